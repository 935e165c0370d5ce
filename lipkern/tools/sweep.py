"""``lipkern bench --sweep``: throughput of the forward, statistics and backward against size.

Each size 2^k elements (k from ``--sweep-min`` to ``--sweep-max`` in steps of ``--sweep-step``,
2^10 to 2^26 by default) is a ``[2^k / 1024, 1024]`` tensor with per-channel thresholds; lipkern
and the baselines of :mod:`lipkern.tools.bench` (hand-written remap and reference, eager and
``torch.compile``d for any size, the bare activation, ``copy_``) are timed as there. Results are
GB/s (bytes an ideal kernel moves / median time), written as ``sweep.json`` and drawn in
``sweep.png`` (log-log): where lipkern wins, and below which size the call overhead dominates.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch

from lipkern.tools import bench
from lipkern.tools.table import format_table

# Per panel (the op's name in bench's timings): lipkern's timing first, then its baselines.
PANELS = {
    subject.timing.removeprefix("lipkern "): (
        subject.timing, *(b.timing for b in subject.baselines if b.kind != "fwd")
    )
    for subject in bench.SUBJECTS
    if subject.op in ("fwd", "stats", "bwd")
}
COLUMNS = 1024
SMALLEST = 10  # 2^10 elements: one row of COLUMNS
# The sweep's own options and their defaults: given without --sweep, they would be ignored.
SWEEP_DEFAULTS = {"sweep_min": SMALLEST, "sweep_max": 26, "sweep_step": 2, "out": "lipkern-sweep"}


def _exponent(text: str) -> int:
    """An argparse type: a number of elements, a power of two >= 2^10 written ``2^k`` or in
    full, returned as its exponent."""
    try:
        elements = 2 ** int(text[2:]) if text.startswith("2^") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of elements like 2^20, got {text!r}"
        ) from None
    if elements < 1 << SMALLEST or elements & (elements - 1):
        raise argparse.ArgumentTypeError(
            f"must be a power of two >= 2^{SMALLEST} (one row of {COLUMNS}), got {text!r}"
        )
    return elements.bit_length() - 1


def add_arguments(parser) -> None:
    from lipkern.cli import positive

    parser.add_argument(
        "--sweep", action="store_true",
        help="time fwd, fwd+stats and bwd from 2^10 to 2^26 elements; writes sweep.png/.json",
    )
    parser.add_argument("--sweep-min", type=_exponent, default=SWEEP_DEFAULTS["sweep_min"], metavar="N",
                        help="smallest size in elements, a power of two (2^10)")
    parser.add_argument("--sweep-max", type=_exponent, default=SWEEP_DEFAULTS["sweep_max"], metavar="N",
                        help="largest size in elements, a power of two (2^26; 2^14 for a smoke run)")
    parser.add_argument("--sweep-step", type=positive(int), default=SWEEP_DEFAULTS["sweep_step"], metavar="K",
                        help="exponent step between sizes (2: 2^10, 2^12, ...)")
    parser.add_argument("--out", default=SWEEP_DEFAULTS["out"], metavar="DIR", type=_output_dir,
                        help="directory for sweep.png and sweep.json (created; lipkern-sweep)")


def _output_dir(text: str) -> str:
    parent = os.path.dirname(os.path.abspath(text))
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"--out {text!r} exists and is not a directory")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"--out {text!r}: directory {parent!r} does not exist")
    return text


def argument_error(args) -> Optional[str]:
    """Why the bench arguments do not make a run, or None: a sweep chooses its own shapes and
    output, so the options of a single run would be silently ignored, and the other way round.
    A sweep's ``--out`` directory is created here, once the arguments are otherwise good: only
    creating it tells whether the results could be written there (``/proc/x`` passes every check
    short of that), and finding out after the timings would lose them."""
    if not args.sweep:
        given = [f"--{dest.replace('_', '-')}" for dest, default in SWEEP_DEFAULTS.items()
                 if getattr(args, dest) != default]
        return f"{', '.join(given)}: only with --sweep" if given else None
    if args.sweep_min > args.sweep_max:
        return f"--sweep-min 2^{args.sweep_min} is above --sweep-max 2^{args.sweep_max}"
    ignored = [
        option
        for option, given in (
            ("--shape", args.shape), ("--quick", args.quick), ("--json", args.json),
            ("--profile", args.profile), ("a second --dtype", len(args.dtype or ()) > 1),
        )
        if given
    ]
    if ignored:
        return f"--sweep times its own sizes of one dtype; it cannot take {', '.join(ignored)}"
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        return f"--out {args.out!r}: cannot create the directory ({error.strerror or error})"
    return None


def sizes(args) -> list[int]:
    return [1 << k for k in range(args.sweep_min, args.sweep_max + 1, args.sweep_step)]


def run(args) -> dict:
    """Time every panel at every size, print a table, write sweep.json and sweep.png into
    ``args.out``, which :func:`argument_error` created."""
    torch.set_num_threads(args.threads)
    bench.steady_allocator()
    dtype_name = (args.dtype or ["fp32"])[0]
    dtype = bench.DTYPES[dtype_name]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = sorted({name for names in PANELS.values() for name in names})
    if args.no_compile:
        wanted = [name for name in wanted if not name.startswith("compile(")]
    bench.warn_if_busy(os.getloadavg()[0])
    points = []
    for device in devices:
        backend = "triton" if device == "cuda" else args.backend
        for numel in sizes(args):
            shape = bench.Shape(f"{numel // COLUMNS}x{COLUMNS}", (numel // COLUMNS, COLUMNS), -1)
            fns = bench.candidates(shape, dtype, args.act, not args.no_compile, backend, device,
                                   dynamic=True, input_std=args.input_std)
            fns = {name: fns[name] for name in wanted}
            times = (bench.cuda_times(fns) if device == "cuda"
                     else bench.median_times(fns, args.min_time))
            x_bytes = numel * torch.empty((), dtype=dtype).element_size()
            points.append({
                "device": device, "elements": numel,
                "GB/s": bench.effective_bandwidth(times, x_bytes),
                "times_ms": {k: v.median * 1e3 for k, v in times.items()},
                "spread": {k: v.spread for k, v in times.items()},
            })
            print(f"  timed {device} 2^{numel.bit_length() - 1} elements", flush=True)
    report = {
        "act": args.act, "dtype": dtype_name, "threshold": bench.THRESHOLD,
        "input_std": args.input_std,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "panels": {panel: [n for n in names if n in wanted] for panel, names in PANELS.items()},
        "points": points,
    }
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    plot(report, os.path.join(args.out, "sweep.png"))
    print(format_sweep(report))
    print(f"wrote {os.path.join(args.out, 'sweep.json')} and sweep.png beside it")
    return report


def format_sweep(report: dict) -> str:
    """GB/s of lipkern and of the fastest baseline of each panel, per device and size."""
    header = ["device", "elements"]
    for panel in report["panels"]:
        header += [f"{panel} lipkern", f"{panel} best baseline"]
    body = []
    for point in report["points"]:
        row = [point["device"], f"2^{point['elements'].bit_length() - 1}"]
        for names in report["panels"].values():
            gbs = point["GB/s"]
            baselines = [n for n in names[1:] if n != "copy_"]
            best = max(baselines, key=lambda n: gbs[n])
            row += [f"{gbs[names[0]]:.3g}", f"{gbs[best]:.3g} ({best})"]
        body.append(row)
    return format_table(header, body) + "\nGB/s: bytes an ideal kernel moves / median time"


def _colour(name: str) -> str:
    """One colour per candidate family, the same in every panel."""
    families = ("lipkern", "hand", "ref", "compile(hand)", "compile(ref)", "act", "copy_")
    family = name.split(" ")[0]
    return f"C{families.index(family)}" if family in families else "k"


def plot(report: dict, path: str) -> None:
    """One panel per op: GB/s against elements (log-log), a line per candidate and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = report["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    devices = sorted({p["device"] for p in report["points"]})
    for ax, (panel, names) in zip(axes[0], panels.items()):
        for device in devices:
            pts = [p for p in report["points"] if p["device"] == device]
            for name in names:
                style = "-" if name.startswith("lipkern") else (":" if name == "copy_" else "--")
                ax.plot([p["elements"] for p in pts], [p["GB/s"][name] for p in pts], style,
                        color=_colour(name), marker="o", markersize=3,
                        linewidth=2.5 if name.startswith("lipkern") else 1.2,
                        label=name if len(devices) == 1 else f"{name} ({device})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s (ideal bytes / median time)")
        ax.set_title(f"{panel}, {report['act']} {report['dtype']}, inputs std {report['input_std']:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
