"""Attacks, each a thin wrapper over a kept library where one fits.

* AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square): ``pyautoattack.AutoAttack``.
* Adaptive attack: APGD-CE then APGD-T (9 targets), ``pyautoattack``'s classes driven by the same
  ``AutoAttack`` runner (``version="custom"``), with the model inside ``lipkern.straight_through`` so the
  remap's backward is the BPDA identity ``dx = dy * act'(x)``; the forward (what is scored) is unchanged.
* FGSM / PGD (cross entropy): ``torchattacks``.
* CW-L-inf: PGD on the CW margin loss. torchattacks' PGD hard-codes cross entropy, so this one is written
  here as a ``torchattacks.attack.Attack`` subclass.

All functions return per-sample boolean "still correct" flags (and adversarial inputs where useful), so
that the caller can combine attacks per sample (worst case over attacks). Everything runs on the device of
``x``, which must be the model's.
"""
from __future__ import annotations

import contextlib
import logging
import re

import torch
import torch.nn as nn
import torchattacks
from torchattacks.attack import Attack
from pyautoattack import AutoAttack

from . import _remap


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return predict(model, x, batch_size) == y


def _batched(attack, x, y, batch_size):
    return torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def fgsm(model, x, y, eps, batch_size=500):
    if eps == 0:
        return x.clone()
    return _batched(torchattacks.FGSM(model, eps=eps), x, y, batch_size)


def pgd(model, x, y, eps, steps=20, batch_size=500, seed=0):
    """L-inf PGD on cross entropy, random start, step 2.5 * eps / steps (Madry et al.'s schedule)."""
    if eps == 0:
        return x.clone()
    torch.manual_seed(seed)
    return _batched(torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True),
                    x, y, batch_size)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin, per sample: max_{j != y} z_j - z_y (positive means misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z_y


class PGDCW(Attack):
    """L-inf PGD maximising the CW margin loss (the paper's "CW attack on L-inf", Table 4)."""

    def __init__(self, model, eps, steps=30, alpha=None, random_start=True):
        super().__init__("PGDCW", model)
        self.eps, self.steps, self.random_start = eps, steps, random_start
        self.alpha = 2.5 * eps / steps if alpha is None else alpha
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        best = images.clone()
        best_margin = torch.full((len(images),), float("-inf"), device=images.device)
        for _ in range(self.steps + 1):
            adv.requires_grad_(True)
            margin = margin_loss(self.get_logits(adv), labels)
            grad = torch.autograd.grad(margin.sum(), adv)[0]
            # Keep the best iterate per sample: a later step can walk back across the boundary.
            better = margin.detach() > best_margin
            best[better], best_margin[better] = adv.detach()[better], margin.detach()[better]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1)
        return best


def pgd_cw(model, x, y, eps, steps=30, batch_size=500, seed=0):
    torch.manual_seed(seed)
    return _batched(PGDCW(model, eps=eps, steps=steps), x, y, batch_size)


class _StageLog(logging.Handler):
    """Collects AutoAttack's "robust accuracy after <ATTACK>: xx.xx%" lines: the per-stage accuracies it
    computes but does not return."""

    PATTERN = re.compile(r"robust accuracy after ([A-Z\-]+): ([0-9.]+)%")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.stages: dict[str, float] = {}

    def emit(self, record):
        m = self.PATTERN.match(record.getMessage())
        if m:
            self.stages[m.group(1).lower()] = float(m.group(2)) / 100


@contextlib.contextmanager
def _stage_log():
    logger = logging.getLogger("auto-attack")
    handler, saved = _StageLog(), (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # AutoAttack's chatter stays off the report's stdout
    logger.addHandler(handler)
    try:
        yield handler.stages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _run_autoattack(model, x, y, eps, *, num_classes, seed, batch_size, attacks=None, n_targets=9,
                    square_queries=5000):
    """Runs pyautoattack's AutoAttack (standard version, or ``attacks`` in order as version "custom").

    ``n_targets`` / ``square_queries`` other than the standard 9 / 5000 are for reduced (quick) budgets only.
    Returns ``(x_adv, still-correct flags, {attack: robust accuracy after that stage})``.
    """
    if attacks is None:
        aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device)
    else:
        aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=list(attacks), seed=seed,
                        device=x.device)
        aa.apgd.n_restarts = 1
        aa.apgd_targeted.n_restarts = 1
    # AutoAttack's 9 targets assume >= 10 classes; fewer classes cap the targets at num_classes - 1.
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = min(n_targets, num_classes - 1)
    aa.square.n_queries = square_queries
    with _stage_log() as stages:
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv, correct(model, x_adv, y, batch_size), stages


def autoattack(model, x, y, eps, *, num_classes, seed=0, batch_size=500, n_targets=9, square_queries=5000):
    """Official AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square 5000 queries), L-inf.

    The per-stage accuracies give APGD-CE's own accuracy (it runs first on all points) and what the
    gradient-free Square adds on the points that survive the three gradient-based attacks.
    """
    return _run_autoattack(model, x, y, eps, num_classes=num_classes, seed=seed, batch_size=batch_size,
                           n_targets=n_targets, square_queries=square_queries)


def gradient_attacks(model, x, y, eps, *, num_classes, attacks=("apgd-ce", "apgd-t"), seed=0, batch_size=500,
                     n_targets=9):
    """AutoAttack's gradient attacks alone (APGD-CE, then APGD-T on the survivors), plain gradients."""
    return _run_autoattack(model, x, y, eps, num_classes=num_classes, seed=seed, batch_size=batch_size,
                           attacks=attacks, n_targets=n_targets)


def adaptive(model, x, y, eps, *, num_classes, seed=0, batch_size=500, n_targets=9):
    """APGD-CE + APGD-T through the remapped model with the straight-through (BPDA) remap gradient."""
    with _remap.straight_through(model):
        return gradient_attacks(model, x, y, eps, num_classes=num_classes, seed=seed, batch_size=batch_size,
                                n_targets=n_targets)
