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
from lipkern import nn
from lipkern.convert import convert, describe, straight_through, unconvert
from lipkern.calibrate import (
    CalibrationReport,
    calibrate,
    load_calibration,
    measure_remapped,
    save_calibration,
    set_ratio,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The evaluation pulls in matplotlib and AutoAttack: load it only when asked for.
    if name == "evaluate":
        from lipkern.eval.api import evaluate

        return evaluate
    raise AttributeError(f"module 'lipkern' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "CalibrationReport",
    "ChannelStats",
    "available_backends",
    "calibrate",
    "convert",
    "describe",
    "evaluate",
    "load_calibration",
    "measure_remapped",
    "nn",
    "remap_act",
    "remap_act_",
    "remap_act_stats",
    "save_calibration",
    "set_ratio",
    "straight_through",
    "unconvert",
]
