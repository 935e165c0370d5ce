"""Uncertainty of accuracies and of paired differences, and the verdict built on them.

* One accuracy: the Wilson score interval (Wilson 1927), which keeps its coverage near 0 and 1 where the
  normal-approximation interval collapses to a point.
* Two models on the same samples: the difference of accuracies with Bonett & Price's (2012) adjusted Wald
  interval for paired proportions, and McNemar's exact test: under "no difference" the discordant samples split 50/50, so the
  two-sided p-value is a binomial tail on the discordant count (scipy's ``binomtest``).

A difference is called a gain or a loss only when the McNemar p-value is below ``ALPHA``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest, norm

ALPHA = 0.05
Z95 = float(norm.ppf(1 - ALPHA / 2))


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    if b + c == 0:
        return 1.0
    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """Bonett & Price's adjusted Wald interval for acc_B - acc_A from the 2x2 table of samples.

    a: both correct, b: only A correct, c: only B correct, d: both wrong. Adding one to each discordant count
    keeps the coverage near 95 % for small or lopsided tables and never gives a zero-width interval (Newcombe's
    score-based hybrid does when the two models agree on every sample).
    """
    n = a + b + c + d
    if n <= 0 or min(a, b, c, d) < 0:
        raise ValueError(f"need non-negative counts with a positive total, got {(a, b, c, d)}")
    only_a, only_b = (b + 1) / (n + 2), (c + 1) / (n + 2)
    diff = only_b - only_a
    half = z * math.sqrt((only_a + only_b - diff * diff) / (n + 2))
    return max(-1.0, diff - half), min(1.0, diff + half)


@dataclass(frozen=True)
class Accuracy:
    k: int
    n: int
    value: float
    low: float
    high: float

    @classmethod
    def of(cls, flags) -> "Accuracy":
        flags = np.asarray(flags, dtype=bool)
        k, n = int(flags.sum()), int(flags.size)
        low, high = wilson_interval(k, n)
        return cls(k, n, k / n, low, high)


@dataclass(frozen=True)
class PairedComparison:
    """``candidate`` vs ``baseline`` on the same samples (difference = candidate - baseline)."""

    n: int
    baseline: float
    candidate: float
    difference: float
    low: float
    high: float
    only_baseline: int     # samples the baseline gets right and the candidate wrong
    only_candidate: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    @property
    def direction(self) -> int:
        """+1 significant gain, -1 significant loss, 0 no significant change."""
        return 0 if not self.significant else (1 if self.difference > 0 else -1)

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant, "direction": self.direction}


def paired(baseline_flags, candidate_flags) -> PairedComparison:
    base = np.asarray(baseline_flags, dtype=bool)
    cand = np.asarray(candidate_flags, dtype=bool)
    if base.shape != cand.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(f"paired outcomes need two non-empty 1-D arrays of one length, got {base.shape} and "
                         f"{cand.shape}")
    a, b = int((base & cand).sum()), int((base & ~cand).sum())
    c, d = int((~base & cand).sum()), int((~base & ~cand).sum())
    low, high = paired_difference_interval(a, b, c, d)
    n = base.size
    return PairedComparison(n, (a + b) / n, (a + c) / n, (c - b) / n, low, high, b, c, mcnemar_exact(b, c))


GAIN = "significant gain that survives the adaptive attack"
NO_CHANGE = "no significant change"
LOSS = "significant loss"
MASKING = "gain under AutoAttack only, gone under the adaptive or transfer attack (gradient masking)"
UNCONFIRMED = ("gain under AutoAttack, not confirmed in the worst case over the adaptive and transfer attacks "
               "(inconclusive at this sample size)")
CLEAN_COST = ", at a significant loss of clean accuracy"


def verdict(autoattack: PairedComparison, worst_case: PairedComparison, clean: PairedComparison | None = None) -> str:
    """One remapped configuration vs the original model.

    ``autoattack``: AutoAttack outcomes, original vs remapped. ``worst_case``: the original's worst case vs the
    remapped model's worst case over AutoAttack, the adaptive BPDA attack, CW and transfer from the original.
    A gain counts only if it holds in the worst case. An AutoAttack gain whose worst-case estimate is gone
    (difference <= 0) is the masking signature RobustBench found for MeanSparse; one that shrinks but stays
    positive without significance is reported as unconfirmed rather than as masking. A significant loss in
    clean accuracy is a loss where the attacks show no gain, and is named beside any gain they show (a robust
    gain bought with clean accuracy is a trade-off, not a free improvement).
    """
    clean_loss = clean is not None and clean.direction < 0
    if worst_case.direction > 0:
        robust = GAIN
    elif autoattack.direction > 0:
        robust = MASKING if worst_case.difference <= 0 else UNCONFIRMED
    elif worst_case.direction < 0 or autoattack.direction < 0 or clean_loss:
        return LOSS
    else:
        return NO_CHANGE
    return robust + CLEAN_COST if clean_loss else robust
