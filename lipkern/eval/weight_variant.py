"""The "Weight" alternative of the paper (Lemma 2, Table 5): no runtime remap; instead, for every linear map
with a remapped input, zero the weight columns of the input features that the runtime remap sets to 0 in at
least ``fraction`` of the calibration rows (rows = samples x tokens for Linear, samples x positions for conv).

Default fraction 0.5: a feature is pruned for every input when the remap removes it in most rows (Lemma 2's
static counterpart of the sample-wise remap); the evaluation sweeps 0.25 / 0.5 / 0.75. Only the remap's own
work counts: an element that was already 0 in the original model (ReLU's zeros) is not "remapped", else on a
ReLU network every channel that is off for a quarter of the inputs would be pruned for all of them.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .layers import linear_layers

DEFAULT_FRACTION = 0.5
SWEEP_FRACTIONS = (0.25, 0.5, 0.75)


def remap_frequency(counts: torch.Tensor) -> torch.Tensor:
    """Per input feature: the fraction of calibration rows in which the remap set the feature to 0 (0 in the
    converted model's input, non-zero in the original model's input for the same row), from the (3, F + 1)
    counts of :func:`lipkern.eval.layers.remap_counts`."""
    return counts[2, 1:].double() / counts[2, 0].double()


@torch.no_grad()
def weight_variant(original: nn.Module, frequency: dict[str, torch.Tensor], fraction: float = DEFAULT_FRACTION):
    """A copy of ``original`` with the columns of features remapped in >= ``fraction`` of rows set to zero.

    Returns ``(model, {layer: number of zeroed columns})``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    model = copy.deepcopy(original).eval()
    layers = dict(linear_layers(model))
    pruned = {}
    for name, freq in frequency.items():
        module = layers[name]
        cols = freq >= fraction
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"{name}: grouped convolutions are not supported by the weight variant")
        # Linear weight is (out, in); Conv2d weight is (out, in, kh, kw): column k is weight[:, k].
        module.weight[:, cols] = 0
        pruned[name] = int(cols.sum())
    return model, pruned
