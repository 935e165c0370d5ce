"""Gradient-masking audit: the checks of the paper's appendix B plus the adaptive and gradient-free ones.

For each model configuration (original, each c^r):
  1. one-step FGSM accuracy >= iterative PGD accuracy at every eps (up to the margin);
  2. PGD accuracy at the largest eps of the sweep <= NEAR_ZERO;
  3. transfer accuracy (attacks made on the original model) >= white-box AutoAttack accuracy - margin;
  4. adaptive (BPDA through the remap) accuracy >= AutoAttack accuracy - margin;
  5. for a remapped configuration whose AutoAttack accuracy exceeds the original model's by more than the margin:
     the adaptive and the transfer accuracies exceed it too (RobustBench's re-evaluation of MeanSparse: an
     AutoAttack gain that BPDA takes back is masking, not robustness);
  6. gradient-free Square does not beat the gradient attacks: on the points that survive AutoAttack's APGD-CE,
     APGD-T and FAB-T, Square (5000 queries) breaks at most a margin's worth more (AutoAttack's own
     check_square_sr asks the same). Running Square alone on all points instead would double AutoAttack's cost.
A failed check means the gradients the white-box attacks used were less useful than they should be, i.e.
the white-box numbers may overstate robustness. Verdict PASS when every applicable check holds, else WARN;
INCONCLUSIVE instead of PASS where the margin exceeds WIDEST_MARGIN (fewer than 12 samples), since checks
with such a margin could not have failed.

Margin: max(MARGIN, MARGIN_SAMPLES / n) in accuracy units, so that on small test sets a difference of one or
two images is not reported as masking. The audit is a screen for masking symptoms; whether a difference is
real is decided by the paired test of :mod:`lipkern.eval.stats`.
"""
from __future__ import annotations

MARGIN = 0.02
MARGIN_SAMPLES = 3
NEAR_ZERO = 0.05
WIDEST_MARGIN = 0.25


def margin_for(n: int) -> float:
    return max(MARGIN, MARGIN_SAMPLES / max(n, 1))


def audit(cfg: dict, n: int, original_autoattack: float | None = None) -> dict:
    """``cfg``: one configuration's results (keys: fgsm, pgd {eps in units of 1/255, as str: acc}, autoattack,
    square_gain and, for remapped configurations, transfer and adaptive).

    Returns ``{"verdict", "margin", "checks": [...], "reasons": [...]}``."""
    m = margin_for(n)
    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    bad = [e for e in cfg["pgd"] if cfg["fgsm"][e] < cfg["pgd"][e] - m]
    check("FGSM >= PGD at every eps", not bad,
          "holds at all eps" if not bad else
          "; ".join(f"eps {e}/255: FGSM {cfg['fgsm'][e]:.3f} < PGD {cfg['pgd'][e]:.3f}" for e in bad))
    e_max = max(cfg["pgd"], key=float)
    check("PGD ~ 0 at the largest eps", cfg["pgd"][e_max] <= NEAR_ZERO,
          f"PGD accuracy {cfg['pgd'][e_max]:.3f} at eps {e_max}/255 (limit {NEAR_ZERO})")
    aa = cfg["autoattack"]
    for key, label in (("transfer", "transfer from the original"), ("adaptive", "adaptive BPDA APGD")):
        if cfg.get(key) is not None:
            check(f"{label} not below AutoAttack", cfg[key] >= aa - m,
                  f"{key} {cfg[key]:.3f} vs AutoAttack {aa:.3f}")
    if original_autoattack is not None and cfg.get("adaptive") is not None and aa > original_autoattack + m:
        kept = min(cfg["adaptive"], cfg["transfer"])
        check("AutoAttack gain over the original survives adaptive and transfer", kept > original_autoattack + m,
              f"AutoAttack {aa:.3f}, adaptive {cfg['adaptive']:.3f}, transfer {cfg['transfer']:.3f} vs the "
              f"original's AutoAttack {original_autoattack:.3f}")
    check("Square not stronger than the gradient attacks", cfg["square_gain"] <= m,
          f"Square lowers accuracy by {cfg['square_gain']:.3f} after APGD-CE/APGD-T/FAB-T")
    failed = [c for c in checks if not c["ok"]]
    reasons = [f"{c['check']}: {c['detail']}" for c in failed]
    if failed:
        verdict = "WARN"
    elif m > WIDEST_MARGIN:
        verdict = "INCONCLUSIVE"
        reasons = [f"{n} samples give a margin of {100 * m:.0f} points, too wide for the checks to flag masking"]
    else:
        verdict = "PASS"
    return {"verdict": verdict, "margin": m, "checks": checks, "reasons": reasons}
