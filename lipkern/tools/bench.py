"""``lipkern bench``: the fused ops against eager PyTorch, torch.compile, the bare activation and copy_.

Every timing is a median over interleaved rounds (all candidates of one configuration take turns,
so a slow drift of the machine hits them alike), after warm-up calls that also trigger
``torch.compile``. Results are reported as ratios:

- *speedup* = baseline time / lipkern time (``x faster``), against the eager reference and
  ``torch.compile`` of the reference (forward; forward with statistics; backward; forward+backward
  through autograd);
- *time ratio* = lipkern time / baseline time, against the bare activation (``F.gelu`` etc., the
  floor a fused remap should sit on) and ``copy_`` of the same tensor (the memory-bandwidth floor);
- *bandwidth fraction* = copy_ time / in-place time for the in-place ReLU + remap, which moves the
  same bytes as ``copy_``.

The project's performance targets are printed with each ratio they apply to. On a CUDA machine the
Triton kernels are timed with ``triton.testing.do_bench`` and reported in GB/s and as a fraction
of the device's peak memory bandwidth; without one, the static traffic figures are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import lipkern
from lipkern.ops import reference
from lipkern.ops.activations import lookup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# On x ~ N(0, 1) a threshold of 0.1 remaps about 23 % of GELU outputs, near the 20 % the paper
# reports at FC1 inputs (2^-7 * max|a| would remap almost nothing of a Gaussian).
THRESHOLD = 0.1
# (subject, baseline) -> (ratio kind, comparison, bound): the project's performance targets.
TARGETS = {
    ("fwd", "compile"): ("speedup", ">=", 1.5),
    ("fwd", "act"): ("time", "<=", 1.1),
    ("stats", "compile"): ("speedup", ">=", 4.0),
    ("stats", "fwd"): ("time", "<=", 1.2),
    ("fwd+bwd", "compile"): ("speedup", ">=", 1.5),
    ("inplace", "copy_"): ("bandwidth", ">=", 0.70),
}
# How each subject is compared: baseline name -> ratio kind.
COMPARISONS = {
    "fwd": {"eager": "speedup", "compile": "speedup", "act": "time", "copy_": "time"},
    "stats": {
        "eager": "speedup",
        "compile": "speedup",
        "fwd": "time",
        "act": "time",
        "copy_": "time",
    },
    "bwd": {"eager": "speedup", "compile": "speedup", "act": "time", "copy_": "time"},
    "fwd+bwd": {"eager": "speedup", "compile": "speedup", "act": "time"},
    "inplace": {"eager": "speedup", "copy_": "bandwidth"},
}
# Which timing each (subject, baseline) pair reads. "fwd" as a baseline is lipkern's forward.
BASELINE_TIMING = {
    "fwd": {"eager": "ref", "compile": "compile(ref)", "act": "act", "copy_": "copy_"},
    "stats": {
        "eager": "ref+stats",
        "compile": "compile(ref+stats)",
        "fwd": "lipkern fwd",
        "act": "act",
        "copy_": "copy_",
    },
    "bwd": {"eager": "ref bwd", "compile": "compile(ref bwd)", "act": "act bwd", "copy_": "copy_"},
    "fwd+bwd": {"eager": "ref fwd+bwd", "compile": "compile(ref) fwd+bwd", "act": "act fwd+bwd"},
    "inplace": {"eager": "ref relu in-place", "copy_": "copy_"},
}
SUBJECT_TIMING = {
    "fwd": "lipkern fwd",
    "stats": "lipkern fwd+stats",
    "bwd": "lipkern bwd",
    "fwd+bwd": "lipkern fwd+bwd",
    "inplace": "lipkern relu in-place",
}


@dataclass(frozen=True)
class Shape:
    """A benchmark tensor: its sizes, channel axis and memory format."""

    label: str
    sizes: tuple
    channel_dim: int
    channels_last: bool = False

    def make(self, dtype, seed=0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.sizes, generator=gen, dtype=torch.float32).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n


def parse_shape(text: str) -> Shape:
    """``4096x1024`` ([rows, C], channel_dim -1), ``nlc:NxLxC``, ``nchw:NxCxHxW``, ``nchw_cl:...``."""
    kind, _, dims = text.rpartition(":")
    try:
        sizes = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: sizes must be integers joined by 'x'") from None
    if any(size < 1 for size in sizes):
        raise ValueError(f"shape {text!r}: every size must be >= 1")
    kind = kind.lower()
    if kind in ("", "nlc", "nc"):
        return Shape(text, sizes, -1)
    if kind in ("nchw", "nchw_cl"):
        if len(sizes) != 4:
            raise ValueError(f"shape {text!r}: {kind} needs 4 sizes")
        return Shape(text, sizes, 1, channels_last=kind == "nchw_cl")
    raise ValueError(f"shape {text!r}: unknown layout {kind!r} (use nlc, nchw or nchw_cl)")


def cuda_extra_shapes(shapes) -> list[Shape]:
    """The bandwidth target is for >= 16 Mi elements: add such a shape on CUDA."""
    if any(s.numel >= 1 << 24 for s in shapes):
        return []
    return [Shape("4096x4096", (4096, 4096), -1)]


def default_shapes(batch: int) -> list[Shape]:
    return [
        Shape("4096x1024", (4096, 1024), -1),
        Shape(f"NLC {batch}x3136x192", (batch, 3136, 192), -1),
        Shape(f"NCHW {batch}x192x56x56", (batch, 192, 56, 56), 1),
        Shape(f"NCHW-cl {batch}x192x56x56", (batch, 192, 56, 56), 1, channels_last=True),
    ]


# --------------------------------------------------------------------------------------------
# Timing


def median_times(
    fns: dict[str, Callable[[], object]],
    min_time: float,
    max_rounds: int = 15,
    warmup: float = 0.02,
) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds.

    Each function is warmed up twice (compiling where it is compiled), then called in blocks
    long enough to make timer overhead negligible (>= ~20 ms); blocks of all functions
    alternate, each round starting one function later, each function getting about ``min_time``
    seconds (at least 3 blocks), each block after ``warmup`` seconds of untimed calls.
    """
    per_call, block, rounds = {}, {}, {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - start, 1e-7)
        block[name] = max(1, int(0.02 / per_call[name]))
        rounds[name] = min(max_rounds, max(3, round(min_time / (block[name] * per_call[name]))))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(rounds.values(), default=0)):
        # Each round starts one candidate later, so that whatever a round's start leaves behind
        # (its first block once ran about 40 % slow after a single untimed call, whichever
        # candidate it was) reaches each candidate in only a few of its rounds.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            if r >= rounds[name]:
                continue
            # Untimed: after another candidate's block, the next ~10 calls of any candidate
            # (clone and F.gelu included) ran up to 1.6x slower here, a warm-up of the memory
            # system that would otherwise land on each block's first half; medians then compare
            # steady states.
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < warmup:
                fn()
            start = time.perf_counter()
            for _ in range(block[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / block[name])
    return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------------------------------
# Candidates


def _bare_activation(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """PyTorch's own activation in the storage dtype (what a model without lipkern runs)."""
    return torch.clone if act == "identity" else lookup(act).torch_fn


def _fwd_bwd(fn, x, dy):
    """Forward and backward through autograd (the training step's share of the op)."""

    def run():
        xr = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(xr), xr, dy)

    return run


def _bwd_only(fn, x, dy):
    """The backward alone: autograd through a forward graph built on first call and retained."""
    graph = {}

    def run():
        if not graph:
            graph["x"] = x.detach().requires_grad_(True)
            graph["y"] = fn(graph["x"])
        return torch.autograd.grad(graph["y"], graph["x"], dy, retain_graph=True)

    return run


def candidates(
    shape: Shape,
    dtype: torch.dtype,
    act: str,
    compile_baselines: bool,
    backend: str = "auto",
    device: str = "cpu",
) -> dict[str, Callable[[], object]]:
    """The timed callables of one configuration, keyed by the names BASELINE_TIMING uses."""
    x = shape.make(dtype).to(device)
    dy = shape.make(dtype, seed=1).to(device)
    cd = shape.channel_dim % x.dim()
    channels = x.shape[cd]
    t = torch.full((channels,), THRESHOLD, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    inplace_buf = x.clone()
    ref_buf = x.clone()
    bare = _bare_activation(act)

    def ref_fwd(x_):
        return reference.remap_act_reference(x_, t, None, act, cd)

    def ref_stats(x_):
        return reference.remap_act_stats_reference(x_, t, None, act, cd)

    def lipkern_fwd(x_):
        return lipkern.remap_act(x_, t, act, channel_dim=cd, backend=backend)

    no_grad = torch.no_grad()
    fns = {
        "lipkern fwd": no_grad(lambda: lipkern_fwd(x)),
        "lipkern fwd+stats": no_grad(
            lambda: lipkern.remap_act_stats(x, t, act, channel_dim=cd, backend=backend)
        ),
        "lipkern bwd": _bwd_only(lipkern_fwd, x, dy),
        "lipkern fwd+bwd": _fwd_bwd(lipkern_fwd, x, dy),
        "lipkern relu in-place": no_grad(
            lambda: lipkern.remap_act_(inplace_buf, t, "relu", channel_dim=cd, backend=backend)
        ),
        "ref": no_grad(lambda: ref_fwd(x)),
        "ref+stats": no_grad(lambda: ref_stats(x)),
        "ref bwd": _bwd_only(ref_fwd, x, dy),
        "ref fwd+bwd": _fwd_bwd(ref_fwd, x, dy),
        "ref relu in-place": no_grad(
            lambda: reference.remap_act_inplace_reference(ref_buf, t, None, "relu", cd)
        ),
        "act": no_grad(lambda: bare(x)),
        "act bwd": _bwd_only(bare, x, dy),
        "act fwd+bwd": _fwd_bwd(bare, x, dy),
        "copy_": lambda: out.copy_(x),
    }
    if compile_baselines:
        # Every configuration compiles the same code objects anew: without a reset, dynamo's
        # recompile limit (8) is reached after a few shapes and it silently falls back to eager.
        torch._dynamo.reset()
        compiled_fwd = torch.compile(ref_fwd, dynamic=False)
        compiled_stats = torch.compile(ref_stats, dynamic=False)
        fns["compile(ref)"] = no_grad(lambda: compiled_fwd(x))
        fns["compile(ref+stats)"] = no_grad(lambda: compiled_stats(x))
        # With x requiring grad the same compiled function traces a joint forward-backward graph.
        fns["compile(ref bwd)"] = _bwd_only(compiled_fwd, x, dy)
        fns["compile(ref) fwd+bwd"] = _fwd_bwd(compiled_fwd, x, dy)
    return fns


# --------------------------------------------------------------------------------------------
# Ratios


def compare(times: dict[str, float]) -> list[dict]:
    """The ratio rows of one configuration (skipping baselines that were not timed)."""
    rows = []
    for subject, baselines in COMPARISONS.items():
        mine = times.get(SUBJECT_TIMING[subject])
        if mine is None:
            continue
        for baseline, kind in baselines.items():
            theirs = times.get(BASELINE_TIMING[subject][baseline])
            if theirs is None:
                continue
            ratio = mine / theirs if kind == "time" else theirs / mine
            row = {
                "op": subject,
                "baseline": BASELINE_TIMING[subject][baseline],
                "lipkern_ms": mine * 1e3,
                "baseline_ms": theirs * 1e3,
                "kind": kind,
                "ratio": ratio,
                "target": None,
                "met": None,
            }
            target = TARGETS.get((subject, baseline))
            if target is not None:
                _, op, bound = target
                row["target"] = f"{op}{bound:g}"
                row["met"] = ratio >= bound if op == ">=" else ratio <= bound
            rows.append(row)
    return rows


# Bytes an ideal kernel moves for each timed callable, in units of x's size: the forward
# reads x and writes y; the backward reads dy and x and writes dx.
TRAFFIC = {
    "lipkern fwd": 2, "lipkern fwd+stats": 2, "lipkern bwd": 3, "lipkern fwd+bwd": 5,
    "lipkern relu in-place": 2, "ref": 2, "compile(ref)": 2, "act": 2, "copy_": 2,
}


def effective_bandwidth(times: dict[str, float], x_bytes: int) -> dict[str, float]:
    """GB/s of each timed callable, counting the bytes an ideal kernel would move."""
    return {name: TRAFFIC[name] * x_bytes / times[name] / 1e9 for name in TRAFFIC if name in times}


def format_bandwidth(results: list[dict], peak_gbs: Optional[float] = None) -> str:
    """One line per configuration: GB/s of each callable (and its fraction of ``peak_gbs``)."""
    names = [n for n in TRAFFIC if any(n in c["GB/s"] for c in results)]
    header = ["shape", "dtype"] + names
    body = []
    for c in results:
        cells = []
        for n in names:
            gbs = c["GB/s"].get(n)
            text = "-" if gbs is None else f"{gbs:.3g}"
            if gbs is not None and peak_gbs:
                text += f" ({gbs / peak_gbs:.0%})"
            cells.append(text)
        body.append([c["shape"], c["dtype"]] + cells)
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


_KIND_TEXT = {"speedup": "{:.2f}x faster", "time": "{:.2f} of time", "bandwidth": "{:.0%} of bw"}


def format_rows(results: list[dict]) -> str:
    header = ("shape", "dtype", "op", "lipkern ms", "baseline", "base ms", "ratio", "target", "met")
    body = []
    for config in results:
        for row in config["comparisons"]:
            met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
            ratio = _KIND_TEXT[row["kind"]].format(row["ratio"])
            target = ""
            if row["target"]:
                target = row["target"] + {"speedup": "x", "time": "", "bandwidth": ""}[row["kind"]]
            body.append(
                (
                    config["shape"],
                    config["dtype"],
                    row["op"],
                    f"{row['lipkern_ms']:.3f}",
                    row["baseline"],
                    f"{row['baseline_ms']:.3f}",
                    ratio,
                    target,
                    met,
                )
            )
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CUDA (Triton) and static traffic


def cuda_peak_bandwidth(device=None) -> float:
    """Peak DRAM bandwidth in bytes/s from the memory clock (kHz, double data rate) and bus."""
    props = torch.cuda.get_device_properties(device)
    return 2.0 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def bench_cuda(shapes, dtypes, act, compile_baselines=True) -> list[dict]:
    """The Triton backend on CUDA (``do_bench`` medians): ratios and GB/s."""
    from triton.testing import do_bench

    results = []
    for shape in shapes:
        for dtype_name in dtypes:
            fns = candidates(
                shape, DTYPES[dtype_name], act, compile_baselines, backend="triton", device="cuda"
            )
            times = {name: do_bench(fn, return_mode="median") * 1e-3 for name, fn in fns.items()}
            x_bytes = shape.numel * torch.empty((), dtype=DTYPES[dtype_name]).element_size()
            results.append(
                {
                    "shape": shape.label,
                    "dtype": dtype_name,
                    "elements": shape.numel,
                    "times_ms": {k: v * 1e3 for k, v in times.items()},
                    "GB/s": effective_bandwidth(times, x_bytes),
                    "comparisons": compare(times),
                }
            )
    return results


def format_cuda(results: list[dict], peak: float) -> str:
    return format_bandwidth(results, peak / 1e9) + "\n\n" + format_rows(results)


def static_traffic() -> Optional[str]:
    """The Triton engineer's static traffic table (bytes per element, time at H100 bandwidth)."""
    try:
        from lipkern.ops import triton_backend
    except ImportError as error:
        return f"(Triton backend unavailable: {error})"
    table = getattr(triton_backend, "static_traffic_table", None)
    return None if table is None else str(table())


# --------------------------------------------------------------------------------------------
# Driver


def _shape_argument(text: str) -> Shape:
    # argparse reports a type's ValueError as "invalid value" only; this keeps the reason.
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser) -> None:
    from lipkern.cli import output_file, positive

    parser.add_argument("--quick", action="store_true", help="4096x1024 fp32 only")
    parser.add_argument(
        "--shape",
        action="append",
        type=_shape_argument,
        help="AxB ([rows, C]), nlc:NxLxC, nchw:NxCxHxW or nchw_cl:NxCxHxW (repeatable)",
    )
    parser.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="repeatable")
    parser.add_argument("--act", default="gelu", choices=reference.ACTIVATIONS)
    parser.add_argument(
        "--backend", default="auto", choices=("auto", "cpu", "triton", "reference"),
        help="lipkern backend timed on the CPU (auto: the C++ kernels)",
    )
    parser.add_argument(
        "--batch", type=positive(int), default=16, help="batch of the [N, L, C] and NCHW shapes (16)"
    )
    parser.add_argument(
        "--threads", type=positive(int), default=os.cpu_count(), help="torch threads"
    )
    parser.add_argument(
        "--min-time", type=positive(float), default=0.4,
        help="seconds of timing per candidate (0.4)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baselines"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler tables of lipkern and compiled-reference calls (first config)",
    )
    parser.add_argument(
        "--json", metavar="FILE", type=output_file, help="also write the results as JSON to FILE"
    )


PROFILED = ("lipkern fwd", "compile(ref)", "lipkern fwd+stats", "compile(ref+stats)", "lipkern bwd")


def profile(fns: dict[str, Callable[[], object]], calls: int = 5) -> None:
    """Where the time goes: the operators each of the PROFILED callables runs (already warm)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in PROFILED:
        if name not in fns:
            continue
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fns[name]()
        print(f"\nprofile of {name!r} ({calls} calls):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def steady_allocator() -> bool:
    """Keep freed memory in glibc's heap, so a candidate's time does not depend on the last one.

    With glibc's defaults, a candidate that frees many large temporaries (the eager reference)
    shrinks the heap, and the next candidate's outputs are page-faulted in anew: measured here,
    ``F.relu`` on 4096x1024 fp32 took 1.1 ms right after the eager reference and 0.61 ms
    otherwise. Raising the trim threshold and pinning the mmap threshold at its maximum (32 MiB)
    is the state a long-running process's allocator settles into. Returns False where there is
    no glibc ``mallopt``.
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _warn_if_busy(load: float) -> None:
    # With every core given to torch, one competing process stalls OpenMP's barriers and a
    # 60 us kernel can take a scheduler time slice (~15 ms): such timings mean nothing.
    if load > torch.get_num_threads() - 0.5:
        print(
            f"warning: 1-minute load average {load:.1f} with {torch.get_num_threads()} torch "
            "threads: other processes compete for the cores, timings are unreliable"
        )


def run(args) -> dict:
    """Run the benchmark described by parsed ``args``; prints the tables, returns the results."""
    torch.set_num_threads(args.threads)
    steady = steady_allocator()
    shapes = args.shape or (default_shapes(args.batch)[:1] if args.quick else default_shapes(args.batch))
    dtypes = args.dtype or (["fp32"] if args.quick else ["fp32", "bf16"])
    print(
        f"lipkern bench: CPU, {torch.get_num_threads()} threads, backend={args.backend}, act={args.act}, "
        f"threshold={THRESHOLD} per channel, torch {torch.__version__}"
        + ("" if steady else " (no glibc mallopt: timings may depend on candidate order)")
    )
    load_before = os.getloadavg()[0]
    _warn_if_busy(load_before)
    results = []
    for shape in shapes:
        for dtype_name in dtypes:
            fns = candidates(
                shape, DTYPES[dtype_name], args.act, not args.no_compile, args.backend
            )
            times = median_times(fns, args.min_time)
            if args.profile and not results:
                profile(fns)
            x_bytes = shape.numel * torch.empty((), dtype=DTYPES[dtype_name]).element_size()
            results.append(
                {
                    "shape": shape.label,
                    "sizes": list(shape.sizes),
                    "channel_dim": shape.channel_dim,
                    "channels_last": shape.channels_last,
                    "dtype": dtype_name,
                    "times_ms": {k: v * 1e3 for k, v in times.items()},
                    "GB/s": effective_bandwidth(times, x_bytes),
                    "comparisons": compare(times),
                }
            )
            print(f"  timed {shape.label} {dtype_name}", flush=True)
    print(format_rows(results))
    print("\neffective bandwidth, GB/s (bytes an ideal kernel moves / median time):")
    print(format_bandwidth(results))
    load_after = os.getloadavg()[0]
    _warn_if_busy(load_after)
    report = {
        "load_average_1min": [load_before, load_after],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "act": args.act,
        "backend": args.backend,
        "threshold": THRESHOLD,
        "torch": torch.__version__,
        "cpu": results,
        "targets_met": all(
            row["met"] for config in results for row in config["comparisons"] if row["met"] is not None
        ),
    }
    if torch.cuda.is_available():
        print(f"\nCUDA: {torch.cuda.get_device_name()}, Triton backend, do_bench medians")
        cuda = bench_cuda(shapes + cuda_extra_shapes(shapes), dtypes, args.act, not args.no_compile)
        peak = cuda_peak_bandwidth()
        print(f"effective bandwidth, GB/s (fraction of the {peak / 1e9:.0f} GB/s peak):")
        print(format_cuda(cuda, peak))
        report["cuda"] = {"peak_GB/s": peak / 1e9, "results": cuda}
    else:
        print("\nno CUDA device: Triton kernels not timed; static traffic figures instead:")
        table = static_traffic()
        print(table if table is not None else "(lipkern.ops.triton_backend has no static_traffic_table)")
        report["cuda"] = None
        report["static_traffic"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def run_from_args(args) -> int:
    run(args)
    return 0
