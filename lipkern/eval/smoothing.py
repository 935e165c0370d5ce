"""Randomized-smoothing certification, CERTIFY of Cohen, Rosenfeld & Kolter (2019), L2 radius.

g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). CERTIFY: pick the top class from n0 noise draws, estimate its
probability from n fresh draws, take the one-sided (1 - alpha) Clopper-Pearson lower bound pA; abstain if
pA < 1/2, else certify radius sigma * Phi^-1(pA). No clipping of the noisy inputs (as in Cohen et al.).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta, norm
from tqdm import tqdm

ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion with k successes of n."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


@torch.no_grad()
def _counts(model, x, num, sigma, num_classes, batch_size, gen):
    counts = torch.zeros(num_classes, dtype=torch.long)
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        batch = x[None].expand(b, *x.shape)
        noisy = batch + sigma * torch.randn(batch.shape, generator=gen)
        counts += torch.bincount(model(noisy).argmax(1), minlength=num_classes)
        remaining -= b
    return counts


def certify(model, x, y, *, sigma: float, num_classes: int, n0: int = 100, n: int = 1000, alpha: float = 0.001,
            batch_size: int = 1000, seed: int = 0, progress: bool = True, desc: str = "certify", position=None):
    """Returns ``(prediction, radius)`` arrays over the samples; prediction ABSTAIN (-1) with radius 0 on abstain."""
    if not (n0 >= 1 and n >= 1 and 0 < alpha < 1 and sigma > 0):
        raise ValueError(f"need n0 >= 1, n >= 1, 0 < alpha < 1, sigma > 0 (got {n0}, {n}, {alpha}, {sigma})")
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    preds = np.full(len(x), ABSTAIN, dtype=np.int64)
    radii = np.zeros(len(x))
    for i in tqdm(range(len(x)), desc=desc, disable=not progress, leave=False, position=position):
        c_hat = int(_counts(model, x[i], n0, sigma, num_classes, batch_size, gen).argmax())
        n_a = int(_counts(model, x[i], n, sigma, num_classes, batch_size, gen)[c_hat])
        p_a = lower_confidence_bound(n_a, n, alpha)
        if p_a >= 0.5:
            preds[i], radii[i] = c_hat, sigma * norm.ppf(p_a)
    return preds, radii


def certified_accuracy(preds, radii, y, grid) -> list[float]:
    """Fraction of samples certified correct at radius >= r, for each r of ``grid`` (non-increasing in r)."""
    y = np.asarray(y)
    ok = preds == y
    return [float(np.mean(ok & (radii >= r))) for r in grid]
