"""``lipkern eval``: the evaluation report from the command line.

    lipkern eval                       # both embedded digits models, full report (<= 15 min on 2 cores)
    lipkern eval --quick               # the CI smoke run (<= 3 min)
    lipkern eval --model pkg.mod:make --checkpoint w.pt --data test.npz
    lipkern eval --robustbench Wu2020Adversarial --model-dir models --data cifar_test.npz

``lipkern.cli`` registers ``add_eval_parser`` / ``run_eval``; ``python -m lipkern.eval`` runs :func:`main`.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import torch

from .api import EvalInputError

DEFAULT_OUT = "lipkern-eval-out"


def parse_eps(text: str) -> float:
    """``0.03``, ``8/255`` -> float; must be finite and > 0."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cannot parse {text!r}; give a number like 0.03 or 8/255") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (an L-inf radius in [0, 1] input units), got {text}")
    return value


def parse_ratios(text: str) -> tuple[float, ...]:
    """Comma-separated c^r values: ``2^-8,2^-7`` or ``0.0039,0.0078``; each in (0, 1)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = 2.0 ** float(part[2:]) if part.startswith("2^") else float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot parse {part!r}; give e.g. 2^-8,2^-7,2^-6") from None
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"each c^r must be in (0, 1), got {part}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(out)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from .api import DEFAULT_SIGMA

    p = subparsers.add_parser(
        "eval", help="evaluate the remap: accuracy, AutoAttack, adaptive attack, masking audit, ...",
        description="Evaluate a model and its remapped versions (c^r = 2^-8, 2^-7, 2^-6 by default): clean, "
                    "AutoAttack, adaptive BPDA APGD, CW-Linf, FGSM/PGD sweep, transfer, masking audit, randomized "
                    "smoothing, remapped proportions, Lipschitz constants, the weight variant and a calibration "
                    "size ablation. Without --model / --robustbench: the two embedded adversarially trained "
                    "digits models.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="MODULE:CALLABLE",
                     help="import MODULE and call CALLABLE() to get the nn.Module to evaluate")
    src.add_argument("--robustbench", metavar="ID", help="RobustBench model ID (L-inf), read from --model-dir")
    p.add_argument("--checkpoint", metavar="FILE", help="state dict to load into the --model")
    p.add_argument("--model-dir", metavar="DIR",
                   help="RobustBench checkpoints: <DIR>/<dataset>/Linf/<ID>.pt (nothing is downloaded)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "imagenet"),
                   help="RobustBench dataset of --robustbench (default cifar10)")
    p.add_argument("--data", metavar="FILE.npz",
                   help="arrays x (N, C, H, W) float in [0, 1] and y (N,); optional x_calib / y_calib, else half "
                        "of the file calibrates (default: the embedded digits data)")
    p.add_argument("--eps", type=parse_eps, default=None,
                   help="L-inf radius, e.g. 8/255 (default 32/255 for digits, 8/255 otherwise)")
    p.add_argument("--ratios", type=parse_ratios, default=None, help="c^r list (default 2^-8,2^-7,2^-6)")
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="randomized-smoothing noise level")
    p.add_argument("--acts", default=None,
                   help="activations to convert, comma-separated (default: lipkern.convert's own)")
    p.add_argument("--inputs-of", default=None,
                   help="glob patterns of layers whose input gets a remap, comma-separated (e.g. '*.mlp.fc1')")
    p.add_argument("--quick", action="store_true", help="CI smoke budget (<= 3 min on the embedded default)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help=f"output directory for report.md, results.json and PNGs (default ./{DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2,
                   help="models evaluated in parallel worker processes (default 2: one per core on 2 cores)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per process (default 1: these small models are latency-bound, and "
                        "more threads than free cores makes OpenMP spin and run several times slower)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=run_eval)
    return p


def _load_callable_model(spec: str) -> torch.nn.Module:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvalInputError(f"--model must look like module:callable, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EvalInputError(f"--model: cannot import {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise EvalInputError(f"--model: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    model = fn() if callable(fn) and not isinstance(fn, torch.nn.Module) else fn
    if not isinstance(model, torch.nn.Module):
        raise EvalInputError(f"--model: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--checkpoint: no such file: {p}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EvalInputError(f"--checkpoint {p} does not fit the model: {e}") from None


def _user_jobs(args):
    """[(name, model, dataset, convert_kwargs, eps)] for --model / --robustbench."""
    from .data import load_digits, load_npz

    if args.robustbench:
        if not args.model_dir:
            raise EvalInputError("--robustbench needs --model-dir DIR (checkpoint at <DIR>/<dataset>/Linf/<ID>.pt)")
        from lipkern.models import load_robustbench

        model = load_robustbench(args.robustbench, args.dataset, args.model_dir)
        name = args.robustbench
        if not args.data:
            raise EvalInputError(f"--robustbench needs --data FILE.npz with {args.dataset} images (x in [0, 1], "
                                 "y); nothing is downloaded")
    else:
        model = _load_callable_model(args.model)
        if args.checkpoint:
            _load_checkpoint(model, args.checkpoint)
        name = args.model.rsplit(":", 1)[-1]
    model.eval()
    if args.data:
        try:
            dataset = load_npz(args.data)
        except (ValueError, FileNotFoundError) as e:
            raise EvalInputError(str(e)) from None
        dataset.num_classes = None  # the model's output width decides; evaluate() checks the labels against it
        eps = args.eps if args.eps is not None else 8 / 255
    else:
        dataset = load_digits()
        eps = args.eps if args.eps is not None else _digits_eps()
    return [(name, model, dataset, _convert_kwargs(args, None), eps)]


def _digits_eps():
    from .api import DEFAULT_EPS
    return DEFAULT_EPS


def _convert_kwargs(args, default):
    kw = dict(default or {})
    if args.acts is not None:
        kw["acts"] = tuple(a.strip() for a in args.acts.split(",") if a.strip())
    if args.inputs_of is not None:
        kw["inputs_of"] = tuple(a.strip() for a in args.inputs_of.split(",") if a.strip())
    return kw


def _embedded_jobs(args):
    """[(name, None, dataset, convert_kwargs, eps)]: the model is loaded where it is evaluated (maybe a worker)."""
    from .data import load_digits
    from .models import EMBEDDED

    if args.checkpoint or args.model_dir:
        raise EvalInputError("--checkpoint needs --model, --model-dir needs --robustbench")
    dataset = load_digits()
    eps = args.eps if args.eps is not None else _digits_eps()
    return [(name, None, dataset, _convert_kwargs(args, kw), eps) for name, (_, kw) in EMBEDDED.items()]


def _evaluate_job(job, options: dict, threads: int, position: int):
    """Evaluates one job; runs in the main process or in a worker process (hence module level)."""
    from .api import evaluate
    from .models import load_embedded

    torch.set_num_threads(threads)
    name, model, dataset, convert_kwargs, eps = job
    if model is None:
        model = load_embedded(name)
    return evaluate(model, dataset.calib, dataset.test, eps=eps, convert_kwargs=convert_kwargs, name=name,
                    num_classes=dataset.num_classes, progress_position=position,
                    ablation_data=dataset.train if dataset.train is not None else dataset.calib, **options)


def run_eval(args) -> int:
    """Runs the evaluation for parsed ``args``; prints the Markdown report; returns the exit status."""
    from .api import DEFAULT_RATIOS, EvalResult

    try:
        if args.checkpoint and not args.model:
            raise EvalInputError("--checkpoint needs --model MODULE:CALLABLE")
        if args.threads < 1 or args.jobs < 1:
            raise EvalInputError("--threads and --jobs must be >= 1")
        jobs = _user_jobs(args) if (args.model or args.robustbench) else _embedded_jobs(args)
        options = dict(ratios=args.ratios or DEFAULT_RATIOS, quick=args.quick, sigma=args.sigma, seed=args.seed,
                       progress=not args.no_progress)
        n_workers = min(args.jobs, len(jobs))
        if n_workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                futures = [pool.submit(_evaluate_job, job, options, args.threads, i) for i, job in enumerate(jobs)]
                parts = [f.result() for f in futures]
        else:
            previous = torch.get_num_threads()
            try:
                parts = [_evaluate_job(job, options, args.threads, 0) for job in jobs]
            finally:
                torch.set_num_threads(previous)
    except (EvalInputError, FileNotFoundError) as e:
        print(f"lipkern eval: error: {e}", file=sys.stderr)
        return 2
    result = EvalResult()
    for part in parts:
        result = result.merged(part)
    files = result.save(args.out)
    print(result.to_markdown())
    print(f"lipkern eval: wrote {files['report']}, {files['results']} and {len(files) - 2} PNGs in {args.out}",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lipkern")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    return run_eval(parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)]))
