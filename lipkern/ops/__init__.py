"""lipkern's fused activation + threshold-remap ops (reference, C++ CPU and Triton backends)."""

from lipkern.ops.api import (
    available_backends,
    register_backend,
    remap_act,
    remap_act_,
    remap_act_stats,
)
from lipkern.ops.activations import ACTIVATIONS
from lipkern.ops.stats import ChannelStats

__all__ = [
    "ACTIVATIONS",
    "ChannelStats",
    "available_backends",
    "register_backend",
    "remap_act",
    "remap_act_",
    "remap_act_stats",
]
