"""lipkern: data-driven Lipschitz continuity for trained PyTorch networks.

Small-magnitude activations are remapped (``|a - c| < t`` becomes ``c``, with ``c = 0`` the
paper's forged function), with thresholds ``c^r * max|a|`` taken from one scan over data.
"""

from lipkern.ops import (
    ACTIVATIONS,
    ChannelStats,
    available_backends,
    remap_act,
    remap_act_,
    remap_act_stats,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ChannelStats",
    "available_backends",
    "remap_act",
    "remap_act_",
    "remap_act_stats",
]
