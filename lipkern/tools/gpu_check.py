"""The benchmark half of ``scripts/gpu_check.sh``: the Triton kernels against inductor and eager.

For bf16, fp16 and fp32 at 16 Mi elements (``[4096, 4096]``, per-channel thresholds, GELU) it
times lipkern's forward, forward+statistics, backward and in-place remap, the hand-written remap
(eager and ``torch.compile``d), the compiled and eager reference, and ``copy_`` of the same tensor
(``triton.testing.do_bench`` quartiles), and reports GB/s (bytes an ideal kernel moves / median
time) and the fraction of ``copy_``'s GB/s. It then tries other tile sizes and warp counts for
the elementwise and statistics kernels and says, per op and dtype, whether the best of them beats
the shipped configuration by more than ``TUNING_GAIN`` (tuning earns its keep) or not. Everything
goes to ``OUTDIR/gpu_bench.json``; a time budget (``--budget``) skips the tuning it cannot
afford, saying so in the JSON.

``--dry-run`` runs the same code on the CPU through the Triton interpreter, at a tiny size and
without ``torch.compile``, so that the kit is checked on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DTYPES = ("bf16", "fp16", "fp32")
# A tuned configuration must beat the shipped one by this fraction to be worth its complexity.
TUNING_GAIN = 0.05
# (field overrides of triton_kernels.LaunchConfig) tried per kernel family; the shipped
# configuration is always measured too.
ELEMENTWISE_CONFIGS = [
    {"tile": tile, "num_warps": warps} for tile in (2048, 4096, 8192) for warps in (4, 8, 16)
]
STATS_CONFIGS = [
    {"stats_tile": tile, "num_warps": warps} for tile in (1024, 2048, 4096) for warps in (4, 8)
]
# Which configurations each op's timing depends on.
TUNED = {"fwd": ELEMENTWISE_CONFIGS, "bwd": ELEMENTWISE_CONFIGS, "fwd+stats": STATS_CONFIGS}


def parse_args(argv):
    from lipkern.cli import positive

    parser = argparse.ArgumentParser(
        prog="python -m lipkern.tools.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("outdir", help="directory for gpu_bench.json (created)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny size, no torch.compile")
    parser.add_argument("--budget", type=positive(float), default=170.0,
                        help="seconds for the whole benchmark; tuning stops when it is spent")
    args = parser.parse_args(argv)
    if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
        parser.error(f"outdir {args.outdir!r} exists and is not a directory")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is available: run with --dry-run to check the kit on CPU")
    return args


def ops() -> list:
    """(op, lipkern's timing, its eager and compiled baselines) of the four ops checked."""
    from lipkern.tools import bench

    return [
        (subject.timing.removeprefix("lipkern "), subject.timing,
         tuple(b.timing for b in subject.baselines if b.kind in ("eager", "compiled")))
        for subject in bench.SUBJECTS
        if subject.op in ("fwd", "stats", "bwd", "inplace")
    ]


def _timer(dry_run):
    from lipkern.tools import bench

    if dry_run:
        return lambda fns: bench.median_times(fns, 0.002, max_rounds=3, warmup=0.0)
    return bench.cuda_times


def measure(shape, dtype_name, dry_run) -> dict:
    """Every op and baseline at one dtype: GB/s, fraction of copy_'s, speed-ups."""
    from lipkern.tools import bench

    device = "cpu" if dry_run else "cuda"
    fns = bench.candidates(shape, bench.DTYPES[dtype_name], "gelu", not dry_run, "triton", device)
    wanted = ["copy_"] + [name for _, mine, baselines in ops() for name in (mine, *baselines)]
    times = _timer(dry_run)({name: fns[name] for name in wanted if name in fns})
    x_bytes = shape.numel * torch.empty((), dtype=bench.DTYPES[dtype_name]).element_size()
    gbs = bench.effective_bandwidth(times, x_bytes)
    figures = {}
    for op, mine, baselines in ops():
        timed = [b for b in baselines if b in times]
        figures[op] = {
            "lipkern_GB/s": gbs[mine],
            "fraction_of_copy": gbs[mine] / gbs["copy_"],
            "baselines_GB/s": {b: gbs[b] for b in timed},
            "speedup": {b: times[b].median / times[mine].median for b in timed},
            "spread": {n: times[n].spread for n in (mine, *timed)},
        }
    return {"copy_GB/s": gbs["copy_"], "ops": figures}


def tune(shape, dtype_name, dry_run, deadline) -> dict:
    """Per tuned op: the shipped configuration's time, the best tried one's, and the verdict."""
    from lipkern.ops import triton_kernels
    from lipkern.tools import bench

    device = "cpu" if dry_run else "cuda"
    timer = _timer(dry_run)
    shipped = triton_kernels.CONFIG
    fns = bench.candidates(shape, bench.DTYPES[dtype_name], "gelu", False, "triton", device)
    names = {op: mine for op, mine, _ in ops()}
    results = {}
    for op, configs in TUNED.items():
        if time.monotonic() > deadline:
            results[op] = {"skipped": "time budget spent"}
            continue
        tried = {}
        for overrides in [{}] + (configs[:2] if dry_run else configs):
            # The launchers read triton_kernels.CONFIG at every call.
            triton_kernels.CONFIG = shipped._replace(**overrides)
            try:
                tried[json.dumps(overrides)] = timer({op: fns[names[op]]})[op].median
            finally:
                triton_kernels.CONFIG = shipped
        best = min(tried, key=tried.get)
        gain = tried["{}"] / tried[best] - 1
        results[op] = {
            "shipped_ms": tried["{}"] * 1e3,
            "best": json.loads(best),
            "best_ms": tried[best] * 1e3,
            "gain": gain,
            "verdict": "tune" if gain > TUNING_GAIN else "keep the shipped configuration",
            "tried_ms": {k: v * 1e3 for k, v in tried.items()},
        }
    return results


def main(argv=None) -> int:
    from lipkern.cli import prefer_triton_interpreter

    args = parse_args(sys.argv[1:] if argv is None else argv)
    prefer_triton_interpreter()
    from lipkern.tools import bench

    start = time.monotonic()
    deadline = start + args.budget
    shape = (bench.Shape("64x64", (64, 64), -1) if args.dry_run
             else bench.Shape("4096x4096", (4096, 4096), -1))
    bench.steady_allocator()
    report = {
        "device": "cpu (Triton interpreter, dry run)" if args.dry_run
        else torch.cuda.get_device_name(),
        "torch": torch.__version__, "shape": list(shape.sizes), "act": "gelu",
        "threshold": bench.THRESHOLD, "tuning_gain": TUNING_GAIN, "dtypes": {},
    }
    path = os.path.join(args.outdir, "gpu_bench.json")
    os.makedirs(args.outdir, exist_ok=True)
    # Written after every step: a run stopped by the caller's time limit keeps what it finished.
    for dtype_name in DTYPES:
        report["dtypes"][dtype_name] = measure(shape, dtype_name, args.dry_run)
        _write(report, path, start, f"measured {dtype_name}")
    for dtype_name in DTYPES:
        report["dtypes"][dtype_name]["tuning"] = tune(shape, dtype_name, args.dry_run, deadline)
        _write(report, path, start, f"tuned {dtype_name}")
    print(format_report(report))
    print(f"wrote {path}")
    return 0


def _write(report: dict, path: str, start: float, step: str) -> None:
    report["seconds"] = time.monotonic() - start
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"gpu_check: {step} ({report['seconds']:.0f} s)", flush=True)


def format_report(report: dict) -> str:
    from lipkern.tools.bench import speedup_text
    from lipkern.tools.table import format_table

    header = ("dtype", "op", "lipkern GB/s", "of copy_", "vs fastest compiled", "vs fastest eager",
              "tuning")
    body = []
    for dtype_name, result in report["dtypes"].items():
        for op, figures in result["ops"].items():
            kinds = {}
            for name, speedup in figures["speedup"].items():
                kind = "compiled" if name.startswith("compile(") else "eager"
                kinds[kind] = min(kinds.get(kind, float("inf")), speedup)
            tuning = result.get("tuning", {}).get(op, {})
            body.append((
                dtype_name, op, f"{figures['lipkern_GB/s']:.4g}",
                f"{figures['fraction_of_copy']:.0%}",
                speedup_text(kinds["compiled"]) if "compiled" in kinds else None,
                speedup_text(kinds["eager"]) if "eager" in kinds else None,
                tuning.get("skipped") or (
                    f"{tuning['verdict']} ({tuning['gain']:+.1%} with {tuning['best']})"
                    if tuning else None),
            ))
    return format_table(header, body)


if __name__ == "__main__":
    sys.exit(main())
