"""The evaluation's only contact with the model layer (lipkern.convert / calibrate / set_ratio /
straight_through), so the rest of lipkern.eval does not depend on how conversion is wired."""
from __future__ import annotations

import copy

import torch.nn as nn

from lipkern.calibrate import calibrate, set_ratio
from lipkern.convert import check_convert_arguments, convert, straight_through
from lipkern.nn import has_input_remap, remap_modules

__all__ = ["NothingToRemapError", "calibrated", "check_convert_arguments", "converted_copy", "has_input_remap",
           "remapped_copy", "set_ratio", "straight_through"]


class NothingToRemapError(ValueError):
    """The conversion placed no remap: the model has no selected activation and no input layer matched."""


def converted_copy(model: nn.Module, convert_kwargs: dict) -> nn.Module:
    """A converted deep copy of ``model`` (``model`` is untouched); NothingToRemapError where the
    conversion placed no remap."""
    m = convert(copy.deepcopy(model), **convert_kwargs)
    if not remap_modules(m):
        raise NothingToRemapError(f"lipkern.convert with {convert_kwargs or 'its defaults'} placed no remap in the "
                                  "model: it has none of the selected activations and no layer matched inputs_of")
    return m


def calibrated(converted: nn.Module, calib_batches, c_r: float, progress: bool = True):
    """``converted`` calibrated on ``calib_batches`` at ratio ``c_r``, in eval mode, and the calibration report;
    other ratios then need only :func:`set_ratio`."""
    report = calibrate(converted, calib_batches, c_r=c_r, progress=progress)
    return converted.eval(), report


def remapped_copy(model: nn.Module, calib_batches, c_r: float, convert_kwargs: dict, progress: bool = True):
    """:func:`converted_copy` then :func:`calibrated`: ``(converted_model, calibration_report)``."""
    return calibrated(converted_copy(model, convert_kwargs), calib_batches, c_r, progress)
