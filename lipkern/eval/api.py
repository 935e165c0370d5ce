"""``lipkern.eval.evaluate``: the whole evaluation of one model, original vs each remap ratio c^r.

How the work is cut (what makes it resumable and shardable):

1. Calibration, collectively: the calibration set is cut into batches of ``CALIB_BATCH`` samples, batch ``i``
   scanned by rank ``i % world``; ``lipkern.calibrate`` all-reduces the statistics, so every rank gets the
   thresholds of one scan over all batches. The same holds for the integer counts that pick the layers with a
   remapped input and the weight variant's pruned columns.
2. Test samples, in chunks: the attacked samples are ``n_test`` test samples drawn without replacement with
   ``numpy.random.default_rng(seed)`` (all of them, in file order, when ``n_test`` covers the test set), cut into
   chunks of ``chunk_size``. Chunk ``k`` is run by rank ``k % world`` through every stage of every
   configuration, with attack seeds derived from ``(seed, k)``; AutoAttack's later stages see only the chunk's
   survivors. A chunk runs the same way on any rank, so per-sample outcomes do not depend on the number of
   processes.
3. Every finished (chunk, stage) is committed to the output directory's outcome store
   (:mod:`lipkern.eval.store`) before the next starts; a rerun skips what is there. The report is built from
   the store alone.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import numbers
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import _remap, attacks, audit, layers, lipschitz, parallel, smoothing, stats, weight_variant
from .data import Split
from .report import chunk_phrase
from .store import NotAStoreError, OutcomeStore, SettingsMismatchError

DEFAULT_RATIOS = (2 ** -8, 2 ** -7, 2 ** -6)
DEFAULT_EPS = 32 / 255  # see lipkern/eval/train.py for why this suits 8x8 digits
SWEEP_EPS_255 = (1, 2, 4, 8, 16, 32, 64, 96)
# sigma = 0.25 is Cohen et al.'s middle setting; on [0, 1] digits it is two grey levels' worth of noise per
# pixel in L2 terms over 64 pixels (||noise|| ~ 2), large enough to certify non-trivial radii.
DEFAULT_SIGMA = 0.25
CERT_RADII = tuple(round(0.05 * i, 2) for i in range(0, 21))
DEFAULT_CHUNK = 100
# The settings a resumed run is checked on by digest, and what each digests (a refusal names them in words).
HASHED_SETTINGS = {"model_sha": "the model's weights",
                   "test_indices_sha": "the test samples drawn (--n-test, --seed; from Python, n_test, seed)",
                   "test_sha": "the test data", "calib_sha": "the calibration data"}
# What the caller set to give each of the other settings, on the command line and from Python: a refusal to
# resume names that, not the key it is stored under.
SETTING_NAMES = {
    "eps": "--eps (from Python, eps)",
    "ratios": "--ratios (from Python, ratios)",
    "budget": "the budget (--quick; from Python, quick or budget)",
    "seed": "--seed (from Python, seed)",
    "sigma": "--sigma (from Python, sigma)",
    "chunk_size": "--chunk-size (from Python, chunk_size)",
    "batch_size": "--batch-size (from Python, batch_size)",
    "device_type": "the device type (--device; from Python, device)",
    "n_calib": "the number of calibration samples (--n-calib; from Python, n_calib)",
    "convert_kwargs": "the conversion (--acts, --inputs-of; from Python, convert_kwargs)",
    "convert_kwargs.acts": "--acts (from Python, convert_kwargs['acts'])",
    "convert_kwargs.inputs_of": "--inputs-of (from Python, convert_kwargs['inputs_of'])",
}
DEFAULT_BATCH = 500
# Small enough that a few hundred calibration samples still give each of 8 ranks a batch; the batches are the
# same for any number of processes, so the thresholds are too.
CALIB_BATCH = 16
# Test samples whose outputs tie a resumed run to the model it started with (store.bind_outputs).
PROBE_SAMPLES = 16
# What a stored unit holds; a run stored in another format is not resumed.
STORE_FORMAT = 2
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
AA_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


class EvalInputError(ValueError):
    """Bad user input (model, data, eps, ratios); the CLI prints it as ``lipkern eval: error: ...``."""


@dataclass(frozen=True)
class Budget:
    """How much of each analysis to run; ``FULL`` is the default report, ``QUICK`` the CI smoke run."""

    name: str
    n_test: int | None          # default number of attacked test samples (None: all)
    pgd_steps: int
    cw_steps: int
    aa_targets: int             # AutoAttack's APGD-T / FAB-T target classes (standard: 9)
    aa_square_queries: int      # AutoAttack's Square queries (standard: 5000)
    aux_attacks: tuple[str, ...]  # attacks of the weight variant and the ablation (AutoAttack's gradient ones)
    n_cert: int                 # test samples certified by randomized smoothing
    cert_n0: int
    cert_n: int
    cert_alpha: float
    weight_fractions: tuple[float, ...]
    n_ablation_sizes: int       # calibration-set sizes in the ablation (including the main one)
    n_lipschitz: int            # test samples whose layer inputs feed the Lipschitz / proportion analyses


# AutoAttack dominates (~2000 gradient steps and 5000 queries per chunk, nearly independent of the chunk size for
# these small models), so the secondary analyses (weight variant, calibration ablation) use AutoAttack's two
# APGD attacks, about a quarter of its cost; the main table uses the official standard AutoAttack. QUICK is a
# smoke test: it also cuts AutoAttack to 3 target classes and 1000 Square queries.
FULL = Budget("full", 200, pgd_steps=20, cw_steps=30, aa_targets=9, aa_square_queries=5000,
              aux_attacks=("apgd-ce", "apgd-t"), n_cert=100, cert_n0=100, cert_n=1000, cert_alpha=0.001,
              weight_fractions=weight_variant.SWEEP_FRACTIONS, n_ablation_sizes=3, n_lipschitz=200)
QUICK = Budget("quick", 40, pgd_steps=10, cw_steps=20, aa_targets=3, aa_square_queries=1000,
               aux_attacks=("apgd-ce",), n_cert=20, cert_n0=100, cert_n=1000, cert_alpha=0.001,
               weight_fractions=(weight_variant.DEFAULT_FRACTION,), n_ablation_sizes=2, n_lipschitz=40)

_STAGE = contextvars.ContextVar("lipkern_eval_stage", default=None)


def current_stage() -> str | None:
    """The stage :func:`evaluate` is running now (e.g. ``"2^-7/adaptive"``), for hooks that watch the model."""
    return _STAGE.get()


@contextlib.contextmanager
def _in_stage(label: str):
    token = _STAGE.set(label)
    try:
        yield
    finally:
        _STAGE.reset(token)


def ratio_label(r: float) -> str:
    k = math.log2(r)
    return f"2^{int(k)}" if k == int(k) else f"{r:g}"


def eps_label(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


@dataclass
class EvalResult:
    """Results of one or more models; ``models`` is a list of JSON-ready dicts (see ``results.json``)."""

    models: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def merged(self, other: "EvalResult") -> "EvalResult":
        return EvalResult(self.models + other.models, {**self.meta, **other.meta})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        from .report import render_markdown
        return render_markdown(self.to_dict())

    def save(self, out_dir) -> dict:
        """Writes report.md, results.json and the PNGs into ``out_dir``; returns ``{artifact: path}``."""
        from .report import write_report
        return write_report(self.to_dict(), out_dir)


def _as_split(data, what: str, *, labelled: bool) -> Split:
    """``data`` as a Split; a tensor x alone only where the labels go unused (calibration)."""
    if isinstance(data, Split):
        split = data
    elif isinstance(data, torch.Tensor) and not labelled:
        split = Split(data, torch.zeros(len(data) if data.dim() else 0, dtype=torch.long))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        split = Split(data[0], torch.as_tensor(data[1]))
    else:
        alone = "" if labelled else ", a tensor x,"
        raise EvalInputError(f"{what} must be a lipkern.eval.data.Split{alone} or an (x, y) pair of tensors; "
                             f"got {type(data).__name__}")
    if split.x.dim() == 0 or split.y.shape != split.x.shape[:1]:
        raise EvalInputError(f"{what}: y must have shape (N,) for x of shape (N, C, H, W); got x "
                             f"{tuple(split.x.shape)}, y {tuple(split.y.shape)}")
    if labelled and (split.y.is_floating_point() or split.y.is_complex() or split.y.dtype == torch.bool):
        raise EvalInputError(f"{what}: y must hold integer class labels, got dtype {split.y.dtype}")
    if split.y.dtype != torch.long:
        # The attacks index and compare labels as int64.
        split = Split(split.x, split.y.long())
    return split


def _check_number(name: str, value, low=None, high=None, *, integer=False, low_open=False):
    # numpy's scalars count as what they are: np.float32 a number, np.int64 an integer, 4.0 not an integer.
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        rng += (" and " if rng and high is not None else "") + (f"<= {high}" if high is not None else "")
        raise EvalInputError(f"{name} must be a finite {'integer' if integer else 'number'} {rng}, got {value!r}")


def check_name(name) -> None:
    """A model name becomes part of file names and Markdown tables: letters, digits and ``._+-`` only."""
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise EvalInputError(f"name must be letters, digits and . _ + - (it names the report's files), got {name!r}")


def check_eps(eps) -> None:
    if isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 1:
        raise EvalInputError(f"eps must be < 1 (an L-inf radius in [0, 1] input units), got {eps!r}; "
                             f"did you mean {eps:g}/255?")
    _check_number("eps", eps, 0, 1, low_open=True)


def described(error: BaseException) -> str:
    """An exception's type and the first line of its message, which may be empty."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines and lines[0] else type(error).__name__


def _check_data(model, calib: Split, test: Split, num_classes, device) -> int:
    for what, s in (("calib_data", calib), ("test_data", test)):
        if len(s) == 0:
            raise EvalInputError(f"{what} is empty")
        if s.x.dim() != 4:
            raise EvalInputError(f"{what}: x must have shape (N, C, H, W), got {tuple(s.x.shape)}")
    for what, s, why in (("test_data", test, "attacks clip to that box"),
                         ("calib_data", calib, "the thresholds are taken on the images the model will see")):
        if s.x.isnan().any() or s.x.min() < 0 or s.x.max() > 1:
            raise EvalInputError(f"{what}: x must lie in [0, 1], without NaN ({why})")
    expected = _input_channels(model)
    c = test.x.shape[1]
    if expected is not None and c != expected:
        hint = (" (the data looks channels-last, (N, H, W, C): transpose it to (N, C, H, W))"
                if test.x.shape[-1] == expected else "")
        raise EvalInputError(f"the data has {c} channels (samples of shape (C, H, W) = {tuple(test.x.shape[1:])}) "
                             f"but the model's first convolution takes {expected}{hint}")
    if calib.x.shape[1:] != test.x.shape[1:]:
        raise EvalInputError(f"calib_data has samples of shape {tuple(calib.x.shape[1:])}, test_data "
                             f"{tuple(test.x.shape[1:])}")
    probe = test.x[:2]
    try:
        with torch.no_grad():
            logits = model.eval()(probe.to(device))
    except Exception as e:  # noqa: BLE001 -- the model's own code may fail in any way
        raise EvalInputError(f"the model cannot run on the data's samples (shape {tuple(test.x.shape[1:])}, "
                             f"dtype {test.x.dtype}): {described(e)}") from None
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) == len(probe)):
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvalInputError(f"the model must return logits of shape (N, classes), got {got} for N = {len(probe)}")
    n_out = logits.shape[1]
    if n_out < 4:
        raise EvalInputError(f"the model outputs {n_out} logits; AutoAttack's targeted DLR loss needs at least "
                             "4 classes")
    if num_classes is not None and num_classes != n_out:
        raise EvalInputError(f"num_classes={num_classes} but the model outputs {n_out} logits")
    if test.y.min() < 0 or test.y.max() >= n_out:
        raise EvalInputError(f"test labels out of range: min {int(test.y.min())}, max {int(test.y.max())}; "
                             f"the model has {n_out} classes (labels 0..{n_out - 1})")
    return n_out


def _input_channels(model: nn.Module) -> int | None:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def select_samples(n_available: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of the attacked test samples (see the module docstring): all in order, or a seeded subset."""
    if n is None or n >= n_available:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, size=n, replace=False))


def chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def evaluate(model: nn.Module, calib_data, test_data, *, eps: float = DEFAULT_EPS, ratios=DEFAULT_RATIOS,
             quick: bool = False, convert_kwargs: dict | None = None, num_classes: int | None = None,
             sigma: float = DEFAULT_SIGMA, ablation_data=None, name: str = "model", seed: int = 0,
             progress: bool = True, progress_position: int = 0, budget: Budget | None = None,
             device: str | torch.device | None = "auto", n_test: int | None = None, n_calib: int | None = None,
             batch_size: int = DEFAULT_BATCH, chunk_size: int = DEFAULT_CHUNK, out_dir=None,
             calib_source: str = "given by the caller", run_models=None, log=None,
             threads: int | None = None) -> EvalResult:
    """Evaluate ``model`` and its remapped versions (one calibration scan, then ``set_ratio`` per c^r).

    ``calib_data`` (training data, never test data) calibrates the thresholds; ``test_data`` is ``(x, y)`` with x
    in [0, 1]. ``convert_kwargs`` go to ``lipkern.convert`` (default: its own defaults). ``ablation_data``
    (default ``calib_data``) supplies the larger calibration sets of the size ablation; its prefix of
    ``len(calib_data)`` samples should be ``calib_data`` itself so the main run doubles as one ablation point.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; every stage runs there, batch by
    batch. ``n_test``: attacked samples (default: the budget's, all when it has none); ``n_calib``: the first
    ``n_calib`` calibration samples. ``out_dir``: where per-sample outcomes are stored as they finish; work already
    stored there by an identical earlier call is reused (default: a temporary directory). Under an initialised
    ``torch.distributed`` process group, every rank must make the same call; chunks are shared among the ranks.
    ``run_models``: the names of every model evaluated into the same ``out_dir`` (``name`` among them); the store
    records them, and a resumed call must name the same ones (None: no such check).
    ``log``: where the one-line work summary and time estimate go (default stderr, main rank only).
    ``threads``: torch's intra-op threads while the evaluation runs, put back as they were when it returns (None:
    left as they are). The setting is process-wide, so it is changed only when asked for. Small models are
    latency-bound, and more threads than free cores make OpenMP spin and run several times slower: on a small
    or shared machine pass the number of free cores, 1 where other processes share them (``lipkern eval``'s
    ``--threads`` default).
    """
    budget = budget or (QUICK if quick else FULL)
    calib = _as_split(calib_data, "calib_data", labelled=False)
    test = _as_split(test_data, "test_data", labelled=True)
    if not isinstance(model, nn.Module):
        raise EvalInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    convert_kwargs = dict(convert_kwargs or {})
    try:
        _remap.check_convert_arguments(**convert_kwargs)
    except (TypeError, ValueError) as e:
        raise EvalInputError(f"convert_kwargs: {e}") from None
    check_name(name)
    if run_models is not None:
        if isinstance(run_models, str) or name not in list(run_models):
            raise EvalInputError(f"run_models must be a list of the names of every model of the run, {name!r} "
                                 f"among them, got {run_models!r}")
        for model_name in run_models:
            check_name(model_name)
    _check_number("seed", seed, 0, integer=True)
    check_eps(eps)
    if not (isinstance(ratios, (list, tuple, np.ndarray))
            and all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in ratios)):
        raise EvalInputError(f"ratios must be a list of numbers in (0, 1), got {ratios!r}")
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not (0 < r < 1) for r in ratios):
        raise EvalInputError(f"ratios must be a non-empty list of values in (0, 1), got {list(ratios)}")
    if len({ratio_label(r) for r in ratios}) < len(ratios):
        raise EvalInputError(f"ratios must not repeat a value (as the report labels them, "
                             f"{[ratio_label(r) for r in ratios]}), got {list(ratios)}")
    # Ascending: tables and plots read left to right, and the largest ratio selects the remapped layers.
    ratios = tuple(sorted(ratios))
    _check_number("sigma", sigma, 0, low_open=True)
    _check_number("batch_size", batch_size, 1, integer=True)
    _check_number("chunk_size", chunk_size, 1, integer=True)
    if threads is not None:
        _check_number("threads", threads, 1, integer=True)
    if n_test is not None:
        _check_number("n_test", n_test, 1, len(test), integer=True)
    if n_calib is not None:
        _check_number("n_calib", n_calib, 1, len(calib), integer=True)
        calib = calib.head(n_calib)
    # numpy scalars passed the checks; the settings are stored as JSON, which takes Python numbers only.
    eps, sigma, seed, batch_size, chunk_size = float(eps), float(sigma), int(seed), int(batch_size), int(chunk_size)
    n_test = None if n_test is None else int(n_test)
    try:
        processes = parallel.current()
        dev = parallel.resolve_device(device, processes.local_rank)
    except parallel.DeviceError as e:
        raise EvalInputError(str(e)) from None
    if out_dir is not None and not Path(out_dir).is_dir():
        raise EvalInputError(f"out_dir must be an existing directory, got {str(out_dir)!r}")
    if out_dir is None and processes.world > 1:
        raise EvalInputError("out_dir is required when several processes evaluate together")
    with contextlib.ExitStack() as cleanup:
        if threads is not None:
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(int(threads))
        original = copy.deepcopy(model).eval().to(dev)
        for p in original.parameters():
            p.requires_grad_(False)
        n_cls = _check_data(original, calib, test, num_classes, dev)
        ablation = calib if ablation_data is None else _as_split(ablation_data, "ablation_data", labelled=False)
        for what, size in [("calibration", len(calib)), *(("ablation calibration", k) for k in
                                                           _ablation_sizes(len(calib), len(ablation),
                                                                           budget.n_ablation_sizes))]:
            if math.ceil(size / CALIB_BATCH) < processes.world:
                raise EvalInputError(f"{size} {what} samples make {math.ceil(size / CALIB_BATCH)} batches of "
                                     f"{CALIB_BATCH}, fewer than the {processes.world} processes; every process "
                                     "needs a batch (use more calibration data or fewer processes)")
        order = select_samples(len(test), n_test if n_test is not None else budget.n_test, seed)
        plan = _Plan(name, budget, ratios, order, chunk_size, eps, sigma, seed, n_cls, batch_size)
        # Everything a per-sample outcome depends on: a resumed run must match it, or the report would mix runs.
        settings = {"store_format": STORE_FORMAT, "eps": eps, "ratios": list(ratios), "budget": asdict(budget),
                    "seed": seed, "sigma": sigma, "chunk_size": chunk_size, "batch_size": batch_size,
                    "device_type": dev.type,
                    "model_sha": _digest(*(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()
                                           for t in original.state_dict().values() if t.numel())),
                    "test_indices_sha": _digest(order), "n_calib": len(calib),
                    "convert_kwargs": _jsonable(convert_kwargs), "test_sha": _digest(test.x.numpy(), test.y.numpy()),
                    "calib_sha": _digest(calib.x.numpy())}

        try:
            converted = _remap.converted_copy(original, convert_kwargs)
        except _remap.UnusableConversionError as e:
            raise EvalInputError(f"{name}: {e}") from None
        if out_dir is None:
            out_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="lipkern-eval-"))
        # Opened once the model has converted (a model that cannot be remapped leaves no store behind) and
        # before the calibration: a resumed run with other settings stops here, and a run killed later resumes.
        try:
            store = OutcomeStore(out_dir)
        except NotAStoreError as e:
            raise EvalInputError(f"out_dir: {e}") from None
        cleanup.callback(store.close)
        mismatch = None
        try:
            store.bind_settings(name, settings, HASHED_SETTINGS, run_models, named=SETTING_NAMES,
                                shown={"eps": eps_label, "ratios": lambda rs: ",".join(map(ratio_label, rs))})
            # Each rank compares its own outputs: one may differ where the others pass.
            store.bind_outputs(name, _probe_outputs(original, test, dev))
        except SettingsMismatchError as caught:
            mismatch = caught
        processes.agree(mismatch)
        with _in_stage("calibrate"):
            converted, _ = _remap.calibrated(converted, _my_batches(calib, processes, dev), ratios[0], progress=False)
        for p in converted.parameters():
            p.requires_grad_(False)
        names = layers.check_matching(original, converted)
        with _in_stage("remap counts"):
            layer_info = _layer_selection(original, converted, calib, names, ratios, processes, dev)
        aux_models = _aux_models(original, layer_info, calib, ablation, budget, ratios, convert_kwargs,
                                 processes, dev)
        error, store_writes = None, 0.0
        try:
            store_writes = _run_chunks(plan, store, original, converted, layer_info, aux_models, test, processes, dev,
                                  progress, progress_position, log if log is not None else sys.stderr)
        except Exception as caught:  # noqa: BLE001 -- re-raised by agree() once every rank knows
            error = caught
        processes.agree(error)
        result = _aggregate(plan, store, original, layer_info, aux_models, store_writes, calib_source, len(calib),
                            test.y.numpy()[order], dev)
    return EvalResult([result], {"quick": budget.name == "quick"})


def _probe_outputs(model: nn.Module, test: Split, device) -> np.ndarray:
    """``model``'s outputs on the first test samples, which a resumed run's model must still give."""
    with torch.no_grad():
        return model(test.x[:PROBE_SAMPLES].to(device)).double().cpu().numpy()


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _jsonable(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _my_batches(split: Split, processes: parallel.Processes, device) -> list[torch.Tensor]:
    return [x.to(device) for i, (x, _) in enumerate(split.batches(CALIB_BATCH)) if processes.owns(i)]


@dataclass
class _LayerInfo:
    names: list[str]                       # every Linear / Conv2d, original model's names
    remapped: list[str]                    # those whose input the remap changes (from the calibration data)
    zero_fraction_calib: dict[str, dict[str, float]]
    wv_ratio: float
    frequency: dict[str, torch.Tensor]     # weight variant: per remapped layer, per feature


def _layer_selection(original, converted, calib, names, ratios, processes, device) -> _LayerInfo:
    """Layers with a remapped input (at the largest ratio, their share of zero inputs on the calibration data
    grows by more than ``layers.REMAPPED_MIN_GAIN``) and the weight variant's remap frequencies."""
    batches = _my_batches(calib, processes, device)
    wv_ratio = 2 ** -7 if 2 ** -7 in ratios else ratios[len(ratios) // 2]
    counts = {}
    for r in sorted({ratios[-1], wv_ratio}):
        _remap.set_ratio(converted, r)
        c = layers.remap_counts(original, converted, batches, names)
        for n in names:
            parallel.all_reduce_sum_(c[n])
        counts[r] = {n: v.cpu() for n, v in c.items()}
    last = counts[ratios[-1]]
    zero = {}
    for n in names:
        elements = last[n][0, 0].item() * (last[n].shape[1] - 1)
        zero[n] = {"original": last[n][0, 1:].sum().item() / elements,
                   "converted": last[n][1, 1:].sum().item() / elements}
    remapped = [n for n in names if zero[n]["converted"] > zero[n]["original"] + layers.REMAPPED_MIN_GAIN]
    frequency = {n: weight_variant.remap_frequency(counts[wv_ratio][n]) for n in remapped}
    _remap.set_ratio(converted, ratios[0])
    return _LayerInfo(names, remapped, {n: zero[n] for n in remapped}, wv_ratio, frequency)


def _ablation_sizes(n_main: int, n_available: int, k: int) -> list[int]:
    """``k`` calibration-set sizes: a quarter of the main set, the main set, then all available data."""
    return sorted(set([max(1, n_main // 4), n_main, n_available][:max(k, 1)]))


def _aux_models(original, info: _LayerInfo, calib, ablation, budget, ratios, convert_kwargs, processes, device):
    """``{unit name: model}`` of the weight variants and the calibration ablation (the main calibration size
    is the main run at the weight variant's ratio and needs no model of its own)."""
    models = {}
    with _in_stage("weight variant models"):
        for f in budget.weight_fractions:
            models[f"weight/{f}"] = weight_variant.weight_variant(original, info.frequency, f)
    with _in_stage("calibration ablation models"):
        for size in _ablation_sizes(len(calib), len(ablation), budget.n_ablation_sizes):
            if size == len(calib) and info.wv_ratio in ratios:
                continue
            sub = ablation.head(size)
            m, _ = _remap.remapped_copy(original, _my_batches(sub, processes, device), info.wv_ratio,
                                        convert_kwargs, progress=False)
            for p in m.parameters():
                p.requires_grad_(False)
            models[f"ablation/{len(sub)}"] = (m, None)
    return models


@dataclass(frozen=True)
class _Plan:
    name: str
    budget: Budget
    ratios: tuple[float, ...]
    order: np.ndarray                      # indices into the test set, in attack order
    chunk_size: int
    eps: float
    sigma: float
    seed: int
    num_classes: int
    batch_size: int

    @property
    def configs(self) -> list[str]:
        return ["original", *map(ratio_label, self.ratios)]

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.order) / self.chunk_size)

    def positions(self, chunk: int) -> np.ndarray:
        return np.arange(chunk * self.chunk_size, min(len(self.order), (chunk + 1) * self.chunk_size))

    def units(self, chunk: int, aux_units) -> list[str]:
        pos = self.positions(chunk)
        out = []
        for config in self.configs:
            out += [f"{config}/aa", f"{config}/cw", f"{config}/sweep"]
            if config != "original":
                out.append(f"{config}/adaptive")
            if pos[0] < self.budget.n_cert:
                out.append(f"{config}/smoothing")
            if pos[0] < self.budget.n_lipschitz:
                out.append(f"{config}/layers")
        return out + list(aux_units)


def _run_chunks(plan: _Plan, store: OutcomeStore, original, converted, info: _LayerInfo, aux_models, test: Split,
                processes, device, progress, position, log) -> float:
    """Runs this process's units that the store lacks; returns the seconds its store writes took."""
    mine = [k for k in range(plan.n_chunks) if processes.owns(k)]
    todo = [(k, u) for k in mine for u in plan.units(k, aux_models) if not store.has(plan.name, k, u)]
    total_units = sum(len(plan.units(k, aux_models)) for k in range(plan.n_chunks))
    if processes.is_main:
        print(f"lipkern eval: {plan.name}: {len(plan.order)} test samples x {len(plan.configs)} configurations "
              f"(AutoAttack, CW, FGSM/PGD at {len(SWEEP_EPS_255)} eps, adaptive+transfer, smoothing, layers) + "
              f"{len(aux_models)} weight-variant/ablation models; {chunk_phrase(len(plan.order), plan.chunk_size)} "
              f"on {processes.world} process(es), device {device}; {total_units} units, "
              f"{store.count(plan.name)} already done", file=log, flush=True)
    store_writes = 0.0
    bar = tqdm(total=len(todo), desc=f"eval {plan.name}" + (f" [rank {processes.rank}]" if processes.world > 1
                                                             else ""), disable=not progress, unit="unit",
               position=position + processes.rank, dynamic_ncols=True)
    estimated = False
    if processes.is_main and todo:
        estimated = _print_time_left(plan.name, [u for _, u in todo], store, log, "from the units stored earlier")
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, (k, unit) in enumerate(todo):
        if k not in cache:
            cache.clear()
            idx = torch.from_numpy(plan.order[plan.positions(k)])
            cache[k] = (test.x[idx].to(device), test.y[idx].to(device))
        x, y = cache[k]
        bar.set_postfix_str(f"chunk {k} {unit}")
        t0 = time.perf_counter()
        with _in_stage(unit):
            arrays = _run_unit(plan, store, unit, k, x, y, original, converted, info, aux_models)
        # Stored with the unit, so the report's timings cover every process and resumed session.
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.put(plan.name, k, unit, arrays, seconds)
        store_writes += time.perf_counter() - t1
        bar.update(1)
        done_chunk = i + 1 == len(todo) or todo[i + 1][0] != k
        if done_chunk and not estimated and processes.is_main and i + 1 < len(todo):
            estimated = _print_time_left(plan.name, [u for _, u in todo[i + 1:]], store, log,
                                         f"after chunk {k}")
    bar.close()
    return store_writes


def _print_time_left(model: str, units: list[str], store: OutcomeStore, log, basis: str) -> bool:
    """Prints the time ``units`` will take, each at the mean of the stored units of its kind (any process or
    session's); returns whether it could: the kinds cost very differently (AutoAttack against a sweep, and
    smoothing runs on the first samples only), so no estimate is made while a kind has no timing yet."""
    timed: dict[str, list[float]] = {}
    for unit, seconds in store.unit_seconds(model):
        timed.setdefault(unit, []).append(seconds)
    if not timed or any(unit not in timed for unit in units):
        return False
    left = sum(sum(timed[unit]) / len(timed[unit]) for unit in units)
    print(f"lipkern eval: {model}: estimated time left {_duration(left)} ({len(units)} units, {basis})", file=log,
          flush=True)
    return True


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _config_model(plan: _Plan, config: str, original, converted):
    if config == "original":
        return original
    _remap.set_ratio(converted, plan.ratios[plan.configs.index(config) - 1])
    return converted


def _flags(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(bool)


def _run_unit(plan: _Plan, store, unit, k, x, y, original, converted, info, aux_models) -> dict[str, np.ndarray]:
    seed = chunk_seed(plan.seed, k)
    b = plan.budget
    aa_kw = dict(num_classes=plan.num_classes, seed=seed, n_targets=b.aa_targets, batch_size=plan.batch_size)
    bs = plan.batch_size
    if unit.startswith(("weight/", "ablation/")):
        m = aux_models[unit][0]
        _, ok, _ = attacks.gradient_attacks(m, x, y, plan.eps, attacks=b.aux_attacks, **aa_kw)
        return {"clean": _flags(attacks.correct(m, x, y, bs)), "robust": _flags(ok)}
    config, stage = unit.split("/")
    m = _config_model(plan, config, original, converted)
    if stage == "aa":
        clean = attacks.correct(m, x, y, bs)
        x_adv, ok, stage_acc = attacks.autoattack(m, x, y, plan.eps, square_queries=b.aa_square_queries, **aa_kw)
        # A stage AutoAttack skips (no survivor left) keeps the count of the stage before it.
        robust, last = [], int(clean.sum())
        for s in AA_STAGES:
            last = round(stage_acc[s] * len(x)) if s in stage_acc else last
            robust.append(last)
        robust = np.array(robust)
        out = {"clean": _flags(clean), "aa": _flags(ok), "stage_robust": robust}
        if config == "original":
            out["x_adv"] = x_adv.detach().cpu().numpy()
        return out
    if stage == "cw":
        return {"cw": _flags(attacks.correct(m, attacks.pgd_cw(m, x, y, plan.eps, steps=b.cw_steps, seed=seed,
                                                              batch_size=bs), y, bs))}
    if stage == "sweep":
        fgsm = [_flags(attacks.correct(m, attacks.fgsm(m, x, y, e / 255, batch_size=bs), y, bs))
                for e in SWEEP_EPS_255]
        pgd = [_flags(attacks.correct(m, attacks.pgd(m, x, y, e / 255, steps=b.pgd_steps, seed=seed,
                                                     batch_size=bs), y, bs)) for e in SWEEP_EPS_255]
        return {"fgsm": np.stack(fgsm), "pgd": np.stack(pgd)}
    if stage == "adaptive":
        _, ok, _ = attacks.adaptive(m, x, y, plan.eps, **aa_kw)
        x_adv = torch.from_numpy(store.get(plan.name, k, "original/aa", ("x_adv",))["x_adv"]).to(x.device)
        return {"adaptive": _flags(ok), "transfer": _flags(attacks.correct(m, x_adv, y, bs))}
    pos = plan.positions(k)
    if stage == "smoothing":
        n = int((pos < b.n_cert).sum())
        preds, radii = smoothing.certify(m, x[:n], y[:n], sigma=plan.sigma, num_classes=plan.num_classes,
                                         n0=b.cert_n0, n=b.cert_n, alpha=b.cert_alpha, seed=seed, batch_size=bs)
        return {"pred": preds, "radius": radii}
    if stage == "layers":
        n = int((pos < b.n_lipschitz).sum())
        modules = dict(layers.linear_layers(original))
        selected = {name: modules[name] for name in info.remapped}
        st = layers.sample_layer_stats(m, x[:n], info.names, selected, bs)
        return {name: v.cpu().numpy() for name, v in st.items()} or {"none": np.zeros(0)}
    raise AssertionError(f"unknown unit {unit}")


def _aggregate(plan: _Plan, store: OutcomeStore, original, info: _LayerInfo, aux_models, store_writes, calib_source,
               n_calib, labels: np.ndarray, device) -> dict:
    """The results dictionary of one model, built from the store's per-sample outcomes of every chunk."""
    chunks = range(plan.n_chunks)

    def gather(unit, key, axis=0):
        return np.concatenate([store.get(plan.name, k, unit, (key,))[key] for k in chunks
                               if unit in plan.units(k, aux_models)], axis=axis)

    n = len(plan.order)
    b = plan.budget
    configs, flags = {}, {}
    for config in plan.configs:
        f = {"clean": gather(f"{config}/aa", "clean"), "autoattack": gather(f"{config}/aa", "aa"),
             "cw": gather(f"{config}/cw", "cw")}
        fgsm, pgd = gather(f"{config}/sweep", "fgsm", 1), gather(f"{config}/sweep", "pgd", 1)
        worst = f["clean"] & f["autoattack"] & f["cw"]
        if config != "original":
            f["adaptive"], f["transfer"] = gather(f"{config}/adaptive", "adaptive"), gather(f"{config}/adaptive",
                                                                                            "transfer")
            worst = worst & f["adaptive"] & f["transfer"]
        f["worst_case"] = worst
        flags[config] = f
        robust_after = sum(store.get(plan.name, k, f"{config}/aa", ("stage_robust",))["stage_robust"]
                           for k in chunks)
        stage_acc = {s: float(robust_after[j] / n) for j, s in enumerate(AA_STAGES)}
        cfg = {"ratio": None if config == "original" else plan.ratios[plan.configs.index(config) - 1]}
        for key, v in f.items():
            cfg[key] = float(v.mean())
        cfg.setdefault("adaptive", None)
        cfg.setdefault("transfer", None)
        cfg["autoattack_stages"] = stage_acc
        cfg["apgd_ce"] = stage_acc["apgd-ce"]
        cfg["square_gain"] = stage_acc["fab-t"] - stage_acc["square"]
        cfg["aux_robust"] = stage_acc[b.aux_attacks[-1]]
        cfg["fgsm"] = {str(e): float(fgsm[i].mean()) for i, e in enumerate(SWEEP_EPS_255)}
        cfg["pgd"] = {str(e): float(pgd[i].mean()) for i, e in enumerate(SWEEP_EPS_255)}
        cfg["n"] = n
        cfg["intervals"] = {key: list(stats.wilson_interval(int(v.sum()), n)[:2]) for key, v in f.items()}
        cfg["outcomes"] = {key: "".join("1" if t else "0" for t in v) for key, v in f.items()}
        configs[config] = cfg
    base = flags["original"]
    for config in plan.configs[1:]:
        f, cfg = flags[config], configs[config]
        cmp = {"clean": stats.paired(base["clean"], f["clean"]),
               "autoattack": stats.paired(base["autoattack"], f["autoattack"]),
               "worst_case": stats.paired(base["worst_case"], f["worst_case"]),
               "adaptive_vs_original_aa": stats.paired(base["autoattack"], f["adaptive"]),
               "transfer_vs_original_aa": stats.paired(base["autoattack"], f["transfer"])}
        cfg["paired"] = {k: v.to_dict() for k, v in cmp.items()}
        cfg["verdict"] = stats.verdict(cmp["autoattack"], cmp["worst_case"], cmp["clean"])
    for config, cfg in configs.items():
        cfg["audit"] = audit.audit(cfg, n, original_autoattack=configs["original"]["autoattack"])

    n_cert = min(b.n_cert, n)
    cert = {}
    for config in plan.configs:
        preds, radii = gather(f"{config}/smoothing", "pred"), gather(f"{config}/smoothing", "radius")
        cert[config] = smoothing.certified_accuracy(preds, radii, labels[:n_cert], CERT_RADII)

    n_lip = min(b.n_lipschitz, n)
    per_sample = {config: {name: torch.from_numpy(gather(f"{config}/layers", name)) for name in info.remapped}
                  for config in plan.configs}
    zero = {config: {name: float(v[:, 0].sum() / v[:, 1].sum()) for name, v in st.items()}
            for config, st in per_sample.items()}
    modules = dict(layers.linear_layers(original))
    lip = lipschitz.lipschitz_table({name: modules[name] for name in info.remapped}, per_sample)

    wv_label = ratio_label(info.wv_ratio)
    aux_label = " + ".join(a.upper() for a in b.aux_attacks)
    wv_rows, ab_rows = [], []
    for unit, (_, pruned) in aux_models.items():
        clean, robust = gather(unit, "clean"), gather(unit, "robust")
        row = {"clean": float(clean.mean()), "robust": float(robust.mean()),
               "robust_interval": list(stats.wilson_interval(int(robust.sum()), n))}
        if unit.startswith("weight/"):
            wv_rows.append({"fraction": float(unit.split("/")[1]), "pruned_columns": pruned, **row})
        else:
            ab_rows.append({"n_calib": int(unit.split("/")[1]), **row})
    if wv_label in configs:
        main = configs[wv_label]
        ab_rows.append({"n_calib": n_calib, "clean": main["clean"], "robust": main["aux_robust"],
                        "robust_interval": list(stats.wilson_interval(round(main["aux_robust"] * n), n))})
    ab_rows.sort(key=lambda r: r["n_calib"])

    return {
        "name": plan.name, "eps": plan.eps, "eps_label": eps_label(plan.eps), "ratios": list(plan.ratios),
        "ratio_labels": [ratio_label(r) for r in plan.ratios], "n_test": n, "n_calib": n_calib,
        "calib_source": calib_source, "test_indices": plan.order.tolist(), "chunk_size": plan.chunk_size,
        "seed": plan.seed, "device": str(device), "num_classes": plan.num_classes, "budget": asdict(b),
        "configs": configs,
        "smoothing": {"sigma": plan.sigma, "n0": b.cert_n0, "n": b.cert_n, "alpha": b.cert_alpha,
                      "n_points": n_cert, "radii": list(CERT_RADII), "certified_accuracy": cert},
        "layers": {"names": info.remapped, "zero_fraction": zero, "n_samples": n_lip,
                   "zero_fraction_calibration": info.zero_fraction_calib},
        "lipschitz": lip,
        "weight_variant": {"ratio": info.wv_ratio, "ratio_label": wv_label, "attack": aux_label, "rows": wv_rows},
        "calib_ablation": {"ratio": info.wv_ratio, "ratio_label": wv_label, "attack": aux_label, "rows": ab_rows},
        "timings_s": _stage_timings(plan, store),
        "store_writes_s_this_session": round(store_writes, 2),
    }


def _stage_timings(plan: _Plan, store: OutcomeStore) -> dict[str, float]:
    """Seconds per kind of stage, summed over every stored unit: all processes and resumed sessions."""
    timings: dict[str, float] = {}
    for unit, seconds in store.unit_seconds(plan.name):
        kind = unit.split("/")[-1] if not unit.startswith(("weight/", "ablation/")) else unit.split("/")[0]
        timings[kind] = timings.get(kind, 0.0) + seconds
    return {kind: round(seconds, 2) for kind, seconds in timings.items()}
