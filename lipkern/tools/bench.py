"""``lipkern bench``: the fused ops against what a user would run without lipkern.

Every timing is a median over interleaved rounds (all candidates of one configuration take turns,
so a slow drift of the machine hits them alike), after warm-up calls that also trigger
``torch.compile``. Baselines come in kinds, and each op is reported against the *fastest*
baseline of each kind, always as a speed-up (baseline time / lipkern time; below 1 it is spelled
out as "x slower"):

- ``eager``: the remap a user writes by hand (``a = F.gelu(x); torch.where(a.abs() < t, 0, a)``,
  plus the statistics with ``amax`` / ``sum`` reductions) and lipkern's eager reference;
- ``compiled``: ``torch.compile`` of both;
- ``act``: the bare activation (``F.gelu`` etc.), the floor a fused remap should sit on;
- ``copy_``: a copy of the same tensor, the memory-bandwidth floor;
- ``fwd`` (statistics only): lipkern's own forward, what the statistics cost on top.

The ``target`` column is the project's goal for that ratio, a minimum speed-up; ``met`` says
whether this run reached it. A baseline whose rounds spread widely (interquartile range above
``NOISY_SPREAD`` of its median) is flagged: the machine was busy, re-run before quoting. On a
CUDA machine the Triton kernels are timed with ``triton.testing.do_bench`` and reported in GB/s
and as a fraction of ``copy_``'s; without one, the static traffic figures are printed.
``--sweep`` times the forward, statistics and backward over sizes 2^10 to 2^26 and writes a
throughput-vs-size PNG and JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch._functorch.config

import lipkern
from lipkern import _ext
from lipkern.ops import reference
from lipkern.ops.activations import ACTIVATIONS, lookup
from lipkern.tools.table import format_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# On x ~ N(0, 1) a threshold of 0.1 remaps about 23 % of GELU outputs, near the 20 % the paper
# reports at FC1 inputs (2^-7 * max|a| would remap almost nothing of a Gaussian).
THRESHOLD = 0.1
# Interquartile range / median of a candidate's rounds above which its timing is called noisy:
# on an idle machine the rounds of one candidate agree within a few per cent.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Baseline:
    """A timed callable a subject is compared with, and the kind whose fastest member counts."""

    timing: str
    kind: str


@dataclass(frozen=True)
class Subject:
    """One lipkern op as timed: its callable, the baselines it is compared with, the project's
    goal (minimum speed-up against the fastest baseline of ``target_kind``) and the bytes an
    ideal kernel moves, in units of x's size."""

    op: str
    timing: str
    baselines: tuple
    traffic: int
    target_kind: Optional[str] = None
    target: Optional[float] = None


def _eager_and_compiled(name: str) -> tuple:
    """The hand-written and reference variants of ``name``, eager and compiled."""
    return (
        Baseline(f"hand {name}", "eager"),
        Baseline(f"ref {name}", "eager"),
        Baseline(f"compile(hand) {name}", "compiled"),
        Baseline(f"compile(ref) {name}", "compiled"),
    )


SUBJECTS = (
    Subject(
        "fwd", "lipkern fwd",
        _eager_and_compiled("fwd") + (Baseline("act fwd", "act"), Baseline("copy_", "copy_")),
        traffic=2, target_kind="act", target=1 / 1.1,
    ),
    Subject(
        "stats", "lipkern fwd+stats",
        _eager_and_compiled("fwd+stats")
        + (Baseline("lipkern fwd", "fwd"), Baseline("act fwd", "act"), Baseline("copy_", "copy_")),
        traffic=2, target_kind="fwd", target=1 / 1.2,
    ),
    Subject(
        "bwd", "lipkern bwd",
        _eager_and_compiled("bwd") + (Baseline("act bwd", "act"), Baseline("copy_", "copy_")),
        traffic=3, target_kind="act", target=1 / 1.1,
    ),
    Subject(
        "fwd+bwd", "lipkern fwd+bwd",
        _eager_and_compiled("fwd+bwd") + (Baseline("act fwd+bwd", "act"),),
        traffic=5, target_kind="compiled", target=1.5,
    ),
    Subject(
        "inplace", "lipkern in-place",
        (Baseline("hand in-place", "eager"), Baseline("ref in-place", "eager"),
         Baseline("copy_", "copy_")),
        traffic=2, target_kind="copy_", target=0.70,
    ),
)
def _traffic_table() -> dict:
    """Bytes an ideal kernel moves for each timed callable, in units of x's size."""
    table = {"copy_": 2}
    for subject in SUBJECTS:
        table[subject.timing] = subject.traffic
        for baseline in subject.baselines:
            table.setdefault(baseline.timing, subject.traffic)
    return table


TRAFFIC = _traffic_table()


@dataclass(frozen=True)
class Shape:
    """A benchmark tensor: its sizes, channel axis and memory format."""

    label: str
    sizes: tuple
    channel_dim: int
    channels_last: bool = False

    def __post_init__(self):
        # A 0-element tensor times nothing but call overhead, and its ratios mean nothing.
        if any(size < 1 for size in self.sizes):
            raise ValueError(
                f"shape {self.label!r}: every size must be >= 1 (got {tuple(self.sizes)}, "
                f"{self.numel} elements)"
            )

    def make(self, dtype, seed=0, std=1.0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(self.sizes, generator=gen, dtype=torch.float32) * std).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def parse_shape(text: str) -> Shape:
    """``4096x1024`` ([rows, C], channel_dim -1), ``nlc:NxLxC``, ``nchw:NxCxHxW``, ``nchw_cl:...``."""
    kind, _, dims = text.rpartition(":")
    try:
        sizes = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: sizes must be integers joined by 'x'") from None
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


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of a candidate's rounds and their interquartile range."""

    median: float
    iqr: float

    @property
    def spread(self) -> float:
        return self.iqr / self.median if self.median > 0 else 0.0


def summarise(samples: list[float]) -> Timing:
    """Median and interquartile range of per-call seconds (one sample: no spread)."""
    if len(samples) < 2:
        return Timing(samples[0], 0.0)
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Timing(statistics.median(samples), q3 - q1)


def retained_backward_graphs():
    """A context in which a compiled backward may run again on its retained graph, as the
    backward-only candidates do (``_bwd_only``): buffers a compiled backward donates forbid that,
    and torch reads the setting on every backward call, not only when compiling (with dynamic
    shapes the donation happens on CPU too), so it holds wherever candidates are timed."""
    import torch._functorch.config

    return torch._functorch.config.patch(donated_buffer=False)


@retained_backward_graphs()
def median_times(
    fns: dict[str, Callable[[], object]],
    min_time: float,
    max_rounds: int = 15,
    warmup: float = 0.02,
) -> dict[str, Timing]:
    """Per-call time of each function, measured in interleaved rounds.

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
    return {name: summarise(s) for name, s in samples.items()}


@retained_backward_graphs()
def cuda_times(fns: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    """Per-call time of each function on CUDA, from ``triton.testing.do_bench``'s quartiles."""
    from triton.testing import do_bench

    times = {}
    for name, fn in fns.items():
        q1, median, q3 = do_bench(fn, quantiles=[0.25, 0.5, 0.75])
        times[name] = Timing(median * 1e-3, (q3 - q1) * 1e-3)
    return times


# --------------------------------------------------------------------------------------------
# Candidates


def _bare_activation(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """PyTorch's own activation in the storage dtype (what a model without lipkern runs)."""
    return torch.clone if act == "identity" else lookup(act).torch_fn


def hand_written_remap(act: str, t: torch.Tensor, channel_dim: int, ndim: int):
    """The remap a user writes without lipkern: ``a = act(x); torch.where(|a| < t, 0, a)``,
    in x's dtype, with ``t`` broadcast along ``channel_dim``."""
    bare = _bare_activation(act)
    t_b = reference.broadcast_per_channel(t, ndim, channel_dim)

    def remap(x):
        a = bare(x)
        return torch.where(a.abs() < t_b, 0, a)

    return remap


def hand_written_stats(act: str, t: torch.Tensor, channel_dim: int, ndim: int):
    """The hand-written remap with the per-channel statistics lipkern returns (amax, remapped,
    count, float64 sum and sum of squares of ``a``)."""
    bare = _bare_activation(act)
    t_b = reference.broadcast_per_channel(t, ndim, channel_dim)
    reduce = [d for d in range(ndim) if d != channel_dim]

    def remap_stats(x):
        a = bare(x)
        small = a.abs() < t_b
        a64 = a.double()
        per_channel = x.numel() // x.shape[channel_dim]
        count = torch.full((x.shape[channel_dim],), per_channel, device=x.device)
        return (
            torch.where(small, 0, a),
            a.abs().amax(reduce).float(),
            small.sum(reduce),
            count,
            a64.sum(reduce),
            (a64 * a64).sum(reduce),
        )

    return remap_stats


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
    dynamic: bool = False,
    input_std: float = 1.0,
) -> dict[str, Callable[[], object]]:
    """The timed callables of one configuration, keyed by the names SUBJECTS use.

    ``dynamic`` compiles the baselines with dynamic shapes (a sweep still compiles them once per
    size: each configuration resets dynamo, see below). ``input_std`` is the inputs' standard
    deviation: the smooth activations' kernels leave their fp32 grid beyond |x| = 3.875 (GELU)
    or 7.75 (SiLU), so wide inputs time other code."""
    x = shape.make(dtype, std=input_std).to(device)
    dy = shape.make(dtype, seed=1).to(device)
    cd = shape.channel_dim % x.dim()
    channels = x.shape[cd]
    t = torch.full((channels,), THRESHOLD, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    buffers = {name: x.clone() for name in ("lipkern", "hand", "ref")}
    bare = _bare_activation(act)
    hand = hand_written_remap(act, t, cd, x.dim())
    hand_stats = hand_written_stats(act, t, cd, x.dim())
    t_b = reference.broadcast_per_channel(t, x.dim(), cd)

    def ref_fwd(x_):
        return reference.remap_act_reference(x_, t, None, act, cd)

    def ref_stats(x_):
        return reference.remap_act_stats_reference(x_, t, None, act, cd)

    def lipkern_fwd(x_):
        return lipkern.remap_act(x_, t, act, channel_dim=cd, backend=backend)

    def hand_inplace():
        # What a user writes in place: the activation's in-place form, then a masked fill.
        buf = buffers["hand"]
        a = buf.relu_() if act == "relu" else buf.copy_(bare(buf))
        return a.masked_fill_(a.abs() < t_b, 0)

    no_grad = torch.no_grad()
    fns = {
        "lipkern fwd": no_grad(lambda: lipkern_fwd(x)),
        "lipkern fwd+stats": no_grad(
            lambda: lipkern.remap_act_stats(x, t, act, channel_dim=cd, backend=backend)
        ),
        "lipkern bwd": _bwd_only(lipkern_fwd, x, dy),
        "lipkern fwd+bwd": _fwd_bwd(lipkern_fwd, x, dy),
        "lipkern in-place": no_grad(
            lambda: lipkern.remap_act_(buffers["lipkern"], t, act, channel_dim=cd, backend=backend)
        ),
        "hand fwd": no_grad(lambda: hand(x)),
        "hand fwd+stats": no_grad(lambda: hand_stats(x)),
        "hand bwd": _bwd_only(hand, x, dy),
        "hand fwd+bwd": _fwd_bwd(hand, x, dy),
        "hand in-place": no_grad(hand_inplace),
        "ref fwd": no_grad(lambda: ref_fwd(x)),
        "ref fwd+stats": no_grad(lambda: ref_stats(x)),
        "ref bwd": _bwd_only(ref_fwd, x, dy),
        "ref fwd+bwd": _fwd_bwd(ref_fwd, x, dy),
        "ref in-place": no_grad(
            lambda: reference.remap_act_inplace_reference(buffers["ref"], t, None, act, cd)
        ),
        "act fwd": no_grad(lambda: bare(x)),
        "act bwd": _bwd_only(bare, x, dy),
        "act fwd+bwd": _fwd_bwd(bare, x, dy),
        "copy_": lambda: out.copy_(x),
    }
    if compile_baselines:
        # Every configuration compiles the same code objects anew: without a reset, dynamo's
        # recompile limit (8) is reached after a few shapes and it silently falls back to eager.
        torch._dynamo.reset()
        compiled = {}
        for variant, fwd, stats in (("ref", ref_fwd, ref_stats), ("hand", hand, hand_stats)):
            compiled_fwd = torch.compile(fwd, dynamic=dynamic)
            compiled_stats = torch.compile(stats, dynamic=dynamic)
            name = f"compile({variant})"
            compiled[f"{name} fwd"] = no_grad(lambda f=compiled_fwd: f(x))
            compiled[f"{name} fwd+stats"] = no_grad(lambda f=compiled_stats: f(x))
            # With x requiring grad the same compiled function traces a joint graph.
            compiled[f"{name} bwd"] = _bwd_only(compiled_fwd, x, dy)
            compiled[f"{name} fwd+bwd"] = _fwd_bwd(compiled_fwd, x, dy)
        # Compiled here, once, and timed under the same setting (median_times, cuda_times).
        with retained_backward_graphs():
            for fn in compiled.values():
                fn()
        fns.update(compiled)
    return fns


# --------------------------------------------------------------------------------------------
# Ratios


def speedup_text(speedup: float) -> str:
    """One unit for every ratio: ``2.41x faster``, or ``1.25x slower`` below 1."""
    if speedup >= 1:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower"


def target_text(subject: Subject) -> Optional[str]:
    if subject.target is None:
        return None
    return f">= {speedup_text(subject.target)}" if subject.target >= 1 else (
        f"<= {speedup_text(subject.target)}"
    )


def compare(times: dict[str, Timing]) -> list[dict]:
    """One row per (subject, baseline kind): the subject against the fastest timed baseline of
    that kind (kinds none of whose baselines were timed are skipped)."""
    rows = []
    for subject in SUBJECTS:
        mine = times.get(subject.timing)
        if mine is None:
            continue
        kinds = {}
        for baseline in subject.baselines:
            if baseline.timing in times:
                kinds.setdefault(baseline.kind, []).append(baseline.timing)
        for kind, names in kinds.items():
            fastest = min(names, key=lambda n: times[n].median)
            theirs = times[fastest]
            speedup = theirs.median / mine.median
            row = {
                "op": subject.op,
                "kind": kind,
                "baseline": fastest,
                "lipkern_ms": mine.median * 1e3,
                "baseline_ms": theirs.median * 1e3,
                "speedup": speedup,
                "noisy": max(mine.spread, theirs.spread) > NOISY_SPREAD,
                "spread": max(mine.spread, theirs.spread),
                "target": None,
                "met": None,
            }
            if kind == subject.target_kind:
                row["target"] = subject.target
                row["met"] = speedup >= subject.target
            rows.append(row)
    return rows


def effective_bandwidth(times: dict[str, Timing], x_bytes: int) -> dict[str, float]:
    """GB/s of each timed callable, counting the bytes an ideal kernel would move."""
    return {
        name: TRAFFIC[name] * x_bytes / times[name].median / 1e9
        for name in TRAFFIC
        if name in times
    }


def format_bandwidth(results: list[dict]) -> str:
    """One line per configuration: GB/s of each lipkern op and its fraction of ``copy_``'s (the
    baselines' figures are in the JSON)."""
    names = [s.timing for s in SUBJECTS] + ["copy_"]
    names = [n for n in names if any(n in c["GB/s"] for c in results)]
    body = []
    for c in results:
        copy = c["GB/s"].get("copy_")
        cells = []
        for n in names:
            gbs = c["GB/s"].get(n)
            text = None if gbs is None else f"{gbs:.3g}"
            if gbs is not None and copy:
                text += f" ({gbs / copy:.0%})"
            cells.append(text)
        body.append([c["shape"], c["dtype"]] + cells)
    return format_table(["shape", "dtype"] + names, body)


LEGEND = (
    "ratio: baseline time / lipkern time against the fastest baseline of the kind "
    "(eager: hand-written remap or lipkern's reference; compiled: torch.compile of either; act: "
    "the bare activation; copy_: a copy of x; fwd: lipkern's own forward). target: the "
    "project's goal for that ratio; met: whether this run reached it. "
    f"noisy: a spread (interquartile range / median of the rounds) above {NOISY_SPREAD:.0%}."
)


def format_rows(results: list[dict]) -> str:
    header = ("shape", "dtype", "op", "vs", "lipkern ms", "fastest baseline", "base ms", "ratio",
              "target", "met", "spread")
    body = []
    noisy = []
    for config in results:
        for row in config["comparisons"]:
            subject = next(s for s in SUBJECTS if s.op == row["op"])
            if row["noisy"]:
                noisy.append(f"{config['shape']} {config['dtype']} {row['op']} vs {row['kind']}")
            body.append((
                config["shape"],
                config["dtype"],
                row["op"],
                row["kind"],
                f"{row['lipkern_ms']:.3f}",
                row["baseline"],
                f"{row['baseline_ms']:.3f}",
                speedup_text(row["speedup"]),
                target_text(subject) if row["target"] is not None else "",
                "" if row["met"] is None else ("yes" if row["met"] else "NO"),
                f"{row['spread']:.0%}" + (" NOISY" if row["noisy"] else ""),
            ))
    lines = [format_table(header, body), LEGEND]
    if noisy:
        lines.append(
            f"warning: NOISY in {len(noisy)} row(s), timings whose spread exceeds "
            f"{NOISY_SPREAD:.0%} ({'; '.join(noisy[:4])}{', ...' if len(noisy) > 4 else ''}): "
            "the machine was busy, re-run before quoting"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CUDA (Triton) and static traffic


def bench_cuda(shapes, dtypes, act, compile_baselines=True, input_std=1.0) -> list[dict]:
    """The Triton backend on CUDA (``do_bench`` quartiles): ratios and GB/s."""
    results = []
    for shape in shapes:
        for dtype_name in dtypes:
            fns = candidates(
                shape, DTYPES[dtype_name], act, compile_baselines, backend="triton", device="cuda",
                input_std=input_std,
            )
            results.append(_result(shape, dtype_name, cuda_times(fns)))
    return results


def _result(shape: Shape, dtype_name: str, times: dict[str, Timing]) -> dict:
    x_bytes = shape.numel * torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    return {
        "shape": shape.label,
        "sizes": list(shape.sizes),
        "channel_dim": shape.channel_dim,
        "channels_last": shape.channels_last,
        "dtype": dtype_name,
        "elements": shape.numel,
        "times_ms": {k: v.median * 1e3 for k, v in times.items()},
        "spread": {k: v.spread for k, v in times.items()},
        "GB/s": effective_bandwidth(times, x_bytes),
        "comparisons": compare(times),
    }


def static_traffic() -> str:
    """The static traffic table of the Triton kernels (bytes per element, time at H100 bandwidth)."""
    try:
        from lipkern.tools import traffic
    except ImportError as error:
        return f"(Triton unavailable: {error})"
    return traffic.static_traffic_table()


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
    parser.add_argument("--act", default="gelu", choices=ACTIVATIONS)
    parser.add_argument(
        "--backend", default="auto", choices=("auto", "cpu", "reference"),
        help="lipkern backend timed on the CPU (auto: the C++ kernels). Triton runs CPU tensors "
             "only in its interpreter, whose timings say nothing of its kernels: --sweep times "
             "them on a GPU, as does scripts/gpu_check.sh",
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
        "--input-std", type=positive(float), default=1.0,
        help="standard deviation of the normal inputs (1); wider inputs leave the smooth "
        "activations' fp32 grid",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler tables of lipkern and compiled-reference calls (first config)",
    )
    parser.add_argument(
        "--json", metavar="FILE", type=output_file, help="also write the results as JSON to FILE"
    )


PROFILED = (
    "lipkern fwd", "compile(hand) fwd", "lipkern fwd+stats", "compile(hand) fwd+stats", "lipkern bwd"
)


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


def warn_if_busy(load: float, seconds_of_this_run: float = 0.0) -> None:
    """Warn when other processes need more cores than torch's threads leave free: one process
    competing for torch's cores stalls OpenMP's barriers, and a 60 us kernel can take a
    scheduler time slice (~15 ms), so such timings mean nothing. ``seconds_of_this_run``: the
    load average was read after timings that ran this long, which count in it as torch's
    threads weighted by how far the 1-minute average has caught up with them."""
    threads = torch.get_num_threads()
    cores = os.cpu_count() or threads
    others = load - threads * (1.0 - math.exp(-seconds_of_this_run / 60.0))
    if others > cores - threads + 0.5:
        print(
            f"warning: 1-minute load average {load:.1f} on {cores} cores with {threads} torch "
            "threads: other processes compete for torch's cores, timings are unreliable"
        )


def cpu_kernel_build() -> dict:
    """The C++ kernels' build in use and how it evaluates the 16-bit smooth activations (timed
    per CPU, see ``lipkern._C.cpu_16bit_method``); empty where the extension is not built."""
    if _ext.missing_reason() is not None:
        return {}
    module = _ext.load()
    return {"capability": module.cpu_capability(), "16bit_method": module.cpu_16bit_method()}


def run(args) -> dict:
    """Run the benchmark described by parsed ``args``; prints the tables, returns the results."""
    torch.set_num_threads(args.threads)
    steady = steady_allocator()
    build = cpu_kernel_build()
    shapes = args.shape or (default_shapes(args.batch)[:1] if args.quick else default_shapes(args.batch))
    dtypes = args.dtype or (["fp32"] if args.quick else ["fp32", "bf16"])
    print(
        f"lipkern bench: CPU, {torch.get_num_threads()} threads, backend={args.backend}, act={args.act}, "
        f"threshold={THRESHOLD} per channel, inputs N(0, {args.input_std:g}^2), "
        f"torch {torch.__version__}"
        + (f", C++ build {build['capability']} (16-bit: {build['16bit_method']})" if build else "")
        + ("" if steady else " (no glibc mallopt: timings may depend on candidate order)")
    )
    load_before, started = os.getloadavg()[0], time.perf_counter()
    warn_if_busy(load_before)
    results = []
    for shape in shapes:
        for dtype_name in dtypes:
            fns = candidates(
                shape, DTYPES[dtype_name], args.act, not args.no_compile, args.backend,
                input_std=args.input_std,
            )
            times = median_times(fns, args.min_time)
            if args.profile and not results:
                profile(fns)
            results.append(_result(shape, dtype_name, times))
            print(f"  timed {shape.label} {dtype_name}", flush=True)
    print(format_rows(results))
    print("\neffective bandwidth, GB/s (bytes an ideal kernel moves / median time; % of copy_'s):")
    print(format_bandwidth(results))
    load_after = os.getloadavg()[0]
    warn_if_busy(load_after, seconds_of_this_run=time.perf_counter() - started)
    report = {
        "load_average_1min": [load_before, load_after],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "act": args.act,
        "backend": args.backend,
        "threshold": THRESHOLD,
        "input_std": args.input_std,
        "torch": torch.__version__,
        "cpu_kernel_build": build,
        "cpu": results,
        "targets_met": all(
            row["met"] for config in results for row in config["comparisons"] if row["met"] is not None
        ),
    }
    if torch.cuda.is_available():
        print(f"\nCUDA: {torch.cuda.get_device_name()}, Triton backend, do_bench medians")
        cuda = bench_cuda(
            shapes + cuda_extra_shapes(shapes), dtypes, args.act, not args.no_compile,
            args.input_std,
        )
        print("effective bandwidth, GB/s (fraction of copy_'s on this device):")
        print(format_bandwidth(cuda) + "\n\n" + format_rows(cuda))
        report["cuda"] = cuda
    else:
        print("\nno CUDA device: Triton kernels not timed; static traffic figures instead:")
        table = static_traffic()
        print(table)
        report["cuda"] = None
        report["static_traffic"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


