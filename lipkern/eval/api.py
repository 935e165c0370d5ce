"""``lipkern.eval.evaluate``: the whole evaluation of one model, original vs each remap ratio c^r."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from . import _remap, attacks, audit, layers, lipschitz, smoothing, weight_variant
from .data import Split

DEFAULT_RATIOS = (2 ** -8, 2 ** -7, 2 ** -6)
DEFAULT_EPS = 32 / 255  # see lipkern/eval/train.py for why this suits 8x8 digits
SWEEP_EPS_255 = (1, 2, 4, 8, 16, 32, 64, 96)
# sigma = 0.25 is Cohen et al.'s middle setting; on [0, 1] digits it is two grey levels' worth of noise per
# pixel in L2 terms over 64 pixels (||noise|| ~ 2), large enough to certify non-trivial radii.
DEFAULT_SIGMA = 0.25
CERT_RADII = tuple(round(0.05 * i, 2) for i in range(0, 21))


class EvalInputError(ValueError):
    """Bad user input (model, data, eps, ratios); the CLI prints it as ``lipkern eval: error: ...``."""


@dataclass(frozen=True)
class Budget:
    """How much of each analysis to run; ``FULL`` is the default report, ``QUICK`` the CI smoke run."""

    name: str
    n_test: int | None          # test samples for the attacks (None: all)
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


# Sized so that, with one model per core and one intra-op thread, the embedded default runs in <= 15 min (full)
# and <= 3 min (quick) on 2 cores. AutoAttack dominates (~2000 gradient steps and 5000 queries per run, nearly
# independent of the batch size for these small models), so the secondary analyses (weight variant, calibration
# ablation) use AutoAttack's two APGD attacks, about a quarter of its cost; the main table uses the official
# standard AutoAttack. QUICK is a smoke test: it also cuts AutoAttack to 3 target classes and 1000 Square queries.
FULL = Budget("full", 200, pgd_steps=20, cw_steps=30, aa_targets=9, aa_square_queries=5000,
              aux_attacks=("apgd-ce", "apgd-t"), n_cert=100, cert_n0=100, cert_n=1000, cert_alpha=0.001,
              weight_fractions=weight_variant.SWEEP_FRACTIONS, n_ablation_sizes=3, n_lipschitz=200)
QUICK = Budget("quick", 40, pgd_steps=10, cw_steps=20, aa_targets=3, aa_square_queries=1000,
               aux_attacks=("apgd-ce",), n_cert=20, cert_n0=100, cert_n=1000, cert_alpha=0.001,
               weight_fractions=(weight_variant.DEFAULT_FRACTION,), n_ablation_sizes=2, n_lipschitz=40)


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


def _as_split(data, what: str) -> Split:
    if isinstance(data, Split):
        return data
    if isinstance(data, torch.Tensor):
        return Split(data, torch.zeros(len(data), dtype=torch.long))
    if isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(data[0], torch.Tensor):
        return Split(data[0], torch.as_tensor(data[1]))
    raise EvalInputError(f"{what} must be a lipkern.eval.data.Split, a tensor x, or an (x, y) pair of tensors; "
                    f"got {type(data).__name__}")


def _check_inputs(model, calib: Split, test: Split, eps: float, ratios, num_classes: int | None) -> int:
    if not isinstance(model, nn.Module):
        raise EvalInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise EvalInputError(f"eps must be a finite number > 0 (in [0, 1] input units), got {eps!r}")
    if not ratios or any(not (0 < r < 1) for r in ratios):
        raise EvalInputError(f"ratios must be a non-empty list of values in (0, 1), got {list(ratios)}")
    for what, s in (("calib_data", calib), ("test_data", test)):
        if len(s) == 0:
            raise EvalInputError(f"{what} is empty")
        if s.x.dim() != 4:
            raise EvalInputError(f"{what}: x must have shape (N, C, H, W), got {tuple(s.x.shape)}")
    if test.x.min() < 0 or test.x.max() > 1:
        raise EvalInputError("test_data: x must lie in [0, 1] (attacks clip to that box)")
    with torch.no_grad():
        n_out = model.eval()(test.x[:2]).shape[-1]
    if n_out < 4:
        raise EvalInputError(f"the model outputs {n_out} logits; AutoAttack's targeted DLR loss needs at least "
                             "4 classes")
    if num_classes is not None and num_classes != n_out:
        raise EvalInputError(f"num_classes={num_classes} but the model outputs {n_out} logits")
    if test.y.min() < 0 or test.y.max() >= n_out:
        raise EvalInputError(f"test labels out of range: min {int(test.y.min())}, max {int(test.y.max())}; "
                         f"the model has {n_out} classes (labels 0..{n_out - 1})")
    return n_out


def _acc(flags: torch.Tensor) -> float:
    return flags.float().mean().item()


def evaluate(model: nn.Module, calib_data, test_data, *, eps: float = DEFAULT_EPS, ratios=DEFAULT_RATIOS,
             quick: bool = False, convert_kwargs: dict | None = None, num_classes: int | None = None,
             sigma: float = DEFAULT_SIGMA, ablation_data=None, name: str = "model", seed: int = 0,
             progress: bool = True, progress_position: int = 0, budget: Budget | None = None) -> EvalResult:
    """Evaluate ``model`` and its remapped versions (one calibration scan, then ``set_ratio`` per c^r).

    ``calib_data`` (training data, never test data) calibrates the thresholds; ``test_data`` is ``(x, y)`` with x
    in [0, 1]. ``convert_kwargs`` go to ``lipkern.convert`` (default: its own defaults). ``ablation_data``
    (default ``calib_data``) supplies the larger calibration sets of the size ablation; its prefix of
    ``len(calib_data)`` samples should be ``calib_data`` itself so the main run doubles as one ablation point.
    """
    budget = budget or (QUICK if quick else FULL)
    calib, test = _as_split(calib_data, "calib_data"), _as_split(test_data, "test_data")
    ratios = tuple(float(r) for r in ratios)
    n_cls = _check_inputs(model, calib, test, eps, ratios, num_classes)
    ablation = calib if ablation_data is None else _as_split(ablation_data, "ablation_data")
    convert_kwargs = dict(convert_kwargs or {})
    test = test.head(budget.n_test)
    x, y = test.x, test.y
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    timings: dict[str, float] = {}
    stages = ["calibrate"] + [f"{c}: {s}" for c in ["original", *map(ratio_label, ratios)]
                              for s in ("clean+AutoAttack", "CW", "FGSM/PGD sweep", "adaptive+transfer",
                                        "smoothing", "layers")]
    stages = [s for s in stages if not (s.startswith("original: adaptive"))]
    stages += ["weight variant", "calibration ablation"]
    bar = tqdm(total=len(stages), desc=f"eval {name}", disable=not progress, unit="step",
               position=progress_position)

    def stage(label):
        bar.set_postfix_str(label)
        return _Timer(timings, label, bar)

    calib_batches = list(calib.batches(256))
    with stage("calibrate"):
        converted, _ = _remap.remapped_copy(original, calib_batches, ratios[0], convert_kwargs, progress=False)
        for p in converted.parameters():
            p.requires_grad_(False)
        names = layers.check_matching(original, converted)

    aa_kw = dict(num_classes=n_cls, seed=seed, n_targets=budget.aa_targets)
    configs: dict[str, dict] = {}
    layer_inputs: dict[str, dict[str, torch.Tensor]] = {}
    cert = {}
    n_lip = min(budget.n_lipschitz, len(x))
    x_adv_original = None
    for r in (None, *ratios):
        label = "original" if r is None else ratio_label(r)
        if r is None:
            m = original
        else:
            _remap.set_ratio(converted, r)
            m = converted
        cfg: dict = {"ratio": r}
        with stage(f"{label}: clean+AutoAttack"):
            clean = attacks.correct(m, x, y)
            x_adv, aa_ok, aa_stages = attacks.autoattack(m, x, y, eps, square_queries=budget.aa_square_queries,
                                                      **aa_kw)
            cfg["clean"], cfg["autoattack"] = _acc(clean), _acc(aa_ok)
            cfg["autoattack_stages"] = _stage_accuracies(aa_stages, cfg["clean"])
            cfg["apgd_ce"] = cfg["autoattack_stages"]["apgd-ce"]
            cfg["square_gain"] = cfg["autoattack_stages"]["fab-t"] - cfg["autoattack_stages"]["square"]
            # The secondary analyses' attack is a prefix of AutoAttack's sequence with the same settings and seed,
            # so its accuracy on this configuration is the matching AutoAttack stage.
            cfg["aux_robust"] = cfg["autoattack_stages"][budget.aux_attacks[-1]]
            worst = clean & aa_ok
            if r is None:
                x_adv_original = x_adv
        with stage(f"{label}: CW"):
            cw_ok = attacks.correct(m, attacks.pgd_cw(m, x, y, eps, steps=budget.cw_steps, seed=seed), y)
            cfg["cw"] = _acc(cw_ok)
            worst &= cw_ok
        with stage(f"{label}: FGSM/PGD sweep"):
            cfg["fgsm"], cfg["pgd"] = {}, {}
            for k in SWEEP_EPS_255:
                cfg["fgsm"][str(k)] = _acc(attacks.correct(m, attacks.fgsm(m, x, y, k / 255), y))
                cfg["pgd"][str(k)] = _acc(attacks.correct(m, attacks.pgd(m, x, y, k / 255, steps=budget.pgd_steps,
                                                                          seed=seed), y))
        cfg["adaptive"] = cfg["transfer"] = None
        if r is not None:
            with stage(f"{label}: adaptive+transfer"):
                _, ad_ok, _ = attacks.adaptive(m, x, y, eps, **aa_kw)
                tr_ok = attacks.correct(m, x_adv_original, y)
                cfg["adaptive"], cfg["transfer"] = _acc(ad_ok), _acc(tr_ok)
                worst &= ad_ok & tr_ok
        cfg["worst_case"] = _acc(worst)
        with stage(f"{label}: smoothing"):
            n_c = min(budget.n_cert, len(x))
            preds, radii = smoothing.certify(m, x[:n_c], y[:n_c], sigma=sigma, num_classes=n_cls, n0=budget.cert_n0,
                                             n=budget.cert_n, alpha=budget.cert_alpha, seed=seed,
                                             progress=progress, desc=f"certify {label}",
                                             position=2 + progress_position)
            cert[label] = smoothing.certified_accuracy(preds, radii, y[:n_c].numpy(), CERT_RADII)
        with stage(f"{label}: layers"):
            layer_inputs[label] = layers.layer_inputs(m, x[:n_lip], names)
        cfg["audit"] = audit.audit(cfg, len(x))
        configs[label] = cfg

    last = ratio_label(ratios[-1])
    zero = {c: layers.zero_fractions(v) for c, v in layer_inputs.items()}
    remapped_layers = [n for n in names if zero[last][n] > zero["original"][n] + layers.REMAPPED_MIN_GAIN]
    modules = dict(layers.linear_layers(original))
    lip = lipschitz.lipschitz_table({n: modules[n] for n in remapped_layers},
                                    {c: {n: v[n] for n in remapped_layers} for c, v in layer_inputs.items()})
    del layer_inputs

    wv_ratio = 2 ** -7 if 2 ** -7 in ratios else ratios[len(ratios) // 2]
    aux_label = " + ".join(a.upper() for a in budget.aux_attacks)

    def aux_attack(model_, x_, y_, eps_, **kw):
        return attacks.gradient_attacks(model_, x_, y_, eps_, attacks=budget.aux_attacks, **kw)
    with stage("weight variant"):
        _remap.set_ratio(converted, wv_ratio)
        freq = weight_variant.remap_frequency(
            {n: v for n, v in layers.layer_inputs(converted, calib.x, names).items() if n in remapped_layers},
            layers.layer_inputs(original, calib.x, names))
        wv_rows = []
        for f in budget.weight_fractions:
            wm, pruned = weight_variant.weight_variant(original, freq, f)
            _, ok, _ = aux_attack(wm, x, y, eps, **aa_kw)
            wv_rows.append({"fraction": f, "pruned_columns": pruned, "clean": _acc(attacks.correct(wm, x, y)),
                            "robust": _acc(ok)})

    with stage("calibration ablation"):
        ab_rows = []
        for size in _ablation_sizes(len(calib), len(ablation), budget.n_ablation_sizes):
            if size == len(calib) and wv_ratio in ratios:
                main = configs[ratio_label(wv_ratio)]
                ab_rows.append({"n_calib": size, "clean": main["clean"], "robust": main["aux_robust"]})
                continue
            sub = ablation.head(size)
            am, _ = _remap.remapped_copy(original, list(sub.batches(256)), wv_ratio, convert_kwargs, progress=False)
            _, ok, _ = aux_attack(am, x, y, eps, **aa_kw)
            ab_rows.append({"n_calib": size, "clean": _acc(attacks.correct(am, x, y)), "robust": _acc(ok)})
    bar.close()

    result = {
        "name": name, "eps": eps, "eps_label": eps_label(eps), "ratios": list(ratios),
        "ratio_labels": [ratio_label(r) for r in ratios], "n_test": len(x), "n_calib": len(calib),
        "num_classes": n_cls, "budget": asdict(budget), "convert_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                                            for k, v in convert_kwargs.items()},
        "configs": configs,
        "smoothing": {"sigma": sigma, "n0": budget.cert_n0, "n": budget.cert_n, "alpha": budget.cert_alpha,
                      "n_points": min(budget.n_cert, len(x)), "radii": list(CERT_RADII), "certified_accuracy": cert},
        "layers": {"names": remapped_layers, "zero_fraction": {c: {n: z[n] for n in remapped_layers}
                                                               for c, z in zero.items()},
                   "n_samples": n_lip},
        "lipschitz": lip,
        "weight_variant": {"ratio": wv_ratio, "ratio_label": ratio_label(wv_ratio), "attack": aux_label,
                           "rows": wv_rows},
        "calib_ablation": {"ratio": wv_ratio, "ratio_label": ratio_label(wv_ratio), "attack": aux_label,
                           "rows": ab_rows},
        "timings_s": timings,
    }
    return EvalResult([result], {"quick": budget.name == "quick"})


def _stage_accuracies(stages: dict[str, float], clean: float) -> dict[str, float]:
    """Accuracy after each AutoAttack stage; a stage skipped because no point was left keeps the previous value."""
    out, last = {}, clean
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        last = out[name] = stages.get(name, last)
    return out


def _ablation_sizes(n_main: int, n_available: int, k: int) -> list[int]:
    """``k`` calibration-set sizes: a quarter of the main set, the main set, then all available data."""
    return sorted(set([max(1, n_main // 4), n_main, n_available][:max(k, 1)]))


class _Timer:
    def __init__(self, store, label, bar):
        self.store, self.label, self.bar = store, label, bar

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.store[self.label] = round(time.perf_counter() - self.t0, 2)
        if exc[0] is None:
            self.bar.update(1)
        return False
