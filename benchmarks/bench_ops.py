"""pytest-benchmark suite: lipkern's fused ops side by side with their baselines.

Run with ``pytest benchmarks/ --benchmark-only`` (not part of ``pytest tests``). Each group is
one op on one shape and dtype, holding lipkern's callable and the baselines ``lipkern bench``
compares it with (the hand-written remap ``torch.where(act(x).abs() < t, 0, act(x))`` and
lipkern's reference, each eager and under ``torch.compile``, the bare activation, ``copy_``), so
pytest-benchmark's table shows them together. The callables and the grouping come from
:mod:`lipkern.tools.bench`; set ``LIPKERN_BENCH_SHAPES`` (comma-separated ``lipkern bench --shape``
strings), ``LIPKERN_BENCH_DTYPES`` (e.g. ``fp32,bf16``), ``LIPKERN_BENCH_ACT``,
``LIPKERN_BENCH_BATCH``, ``LIPKERN_BENCH_BACKEND`` (CPU backend, default the C++ kernels) and
``LIPKERN_BENCH_INPUT_STD`` (the inputs' standard deviation, default 1) to change the
configurations; CUDA groups (the Triton backend) run when a GPU is present.
"""

import functools
import os

import pytest
import torch

from lipkern.tools import bench

ACT = os.environ.get("LIPKERN_BENCH_ACT", "gelu")
SHAPES = (
    [bench.parse_shape(s) for s in os.environ["LIPKERN_BENCH_SHAPES"].split(",")]
    if os.environ.get("LIPKERN_BENCH_SHAPES")
    else bench.default_shapes(int(os.environ.get("LIPKERN_BENCH_BATCH", "16")))
)
DTYPES = os.environ.get("LIPKERN_BENCH_DTYPES", "fp32,bf16").split(",")
CPU_BACKEND = os.environ.get("LIPKERN_BENCH_BACKEND", "auto")


def _input_std() -> float:
    text = os.environ.get("LIPKERN_BENCH_INPUT_STD", "1")
    try:
        std = float(text)
    except ValueError:
        std = float("nan")
    if not std > 0 or std == float("inf"):
        raise ValueError(f"LIPKERN_BENCH_INPUT_STD must be a positive number, got {text!r}")
    return std


INPUT_STD = _input_std()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _members(subject):
    """lipkern's timing for ``subject`` followed by the baselines it is compared with."""
    return [subject.timing] + [baseline.timing for baseline in subject.baselines]


@functools.lru_cache(maxsize=2)
def _candidates(shape, dtype_name, device):
    backend = "triton" if device == "cuda" else CPU_BACKEND
    return bench.candidates(
        shape, bench.DTYPES[dtype_name], ACT, True, backend, device, input_std=INPUT_STD
    )


CASES = [
    pytest.param(shape, dtype, device, op, name, id=f"{device}-{shape.label}-{dtype}-{op}-{name}")
    for device in DEVICES
    for shape in SHAPES
    for dtype in DTYPES
    for subject in bench.SUBJECTS
    for op in [subject.op]
    for name in _members(subject)
]


@pytest.mark.parametrize("shape,dtype,device,op,name", CASES)
def test_op(benchmark, shape, dtype, device, op, name):
    fn = _candidates(shape, dtype, device)[name]
    if device == "cuda":
        run = fn

        def fn():
            run()
            torch.cuda.synchronize()

    benchmark.group = f"{device} {op} {shape.label} {dtype} ({ACT}, inputs std {INPUT_STD:g})"
    benchmark.extra_info.update(op=op, lipkern=name.startswith("lipkern"))
    with bench.retained_backward_graphs():
        fn()  # warm-up; compiles the torch.compile baselines
        benchmark(fn)
