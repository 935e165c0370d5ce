"""Randomized-smoothing certification, CERTIFY of Cohen, Rosenfeld & Kolter (2019), L2 radius.

g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). CERTIFY: pick the top class from n0 noise draws, estimate its
probability from n fresh draws, take the one-sided (1 - alpha) Clopper-Pearson lower bound pA; abstain if
pA < 1/2, else certify radius sigma * Phi^-1(pA). No clipping of the noisy inputs (as in Cohen et al.).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta, norm

ABSTAIN = -1


def lower_confidence_bound(k, n: int, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion with k successes of n
    (elementwise over an array of k)."""
    k = np.asarray(k)
    return np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)


@torch.no_grad()
def _class_counts(model, x, draws, sigma, num_classes, batch_size, gen):
    """(len(x), num_classes) counts of the classes ``model`` predicts on ``draws`` noisy copies of each sample.

    Samples are taken ``batch_size`` at a time and their copies made ``per_round`` at a time, so that one
    forward holds at most about ``batch_size`` inputs; everything stays on the samples' device.
    """
    counts = torch.zeros(len(x), num_classes, dtype=torch.long, device=x.device)
    for start in range(0, len(x), batch_size):
        group = x[start:start + batch_size]
        per_round = max(1, batch_size // len(group))
        done = 0
        while done < draws:
            k = min(per_round, draws - done)
            batch = group.repeat_interleave(k, 0)
            noisy = batch + sigma * torch.randn(batch.shape, generator=gen, device=x.device)
            preds = model(noisy).argmax(1).reshape(len(group), k)
            counts[start:start + len(group)].scatter_add_(1, preds, torch.ones_like(preds))
            done += k
    return counts


def certify(model, x, y, *, sigma: float, num_classes: int, n0: int = 100, n: int = 1000, alpha: float = 0.001,
            batch_size: int = 1000, seed: int = 0):
    """Returns ``(prediction, radius)`` numpy arrays over the samples; prediction ABSTAIN (-1) with radius 0 on
    abstain. All samples are certified together (one host transfer for the counts); the noise comes from one
    generator seeded with ``seed`` on the samples' device."""
    if not (n0 >= 1 and n >= 1 and 0 < alpha < 1 and sigma > 0):
        raise ValueError(f"need n0 >= 1, n >= 1, 0 < alpha < 1, sigma > 0 (got {n0}, {n}, {alpha}, {sigma})")
    model.eval()
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    c_hat = _class_counts(model, x, n0, sigma, num_classes, batch_size, gen).argmax(1)
    n_a = _class_counts(model, x, n, sigma, num_classes, batch_size, gen).gather(1, c_hat[:, None])[:, 0]
    c_hat, n_a = c_hat.cpu().numpy(), n_a.cpu().numpy()
    p_a = lower_confidence_bound(n_a, n, alpha)
    certified = p_a >= 0.5
    preds = np.where(certified, c_hat, ABSTAIN).astype(np.int64)
    radii = np.where(certified, sigma * norm.ppf(np.clip(p_a, 0.5, 1.0)), 0.0)
    return preds, radii


def certified_accuracy(preds, radii, y, grid) -> list[float]:
    """Fraction of samples certified correct at radius >= r, for each r of ``grid`` (non-increasing in r)."""
    y = np.asarray(y)
    ok = preds == y
    return [float(np.mean(ok & (radii >= r))) for r in grid]
