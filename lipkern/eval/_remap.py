"""The evaluation's only contact with the model layer (lipkern.convert / calibrate / set_ratio /
straight_through), so the rest of lipkern.eval does not depend on how conversion is wired."""
from __future__ import annotations

import copy

import torch.nn as nn

from lipkern.calibrate import calibrate, set_ratio
from lipkern.convert import check_convert_arguments, convert, straight_through
from lipkern.nn import has_input_remap, remap_modules

__all__ = ["NothingToRemapError", "check_convert_arguments", "has_input_remap", "remapped_copy", "set_ratio",
           "straight_through"]


class NothingToRemapError(ValueError):
    """The conversion placed no remap: the model has no selected activation and no input layer matched."""


def remapped_copy(model: nn.Module, calib_batches, c_r: float, convert_kwargs: dict, progress: bool = True):
    """A converted deep copy of ``model`` calibrated on ``calib_batches`` at ratio ``c_r``; ``model`` is untouched.

    Returns ``(converted_model, calibration_report)``; other ratios then need only :func:`set_ratio`.
    """
    m = convert(copy.deepcopy(model), **convert_kwargs)
    if not remap_modules(m):
        raise NothingToRemapError(f"lipkern.convert with {convert_kwargs or 'its defaults'} placed no remap in the "
                                  "model: it has none of the selected activations and no layer matched inputs_of")
    report = calibrate(m, calib_batches, c_r=c_r, progress=progress)
    return m.eval(), report
