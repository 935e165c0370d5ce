"""The ``lipkern`` command: ``verify``, ``bench`` and ``eval``.

``lipkern verify`` checks every available backend against the reference; ``lipkern bench`` times
the fused ops against what a user would run without lipkern (hand-written remap and reference,
eager and compiled, the bare activation, ``copy_``), or sweeps sizes; both live in
:mod:`lipkern.tools`. ``lipkern eval`` (from :mod:`lipkern.eval.cli_eval`) evaluates converted
models. Heavy modules are imported by the
subcommand that needs them, so ``lipkern verify`` never loads the evaluation stack.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Optional, Sequence


def prefer_triton_interpreter() -> None:
    """Without a CUDA device, run Triton kernels in its interpreter on CPU tensors.

    Triton picks interpreter or compiler when a kernel is decorated, i.e. when the Triton
    backend module is first imported, so this must run before anything imports it.
    An explicit ``TRITON_INTERPRET`` in the environment wins.
    """
    import torch

    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    if "lipkern.ops.triton_kernels" in sys.modules:
        print(
            "lipkern: the Triton kernels were imported before TRITON_INTERPRET was set; "
            "backend 'triton' will not run on CPU in this process",
            file=sys.stderr,
        )
        return
    os.environ["TRITON_INTERPRET"] = "1"


def output_file(text: str) -> str:
    """An argparse type for an output FILE: checked when the arguments are parsed, so a path
    that cannot be written fails before the work whose results it would hold."""
    if text == "-":
        return text
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file path")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: directory {parent!r} does not exist"
        )
    writable = os.access(path, os.W_OK) if os.path.exists(path) else os.access(parent, os.W_OK)
    if not writable:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def verify_device(text: str) -> str:
    """An argparse type for a device ``lipkern verify`` can run on, present on this machine."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return text


def positive(kind):
    """An argparse type for a number of ``kind`` (int or float) that must be > 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _quiet_cuda_home_warning() -> None:
    """Import ``torch.utils.cpp_extension`` with its warnings held back on machines without a
    CUDA device.

    At import it warns "No CUDA runtime is found, using CUDA_HOME=..." whenever a CUDA toolkit is
    installed but no GPU is usable; torch.compile (lipkern bench, the evaluation) imports it. On
    such a machine nothing of lipkern uses CUDA, so the line only alarms; imported once here, the
    module is not imported (and does not warn) again.
    """
    import logging

    import torch

    if torch.cuda.is_available() or "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)


def _add_verify_parser(subparsers) -> None:
    from lipkern.ops.activations import ACTIVATIONS
    from lipkern.ops.api import BACKENDS
    from lipkern.tools.verify import seed_argument

    ops = ("fwd", "stats", "inplace", "bwd")
    p = subparsers.add_parser(
        "verify",
        help="check every available backend against the reference",
        description=(
            "Run every available backend (C++ 'cpu', 'triton' - through the interpreter when "
            "there is no GPU) against the pure-PyTorch reference on random and special-value "
            "inputs, for each op, activation and dtype. Exit status 1 if any check fails."
        ),
    )
    p.add_argument("--quick", action="store_true", help="two small layouts instead of five")
    p.add_argument(
        "--backend",
        action="append",
        choices=[b for b in BACKENDS if b != "auto"],
        help="backend to check (repeatable; default: every available one but the reference)",
    )
    p.add_argument("--act", action="append", choices=ACTIVATIONS, help="repeatable; default all")
    p.add_argument("--dtype", action="append", choices=("fp16", "bf16", "fp32"), help="repeatable")
    p.add_argument("--op", action="append", choices=ops, help="repeatable; default all")
    p.add_argument(
        "--device", action="append", type=verify_device,
        help="cpu, cuda or cuda:N (repeatable; default: all present)",
    )
    p.add_argument("--seed", type=seed_argument, default=0)
    p.add_argument(
        "--json",
        metavar="FILE",
        type=output_file,
        help="also write the results as JSON to FILE ('-': JSON on stdout instead of the table)",
    )
    p.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    from lipkern.ops.activations import ACTIVATIONS
    from lipkern.tools import verify

    # A name given twice is checked once.
    report = verify.run_verify(
        backends=list(dict.fromkeys(args.backend)) if args.backend else args.backend,
        acts=list(dict.fromkeys(args.act or ACTIVATIONS)),
        dtypes=list(dict.fromkeys(args.dtype or verify.DTYPES)),
        ops=list(dict.fromkeys(args.op or verify.OPS)),
        devices=list(dict.fromkeys(args.device)) if args.device else None,
        quick=args.quick,
        seed=args.seed,
    )
    if args.json == "-":
        print(report.to_json())
    else:
        print(verify.format_table(report))
        if args.json:
            with open(args.json, "w") as f:
                f.write(report.to_json() + "\n")
    if not report.rows:
        print("lipkern verify: no backend could run, nothing was checked", file=sys.stderr)
    return 0 if report.passed else 1


def _add_bench_parser(subparsers) -> None:
    from lipkern.tools import bench, sweep

    p = subparsers.add_parser(
        "bench",
        help="time the fused ops against hand-written, eager, compiled and bare-activation baselines",
        description=bench.__doc__.split("\n\n")[0],
    )
    bench.add_arguments(p)
    sweep.add_arguments(p)
    p.set_defaults(func=_run_bench, bench_parser=p)


def _run_bench(args) -> int:
    from lipkern.tools import bench, sweep

    error = sweep.argument_error(args)
    if error:
        args.bench_parser.error(error)
    (sweep.run if args.sweep else bench.run)(args)
    return 0


def _add_eval_placeholder(subparsers) -> None:
    # The real parser comes from lipkern.eval.cli_eval and is built only when `eval` is the
    # command (see _run_eval), so that other commands do not import the evaluation stack.
    subparsers.add_parser(
        "eval",
        help="evaluate converted models (lipkern eval --help for its options)",
        add_help=False,
    )


def _run_eval(argv: Sequence[str]) -> int:
    try:
        # import_module reads sys.modules first, unlike `from lipkern.eval import cli_eval`,
        # which returns the package attribute once lipkern.eval has been imported.
        cli_eval = importlib.import_module("lipkern.eval.cli_eval")
    except ImportError as error:
        print(f"lipkern eval is unavailable: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="lipkern")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli_eval.add_eval_parser(subparsers)
    args = parser.parse_args(["eval", *argv])
    status = cli_eval.run_eval(args)
    return 0 if status is None else int(status)


def build_parser() -> argparse.ArgumentParser:
    from lipkern import __version__

    parser = argparse.ArgumentParser(
        prog="lipkern",
        description="Fused activation + threshold-remap kernels: verification, benchmarks, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"lipkern {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_verify_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_eval_placeholder(subparsers)
    return parser


def _cpu_build_error() -> Optional[str]:
    """Why the C++ kernels cannot run as the environment configures them
    (``LIPKERN_CPU_CAPABILITY`` or ``LIPKERN_CPU_16BIT`` naming something this build or CPU
    lacks), else None: said once before any work, not as a failure of every check or op."""
    from lipkern import _ext

    if _ext.missing_reason() is not None:
        return None
    module = _ext.load()
    try:
        module.cpu_capability()
        module.cpu_16bit_method()
    except ValueError as error:
        return str(error)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lipkern`` console script and ``python -m lipkern``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prefer_triton_interpreter()
    _quiet_cuda_home_warning()
    asks_for_help = any(arg in ("-h", "--help") for arg in argv)
    if argv and argv[0] in ("verify", "bench", "eval") and not asks_for_help:
        error = _cpu_build_error()
        if error:
            print(f"lipkern {argv[0]}: {error}", file=sys.stderr)
            return 2
    if argv and argv[0] == "eval":
        return _run_eval(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
