"""The C++ kernels' own ratios, each timed side by side in one process: fwd+stats over the fused
forward, the forward over PyTorch's activation, and the backward over PyTorch's activation
backward (`torch.ops.aten.*_backward`).

    python benchmarks/kernel_ratios.py [stats|fwd|bwd|all] [--threads N] [--rounds R] [--scale S]
                                       [--rows N]

Inputs are standard normal times --scale (default 1). The smooth activations' fp32 grid ends at
|x| = 3.875 (GELU, tanh-GELU) and 7.75 (SiLU); lanes beyond it are evaluated in float64 (in
GELU's backward: act'(x) from a second grid, the value's estimate from an fp32 tail), so their
speed depends on how far the inputs spread.

Thresholds (the `thr` column): per channel, a per-tensor zero, per channel with centres, and per
channel below 2.1e-4 (see `thresholds`); the statistics take the first two.

The fwd and bwd tables take [rows, 1024] inputs, 4096 rows unless --rows says otherwise (an
attack's backward on a small batch has far fewer). Their calls repeat one parameter set, as a
layer's do: data the backward searches per channel and set is made once (see
csrc/cpu/param_cache.h), not per call.

Each ratio takes the 10th percentile of single calls, alternated between the two subjects, so
that calls another process slowed down drop out; ratios move by about 10 % between runs on a
shared machine. The allocator is held steady as `lipkern bench` holds it.
"""

from __future__ import annotations

import argparse
import time

import torch

import lipkern  # noqa: F401  (registers torch.ops.lipkern)
from lipkern import _ext
from lipkern.tools.bench import steady_allocator
from lipkern.tools.table import format_table

OPS = torch.ops.lipkern
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"rows": (4096, 1024), "nchw": (16, 256, 28, 28), "nchw_cl": (16, 256, 28, 28)}
ATEN_FORWARD = {
    "gelu": lambda x: torch.ops.aten.gelu(x),
    "gelu_tanh": lambda x: torch.ops.aten.gelu(x, approximate="tanh"),
    "silu": lambda x: torch.ops.aten.silu(x),
}
ATEN_BACKWARD = {
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
}


def side_by_side(subjects: dict, rounds: int) -> dict:
    times = {name: [] for name in subjects}
    for f in subjects.values():
        f()
    for _ in range(rounds):
        for name, f in subjects.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 10] for name, t in times.items()}


def thresholds(channels: int, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Thresholds and centres of one kind: per channel (`channel`), a per-tensor zero (what a
    calibration scan runs: `tensor0`), per channel with per-channel centres (the MeanSparse
    variant: `centred`), and per-channel thresholds below 2.1e-4, as a dead channel's calibrated
    c^r max|a| can be (`tiny`: GELU's fp32 backward searches each channel's tail interval)."""
    if kind == "channel":
        return torch.rand(channels) * 0.5, None
    if kind == "centred":
        return torch.rand(channels) * 0.2, torch.rand(channels) * 0.3
    if kind == "tiny":
        return torch.rand(channels) * 2e-4, None
    return torch.tensor(0.0), None


def stats(rounds: int, scale: float) -> None:
    rows = []
    for act in ("gelu", "relu", "identity"):
        for dtype in DTYPES:
            for layout, shape in LAYOUTS.items():
                for kind in ("channel", "tensor0"):
                    x = (torch.randn(shape) * scale).to(DTYPES[dtype])
                    if layout == "nchw_cl":
                        x = x.to(memory_format=torch.channels_last)
                    t, _ = thresholds(x.shape[1], kind)
                    r = side_by_side(
                        {
                            "fwd": lambda: OPS.remap_act(x, t, None, act, 1, False),
                            "stats": lambda: OPS.remap_act_stats(x, t, None, act, 1),
                        },
                        rounds,
                    )
                    rows.append((act, dtype, layout, kind, f"{r['fwd'] * 1e3:.3f}",
                                 f"{r['stats'] * 1e3:.3f}", f"{r['stats'] / r['fwd']:.2f}"))
    header = ("act", "dtype", "layout", "thr", "fwd ms", "stats ms", "stats / fwd")
    print(format_table(header, rows), flush=True)


def against_aten(rounds: int, scale: float, rows_of_x: int, backward: bool) -> None:
    rows = []
    for act in ATEN_BACKWARD:
        for dtype in DTYPES:
            for kind in ("channel", "tensor0", "centred", "tiny"):
                x = (torch.randn(rows_of_x, 1024) * scale).to(DTYPES[dtype])
                g = torch.randn_like(x)
                t, c = thresholds(1024, kind)
                if backward:
                    subjects = {
                        "aten": lambda: ATEN_BACKWARD[act](g, x),
                        "ours": lambda: OPS.remap_act_backward(g, x, t, c, act, 1, False),
                    }
                else:
                    subjects = {
                        "aten": lambda: ATEN_FORWARD[act](x),
                        "ours": lambda: OPS.remap_act(x, t, c, act, 1, False),
                    }
                r = side_by_side(subjects, rounds)
                rows.append((act, dtype, kind, f"{r['aten'] * 1e3:.3f}",
                             f"{r['ours'] * 1e3:.3f}", f"{r['ours'] / r['aten']:.2f}"))
    header = ("act", "dtype", "thr", "aten ms", "lipkern ms", "lipkern / aten")
    print(format_table(header, rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=("stats", "fwd", "bwd", "all"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--scale", type=float, default=1.0, help="input standard deviation")
    parser.add_argument("--rows", type=int, default=4096, help="rows of the fwd and bwd inputs")
    args = parser.parse_args()
    if not args.scale > 0:
        parser.error(f"--scale must be a positive number, got {args.scale}")
    if args.rows < 1:
        parser.error(f"--rows must be a positive number, got {args.rows}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    # With glibc's defaults an output of 16 MB was at times page-faulted in anew on every call
    # (fp32 4096 x 1024 fwd+stats with a zero threshold: 4.5-5.2 ms, 1.0-1.6 ms otherwise).
    if not steady_allocator():
        print("no glibc mallopt: timings may include page faults of fresh outputs")
    # Which build runs: an editable install's finder can load another checkout's extension than
    # the lipkern on PYTHONPATH (an A/B of two builds then times one build twice).
    kernels = _ext.load()
    print(f"kernels: {kernels.__file__} ({kernels.cpu_capability()})")
    print(f"inputs: standard normal x {args.scale:g}, {args.threads} threads, "
          f"fwd and bwd on {args.rows}x1024")
    if args.what in ("stats", "all"):
        stats(args.rounds, args.scale)
    if args.what in ("fwd", "all"):
        against_aten(args.rounds, args.scale, args.rows, backward=False)
    if args.what in ("bwd", "all"):
        against_aten(args.rounds, args.scale, args.rows, backward=True)


if __name__ == "__main__":
    main()
