"""Evaluation of the remap: the paper's protocol, an adaptive attack, a masking audit, and the embedded
digits default. ``lipkern.eval.evaluate(model, calib_data, test_data, eps=..., ratios=..., quick=...)``."""
from .api import DEFAULT_EPS, DEFAULT_RATIOS, DEFAULT_SIGMA, FULL, QUICK, Budget, EvalResult, evaluate

__all__ = ["Budget", "DEFAULT_EPS", "DEFAULT_RATIOS", "DEFAULT_SIGMA", "EvalResult", "FULL", "QUICK", "evaluate"]
