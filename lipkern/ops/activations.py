"""The one table of activations every lipkern backend implements.

Each entry names an activation, its code (the ``Act`` enum of ``csrc/remap_act.h`` and the
Triton kernels' ``ACT`` constant share it), whether it is piecewise linear (then every backend is
bit-exact), and the PyTorch function a user would write for it. The tanh-GELU constants live here
too; the C++ header repeats them as literals (tested to agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    piecewise_linear: bool
    torch_fn: Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


TABLE = (
    Activation("identity", 0, True, lambda x: x),
    Activation("relu", 1, True, torch.relu),
    Activation("gelu", 2, False, F.gelu),
    Activation("gelu_tanh", 3, False, _gelu_tanh),
    Activation("silu", 4, False, F.silu),
)

BY_NAME = {entry.name: entry for entry in TABLE}
ACTIVATIONS = tuple(entry.name for entry in TABLE)
EXACT_ACTIVATIONS = tuple(entry.name for entry in TABLE if entry.piecewise_linear)
SMOOTH_ACTIVATIONS = tuple(entry.name for entry in TABLE if not entry.piecewise_linear)
ACT_CODES = {entry.name: entry.code for entry in TABLE}

# gelu_tanh(x) = x/2 (1 + tanh(u)), u = GELU_TANH_SCALE (x + GELU_TANH_CUBIC x^3)
GELU_TANH_SCALE = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


def lookup(act: str) -> Activation:
    """The table entry of ``act``, or a ValueError naming the accepted names."""
    try:
        return BY_NAME[act]
    except (KeyError, TypeError):
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}") from None
