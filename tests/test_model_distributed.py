"""Distributed calibration: 2 gloo processes on different shards == one process on all data."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lipkern.calibrate import calibrate
from lipkern.convert import convert
from lipkern.nn import remap_modules
from model_helpers import model_backend
from test_model_calibrate import Blocks

WORLD = 2
SETTINGS = [
    dict(granularity="channel", statistic="max", center=None),
    dict(granularity="tensor", statistic="quantile:0.99", center="mean"),
]


def _model():
    torch.manual_seed(3)
    return convert(Blocks().eval(), inputs_of=("*fc1", "*fc2"), backend=model_backend())


def _data():
    generator = torch.Generator().manual_seed(4)
    # Shards of different sizes and scales, so that each rank alone gets other thresholds.
    return [torch.randn(2, 5, 8, generator=generator) * (1 + i) for i in range(5)]


def _shard(rank, data, empty_rank=None):
    if rank == empty_rank:
        return []
    return data[:2] if rank == 0 else data[2:]


def _snapshot(model):
    return {
        name: {
            "threshold": m.threshold.clone(),
            "center": m.center.clone(),
            "stats": m.stats,
            "hist": m.hist.clone(),
            "redundant": m.redundant,
        }
        for name, m in remap_modules(model)
    }


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = []
        for settings in SETTINGS:
            model = _model()
            calibrate(model, _shard(rank, _data()), c_r=2**-5, progress=False, **settings)
            results.append(_snapshot(model))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Rank 1 has no data: every rank must raise instead of waiting for it.
        try:
            calibrate(_model(), _shard(rank, _data(), empty_rank=1), progress=False)
            message = "no error"
        except ValueError as error:
            message = f"ValueError: {error}"
        with open(os.path.join(out_dir, f"rank{rank}.empty"), "w") as handle:
            handle.write(message)
        # Rank 1 passes one tensor as its data: refused there, and every other rank raises too.
        try:
            data = torch.randn(4, 8) if rank == 1 else _shard(rank, _data())
            calibrate(_model(), data, progress=False)
            message = "no error"
        except (TypeError, RuntimeError) as error:
            message = f"{type(error).__name__}: {error}"
        with open(os.path.join(out_dir, f"rank{rank}.bad_data"), "w") as handle:
            handle.write(message)
    except Exception as error:  # reported to the parent process through a file
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as handle:
            handle.write(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One 2-process run shared by the tests (starting processes costs seconds each)."""
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    errors = list(out.glob("*.err"))
    assert not errors, errors[0].read_text()
    return out


def test_two_gloo_processes_equal_one_process(spawned):
    ranks = [torch.load(spawned / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for index, settings in enumerate(SETTINGS):
        single = _model()
        calibrate(single, _data(), c_r=2**-5, progress=False, **settings)
        expected = _snapshot(single)
        for rank in ranks:
            got = rank[index]
            assert got.keys() == expected.keys()
            for name, want in expected.items():
                have = got[name]
                assert have["redundant"] == want["redundant"]
                if want["redundant"]:  # fc2 reads the GELU output: not scanned
                    assert have["stats"] is None and have["threshold"].numel() == 0
                    continue
                assert torch.equal(have["threshold"], want["threshold"]), (settings, name)
                assert torch.equal(have["stats"].amax, want["stats"].amax)
                assert torch.equal(have["stats"].count, want["stats"].count)
                assert torch.equal(have["hist"], want["hist"])
                torch.testing.assert_close(
                    have["stats"].sum, want["stats"].sum, rtol=1e-12, atol=1e-12
                )
                torch.testing.assert_close(have["center"], want["center"], rtol=1e-6, atol=1e-7)
    # Calibrating a rank's shard alone would give other thresholds: the reduction mattered.
    alone = _model()
    calibrate(alone, _shard(0, _data()), c_r=2**-5, progress=False, **SETTINGS[0])
    assert not torch.equal(
        alone.blocks[1].act.threshold, ranks[0][0]["blocks.1.act"]["threshold"]
    )


def test_error_on_one_rank_is_raised_on_every_rank(spawned):
    """Each rank says whose data was empty: its own (rank 1) or another's."""
    for rank in range(WORLD):
        message = (spawned / f"rank{rank}.empty").read_text()
        expected = "data is empty" if rank == 1 else "another rank's data is empty"
        assert message.startswith(f"ValueError: {expected}"), (rank, message)


def test_a_bad_argument_on_one_rank_is_raised_on_every_rank(spawned):
    for rank in range(WORLD):
        message = (spawned / f"rank{rank}.bad_data").read_text()
        expected = ("TypeError: data must be an iterable of batches, got one tensor" if rank == 1 else
                    "RuntimeError: lipkern.calibrate failed on another rank")
        assert message.startswith(expected), (rank, message)
