"""The evaluation's only contact with the model layer (lipkern.convert / calibrate / set_ratio /
straight_through), so the rest of lipkern.eval does not depend on how conversion is wired."""
from __future__ import annotations

import copy
import warnings

import torch.nn as nn

from lipkern.calibrate import calibrate, set_ratio
from lipkern.convert import activation_of, check_convert_arguments, convert, matched_inputs, straight_through
from lipkern.nn import has_input_remap, input_channel_dim, remap_modules

__all__ = ["UnusableConversionError", "calibrated", "check_convert_arguments", "converted_copy", "has_input_remap",
           "remapped_copy", "set_ratio", "straight_through"]


class UnusableConversionError(ValueError):
    """The conversion cannot place the remaps it was asked for: a pattern of ``inputs_of`` names no module or
    a module that takes no input remap, or the model has none of the selected activations and no input layer
    matched."""


def _remappable_inputs(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        try:
            input_channel_dim(module)
        except TypeError:
            continue
        names.append(name)
    return names


def converted_copy(model: nn.Module, convert_kwargs: dict) -> nn.Module:
    """A converted deep copy of ``model`` (``model`` is untouched); UnusableConversionError where ``model``
    is converted already or the conversion cannot place what it was asked to. ``lipkern.convert`` only
    warns of an ``inputs_of`` pattern that names no module, but an evaluation that left out a layer it was
    asked to remap answers another question."""
    if remap_modules(model):
        # Evaluated as "the original", it would be compared against a second remap of itself.
        raise UnusableConversionError("the model holds lipkern remap layers already: pass the model before "
                                      "lipkern.convert (lipkern.unconvert gives it back); the evaluation "
                                      "converts a copy")
    matched = matched_inputs(model, convert_kwargs.get("inputs_of", ()))
    unmatched = [pattern for pattern, hits in matched.items() if not hits]
    if unmatched:
        usable = _remappable_inputs(model)
        example = f", such as {usable[-1]!r}" if usable else "; the model has no Linear or convolution layer"
        raise UnusableConversionError(
            f"inputs_of {', '.join(map(repr, unmatched))} {'names' if len(unmatched) == 1 else 'name'} no module "
            f"of the model (fnmatch globs on qualified module names{example})")
    with warnings.catch_warnings():
        # Said by the refusal below, with what the model has instead.
        warnings.filterwarnings("ignore", message="lipkern.convert: nothing was converted", category=UserWarning)
        try:
            m = convert(copy.deepcopy(model), **convert_kwargs)
        except TypeError as e:  # a pattern that matched a module without an input remap, named by convert
            raise UnusableConversionError(str(e)) from None
    if not remap_modules(m):
        present = sorted({act for act in map(activation_of, model.modules()) if act is not None})
        has = f"its activation modules are {', '.join(present)}" if present else "it has no activation module"
        raise UnusableConversionError(f"lipkern.convert with {convert_kwargs or 'its defaults'} placed no remap in "
                                      f"the model: none of the selected activations ({has}) and no layer matched "
                                      "inputs_of")
    return m


def calibrated(converted: nn.Module, calib_batches, c_r: float, progress: bool = True):
    """``converted`` calibrated on ``calib_batches`` at ratio ``c_r``, in eval mode, and the calibration report;
    other ratios then need only :func:`set_ratio`."""
    report = calibrate(converted, calib_batches, c_r=c_r, progress=progress)
    return converted.eval(), report


def remapped_copy(model: nn.Module, calib_batches, c_r: float, convert_kwargs: dict, progress: bool = True):
    """:func:`converted_copy` then :func:`calibrated`: ``(converted_model, calibration_report)``."""
    return calibrated(converted_copy(model, convert_kwargs), calib_batches, c_r, progress)
