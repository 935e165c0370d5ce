"""Drop-in modules that apply lipkern's remap inside a network.

:class:`RemapAct` replaces an activation module (``act`` in identity / relu / gelu / gelu_tanh /
silu) and :class:`InputRemap` is the identity-activation remap placed on the *input* of a Linear
or Conv layer (e.g. the LayerNorm output that feeds a transformer's FC1). Both have a ``mode``:

- ``"off"``: the plain activation, bit-identical to the ``torch.nn`` module it replaced (timm's
  ``Swish`` computes ``x * sigmoid(x)``, which may differ from ``F.silu`` by an ulp).
- ``"calibrate"``: the plain activation, computed by the fused ``lipkern.remap_act_stats`` op with
  threshold 0 (so nothing is remapped), whose per-channel statistics are merged into buffers.
- ``"apply"``: ``lipkern.remap_act`` with the calibrated threshold (and centre). Calling it before
  any calibration raises an error that names the layer.
- ``"monitor"``: like ``"apply"``, and also counts remapped elements
  (:func:`lipkern.measure_remapped`).

Thresholds, centres, statistics and the calibration settings are buffers / extra state, so they
live in ``state_dict``. Their shapes are only known after calibration, so loading a state_dict
resizes them. A layer that holds no calibration may be absent from a state dict it loads (the
original model's, strictly), and keeps its uncalibrated state. ``Module.to(dtype)`` /
``.half()`` move them between devices but never change their dtypes: thresholds and maxima stay
float32, counts int64 and sums float64 (contract: statistics never accumulate in the storage
dtype).

Statistics layout: ``granularity="channel"`` keeps one entry per channel of ``channel_dim``;
``granularity="tensor"`` pools every call's statistics into one entry (so a module object shared by
call sites with different channel counts, as torchvision's Bottleneck does with ``relu``, still
calibrates). A module object used at several call sites always keeps ONE threshold taken over all
of its sites: sites are not split (give each site its own module to get separate thresholds).

An input remap adds the module's input to the model's converted layers with ``act="identity"``.
Wrapping keeps the layer's own parameter names: :func:`add_input_remap` turns ``fc1`` (an
``nn.Linear``) into an instance of a subclass of its own class whose ``forward`` remaps the input
first, with the remap as child ``fc1.input_remap``. So ``fc1.weight`` keeps its state_dict key,
``isinstance(fc1, nn.Linear)`` still holds, and the module stays ``torch.compile(fullgraph=True)``
friendly (no hooks).

Double remaps are avoided at calibration: when every call of an input remap receives, as the same
tensor object, the output of a converted activation (timm ``Mlp``: FC2's input is ``act``'s output
through ``Dropout``/``Identity``; a ResNet block's first conv reads the previous block's ReLU
output), the input remap marks itself ``redundant`` (``fed_by`` names the activation), keeps no
statistics or threshold, and passes its input through unchanged. Calls fed that way are not
scanned; if only some calls of a layer are, its threshold comes from the other calls and it
remaps all of them (calibrate warns).

Threads: calls in ``"calibrate"`` and ``"monitor"`` mode may come from several threads at once (a
serving thread pool, a data-parallel wrapper): merging into the statistics is serialised by one
lock, so no call's statistics are lost. A calibration scan's bookkeeping of which tensors were
converted activations' outputs is per thread, so scans of different models in different threads
do not see each other's tensors. (Two :func:`lipkern.calibrate` calls on the SAME model at once
are refused there: see :mod:`lipkern.calibrate`.)

State changes are all-or-nothing: :meth:`RemapAct.snapshot` / :meth:`RemapAct.restore` let the
multi-layer operations of :mod:`lipkern.calibrate` undo a failure, and loading a state_dict checks
every incoming value (:meth:`RemapAct.check_state`) before it changes anything.
"""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lipkern.ops import reference
from lipkern.ops.api import (
    _direct_cpu_kernels,
    _normalise_channel_dim,
    remap_act,
    remap_act_,
    remap_act_stats,
)
from lipkern.ops.stats import ChannelStats, merge_fields_

MODES = ("off", "calibrate", "apply", "monitor")
GRANULARITIES = ("tensor", "channel")
CENTERS = (None, "mean")

# Quantile histograms: bins of |a| keyed by the top float32 bits (exponent and HIST_MANTISSA_BITS
# mantissa bits), so a bin's width is 2**-HIST_MANTISSA_BITS of its value over the octaves
# [2**-HIST_OCTAVES_BELOW, 2**HIST_OCTAVES_ABOVE); smaller magnitudes fall into bin 0, larger
# ones into the last bin.
HIST_MANTISSA_BITS = 7
HIST_OCTAVES_BELOW = 64
HIST_OCTAVES_ABOVE = 64
HIST_BINS = (HIST_OCTAVES_BELOW + HIST_OCTAVES_ABOVE) << HIST_MANTISSA_BITS
_HIST_SHIFT = 23 - HIST_MANTISSA_BITS
_HIST_OFFSET = (127 - HIST_OCTAVES_BELOW) << HIST_MANTISSA_BITS

_STAT_BUFFERS = ("amax", "remapped", "count", "sum", "sumsq")
# The Python attributes a calibration, set_ratio or load changes (with the buffers).
_STATE_ATTRIBUTES = (
    "_mode", "granularity", "statistic", "center_mode", "ratio", "redundant", "fed_by",
    "sites_seen", "sites_fed",
)
# Serialises merging into the statistics and monitor counts (see module docstring). One lock for
# all layers: a lock is not picklable, so a converted model could not be saved with one per layer,
# and an uncontended acquire costs about 0.1 us against the 20 us of a calibration call.
_MERGE_LOCK = threading.Lock()
# The threshold of a calibration scan of CPU tensors (it remaps nothing); kernels only read it.
_NO_THRESHOLD = torch.zeros(())


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


def _histogram(a: torch.Tensor) -> torch.Tensor:
    """Counts of |a| per quantile-histogram bin (int64, HIST_BINS)."""
    bits = a.detach().float().abs().reshape(-1).view(torch.int32)
    index = ((bits >> _HIST_SHIFT) - _HIST_OFFSET).clamp_(0, HIST_BINS - 1)
    return torch.bincount(index, minlength=HIST_BINS)


def _hist_upper_edges(device) -> torch.Tensor:
    """Upper edge of every histogram bin (float32)."""
    index = torch.arange(1, HIST_BINS + 1, dtype=torch.int32, device=device)
    return ((index + _HIST_OFFSET) << _HIST_SHIFT).view(torch.float32)


# Outputs of converted activations during this thread's calibration scan (weak references,
# cleared after every batch; None outside a scan): an input remap whose input is one of them
# would remap twice.
_scan = threading.local()


def _scan_outputs() -> Optional[list]:
    return getattr(_scan, "outputs", None)


def begin_scan_tracking() -> None:
    _scan.outputs = []


def end_scan_tracking() -> None:
    _scan.outputs = None


def clear_scan_outputs() -> None:
    outputs = _scan_outputs()
    if outputs is not None:
        outputs.clear()


def _feeding_layer(x: torch.Tensor) -> Optional[str]:
    for ref, name in _scan_outputs() or ():
        if ref() is x:
            return name
    return None


class RemapAct(nn.Module):
    """Activation ``act`` followed by the remap ``y = c if |a - c| < t else a``.

    Args:
        act: ``"identity"``, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.
        channel_dim: the channel axis of the input (``1`` for NCHW conv features, ``-1`` for
            ``[..., C]`` transformer tokens); per-channel thresholds and statistics run along it.
        mode: one of ``"off"``, ``"calibrate"``, ``"apply"``, ``"monitor"`` (module docstring).
        inplace: in ``"off"``/``"apply"`` mode, overwrite the input when autograd does not need
            it (as ``nn.ReLU(inplace=True)``); only safe where the input is not read elsewhere.
        backend: passed to the lipkern ops (``"auto"``, ``"cpu"``, ``"reference"``, ``"triton"``).
        straight_through: the backward ignores the remap mask (BPDA, for adaptive attacks).
    """

    kind = "act"

    def __init__(
        self,
        act: str = "relu",
        channel_dim: int = -1,
        *,
        mode: str = "off",
        inplace: bool = False,
        backend: str = "auto",
        straight_through: bool = False,
    ):
        super().__init__()
        if act not in reference.ACTIVATIONS:
            raise ValueError(f"act must be one of {reference.ACTIVATIONS}, got {act!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
        self.act = act
        self.channel_dim = channel_dim
        self.mode = mode
        self.inplace = bool(inplace)
        self.backend = backend
        self.straight_through = bool(straight_through)
        self.layer_name = type(self).__name__
        # Calibration settings (persisted as extra state).
        self.granularity = "tensor"
        self.statistic = "max"
        self.center_mode: Optional[str] = None
        self.ratio: Optional[float] = None
        self.redundant = False
        self.fed_by: Optional[str] = None
        self.sites_seen = 0
        self.sites_fed = 0
        # Shapes are decided at calibration; (0,) means "not calibrated / no statistics".
        self.register_buffer("threshold", torch.zeros(0, dtype=torch.float32))
        self.register_buffer("center", torch.zeros(0, dtype=torch.float32))
        for name, dtype in ChannelStats._DTYPES.items():
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self.register_buffer("hist", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("monitor_remapped", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("monitor_count", torch.zeros(0, dtype=torch.int64))

    # -- state -------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @property
    def calibrated(self) -> bool:
        return self.threshold.numel() > 0

    @property
    def holds_state(self) -> bool:
        """Whether a calibration (thresholds, statistics or a redundancy verdict) is stored."""
        return self.calibrated or self.amax.numel() > 0 or self.redundant

    def _state_keys(self, prefix: str) -> list[str]:
        return [prefix + name for name in self._buffers] + [prefix + "_extra_state"]

    @property
    def stats(self) -> Optional[ChannelStats]:
        """The statistics gathered so far (one entry per channel, or one pooled entry)."""
        if self.amax.numel() == 0:
            return None
        return ChannelStats(*(getattr(self, name) for name in _STAT_BUFFERS))

    @stats.setter
    def stats(self, value: Optional[ChannelStats]) -> None:
        for name in _STAT_BUFFERS:
            tensor = (
                torch.zeros(0, dtype=ChannelStats._DTYPES[name], device=self.threshold.device)
                if value is None
                else getattr(value, name)
            )
            setattr(self, name, tensor)

    def config(self) -> dict:
        """Everything that is not a tensor but belongs to the calibration."""
        return {
            "kind": self.kind,
            "act": self.act,
            "channel_dim": self.channel_dim,
            "mode": self.mode,
            "granularity": self.granularity,
            "statistic": self.statistic,
            "center": self.center_mode,
            "ratio": self.ratio,
            "redundant": self.redundant,
            "fed_by": self.fed_by,
        }

    def get_extra_state(self) -> dict:
        return self.config()

    def snapshot(self) -> dict:
        """What calibration, set_ratio and loading change, for :meth:`restore`.

        Buffers are kept by reference: those operations replace a buffer, never write into one
        they did not create (a scan merges into the tensors its own first call made).
        """
        return {"buffers": dict(self._buffers), **{a: getattr(self, a) for a in _STATE_ATTRIBUTES}}

    def restore(self, snapshot: dict) -> None:
        """Put back the state :meth:`snapshot` took."""
        self._buffers.update(snapshot["buffers"])
        for attribute in _STATE_ATTRIBUTES:
            setattr(self, attribute, snapshot[attribute])

    def check_state(self, tensors: dict, config: dict, exact_dtypes: bool) -> None:
        """Raise ValueError naming this layer unless ``tensors`` (buffer name -> tensor; absent
        ones are empty) and ``config`` (:meth:`config`'s keys) make a valid state for it. Changes
        nothing. ``exact_dtypes``: buffers must have this layer's dtypes (a calibration file is
        adopted as it is; a state_dict is copied into the buffers, which converts)."""
        where = self.layer_name

        def fail(what: str):
            raise ValueError(f"{where}: {what}")

        if not isinstance(config, dict):
            fail(f"the settings must be a dict, got {type(config).__name__}")
        missing = [key for key in self.config() if key not in config]
        if missing:
            fail(f"the settings lack {missing}")
        for key in ("kind", "act", "channel_dim"):
            if config[key] != getattr(self, key):
                fail(
                    f"state was saved from a layer with {key}={config[key]!r}, this layer has "
                    f"{key}={getattr(self, key)!r}"
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
            value = tensors.get(name)
            if value is None:
                return torch.zeros(0, dtype=self._buffers[name].dtype)
            if not isinstance(value, torch.Tensor):
                fail(f"{name} must be a tensor, got {type(value).__name__}")
            if exact_dtypes and value.dtype != self._buffers[name].dtype:
                fail(f"{name} must be {self._buffers[name].dtype}, got {value.dtype}")
            if value.is_floating_point() != self._buffers[name].is_floating_point():
                fail(f"{name} must be a {self._buffers[name].dtype} tensor, got {value.dtype}")
            return value

        values = {name: tensor(name) for name in self._buffers}
        stats = [values[name] for name in _STAT_BUFFERS]
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
            known = channels or getattr(self, "expected_channels", None)
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

    def set_extra_state(self, state: dict) -> None:
        """Adopt :meth:`config`'s settings (checked with the buffers by
        :meth:`_load_from_state_dict`, before anything changed)."""
        self.mode = state["mode"]
        self.granularity = state["granularity"]
        self.statistic = state["statistic"]
        self.center_mode = state["center"]
        self.ratio = state["ratio"]
        self.redundant = state["redundant"]
        self.fed_by = state["fed_by"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not self.holds_state and not any(
            key in state_dict for key in self._state_keys(prefix)
        ):
            # An uncalibrated layer has nothing to restore, so a state dict of the original
            # model (which has no lipkern entries) loads strictly into the converted one.
            return
        self.check_state_dict(state_dict, prefix)
        # Buffer shapes depend on the calibration that produced them: adopt the incoming ones.
        for name, buffer in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_state_dict(self, state_dict, prefix: str) -> None:
        """:meth:`check_state` on this layer's entries of a ``state_dict``, if it has any."""
        config = state_dict.get(prefix + "_extra_state")
        if config is None:
            return
        tensors = {
            name: state_dict[prefix + name] for name in self._buffers if prefix + name in state_dict
        }
        self.check_state(tensors, config, exact_dtypes=False)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not round thresholds or statistics: keep every dtype.
        for name, buffer in self._buffers.items():
            moved = fn(buffer)
            if moved.dtype != buffer.dtype:
                moved = buffer.to(device=moved.device)
            self._buffers[name] = moved
        return self

    def extra_repr(self) -> str:
        text = f"act={self.act!r}, channel_dim={self.channel_dim}, mode={self.mode!r}"
        if self.calibrated:
            text += f", granularity={self.granularity!r}, ratio={self.ratio}"
        if self.redundant:
            text += f", redundant (fed by {self.fed_by})"
        return text

    # -- calibration -------------------------------------------------------------------------

    def begin_calibration(self, granularity="tensor", statistic="max", center=None) -> None:
        """Forget previous statistics and start gathering new ones (mode ``"calibrate"``)."""
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
        self.granularity, self.statistic, self.center_mode = granularity, statistic, center
        self.stats = None
        self.hist = torch.zeros(0, dtype=torch.int64, device=self.threshold.device)
        self.sites_seen = self.sites_fed = 0
        self.redundant, self.fed_by = False, None
        self.mode = "calibrate"

    def _pool(self, fields: tuple) -> tuple:
        """Statistics fields pooled to the layer's granularity (a layer-wide scan of a contiguous
        input already has one channel, see _stats)."""
        if self.granularity == "tensor" and fields[0].shape[0] != 1:
            return ChannelStats(*fields).total().as_tuple()
        return fields

    def _accumulate(self, fields: tuple) -> None:
        fields = self._pool(fields)
        if self.amax.numel() == 0:
            # The first call of a scan: the buffers take over this call's fresh tensors, and
            # later calls merge into them in place.
            self.stats = ChannelStats(*fields)
            return
        channels, got = self.amax.shape[0], fields[0].shape[0]
        if channels != got:
            raise ValueError(
                f"{self.layer_name}: called with {got} channels along channel_dim="
                f"{self.channel_dim} after {channels}; a module shared by call sites "
                "with different channel counts needs granularity='tensor'"
            )
        buffers = self._buffers
        merge_fields_(tuple(buffers[name] for name in _STAT_BUFFERS), fields)

    def statistic_value(self) -> torch.Tensor:
        """The per-channel (or pooled) ``M`` of ``t = ratio * M``, float64."""
        stats = self.stats
        if stats is None or int(stats.count.sum()) == 0:
            raise RuntimeError(f"{self.layer_name}: no calibration statistics (never called)")
        kind, q = parse_statistic(self.statistic)
        if kind == "max":
            return stats.amax.double()
        if kind == "std":
            return stats.var.sqrt()
        counts = self.hist
        total = int(counts.sum())
        needed = torch.tensor(q * total, dtype=torch.float64)
        cumulative = counts.cumsum(0).double()
        index = int(torch.searchsorted(cumulative, needed))
        edge = _hist_upper_edges(counts.device)[min(index, HIST_BINS - 1)].double()
        return torch.minimum(edge, stats.amax.double()).reshape(1)

    def set_ratio(self, ratio: float) -> None:
        """Thresholds ``t = float32(ratio * M)`` (M in float64) from the stored statistics.

        ``ratio`` must be in (0, 1). A product that underflows float32 to 0 where ``M > 0``
        raises instead of silently turning the remap off. Nothing changes on an error.
        """
        ratio = check_ratio(ratio, "ratio")
        # Thresholds made under torch.inference_mode would be inference tensors, which a later
        # grad-mode forward cannot save for backward.
        with torch.inference_mode(False):
            m = self.statistic_value()
            threshold = (ratio * m).to(torch.float32)
            if bool(((threshold == 0) & (m > 0)).any()):
                raise ValueError(
                    f"{self.layer_name}: ratio={ratio:g} times the statistic (min nonzero "
                    f"{float(m[m > 0].min()):g}) underflows float32 to a threshold of 0; "
                    "use a larger ratio"
                )
            if not bool(threshold.isfinite().all()):
                raise ValueError(f"{self.layer_name}: the statistics give a non-finite threshold")
            if self.center_mode == "mean":
                center = self.stats.mean.to(torch.float32)
            else:
                center = torch.zeros(0, dtype=torch.float32, device=m.device)
            if self.granularity == "tensor":
                threshold = threshold.reshape(())
                center = center.reshape(()) if center.numel() else center
        self.threshold, self.center, self.ratio = threshold, center, ratio
        self.mode = "apply"

    @property
    def reached(self) -> bool:
        """Whether the last calibration scan called this layer."""
        return self.amax.numel() > 0

    def finish_calibration(self, ratio: float) -> None:
        """Set thresholds after a scan (input remaps: decide redundancy); mode becomes apply."""
        self.set_ratio(ratio)

    # -- forward -----------------------------------------------------------------------------

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        """The activation exactly as the torch.nn module computes it."""
        act = self.act
        if act == "identity":
            return x
        if act == "relu":
            return torch.relu_(x) if self._may_overwrite(x) else torch.relu(x)
        if act == "silu":
            return F.silu(x, inplace=self._may_overwrite(x))
        return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")

    def _may_overwrite(self, x: torch.Tensor) -> bool:
        return self.inplace and not (x.requires_grad and torch.is_grad_enabled())

    def _center_or_none(self):
        return self.center if self.center.numel() else None

    def _stats(self, x: torch.Tensor, threshold, center=None):
        """``(y, fields)``: :func:`remap_act_stats` for this layer's granularity, its statistics
        as :meth:`ChannelStats.as_tuple`.

        Layer-wide statistics (granularity ``"tensor"``) need no channel axis, so a contiguous x
        is scanned as one flat channel: the kernels then keep every accumulator in registers
        instead of per-channel slots (ViT-tiny's MLP GELU: 0.28 instead of 0.37 ms at batch 8).
        On the C++ kernels the op is called directly with tensor thresholds, as in apply mode
        (see _apply_direct): a calibration scan calls this once per layer and batch.
        """
        channel_dim = _normalise_channel_dim(self.channel_dim, x)  # an axis x lacks: an error
        flat = self.granularity == "tensor" and x.is_contiguous()
        scanned, axis = (x.view(-1, 1), 1) if flat else (x, channel_dim)
        if _direct_cpu_kernels(self.backend, x) and isinstance(threshold, torch.Tensor):
            y, *fields = torch.ops.lipkern.remap_act_stats.default(
                scanned, threshold, center, self.act, axis
            )
        else:
            y, stats = remap_act_stats(
                scanned, threshold, self.act, center, channel_dim=axis, backend=self.backend
            )
            fields = stats.as_tuple()
        return (y.view_as(x) if flat else y), tuple(fields)

    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        y, fields = self._stats(x, _NO_THRESHOLD if x.is_cpu else 0.0)
        counts = _histogram(y) if self.statistic.startswith("quantile") else None
        with _MERGE_LOCK:
            self._accumulate(fields)
            if counts is not None:
                self.hist = counts if self.hist.numel() == 0 else self.hist + counts
        outputs = _scan_outputs()
        if outputs is not None:
            outputs.append((weakref.ref(y), self.layer_name))
        return y

    def _monitor(self, x: torch.Tensor) -> torch.Tensor:
        y, fields = self._stats(x, self.threshold, self._center_or_none())
        _, remapped, count, _, _ = self._pool(fields)
        with _MERGE_LOCK:
            if self.monitor_count.shape != count.shape:
                self.monitor_remapped = torch.zeros_like(remapped)
                self.monitor_count = torch.zeros_like(count)
            self.monitor_remapped = self.monitor_remapped + remapped
            self.monitor_count = self.monitor_count + count
        return y

    def _check_calibrated(self) -> None:
        if not self.calibrated:
            raise RuntimeError(
                f"{self.layer_name}: mode {self.mode!r} needs a threshold, but this layer was "
                "never calibrated; run lipkern.calibrate(model, data) or load_calibration first"
            )

    def _apply_direct(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Apply mode straight through the C++ kernels' op, or None where the checked API must
        run (another backend, no threshold yet, a channel_dim x lacks: it raises the errors).

        Python here is dear: inside a model, between two multi-threaded ops, one microsecond of
        it measured about six (ViT-tiny bf16, between LayerNorm and FC1); the public API's checks
        and dispatch cost about 3 us of it per call.
        """
        if not _direct_cpu_kernels(self.backend, x):
            return None
        threshold = self._buffers["threshold"]
        dim, channel_dim = x.dim(), self.channel_dim
        if threshold.numel() == 0 or not -dim <= channel_dim < dim:
            return None
        center = self._buffers["center"]
        center = center if center.numel() else None
        if self._may_overwrite(x) and not self.straight_through:
            torch.ops.lipkern.remap_act_.default(x, threshold, center, self.act, channel_dim % dim)
            return x
        return torch.ops.lipkern.remap_act.default(
            x, threshold, center, self.act, channel_dim % dim, self.straight_through
        )

    def _check_channels(self, x: torch.Tensor, error: ValueError) -> None:
        """Raise an error naming this layer when x's channel count is not the calibrated one."""
        threshold = self.threshold
        dim = x.dim()
        if threshold.dim() != 1 or not -dim <= self.channel_dim < dim:
            return
        got = x.shape[self.channel_dim]
        if got != threshold.numel():
            raise ValueError(
                f"{self.layer_name}: input of shape {tuple(x.shape)} has {got} channels along "
                f"channel_dim={self.channel_dim}, but the layer was calibrated per channel for "
                f"{threshold.numel()} (granularity='channel')"
            ) from error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        # The kernels reject a per-channel threshold of the wrong size; the handler only runs
        # then, to name the layer (a try block costs nothing until it raises).
        try:
            if mode == "apply":
                y = self._apply_direct(x)
                if y is not None:
                    return y
            if mode == "off":
                return self._plain(x)
            if mode == "calibrate":
                return self._calibrate(x)
            self._check_calibrated()
            if mode == "monitor":
                return self._monitor(x)
            if self._may_overwrite(x) and not self.straight_through:
                return remap_act_(
                    x,
                    self.threshold,
                    act=self.act,
                    center=self._center_or_none(),
                    channel_dim=self.channel_dim,
                    backend=self.backend,
                )
            return remap_act(
                x,
                self.threshold,
                act=self.act,
                center=self._center_or_none(),
                channel_dim=self.channel_dim,
                backend=self.backend,
                straight_through=self.straight_through,
            )
        except ValueError as error:
            if mode != "calibrate":
                self._check_channels(x, error)
            raise


class InputRemap(RemapAct):
    """The remap (identity activation) of a Linear / Conv layer's input.

    ``channel_dim`` is the layer's feature axis: ``-1`` for ``nn.Linear``, ``1`` for convolutions.
    It becomes a pass-through (``redundant``) when calibration finds its input is always the output
    of a converted activation.
    """

    kind = "input"

    def __init__(self, channel_dim: int = -1, **kwargs):
        super().__init__("identity", channel_dim, **kwargs)

    @property
    def reached(self) -> bool:
        return self.sites_seen > 0

    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        source = _feeding_layer(x)
        with _MERGE_LOCK:
            self.sites_seen += 1
            if source is not None:
                self.sites_fed += 1
                self.fed_by = source
        if source is None:
            return super()._calibrate(x)
        # x is a converted activation's output, remapped there already: no statistics needed.
        return x

    def finish_calibration(self, ratio: float) -> None:
        self.redundant = self.sites_seen > 0 and self.sites_fed == self.sites_seen
        if not self.redundant:
            self.fed_by = None
            super().finish_calibration(ratio)
            return
        ratio = check_ratio(ratio, "ratio")
        with torch.inference_mode(False):
            empty = torch.zeros(0, dtype=torch.float32, device=self.threshold.device)
            self.threshold, self.center, self.ratio = empty, empty.clone(), ratio
        self.mode = "apply"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.redundant and self._mode in ("apply", "monitor"):
            return x
        return super().forward(x)


_INPUT_REMAP_CLASSES: dict[type, type] = {}


def _input_remapped_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward remaps its first input through ``self.input_remap``."""
    if cls in _INPUT_REMAP_CLASSES:
        return _INPUT_REMAP_CLASSES[cls]

    def forward(self, input, *args, **kwargs):
        return cls.forward(self, self.input_remap(input), *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # The class is made at run time and cannot be found by name in a new process: pickle
        # (torch.save of a whole model, copy.deepcopy) records the wrapped class instead.
        return _new_input_remapped, (cls,), self.__dict__

    new_cls = type(
        f"InputRemapped{cls.__name__}",
        (cls,),
        {
            "forward": forward,
            "__reduce_ex__": __reduce_ex__,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} with InputRemap",
            "wrapped_class": cls,
        },
    )
    _INPUT_REMAP_CLASSES[cls] = new_cls
    return new_cls


def _new_input_remapped(cls: type) -> nn.Module:
    """An empty instance of ``cls``'s input-remapped class (unpickling fills its state)."""
    return object.__new__(_input_remapped_class(cls))


def input_channel_dim(module: nn.Module) -> int:
    """Where a Linear / Conv layer's input keeps its features."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    raise TypeError(
        f"input remaps go on nn.Linear or convolution layers, got {type(module).__name__}"
    )


def add_input_remap(module: nn.Module, **kwargs) -> InputRemap:
    """Give a Linear / Conv ``module`` an input remap in place; returns the new :class:`InputRemap`.

    The module keeps its parameters, their names and its base class (see module docstring).
    """
    if has_input_remap(module):
        return module.input_remap
    channel_dim = input_channel_dim(module)
    remap = InputRemap(channel_dim, **kwargs)
    remap.expected_channels = (
        module.in_features if isinstance(module, nn.Linear) else module.in_channels
    )
    module.__class__ = _input_remapped_class(type(module))
    module.input_remap = remap
    return remap


def has_input_remap(module: nn.Module) -> bool:
    return isinstance(getattr(module, "input_remap", None), InputRemap)


def remove_input_remap(module: nn.Module) -> None:
    """Undo :func:`add_input_remap`: ``module`` gets its own class back and loses the child."""
    if not has_input_remap(module):
        raise ValueError(f"{type(module).__name__} has no input remap to remove")
    module.__class__ = type(module).wrapped_class
    del module.input_remap


def remap_modules(model: nn.Module) -> list[tuple[str, RemapAct]]:
    """``(qualified name, module)`` of every RemapAct in ``model``, each object once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RemapAct)]
