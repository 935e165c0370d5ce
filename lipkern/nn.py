"""Drop-in modules that apply lipkern's remap inside a network.

:class:`RemapAct` replaces an activation module (``act`` in identity / relu / gelu / gelu_tanh /
silu) and :class:`InputRemap` is the identity-activation remap placed on the *input* of a Linear
or Conv layer (e.g. the LayerNorm output that feeds a transformer's FC1). Both have a ``mode``:

- ``"off"``: the plain activation, bit-identical to the ``torch.nn`` module it replaced, but for
  modules that write the formula out in Python, rounding each step on its own: timm's ``Swish``
  (``x * sigmoid(x)``, an ulp from ``F.silu``), transformers' ``NewGELUActivation`` and
  ``AccurateGELUActivation`` (the tanh formula) and ``GELUActivation(use_gelu_python=True)``
  (the erf formula), within a few ulps of lipkern's op (``F.gelu``'s).
- ``"calibrate"``: the plain activation, computed by the fused ``lipkern.remap_act_stats`` op with
  threshold 0 (so nothing is remapped), whose per-channel statistics are merged into buffers.
- ``"apply"``: ``lipkern.remap_act`` with the calibrated threshold (and centre). Calling it before
  any calibration raises an error that names the layer.
- ``"monitor"``: like ``"apply"``, and also counts remapped elements
  (:func:`lipkern.measure_remapped`).

Under ``torch.compile`` and ``torch.export`` an ``"apply"`` layer is traced, by default, as
pointwise torch ops (``compile_form="decomposed"``, :func:`lipkern.ops.api.remap_act_traceable`)
that inductor fuses into the producer's kernel; ``compile_form="opaque"`` keeps the exact op.

The thresholds' arithmetic (accumulating a scan, the quantile histogram, ``t = c^r * M``, the
checks of a stored calibration) lives in :mod:`lipkern.ops.thresholds`; this module keeps the
modules, their modes and their forward.

Thresholds, centres, statistics and the calibration settings are buffers / extra state, so they
live in ``state_dict``. Their shapes are only known after calibration, so loading a state_dict
resizes them. A layer that holds no calibration may be absent from a state dict it loads (the
original model's, strictly), and keeps its uncalibrated state. ``Module.to(dtype)`` /
``.half()`` move them between devices but never change their dtypes: thresholds and maxima stay
float32, counts int64 and sums float64 (contract: a model's dtype never becomes its statistics'
dtype; batches and processes merge in float64).

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
converted activations' outputs is a :class:`ScanTracker` that the scan hands to its layers, so
scans of different models in different threads do not see each other's tensors. (Two
:func:`lipkern.calibrate` calls on the SAME model at once are refused there: see
:mod:`lipkern.calibrate`.)

State changes are all-or-nothing: :meth:`RemapAct.snapshot` / :meth:`RemapAct.restore` let the
multi-layer operations of :mod:`lipkern.calibrate` undo a failure, and loading a state_dict checks
every incoming value (:meth:`RemapAct.check_state`) before it changes anything.
"""

from __future__ import annotations

import json
import sys
import threading
import weakref
from typing import Optional

import torch
from torch import nn

from lipkern.ops import thresholds
from lipkern.ops.activations import lookup
from lipkern.ops.api import (
    check_backend,
    index_channel_dim,
    remap_act_prechecked,
    remap_act_stats_prechecked,
    remap_act_traceable,
)
from lipkern.ops.stats import STAT_DTYPES, ChannelStats
# Re-exported: these names were defined here before the thresholds' arithmetic moved.
from lipkern.ops.thresholds import (  # noqa: F401
    CENTERS,
    GRANULARITIES,
    HIST_BINS,
    HIST_MANTISSA_BITS,
    MODES,
    check_ratio,
    parse_statistic,
)

COMPILE_FORMS = ("decomposed", "opaque")
_STAT_BUFFERS = tuple(STAT_DTYPES)
# The Python attributes a calibration, set_ratio or load changes (with the buffers).
_STATE_ATTRIBUTES = (
    "_mode", "granularity", "statistic", "center_mode", "ratio", "redundant", "fed_by",
    "sites_seen", "sites_fed", "_scan_tracker",
)
# Serialises merging into the statistics and monitor counts (see module docstring). One lock for
# all layers: a lock is not picklable, so a converted model could not be saved with one per layer,
# and an uncontended acquire costs about 0.1 us against the 20 us of a calibration call.
_MERGE_LOCK = threading.Lock()
# The threshold of a calibration scan of CPU tensors (it remaps nothing); kernels only read it.
_NO_THRESHOLD = torch.zeros(())


class ScanTracker:
    """The outputs of converted activations during one calibration scan, as weak references
    (cleared after every batch): an input remap whose input is one of them would remap twice.

    :func:`lipkern.calibrate` makes one per scan and hands it to every layer it calibrates, so
    scans of different models (in different threads) never see each other's tensors.
    """

    def __init__(self):
        self._outputs: list[tuple[weakref.ref, int, str]] = []

    def record(self, y: torch.Tensor, layer_name: str) -> None:
        self._outputs.append((weakref.ref(y), y._version, layer_name))

    def source_of(self, x: torch.Tensor) -> Optional[str]:
        """The name of the converted activation whose output ``x`` is, unchanged since (an
        in-place op between, such as a LayerScale's ``mul_``, makes it another input), if any."""
        for ref, version, name in self._outputs:
            if ref() is x and x._version == version:
                return name
        return None

    def clear(self) -> None:
        self._outputs.clear()


def config_to_tensor(config: dict) -> torch.Tensor:
    """A layer's settings as its state_dict holds them: JSON in a uint8 tensor, so that tools that
    store tensors only (safetensors, Hugging Face's ``save_pretrained``) can save the model."""
    return torch.tensor(list(json.dumps(config, sort_keys=True).encode()), dtype=torch.uint8)


def config_from_state(value):
    """The settings dict in a state_dict entry (:func:`config_to_tensor`'s, or a dict as earlier
    versions saved it); anything else is returned as it is, for the checks to name."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        try:
            return json.loads(bytes(value.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return value
    return value


def refuse_scanning(modes, what: str, remedy: str) -> None:
    """A ValueError naming the first layer of ``modes`` ((name, mode) pairs) in mode
    "calibrate", which a layer holds only while a calibration scan runs: loaded so, a model would
    gather statistics instead of remapping."""
    for name, mode in modes:
        if mode == "calibrate":
            raise ValueError(
                f"{what}: layer {name!r} is in mode {mode!r}, the middle of a scan; "
                f"{remedy}"
            )


class RemapAct(nn.Module):
    """Activation ``act`` followed by the remap ``y = c if |a - c| < t else a``.

    Args:
        act: ``"identity"``, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.
        channel_dim: the channel axis of the input (``1`` for NCHW conv features, ``-1`` for
            ``[..., C]`` transformer tokens), any integer (a numpy integer too); per-channel
            thresholds and statistics run along it.
        mode: one of ``"off"``, ``"calibrate"``, ``"apply"``, ``"monitor"`` (module docstring).
        inplace: in ``"off"``/``"apply"`` mode, overwrite the input when autograd does not need
            it (as ``nn.ReLU(inplace=True)``); only safe where the input is not read elsewhere.
        backend: passed to the lipkern ops (``"auto"``, ``"cpu"``, ``"reference"``, ``"triton"``).
        straight_through: the backward ignores the remap mask (BPDA, for adaptive attacks).
        compile_form: what ``torch.compile`` / ``torch.export`` see in ``"apply"`` mode:
            ``"decomposed"`` (pointwise torch ops that inductor fuses into the neighbouring
            kernels; the compiler's numerics for smooth activations) or ``"opaque"`` (the exact
            ``lipkern::remap_act`` op). Eager always runs the fused kernels.
        layer_name: how errors and reports name this layer (convert and calibrate set the
            qualified name in the model).
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
        compile_form: str = "decomposed",
        layer_name: Optional[str] = None,
    ):
        super().__init__()
        lookup(act)
        # A plain int: the layer's config is stored as JSON, which takes no numpy integer.
        channel_dim = index_channel_dim(channel_dim)
        if compile_form not in COMPILE_FORMS:
            raise ValueError(f"compile_form must be one of {COMPILE_FORMS}, got {compile_form!r}")
        for name, flag in (("inplace", inplace), ("straight_through", straight_through)):
            if not isinstance(flag, bool):  # bool("no") would be True
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        # Checked here, not at the first call: a layer in "off" mode would never report it.
        check_backend(backend)
        self.act = act
        self.channel_dim = channel_dim
        self.mode = mode
        self.inplace = inplace
        self.backend = backend
        self.straight_through = straight_through
        self.compile_form = compile_form
        self.layer_name = layer_name or type(self).__name__
        # The channel count a layer is known to read before any calibration (an input remap's
        # in_features / in_channels), checked when a calibration is loaded.
        self.expected_channels: Optional[int] = None
        self._scan_tracker: Optional[ScanTracker] = None
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
        for name, dtype in STAT_DTYPES.items():
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
    def has_stats(self) -> bool:
        """Whether statistics of a scan are stored (what set_ratio needs)."""
        return self.amax.numel() > 0

    @property
    def ready(self) -> bool:
        """Whether apply mode has what it needs: thresholds, or the verdict that this (input)
        remap is redundant and passes its input through."""
        return self.calibrated or self.redundant

    @property
    def holds_state(self) -> bool:
        """Whether a calibration (thresholds, statistics or a redundancy verdict) is stored."""
        return self.ready or self.has_stats

    def _state_keys(self, prefix: str) -> list[str]:
        return [prefix + name for name in self._buffers] + [prefix + "_extra_state"]

    @property
    def stats(self) -> Optional[ChannelStats]:
        """The statistics gathered so far (one entry per channel, or one pooled entry)."""
        if not self.has_stats:
            return None
        return ChannelStats(*(getattr(self, name) for name in _STAT_BUFFERS))

    @stats.setter
    def stats(self, value: Optional[ChannelStats]) -> None:
        for name in _STAT_BUFFERS:
            tensor = (
                torch.zeros(0, dtype=STAT_DTYPES[name], device=self.threshold.device)
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

    def get_extra_state(self) -> torch.Tensor:
        return config_to_tensor(self.config())

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
        nothing (see :func:`lipkern.ops.thresholds.check_layer_state`)."""
        thresholds.check_layer_state(
            tensors,
            config,
            self.config(),
            {name: buffer.dtype for name, buffer in self._buffers.items()},
            self.expected_channels,
            exact_dtypes,
            self.layer_name,
        )

    def set_extra_state(self, state) -> None:
        """Adopt :meth:`config`'s settings, as :func:`config_to_tensor` wrote them or as a dict
        (checked with the buffers by :meth:`_load_from_state_dict`, before anything changed)."""
        state = config_from_state(state)
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
        config = config_from_state(config)
        refuse_scanning(
            [(self.layer_name, config.get("mode"))], "load_state_dict",
            "the state_dict was taken mid-scan: take it again once the scan has finished",
        )
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

    def begin_calibration(
        self, granularity="tensor", statistic="max", center=None, tracker=None
    ) -> None:
        """Forget previous statistics and start gathering new ones (mode ``"calibrate"``).

        ``tracker``: the scan's :class:`ScanTracker` (input remaps use it to detect a double
        remap); without one, every input is scanned.
        """
        thresholds.check_settings(granularity, statistic, center)
        self.granularity, self.statistic, self.center_mode = granularity, statistic, center
        self.stats = None
        self.hist = torch.zeros(0, dtype=torch.int64, device=self.threshold.device)
        self.sites_seen = self.sites_fed = 0
        self.redundant, self.fed_by = False, None
        self._scan_tracker = tracker
        self.mode = "calibrate"

    def _accumulate(self, fields: tuple) -> None:
        current = tuple(self._buffers[n] for n in _STAT_BUFFERS) if self.has_stats else None
        merged = thresholds.accumulate(current, fields, self.granularity, self.layer_name)
        if current is None:
            self.stats = ChannelStats(*merged)

    def set_ratio(self, ratio: float) -> None:
        """Thresholds ``t = float32(ratio * M)`` from the stored statistics (see
        :func:`lipkern.ops.thresholds.thresholds`); mode becomes ``"apply"``. Nothing changes
        on an error."""
        # Thresholds made under torch.inference_mode would be inference tensors, which a later
        # grad-mode forward cannot save for backward.
        with torch.inference_mode(False):
            threshold, center = thresholds.thresholds(
                self.stats, self.hist, ratio, self.statistic, self.center_mode,
                self.granularity, self.layer_name,
            )
        self.threshold, self.center, self.ratio = threshold, center, float(ratio)
        self.mode = "apply"

    @property
    def reached(self) -> bool:
        """Whether the last calibration scan called this layer."""
        return self.has_stats

    def end_scan(self) -> None:
        """Let go of the scan's tracker (a scan over, whether or not it reached this layer)."""
        self._scan_tracker = None

    def finish_calibration(self, ratio: float) -> None:
        """Set thresholds after a scan (input remaps: decide redundancy); mode becomes apply."""
        self.set_ratio(ratio)

    # -- forward -----------------------------------------------------------------------------

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        """The activation exactly as the torch.nn module computes it."""
        act = self.act
        if act == "relu":
            return torch.relu_(x) if self._may_overwrite(x) else torch.relu(x)
        if act == "silu" and self._may_overwrite(x):
            return torch.nn.functional.silu(x, inplace=True)
        return lookup(act).torch_fn(x)

    def _may_overwrite(self, x: torch.Tensor) -> bool:
        return self.inplace and not (x.requires_grad and torch.is_grad_enabled())

    def _center_or_none(self) -> Optional[torch.Tensor]:
        center = self._buffers["center"]
        return center if center.numel() else None

    def _stats(self, x: torch.Tensor, threshold: torch.Tensor, center=None):
        """``(y, fields)``: the statistics op for this layer's granularity, its statistics as
        :meth:`ChannelStats.as_tuple`.

        Layer-wide statistics (granularity ``"tensor"``) need no channel axis, so a contiguous x
        is scanned as one flat channel: the kernels then keep every accumulator in registers
        instead of per-channel slots (ViT-tiny's MLP GELU: 0.28 instead of 0.37 ms at batch 8).
        """
        # A nested or mkldnn x has no flat view: it goes to the op, which refuses it by name.
        flat = (
            self.granularity == "tensor" and x.layout == torch.strided and x.is_contiguous()
            and not x.is_nested and self._has_axis(x)
        )
        if not flat:
            return remap_act_stats_prechecked(
                x, threshold, center, self.act, self.channel_dim, self.backend
            )
        y, fields = remap_act_stats_prechecked(
            x.view(-1, 1), threshold, center, self.act, 1, self.backend
        )
        return y.view_as(x), fields

    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        no_threshold = _NO_THRESHOLD if x.is_cpu else x.new_zeros((), dtype=torch.float32)
        y, fields = self._stats(x, no_threshold)
        counts = thresholds.histogram(y) if self.statistic.startswith("quantile") else None
        with _MERGE_LOCK:
            self._accumulate(fields)
            if counts is not None:
                self.hist = counts if self.hist.numel() == 0 else self.hist + counts
        if self._scan_tracker is not None:
            self._scan_tracker.record(y, self.layer_name)
        return y

    def _monitor(self, x: torch.Tensor, threshold: torch.Tensor, center) -> torch.Tensor:
        y, fields = self._stats(x, threshold, center)
        _, remapped, count, _, _ = thresholds.pool(fields, self.granularity)
        with _MERGE_LOCK:
            if self.monitor_count.shape != count.shape:
                self.monitor_remapped = torch.zeros_like(remapped)
                self.monitor_count = torch.zeros_like(count)
            self.monitor_remapped = self.monitor_remapped + remapped
            self.monitor_count = self.monitor_count + count
        return y

    def _not_calibrated(self) -> RuntimeError:
        return RuntimeError(
            f"{self.layer_name}: mode {self.mode!r} needs a threshold, but this layer was "
            "never calibrated (or its calibration gave it no value: it was not reached, or "
            "called with empty inputs only); run lipkern.calibrate(model, data) on data that "
            "reaches it, or load_calibration, first"
        )

    def _has_axis(self, x: torch.Tensor) -> bool:
        """Whether x has this layer's channel_dim (else the ops raise, and the layer names it)."""
        return -x.dim() <= self.channel_dim < x.dim()

    def _named(self, error: Exception) -> Exception:
        """The ops' error with this layer's name: a model moved to float64 reaches their dtype
        error, a layer given a channel_dim its input lacks their range error."""
        return type(error)(f"{self.layer_name} ({type(self).__name__}): {error}")

    def _check_channels(self, x: torch.Tensor, error: ValueError) -> None:
        """Raise an error naming this layer when x's channel count is not the calibrated one."""
        threshold = self.threshold
        if threshold.dim() != 1 or not self._has_axis(x):
            return
        got = x.shape[self.channel_dim]
        if got != threshold.numel():
            raise ValueError(
                f"{self.layer_name}: input of shape {tuple(x.shape)} has {got} channels along "
                f"channel_dim={self.channel_dim}, but the layer was calibrated per channel for "
                f"{threshold.numel()} (granularity='channel')"
            ) from error

    def _traceable(self, x: torch.Tensor, threshold, center) -> Optional[torch.Tensor]:
        """The remap as pointwise ops while torch.compile / torch.export trace an ``"apply"``
        layer (see ``compile_form``), or None where the op must run: the opaque form was asked
        for, the straight-through gradient (the decomposition's gradient has the mask), or a
        channel_dim x lacks (the op raises the error)."""
        dim = x.dim()
        if (
            self.compile_form != "decomposed"
            or self.straight_through
            or not self._has_axis(x)
            or (threshold.dim() == 1 and x.shape[self.channel_dim] != threshold.numel())
        ):
            return None
        return remap_act_traceable(x, threshold, center, self.act, self.channel_dim % dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        if mode == "off":
            return self._plain(x)
        if mode == "calibrate":
            try:
                return self._calibrate(x)
            except TypeError as error:
                raise self._named(error) from None
            except ValueError as error:
                if self._has_axis(x):
                    raise
                raise self._named(error) from None
        threshold = self._buffers["threshold"]
        if threshold.numel() == 0:
            # Nothing to remap: a layer whose calibration saw only empty inputs (an expert no
            # token reached) still runs the forward that calibrated it.
            if x.numel() == 0:
                return self._plain(x)
            raise self._not_calibrated()
        center = self._center_or_none()
        if mode == "apply" and torch.compiler.is_compiling():
            y = self._traceable(x, threshold, center)
            if y is not None:
                return y
        # The kernels reject a per-channel threshold of the wrong size and an unsupported dtype;
        # the handlers only run then, to name the layer (a try block costs nothing until it raises).
        try:
            if mode == "monitor":
                return self._monitor(x, threshold, center)
            return remap_act_prechecked(
                x,
                threshold,
                center,
                self.act,
                self.channel_dim,
                self.backend,
                self.straight_through,
                inplace=self._may_overwrite(x) and not self.straight_through,
            )
        except ValueError as error:
            self._check_channels(x, error)
            if not self._has_axis(x):
                raise self._named(error) from None
            raise
        except TypeError as error:
            raise self._named(error) from None


class InputRemap(RemapAct):
    """The remap (identity activation) of a Linear / Conv layer's input.

    ``channel_dim`` is the layer's feature axis: ``-1`` for ``nn.Linear``, ``1`` for convolutions.
    It becomes a pass-through (``redundant``) when calibration finds its input is always the output
    of a converted activation.
    """

    kind = "input"

    def __init__(self, channel_dim: int = -1, expected_channels: Optional[int] = None, **kwargs):
        super().__init__("identity", channel_dim, **kwargs)
        self.expected_channels = expected_channels

    @property
    def reached(self) -> bool:
        return self.sites_seen > 0

    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        tracker = self._scan_tracker
        source = None if tracker is None else tracker.source_of(x)
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
        ratio = thresholds.check_ratio(ratio, "ratio")
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


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's linear layers, their weight stored
    transposed), looked up only where transformers is already loaded."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def input_channel_dim(module: nn.Module) -> int:
    """Where a Linear / Conv layer's input keeps its features."""
    if is_linear(module):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    raise TypeError(
        "input remaps go on nn.Linear, transformers' Conv1D or convolution layers, got "
        f"{type(module).__name__}"
    )


def input_channels(module: nn.Module) -> int:
    """The features a Linear / Conv layer takes in."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_linear(module):
        return module.nx
    return module.in_channels


def add_input_remap(module: nn.Module, **kwargs) -> InputRemap:
    """Give a Linear / Conv ``module`` an input remap in place; returns the new :class:`InputRemap`.

    The module keeps its parameters, their names and its base class (see module docstring).
    """
    if has_input_remap(module):
        return module.input_remap
    remap = InputRemap(input_channel_dim(module), input_channels(module), **kwargs)
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


def is_compiled_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is torch.compile's wrapper (``OptimizedModule``)."""
    # Imported by torch.compile only: a model it wrapped comes after that import.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DataParallel, DistributedDataParallel and torch.compile's wrapper, which
    prefix every name (``module.``, ``_orig_mod.``): calibrations, reports and ``describe``
    name the layers of the model inside, so a file saved from a wrapped model loads into the
    bare one, and back."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif is_compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def remap_modules(model: nn.Module) -> list[tuple[str, RemapAct]]:
    """``(qualified name, module)`` of every RemapAct in ``model``, each object once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RemapAct)]
