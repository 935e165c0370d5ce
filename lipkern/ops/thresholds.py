"""How a converted layer turns the statistics of one scan into thresholds.

A layer accumulates :class:`~lipkern.ops.stats.ChannelStats` (and, for quantiles, a histogram of
|a|) over a scan, then sets ``t = float32(c_r * M)`` with ``M`` the max, std or a quantile of
|a|, per channel or for the whole layer. This module holds that arithmetic and the checks of a
stored calibration; :mod:`lipkern.nn` keeps the modules and their forward.

Quantile histograms: bins of |a| keyed by the top float32 bits (exponent and
``HIST_MANTISSA_BITS`` mantissa bits), so a bin's width is ``2**-HIST_MANTISSA_BITS`` of its value
over the octaves ``[2**-HIST_OCTAVES_BELOW, 2**HIST_OCTAVES_ABOVE)``; smaller magnitudes fall into
bin 0, larger ones into the last bin.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from lipkern.ops.stats import STAT_DTYPES, ChannelStats, merge_fields_

GRANULARITIES = ("tensor", "channel")
CENTERS = (None, "mean")
MODES = ("off", "calibrate", "apply", "monitor")

HIST_MANTISSA_BITS = 7
HIST_OCTAVES_BELOW = 64
HIST_OCTAVES_ABOVE = 64
HIST_BINS = (HIST_OCTAVES_BELOW + HIST_OCTAVES_ABOVE) << HIST_MANTISSA_BITS
_HIST_SHIFT = 23 - HIST_MANTISSA_BITS
_HIST_OFFSET = (127 - HIST_OCTAVES_BELOW) << HIST_MANTISSA_BITS


def check_ratio(c_r, name: str = "c_r") -> float:
    """``c_r`` as a float in (0, 1), or an error naming ``name``."""
    if isinstance(c_r, bool) or not isinstance(c_r, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(c_r).__name__}")
    c_r = float(c_r)
    if not 0.0 < c_r < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in (0, 1), got {c_r}")
    return c_r


def parse_statistic(statistic) -> tuple[str, Optional[float]]:
    """``"max"``, ``"std"`` or ``"quantile:q"`` (0 < q <= 1) as ``(kind, q)``."""
    if statistic in ("max", "std"):
        return statistic, None
    if isinstance(statistic, str) and statistic.startswith("quantile:"):
        try:
            q = float(statistic.split(":", 1)[1])
        except ValueError:
            q = float("nan")
        if 0.0 < q <= 1.0:
            return "quantile", q
    raise ValueError(
        f"statistic must be 'max', 'std' or 'quantile:q' with 0 < q <= 1, got {statistic!r}"
    )


def check_settings(granularity, statistic, center) -> None:
    """The calibration settings, each checked with an error naming it."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    kind, _ = parse_statistic(statistic)
    if center not in CENTERS:
        raise ValueError(f"center must be None or 'mean', got {center!r}")
    if kind == "quantile" and granularity != "tensor":
        raise ValueError(
            "statistic='quantile:q' keeps a histogram per layer and supports "
            "granularity='tensor' only"
        )


def histogram(a: torch.Tensor) -> torch.Tensor:
    """Counts of |a| per quantile-histogram bin (int64, HIST_BINS)."""
    bits = a.detach().float().abs().reshape(-1).view(torch.int32)
    index = ((bits >> _HIST_SHIFT) - _HIST_OFFSET).clamp_(0, HIST_BINS - 1)
    return torch.bincount(index, minlength=HIST_BINS)


def hist_upper_edges(device) -> torch.Tensor:
    """Upper edge of every histogram bin (float32)."""
    index = torch.arange(1, HIST_BINS + 1, dtype=torch.int32, device=device)
    return ((index + _HIST_OFFSET) << _HIST_SHIFT).view(torch.float32)


def pool(fields: tuple, granularity: str) -> tuple:
    """Statistics fields (:meth:`ChannelStats.as_tuple`) pooled to ``granularity``."""
    if granularity == "tensor" and fields[0].shape[0] != 1:
        return ChannelStats(*fields).total().as_tuple()
    return fields


def accumulate(current: Optional[tuple], fields: tuple, granularity: str, where: str) -> tuple:
    """``current`` (None before a scan's first call) with one call's ``fields`` merged in.

    The first call's fresh tensors are adopted as they are and later calls merge into them in
    place: two kernel calls per merge, whatever the channel count.
    """
    fields = pool(fields, granularity)
    if current is None:
        return tuple(fields)
    channels, got = current[0].shape[0], fields[0].shape[0]
    if channels != got:
        raise ValueError(
            f"{where}: called with {got} channels after {channels}; a module shared by call "
            "sites with different channel counts needs granularity='tensor'"
        )
    merge_fields_(current, fields)
    return current


def statistic_value(stats: Optional[ChannelStats], hist: torch.Tensor, statistic: str, where: str):
    """The per-channel (or pooled) ``M`` of ``t = ratio * M``, float64."""
    if stats is None:
        raise RuntimeError(f"{where}: no calibration statistics (never called)")
    if int(stats.count.sum()) == 0:
        raise RuntimeError(
            f"{where}: no calibration statistics (called with empty inputs, numel 0, only)"
        )
    kind, q = parse_statistic(statistic)
    if kind == "max":
        return stats.amax.double()
    if kind == "std":
        return stats.var.sqrt()
    total = int(hist.sum())
    needed = torch.tensor(q * total, dtype=torch.float64)
    index = int(torch.searchsorted(hist.cumsum(0).double(), needed))
    edge = hist_upper_edges(hist.device)[min(index, HIST_BINS - 1)].double()
    return torch.minimum(edge, stats.amax.double()).reshape(1)


def thresholds(
    stats: Optional[ChannelStats],
    hist: torch.Tensor,
    ratio: float,
    statistic: str,
    center_mode: Optional[str],
    granularity: str,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(threshold, center)`` float32 tensors: ``t = float32(ratio * M)`` (M in float64) and
    the mean as centre (empty without ``center_mode``); shape ``()`` for a layer-wide
    granularity, ``(C,)`` per channel.

    A product that underflows float32 to 0 where ``M > 0`` raises instead of silently turning the
    remap off.
    """
    ratio = check_ratio(ratio, "ratio")
    m = statistic_value(stats, hist, statistic, where)
    threshold = (ratio * m).to(torch.float32)
    if bool(((threshold == 0) & (m > 0)).any()):
        raise ValueError(
            f"{where}: ratio={ratio:g} times the statistic (min nonzero "
            f"{float(m[m > 0].min()):g}) underflows float32 to a threshold of 0; use a larger ratio"
        )
    if not bool(threshold.isfinite().all()):
        raise ValueError(f"{where}: the statistics give a non-finite threshold")
    if center_mode == "mean":
        center = stats.mean.to(torch.float32)
    else:
        center = torch.zeros(0, dtype=torch.float32, device=m.device)
    if granularity == "tensor":
        threshold = threshold.reshape(())
        center = center.reshape(()) if center.numel() else center
    return threshold, center


class LayerStateError(ValueError):
    """A layer's stored state that does not fit it; the message leads with the layer's name,
    ``reason`` is the rest (for a caller that names the layer itself)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def check_layer_state(
    tensors: dict,
    config: dict,
    layer: dict,
    buffer_dtypes: dict,
    expected_channels: Optional[int],
    exact_dtypes: bool,
    where: str,
) -> None:
    """Raise LayerStateError naming ``where`` unless ``tensors`` (buffer name -> tensor; absent ones
    are empty) and ``config`` make a valid stored calibration for a layer whose settings are
    ``layer`` and whose buffers have ``buffer_dtypes``. ``exact_dtypes``: buffers must have those
    dtypes (a calibration file is adopted as it is; a state_dict is copied, which converts)."""

    def fail(what: str):
        raise LayerStateError(where, what)

    if not isinstance(config, dict):
        fail(f"the settings must be a dict, got {type(config).__name__}")
    missing = [key for key in layer if key not in config]
    if missing:
        fail(f"the settings lack {missing}")
    for key in ("kind", "act", "channel_dim"):
        if config[key] != layer[key]:
            fail(
                f"state was saved from a layer with {key}={config[key]!r}, this layer has "
                f"{key}={layer[key]!r}"
            )
    if config["mode"] not in MODES:
        fail(f"mode must be one of {MODES}, got {config['mode']!r}")
    if config["granularity"] not in GRANULARITIES:
        fail(f"granularity must be one of {GRANULARITIES}, got {config['granularity']!r}")
    try:
        parse_statistic(config["statistic"])
        if config["ratio"] is not None:
            check_ratio(config["ratio"], "ratio")
    except (TypeError, ValueError) as error:
        fail(str(error))
    if config["center"] not in CENTERS:
        fail(f"center must be None or 'mean', got {config['center']!r}")
    if not isinstance(config["redundant"], bool):
        fail(f"redundant must be a bool, got {config['redundant']!r}")
    if config["fed_by"] is not None and not isinstance(config["fed_by"], str):
        fail(f"fed_by must be None or a layer name, got {config['fed_by']!r}")

    def tensor(name: str) -> torch.Tensor:
        dtype = buffer_dtypes[name]
        value = tensors.get(name)
        if value is None:
            return torch.zeros(0, dtype=dtype)
        if not isinstance(value, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(value).__name__}")
        if exact_dtypes and value.dtype != dtype:
            fail(f"{name} must be {dtype}, got {value.dtype}")
        if value.is_floating_point() != dtype.is_floating_point:
            fail(f"{name} must be a {dtype} tensor, got {value.dtype}")
        return value

    values = {name: tensor(name) for name in buffer_dtypes}
    stats = [values[name] for name in STAT_DTYPES]
    channels = stats[0].shape[0] if stats[0].dim() == 1 else -1
    if any(t.dim() != 1 or t.shape[0] != channels for t in stats):
        fail(
            "the statistics amax, remapped, count, sum, sumsq must be 1-D tensors of one "
            f"length, got shapes {[tuple(t.shape) for t in stats]}"
        )
    if channels and (stats[0].isnan().any() or (stats[0] < 0).any()):
        fail("amax must be >= 0 and not NaN")
    if channels and ((stats[1] < 0).any() or (stats[2] < 0).any() or (stats[1] > stats[2]).any()):
        fail("the counts must satisfy 0 <= remapped <= count")
    threshold, center = values["threshold"], values["center"]
    if config["granularity"] == "tensor":
        expected = [(0,), ()]
        if channels > 1:
            fail(f"granularity 'tensor' keeps one statistics entry, got {channels}")
    else:
        if channels and expected_channels and channels != expected_channels:
            fail(f"the statistics are of {channels} channels, this layer reads {expected_channels}")
        known = channels or expected_channels
        expected = [(0,), (known,)] if known else None
        if expected is None and threshold.dim() != 1:
            fail(f"granularity 'channel' needs a 1-D threshold, got {tuple(threshold.shape)}")
    if expected is not None and tuple(threshold.shape) not in expected:
        fail(
            f"threshold must have shape {' or '.join(map(str, expected))} for granularity "
            f"{config['granularity']!r}, got {tuple(threshold.shape)}"
        )
    if threshold.numel() and (threshold.isnan().any() or (threshold < 0).any()):
        fail("threshold must be >= 0 and not NaN")
    # A layer a scan reached gets thresholds from its statistics; applying without them, it
    # would refuse every call as never calibrated.
    if (config["mode"] in ("apply", "monitor") and channels and not config["redundant"]
            and not threshold.numel()):
        fail(f"mode {config['mode']!r} with statistics needs their thresholds, which are missing")
    if center.numel():
        if config["center"] != "mean" or center.shape != threshold.shape:
            fail(
                f"center must be empty or, with center='mean', of the threshold's shape "
                f"{tuple(threshold.shape)}; got {tuple(center.shape)} with "
                f"center={config['center']!r}"
            )
        if not center.isfinite().all():
            fail("center must be finite")
    hist = values["hist"]
    if hist.numel() and tuple(hist.shape) != (HIST_BINS,):
        fail(f"hist must be empty or of shape ({HIST_BINS},), got {tuple(hist.shape)}")
