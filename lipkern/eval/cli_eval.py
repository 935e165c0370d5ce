"""``lipkern eval``: the evaluation report from the command line.

    lipkern eval                       # both embedded digits models, full report (<= 15 min on 2 cores)
    lipkern eval --quick               # the CI smoke run (<= 3 min)
    lipkern eval --model pkg.mod:make --checkpoint w.pt --data test.npz
    lipkern eval --robustbench Wu2020Adversarial --model-dir models --data cifar_test.npz

``lipkern.cli`` registers ``add_eval_parser`` / ``run_eval``; ``python -m lipkern.eval`` runs :func:`main`.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import pickle
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipkern.cli import positive

from .api import EvalInputError, described, ratio_label

DEFAULT_OUT = "lipkern-eval-out"


def parse_eps(text: str) -> float:
    """``0.03``, ``8/255`` -> float in (0, 1); ``8`` is refused with a hint (an eps is in [0, 1] input units)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cannot parse {text!r}; give a number like 0.03 or 8/255") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (an L-inf radius in [0, 1] input units), got {text}")
    if value >= 1:
        hint = f"; did you mean {text}/255?" if "/" not in text and math.isfinite(value) else ""
        raise argparse.ArgumentTypeError(f"must be < 1 (an L-inf radius in [0, 1] input units), got {text}{hint}")
    return value


positive_int, positive_float = positive(int), positive(float)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot parse {text!r} as an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def model_name(text: str) -> str:
    from .api import check_name

    try:
        check_name(text)
    except EvalInputError as e:
        raise argparse.ArgumentTypeError(str(e).replace("name must", "must")) from None
    return text


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
        if ratio_label(value) in map(ratio_label, out):
            raise argparse.ArgumentTypeError(f"c^r {part} is given twice (the report labels it "
                                             f"{ratio_label(value)})")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(out)


def parse_acts(text: str) -> tuple[str, ...]:
    """Comma-separated activation families, each one lipkern.convert accepts."""
    from lipkern.convert import ACT_FAMILIES, check_acts

    acts = tuple(a.strip() for a in text.split(",") if a.strip())
    if not acts:
        raise argparse.ArgumentTypeError(f"give at least one of {', '.join(ACT_FAMILIES)}")
    try:
        return check_acts(acts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("acts entries", "each")) from None


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from .api import DEFAULT_BATCH, DEFAULT_CHUNK, DEFAULT_SIGMA
    from .embedded import EMBEDDED

    p = subparsers.add_parser(
        "eval", help="evaluate the remap: accuracy, AutoAttack, adaptive attack, masking audit, verdict, ...",
        description="Evaluate a model and its remapped versions (c^r = 2^-8, 2^-7, 2^-6 by default): clean, "
                    "AutoAttack, adaptive BPDA APGD, CW-Linf, FGSM/PGD sweep, transfer, masking audit, randomized "
                    "smoothing, remapped proportions, Lipschitz constants, the weight variant, a calibration "
                    "size ablation and a paired statistical verdict against the original model. Without --model / "
                    "--robustbench: the two embedded adversarially trained digits models. Under `torchrun "
                    "--nproc_per_node K -m lipkern eval ...` the test samples are shared among K processes.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="MODULE:CALLABLE",
                     help="import MODULE (the working directory is searched first) and call CALLABLE() to get "
                          "the nn.Module to evaluate")
    src.add_argument("--robustbench", metavar="ID", help="RobustBench model ID (L-inf), read from --model-dir")
    src.add_argument("--embedded", choices=sorted(EMBEDDED), help="only this one of the embedded digits models")
    p.add_argument("--checkpoint", metavar="FILE", help="state dict to load into the --model")
    p.add_argument("--model-dir", metavar="DIR",
                   help="RobustBench checkpoints: <DIR>/<dataset>/Linf/<ID>.pt (nothing is downloaded)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "imagenet"),
                   help="RobustBench dataset of --robustbench (default cifar10)")
    p.add_argument("--data", metavar="FILE.npz",
                   help="arrays x (N, C, H, W) float in [0, 1] and y (N,); optional x_calib (calibration images; "
                        "y_calib optional), else half of the file calibrates (default: the embedded digits data)")
    p.add_argument("--calib-data", metavar="FILE.npz",
                   help="calibration images (array x, (N, C, H, W) in [0, 1]; take them from the training set, "
                        "as the paper does); then all of --data is test data")
    p.add_argument("--n-test", type=positive_int, default=None,
                   help="attacked test samples, drawn without replacement with --seed (default: all of --data in "
                        "the full budget, 40 with --quick; the embedded default: 200, 40 with --quick)")
    p.add_argument("--n-calib", type=positive_int, default=None,
                   help="use the first N calibration samples (default all)")
    p.add_argument("--eps", type=parse_eps, default=None,
                   help="L-inf radius, e.g. 8/255 (default 32/255 for digits, 8/255 otherwise)")
    p.add_argument("--ratios", type=parse_ratios, default=None, help="c^r list (default 2^-8,2^-7,2^-6)")
    p.add_argument("--sigma", type=positive_float, default=DEFAULT_SIGMA, help="randomized-smoothing noise level")
    p.add_argument("--acts", type=parse_acts, default=None,
                   help="activations to convert, comma-separated (default: lipkern.convert's own)")
    p.add_argument("--inputs-of", default=None,
                   help="glob patterns of layers whose input gets a remap, comma-separated (e.g. '*.mlp.fc1')")
    p.add_argument("--quick", action="store_true", help="CI smoke budget (<= 3 min on the embedded default)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun, cuda means "
                        "cuda:LOCAL_RANK")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH,
                   help=f"samples per forward/backward in attacks and smoothing (default {DEFAULT_BATCH})")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK,
                   help=f"test samples per unit of work (default {DEFAULT_CHUNK}); the unit processes share and "
                        "resume; per-sample outcomes depend on it, not on the number of processes")
    p.add_argument("--name", type=model_name, default=None, help="the model's name in the report (default: from --model / ID)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help=f"output directory for report.md, results.json, PNGs and the outcome store "
                        f"(default ./{DEFAULT_OUT}); must be empty or missing unless --resume / --overwrite")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run stored in --out, skipping finished work")
    again.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out (kept until this run has stored work)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the sample selection and of every attack's randomness (default 0)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="models evaluated in parallel worker processes (default 2: one per core on 2 cores; "
                        "single process under torchrun)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads per process (default 1: these small models are latency-bound, and "
                        "more threads than free cores makes OpenMP spin and run several times slower)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=run_eval)
    return p


def _load_callable_model(spec: str) -> torch.nn.Module:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvalInputError(f"--model must look like module:callable, got {spec!r}")
    # `python -m` puts the working directory on sys.path; a console script does not, so do it here.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    # The user's code may fail in any way; its failure is reported as theirs, not as lipkern's traceback.
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EvalInputError(f"--model: cannot import {module_name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"--model: importing {module_name!r} raised {described(e)}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise EvalInputError(f"--model: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    try:
        model = fn() if callable(fn) and not isinstance(fn, torch.nn.Module) else fn
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"--model {spec}: calling it raised {described(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise EvalInputError(f"--model: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# Where training scripts commonly put the state dict in a checkpoint that holds more (epoch, optimizer, ...).
CHECKPOINT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
_WRAPPERS_SAID = ", ".join(map(repr, CHECKPOINT_WRAPPERS[:-1])) + f" or {CHECKPOINT_WRAPPERS[-1]!r}"


def _holds_tensors(value) -> bool:
    """Whether ``value`` could be a state dict: a mapping with tensors among its values (a module's extra state
    need not be one)."""
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--checkpoint: no such file: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file fails anywhere in the unpickler
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            # torch's own advice there, weights_only=False, would run code from the file.
            raise EvalInputError(f"--checkpoint {p}: holds pickled Python objects (a whole model?), which are "
                                 "not loaded; save model.state_dict() instead") from None
        raise EvalInputError(f"--checkpoint {p}: not a state dict that torch.load(weights_only=True) reads "
                             f"({described(e)})") from None
    model_keys = set(model.state_dict())
    # A training script's checkpoint holds the state dict beside its epoch, optimizer, metrics (tensors too).
    if isinstance(state, Mapping) and not model_keys & set(state):
        wrapped = [key for key in CHECKPOINT_WRAPPERS if _holds_tensors(state.get(key))]
        if len(wrapped) > 1:
            raise EvalInputError(f"--checkpoint {p}: holds a state dict under each of "
                                 f"{', '.join(map(repr, wrapped))}; save the one to evaluate on its own")
        if wrapped:
            state = state[wrapped[0]]
    if not isinstance(state, Mapping) or (state and not _holds_tensors(state)):
        what = (f"dict with keys {', '.join(map(repr, list(state)[:8]))}{', ...' if len(state) > 8 else ''}"
                if isinstance(state, Mapping) else type(state).__name__)
        raise EvalInputError(f"--checkpoint {p}: holds a {what}, not a state dict (a mapping of parameter names "
                             f"to tensors, or one under {_WRAPPERS_SAID})")
    # DistributedDataParallel saves its wrapped module's entries under "module.", before the module's own names.
    if state and all(str(key).startswith("module.") for key in state) and not model_keys & set(state):
        stripped = copy.copy(state)  # a shallow copy keeps the state dict's _metadata
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(stripped, "module.")
        if model_keys & set(stripped):
            state = stripped
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EvalInputError(f"--checkpoint {p} does not fit the model: {e}") from None


@dataclass
class Job:
    """One model to evaluate, loaded once in the main process; a worker process gets it with the job."""

    name: str
    model: torch.nn.Module
    calib: object
    test: object
    ablation: object
    num_classes: int | None
    convert_kwargs: dict
    eps: float
    n_test: int | None
    calib_source: str
    test_source: str
    test_rows: np.ndarray | None = None  # see Dataset.test_rows
    embedded: bool = False


def _user_jobs(args) -> list[Job]:
    from .api import QUICK
    from .data import load_calibration_npz, load_npz

    if args.robustbench:
        if args.checkpoint:
            raise EvalInputError("--checkpoint needs --model (--robustbench reads its checkpoint from --model-dir)")
        if not args.model_dir:
            raise EvalInputError("--robustbench needs --model-dir DIR (checkpoint at <DIR>/<dataset>/Linf/<ID>.pt)")
        from lipkern.models.robustbench import check_model_id, checkpoint_files

        try:
            check_model_id(args.robustbench, args.dataset)
        except ValueError as e:
            raise EvalInputError(f"--robustbench: {e}") from None
        missing = [str(f) for f in checkpoint_files(args.robustbench, args.dataset, args.model_dir)
                   if not Path(f).is_file()]
        if missing:
            raise EvalInputError(f"--robustbench {args.robustbench}: no checkpoint at {', '.join(missing)}; place "
                                 "the RobustBench checkpoint there (this machine cannot download it)")
        if not args.data:
            raise EvalInputError(f"--robustbench needs --data FILE.npz with {args.dataset} images (x in [0, 1], "
                                 "y); nothing is downloaded")
    elif args.model_dir:
        raise EvalInputError("--model-dir needs --robustbench (a --model's weights come from --checkpoint FILE)")
    elif args.checkpoint and not Path(args.checkpoint).is_file():
        raise EvalInputError(f"--checkpoint: no such file: {args.checkpoint}")
    elif not args.data:
        raise EvalInputError("--model needs --data FILE.npz (x (N, C, H, W) in [0, 1], y (N,))")
    # Data first: a bad file is reported before a large model is built.
    try:
        dataset = load_npz(args.data, all_test=args.calib_data is not None)
        calib_file = load_calibration_npz(args.calib_data) if args.calib_data else None
    except (ValueError, FileNotFoundError) as e:
        raise EvalInputError(str(e)) from None
    if calib_file is not None:
        calib, source = calib_file, f"{args.calib_data} (--calib-data)"
    else:
        calib, source = dataset.calib, dataset.calib_source
    if args.robustbench:
        from lipkern.models import load_robustbench

        try:
            model = load_robustbench(args.robustbench, args.dataset, args.model_dir)
        except (RuntimeError, pickle.UnpicklingError) as e:
            # load_state_dict lists every key of a large network; its start says what does not fit.
            message = " ".join(str(e).split())
            shown = message if len(message) <= 600 else message[:600] + " ..."
            raise EvalInputError(f"--robustbench {args.robustbench}: its checkpoint in --model-dir "
                                 f"{args.model_dir} does not load: {shown}") from None
        name = args.robustbench
    else:
        model = _load_callable_model(args.model)
        if args.checkpoint:
            _load_checkpoint(model, args.checkpoint)
        name = args.model.rsplit(":", 1)[-1]
    n_test = args.n_test or min(QUICK.n_test if args.quick else len(dataset.test), len(dataset.test))
    return [Job(args.name or name, model.eval(), calib, dataset.test, calib, None, _convert_kwargs(args, None),
                args.eps if args.eps is not None else 8 / 255, n_test, source, dataset.test_source, dataset.test_rows)]


def _convert_kwargs(args, default):
    kw = dict(default or {})
    if args.acts is not None:
        kw["acts"] = args.acts
    if args.inputs_of is not None:
        kw["inputs_of"] = tuple(a.strip() for a in args.inputs_of.split(",") if a.strip())
    return kw


def _embedded_jobs(args) -> list[Job]:
    from .api import DEFAULT_EPS
    from .data import load_digits
    from .embedded import EMBEDDED, load_embedded

    if args.checkpoint or args.model_dir or args.data or args.calib_data:
        raise EvalInputError("--checkpoint needs --model, --model-dir needs --robustbench, and --data / "
                             "--calib-data need --model or --robustbench (the embedded models use the digits)")
    if args.name:
        raise EvalInputError("--name needs --model or --robustbench (the embedded models keep their names)")
    dataset = load_digits()
    eps = args.eps if args.eps is not None else DEFAULT_EPS
    names = [args.embedded] if args.embedded else list(EMBEDDED)
    return [Job(name, load_embedded(name), dataset.calib, dataset.test, dataset.train, dataset.num_classes,
                _convert_kwargs(args, EMBEDDED[name][1]), eps, args.n_test, dataset.calib_source,
                dataset.test_source, embedded=True) for name in names]


def _evaluate_job(job: Job, options: dict, position: int):
    """Evaluates one job; runs in the main process or in a worker process (hence module level)."""
    from .api import evaluate

    result = evaluate(job.model, job.calib, job.test, eps=job.eps, convert_kwargs=job.convert_kwargs, name=job.name,
                      num_classes=job.num_classes, progress_position=position, ablation_data=job.ablation,
                      n_test=job.n_test, calib_source=job.calib_source, **options)
    if job.test_rows is not None:
        # test_indices count within the test split; these trace each attacked sample to its row of --data.
        for entry in result.models:
            entry["data_rows"] = job.test_rows[entry["test_indices"]].tolist()
    return result


def _start_worker():
    """Workers ignore SIGINT: the terminal sends it to the whole process group, and the parent decides. Their
    progress bars take a thread lock: tqdm's default one adds a named semaphore, which is useless across
    spawned processes (each would make its own) and, with the worker stopped by Ctrl-C, left the resource
    tracker warning of "leaked semaphore objects" at exit."""
    import signal
    import threading

    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())


def _evaluate_in_workers(jobs, options, n_workers):
    """One worker process per model. Ctrl-C stops the workers at once; their finished units stay stored."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(n_workers, initializer=_start_worker)
    try:
        pending = [pool.apply_async(_evaluate_job, (job, options, i)) for i, job in enumerate(jobs)]
        # Waiting in short slices keeps the parent responsive to Ctrl-C (a bare get() may not return to it).
        for r in pending:
            while not r.ready():
                r.wait(0.2)
        parts = [r.get() for r in pending]
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
    return parts


# Written and removed at once to test --out; a run killed between the two leaves it behind.
WRITE_PROBE = ".lipkern-write-test"
# --overwrite moves the earlier run's files into a directory of this prefix inside --out and deletes them
# when the new run ends having stored work; a killed run leaves them there, for the next --overwrite to
# replace with the rest, or for its resumed run to delete once it has finished.
HELD_PREFIX = ".lipkern-replaced-"


def _written_by_eval(entry: Path) -> bool:
    """Whether lipkern eval wrote ``entry``, told by what it holds (the mark each of its files carries), not by
    its name alone: a file of the user's that has the name of one is neither replaced nor deleted."""
    from .report import is_report_file
    from .store import is_store_file

    if entry.is_dir():
        return entry.name.startswith(HELD_PREFIX) and all(_written_by_eval(e) for e in entry.iterdir())
    if entry.name == WRITE_PROBE:
        return entry.is_file() and entry.stat().st_size == 0
    return is_store_file(entry) or is_report_file(entry)


def check_out_dir(path: str, resume: bool, overwrite: bool) -> list[Path]:
    """Checks ``--out`` before any work, changing nothing: refuses a file, a non-empty directory without
    --resume / --overwrite, --resume without a stored run, --overwrite of a directory that holds anything
    lipkern did not write, and an unwritable place. Returns the entries --overwrite is to replace."""
    from .store import FILENAME, is_store_file

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--out {out} is a file; give a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if resume:
        if not out.is_dir():
            raise EvalInputError(f"--resume: {out} does not exist; there is no run to continue")
        if not (out / FILENAME).is_file():
            raise EvalInputError(f"--resume: {out} holds no outcome store ({FILENAME}) to continue")
        if not is_store_file(out / FILENAME):
            raise EvalInputError(f"--resume: {out / FILENAME} is not an outcome store lipkern made; there is no "
                                 "run to continue")
    elif entries and not overwrite:
        raise EvalInputError(f"--out {out} is not empty; continue its run with --resume, replace it with "
                             "--overwrite, or choose another directory")
    elif entries:
        foreign = [e.name + ("/" if e.is_dir() else "") for e in entries if not _written_by_eval(e)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise EvalInputError(f"--out {out} holds files lipkern did not write ({shown}); --overwrite only "
                                 "replaces an earlier lipkern eval output, told by what its files hold (an "
                                 "older lipkern's figures carry no mark: delete them yourself). Choose "
                                 "another directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise EvalInputError(f"--out {out} is not writable ({existing} is not a writable directory)")
    return entries if overwrite else []


@dataclass
class OutDirChange:
    """What start_out_dir changed: the directories it made (deepest first), where the files that
    --overwrite replaces wait, the held directories of a killed run that a resumed run found, and the units
    its store held then. A run that ends before storing any work leaves --out as it was; with several
    processes, whose others may still hold the store open, it leaves the replaced files where they wait and
    says so."""

    out: Path
    made: list[Path]
    held: Path | None
    resumed: bool
    shared: bool
    leftovers: list[Path]
    units_at_start: int = 0

    def restore(self) -> None:
        """Undoes start_out_dir's own steps: the held files back, the directories it made gone."""
        if self.held is not None:
            for entry in self.held.iterdir():
                entry.rename(self.out / entry.name)
            self.held.rmdir()
            self.held = None
        for directory in self.made:
            if not directory.is_dir():
                continue  # never made: the mkdir that failed
            if any(directory.iterdir()):
                break
            directory.rmdir()

    def finish(self) -> None:
        """The run has stored its work: the replaced files go (a failure to delete them only warns)."""
        for directory in ([self.held] if self.held is not None else []) + self.leftovers:
            try:
                shutil.rmtree(directory)
            except OSError as e:
                print(f"lipkern eval: warning: could not delete the replaced run's files in {directory}: {e}",
                      file=sys.stderr)
        self.held, self.leftovers = None, []

    def settle(self) -> str:
        """After a failure: "stored" where the run stored work, which stays and replaces the earlier run's
        files, or where it resumed a store, which stays (a resumed run that stored nothing, a refused one
        included, deletes nothing); "held" where several processes ran and the replaced files wait in
        ``held``; otherwise "restored": what the run wrote removed and what it replaced put back."""
        from .store import unit_count

        units = unit_count(self.out)
        stored_work = units is None or units > self.units_at_start
        if self.resumed or stored_work:
            if stored_work:
                self.finish()
            return "stored"
        if self.shared and self.held is not None:
            return "held"
        for entry in self.out.iterdir() if self.out.is_dir() else ():
            if entry == self.held or not _written_by_eval(entry):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.restore()
        return "restored"


def start_out_dir(path: str, replaced: list[Path], models: list[str], resume: bool, shared: bool) -> OutDirChange:
    """Once every argument has been checked: makes ``--out`` and moves aside the earlier run's files that
    --overwrite replaces (``shared``: several processes run); a failure here undoes what it did. A resumed
    run must bring the models the stored run was started with: with one left out, the report would miss it
    and its work would stay behind; with one added, the original command could no longer resume."""
    from .store import FILENAME, OutcomeStore, unit_count

    out = Path(path)
    change = OutDirChange(out, [p for p in (out, *out.parents) if not p.exists()], None, resume, shared, [])
    try:
        out.mkdir(parents=True, exist_ok=True)
        if replaced:
            # Making the held directory in --out tests that --out is writable.
            change.held = Path(tempfile.mkdtemp(prefix=HELD_PREFIX, dir=out))
            for f in replaced:
                f.rename(change.held / f.name)
        else:
            probe = out / WRITE_PROBE
            probe.write_bytes(b"")
            probe.unlink()
    except BaseException as e:
        change.restore()
        if isinstance(e, OSError):
            raise EvalInputError(f"--out {out} is not writable: {e.strerror or e}") from None
        raise
    if resume:
        change.leftovers = [e for e in out.iterdir() if e.is_dir() and _written_by_eval(e)]
        change.units_at_start = unit_count(out) or 0  # an unreadable store is refused below
        try:
            store = OutcomeStore(out)
            try:
                stored, recorded = store.models(), store.run_models()
            finally:
                store.close()
        except sqlite3.Error as e:
            raise EvalInputError(f"--resume: {out / FILENAME} is not a readable outcome store: {e}") from None
        # A store whose starter did not record its models tells only those it had started on.
        planned = recorded if recorded is not None else stored
        left_out = sorted(set(planned) - set(models))
        added = sorted(set(models) - set(planned)) if recorded is not None else []
        differences = []
        if left_out:
            differences.append(f"leaves out {', '.join(left_out)}")
        if added:
            differences.append(f"adds {', '.join(added)}")
        if differences:
            raise EvalInputError(f"--resume: {out} holds a run of {', '.join(planned)}, and this one "
                                 f"{' and '.join(differences)}; resume with the same models, or start over "
                                 "with --overwrite")
    return change


def _settle(change: OutDirChange | None) -> str | None:
    """change.settle() after a failed run, reporting its own failure without hiding the run's."""
    if change is None:
        return None
    try:
        outcome = change.settle()
    except OSError as e:
        print(f"lipkern eval: warning: could not put {change.out} back as it was ({e})", file=sys.stderr)
        outcome = "held"
    if outcome == "held" and change.held is not None:
        print(f"lipkern eval: the replaced run's files wait in {change.held}", file=sys.stderr)
    return outcome


def _check_sample_counts(jobs: list[Job], args) -> None:
    """--n-test and --n-calib against each model's data, before --out is touched."""
    for job in jobs:
        for flag, wanted, split, what, source in (("--n-test", args.n_test, job.test, "test", job.test_source),
                                                  ("--n-calib", args.n_calib, job.calib, "calibration",
                                                   job.calib_source)):
            if wanted is not None and wanted > len(split):
                raise EvalInputError(f"{flag} {wanted}: {job.name}'s {what} data holds {len(split)} samples "
                                     f"({source})")


def _check_conversions(jobs: list[Job]) -> None:
    """Each model's conversion (--acts, --inputs-of), tried on a copy before --out is touched or the first model
    runs: a refusal would otherwise come only when the evaluation reaches that model."""
    from ._remap import UnusableConversionError, converted_copy

    for job in jobs:
        try:
            converted_copy(job.model, job.convert_kwargs)
        except UnusableConversionError as e:
            hint = "; --inputs-of applies to every embedded model, name one with --embedded" if (
                job.embedded and len(jobs) > 1 and "inputs_of" in str(e)) else ""
            raise EvalInputError(f"{job.name}: {e}{hint}") from None


def _on_main(processes, step):
    """Runs ``step`` on the main process and returns its result there (None elsewhere); every process learns
    of its failure, so that all stop together (the main process raises what ``step`` raised, the others an
    EvalInputError with its message)."""
    error, caught, result = None, None, None
    if processes.is_main:
        try:
            result = step()
        except Exception as e:  # noqa: BLE001 -- raised below, once every process knows
            error, caught = str(e) if isinstance(e, EvalInputError) else f"{type(e).__name__}: {e}", e
    error = processes.broadcast_error(error)
    if caught is not None:
        raise caught
    if error:
        raise EvalInputError(error)
    return result


def run_eval(args) -> int:
    """Runs the evaluation for parsed ``args``; prints the Markdown report; returns the exit status."""
    from . import parallel
    from .api import DEFAULT_RATIOS, EvalResult
    from .store import SettingsMismatchError

    processes = parallel.launched_processes()
    try:
        if args.checkpoint and not args.model:
            raise EvalInputError("--checkpoint needs --model MODULE:CALLABLE")
        device = parallel.resolve_device(args.device, processes.local_rank, argument="--device")
    except (EvalInputError, parallel.DeviceError) as e:
        print(f"lipkern eval: error: {e}", file=sys.stderr)
        return 2
    parallel.init_process_group(processes, device)
    change = None  # the main process's, once --out is started
    try:
        replaced = _on_main(processes, lambda: check_out_dir(args.out, args.resume, args.overwrite)) or []
        jobs = _user_jobs(args) if (args.model or args.robustbench) else _embedded_jobs(args)
        _check_sample_counts(jobs, args)
        _check_conversions(jobs)
        change = _on_main(processes, lambda: start_out_dir(args.out, replaced, [job.name for job in jobs],
                                                           args.resume, processes.world > 1))
        options = dict(ratios=args.ratios or DEFAULT_RATIOS, quick=args.quick, sigma=args.sigma, seed=args.seed,
                       progress=not args.no_progress, device=device, batch_size=args.batch_size,
                       chunk_size=args.chunk_size, out_dir=args.out, n_calib=args.n_calib,
                       run_models=[job.name for job in jobs], threads=args.threads)
        n_workers = 1 if processes.world > 1 else min(args.jobs, len(jobs))
        if n_workers > 1:
            parts = _evaluate_in_workers(jobs, options, n_workers)
        else:
            parts = [_evaluate_job(job, options, 0) for job in jobs]
        if processes.is_main:
            result = EvalResult()
            for part in parts:
                result = result.merged(part)
            files = result.save(args.out)
            change.finish()
    except (EvalInputError, SettingsMismatchError, FileNotFoundError) as e:
        _settle(change)
        print(f"lipkern eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        outcome = _settle(change)
        if outcome == "stored":
            print(f"lipkern eval: interrupted; finished work is stored in {args.out}, continue it with --resume",
                  file=sys.stderr)
        elif processes.is_main and outcome != "held":
            print(f"lipkern eval: interrupted before any work was stored; {args.out} is as it was before the run",
                  file=sys.stderr)
        return 130
    except BaseException:
        _settle(change)
        raise
    finally:
        if processes.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not processes.is_main:
        return 0
    from .report import verdict_lines

    print(result.to_markdown())
    print(f"lipkern eval: wrote {files['report']}, {files['results']} and {len(files) - 2} PNGs in {args.out}",
          file=sys.stderr)
    print("\n".join(["Verdict (paired with the original model on the same samples):", *verdict_lines(result.to_dict())]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lipkern")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    return run_eval(parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)]))
