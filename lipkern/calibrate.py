"""Thresholds from data: :func:`calibrate`, :func:`set_ratio`, :func:`measure_remapped`,
persistence.

``calibrate(model, data, c_r=2**-7, granularity="tensor", statistic="max", center=None,
max_batches=None, progress=True)`` runs ONE no-grad scan of a converted model (in eval mode,
restored afterwards) in which every :class:`lipkern.nn.RemapAct` computes its activation with the
fused ``lipkern.remap_act_stats`` op and merges per-channel statistics of ``a = act(x)``. Then, per
layer (``granularity="tensor"``) or per channel (``"channel"``)::

    t = float32(c_r * M)          # the product taken in float64
    M = max |a|                   statistic="max" (the paper)
      = std(a)                    statistic="std" (population std, exact from sums in one scan)
      = quantile_q(|a|)           statistic="quantile:q" (from a log histogram, see below)
    c = 0                         center=None (the paper's forged function)
      = mean(a)                   center="mean" (MeanSparse: f(a) = c if |a - c| < t)

MeanSparse proper is ``center="mean", statistic="std"`` (``t = c_r * std``, the ``alpha x std``
rule with ``alpha = c_r``). With ``center="mean"`` and ``statistic="max"`` M is still max |a|: the
mean is not known during the scan, so max |a - mean| would need a second pass.

``statistic="quantile:q"`` keeps, per layer, a histogram of |a| with bins 2**-7 of their value
wide (:data:`lipkern.ops.thresholds.HIST_MANTISSA_BITS`) and returns the upper edge of the bin
holding the q-quantile, capped at max |a|: relative error below 2**-7 from one scan. It supports
``granularity="tensor"`` only (a histogram per channel would cost megabytes per layer).

The statistics are kept, so :func:`set_ratio` re-thresholds without a new scan (a c^r sweep needs
one scan). Remapped fractions at the final thresholds cannot be known during the scan that finds
the maximum; ``measure=True`` (or :func:`measure_remapped` on any data) runs a second pass in
``"monitor"`` mode that counts them exactly. Without it the report's ``remapped_fraction`` is None.

Distributed: when ``torch.distributed`` is initialised every rank scans its own shard, then the
statistics are all-reduced (MAX for maxima, SUM for counts, sums and histograms) before thresholds
are set, so all ranks get the thresholds of a single scan over all shards. Every rank must call
``calibrate`` with the same settings and have at least one batch; an error on one rank (bad data,
non-finite activations) is raised on every rank instead of hanging the others.

Persistence: :func:`save_calibration` writes a safetensors file (tensors named
``"<layer>/<buffer>"`` plus JSON metadata with every layer's settings). :func:`load_calibration`
checks that the model has the same converted layers (names, kinds, activations, channel axes and
known channel counts) before it changes anything, and names the first layer that differs (layers
are matched by name: the model's layers are checked first, in model order, then the file's extra
layers). Channel counts are known for input remaps (the layer's ``in_features`` /
``in_channels``) and for layers calibrated per channel. Every tensor and setting of the file is
checked too (dtypes, shapes, thresholds >= 0, finite centres, ...) before the first layer changes.

Names: every function here names a layer as it is named inside DataParallel,
DistributedDataParallel and torch.compile's wrapper (no ``module.`` or ``_orig_mod.`` prefix), in
files and reports alike, so a calibration saved from a wrapped model loads into the bare one.

All or nothing: :func:`calibrate`, :func:`set_ratio`, :func:`measure_remapped` and
:func:`load_calibration` either succeed or leave every converted layer exactly as it was (buffers,
settings, modes), whatever the error: a data iterator that raises midway, Ctrl-C, empty data,
a threshold that would underflow. Each module's own train/eval flag is restored after a scan.
They may run under ``torch.inference_mode()``: the state they make is made outside it, so the
model still trains afterwards.

Threads: one model's layers hold one scan's statistics, so two of these operations running at
once on the same model (from two threads) would mix two scans into one set of thresholds. The
second one is refused with a RuntimeError instead of being queued: waiting would only let it
overwrite the first one's result, which is never what either caller wants. Operations on
different models run concurrently.
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import json
import os
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from lipkern import nn as lnn
from lipkern.ops import thresholds

FORMAT = "lipkern-calibration/1"
_SAVED_BUFFERS = ("threshold", "center", "amax", "remapped", "count", "sum", "sumsq", "hist")


class NonFiniteActivationError(ValueError):
    """An activation seen during calibration was NaN or infinite."""


@dataclass
class LayerReport:
    name: str
    kind: str
    act: str
    channels: int  # entries of the statistics: C for granularity="channel", 1 for "tensor"
    count: int  # elements seen
    amax: Optional[float]  # max |a| over the layer (None: redundant input remap, not scanned)
    threshold: Optional[torch.Tensor]  # () or (C,), float32 (None: redundant)
    remapped_fraction: Optional[float] = None
    redundant: bool = False
    fed_by: Optional[str] = None


@dataclass
class CalibrationReport:
    """Per-layer results of :func:`calibrate` / :func:`set_ratio`; ``str()`` is a table."""

    ratio: float
    granularity: str
    statistic: str
    center: Optional[str]
    batches: int
    layers: list[LayerReport] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        header = ("layer", "act", "amax", "threshold", "remapped", "elements", "note")
        rows = [header]
        for layer in self.layers:
            t = layer.threshold
            if t is None:
                threshold = "-"
            elif t.numel() == 1:
                threshold = f"{float(t):.4g}"
            else:
                threshold = f"{float(t.min()):.3g}..{float(t.max()):.3g}"
            amax = "-" if layer.amax is None else f"{layer.amax:.4g}"
            fraction = "-" if layer.remapped_fraction is None else f"{layer.remapped_fraction:.2%}"
            note = f"redundant: fed by {layer.fed_by}" if layer.redundant else ""
            rows.append(
                (layer.name, layer.act, amax, threshold, fraction, str(layer.count), note)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        title = (
            f"lipkern calibration: c_r={self.ratio:g}, granularity={self.granularity}, "
            f"statistic={self.statistic}, center={self.center}, batches={self.batches}"
        )
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows
        ]
        return "\n".join([title, *lines])


# id(module) -> the thread running a state-changing operation on it (see module docstring).
_BUSY: dict[int, int] = {}
_BUSY_LOCK = threading.Lock()


@contextlib.contextmanager
def _state_change(modules, what: str):
    """Run the block as the only state change of ``modules`` (the same thread may nest), undoing
    every change to their state if it raises, and outside inference mode."""
    me = threading.get_ident()
    with _BUSY_LOCK:
        busy = [name for name, m in modules if _BUSY.get(id(m), me) != me]
        if busy:
            raise RuntimeError(
                f"lipkern.{what}: another thread is calibrating, measuring or loading this "
                f"model (layer {busy[0]!r}); run one such operation on a model at a time"
            )
        claimed = [id(m) for _, m in modules if id(m) not in _BUSY]
        _BUSY.update(dict.fromkeys(claimed, me))
    snapshots = [m.snapshot() for _, m in modules]
    try:
        with torch.inference_mode(False):
            yield
    except BaseException:
        for (_, module), snapshot in zip(modules, snapshots):
            module.restore(snapshot)
        raise
    finally:
        with _BUSY_LOCK:
            for key in claimed:
                del _BUSY[key]


def _uncompiled(model: nn.Module) -> nn.Module:
    """What a scan runs of a model wrapped by torch.compile: the original module. The graph was
    compiled for the layers' apply mode; a scan's modes would recompile it for one pass, and
    under fullgraph=True fail (the statistics merge under a lock, which dynamo cannot trace)."""
    while lnn.is_compiled_wrapper(model):
        model = model._orig_mod
    return model


def _converted(model: nn.Module) -> list[tuple[str, lnn.RemapAct]]:
    modules = lnn.remap_modules(lnn.unwrapped(model))
    if not modules:
        raise ValueError("model has no lipkern RemapAct layers; call lipkern.convert(model) first")
    for name, module in modules:
        module.layer_name = name or type(module).__name__
    return modules


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for tensor in model.parameters():
        return tensor.device
    return None


def _on(device, value):
    """A batch's tensor as the model takes it: on its device, and a normal tensor (scans run
    outside inference mode, _state_change, where a model may not write into an inference
    tensor); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value if device is None else value.to(device)
    return value.clone() if value.is_inference() else value


def _run_batch(model: nn.Module, batch, index: int, device) -> None:
    """``model(x)`` for a tensor ``x`` or an ``(x, y, ...)`` tuple, ``model(**x)`` for a mapping
    (a Hugging Face ``BatchEncoding``: input ids with their attention mask), alone or first in a
    tuple."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, torch.Tensor) and x.numel() == 0:
        # Its layers would be called with nothing to take statistics of.
        raise ValueError(f"data batch {index} holds no elements (shape {tuple(x.shape)})")
    if isinstance(x, collections.abc.Mapping):
        model(**{key: _on(device, value) for key, value in x.items()})
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"data batch {index}: expected a tensor, an (x, y, ...) tuple whose first item is "
            f"a tensor, or a mapping of the model's keyword arguments, got {type(x).__name__}"
        )
    model(_on(device, x))


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_scan_arguments(device, data, max_batches, progress) -> None:
    """A scan's arguments, checked before its first batch; inside the scan, so that under
    torch.distributed a rank's refusal reaches every rank (_agree) instead of leaving them
    waiting."""
    if device is not None and device.type == "meta":
        raise ValueError(
            "model's parameters are on the meta device and hold no values: materialise them "
            "(model.to_empty(device=...), then load the weights) before a scan"
        )
    if isinstance(data, torch.Tensor):
        raise TypeError(
            "data must be an iterable of batches, got one tensor, which a scan would iterate "
            "along its first axis: pass [x] for one batch (list(x) for a stack of batches)"
        )
    # A map-style Dataset iterates by __getitem__ without being an Iterable.
    if not isinstance(data, collections.abc.Iterable) and not hasattr(type(data), "__getitem__"):
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    _check_flag("progress", progress)


def _batches(data, max_batches, progress: bool, desc: str):
    try:
        length = len(data)
    except TypeError:  # an iterator, or a DataLoader over an IterableDataset without a length
        length = None
    total = max_batches if length is None else min(length, max_batches or length)
    from tqdm.auto import tqdm

    # islice stops before pulling a batch past max_batches (a DataLoader would load it).
    batches = data if max_batches is None else itertools.islice(data, max_batches)
    yield from enumerate(tqdm(batches, total=total, desc=desc, disable=not progress))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _agree(batches: int, error: Optional[BaseException], group) -> None:
    """Across ranks: raise on every rank if any rank failed or saw no data."""
    if _distributed():
        import torch.distributed as dist

        status = torch.tensor([-batches, int(error is not None)], dtype=torch.int64)
        dist.all_reduce(status, op=dist.ReduceOp.MAX, group=group)
        if error is not None:
            raise error
        if status[1]:
            raise RuntimeError("lipkern.calibrate failed on another rank (see its error)")
        if batches and status[0] == 0:
            raise ValueError("another rank's data is empty: a scan needs at least one "
                             "batch on every rank")
        batches = -int(status[0])
    elif error is not None:
        raise error
    if batches == 0:
        raise ValueError("data is empty: a scan needs at least one batch")


def _scan(
    model, modules, data, max_batches, progress, desc, check_finite, group, trackers=()
) -> int:
    """Run ``model`` over ``data`` without gradients in eval mode; returns the batch count."""
    model = _uncompiled(model)
    device = _model_device(model)
    # Each module's own flag: a frozen BatchNorm kept in eval inside a training model stays so.
    was_training = [(module, module.training) for module in model.modules()]
    batches, error = 0, None
    model.eval()
    try:
        _check_scan_arguments(device, data, max_batches, progress)
        with torch.no_grad():
            for index, batch in _batches(data, max_batches, progress, desc):
                _run_batch(model, batch, index, device)
                for tracker in trackers:
                    tracker.clear()
                batches += 1
                if check_finite:
                    for name, module in modules:
                        if module.has_stats and not bool(torch.isfinite(module.amax).all()):
                            raise NonFiniteActivationError(
                                f"non-finite activation (NaN or inf) at layer {name!r} in "
                                f"calibration batch {index}"
                            )
    except (ValueError, TypeError, RuntimeError) as caught:
        if not _distributed():
            raise
        error = caught
    finally:
        for module, training in was_training:
            module.training = training
    _agree(batches, error, group)
    return batches


class ChannelAxisError(ValueError):
    """A per-channel layer's channel axis is not the one its input has its channels on."""


class _ChannelAxes:
    """For a per-channel scan: every converted activation whose input a module of a type that
    fixes its output's channel axis produced (a linear, convolution or normalisation layer,
    :func:`lipkern.convert.layout_of_type`) must read its channels on that axis. ``convert``
    infers a layer's axis from the modules registered before it, an order the forward need not
    follow (an ``nn.ReLU`` registered first, then applied to a convolution's output); per
    channel, thresholds along an image's width instead of its channels would be silently
    wrong, so the scan stops at the first such call, naming the layer and its input's maker.
    Outputs are held as weak references, forgotten after every batch (``clear``)."""

    def __init__(self, model: nn.Module, modules) -> None:
        from lipkern.convert import layout_of_type

        self._made: list[tuple[weakref.ref, str, type, int, bool]] = []
        self._handles = []
        for name, module in lnn.unwrapped(model).named_modules():
            layout = layout_of_type(module)
            # A LayerNorm over [C, H, W] normalises no one axis: its output's channels are
            # where the model has them.
            spans_axes = isinstance(module, nn.LayerNorm) and len(module.normalized_shape) > 1
            if layout is not None and not spans_axes:
                self._handles.append(module.register_forward_hook(self._recorder(name, layout)))
        for name, module in modules:
            if module.kind == "act":
                self._handles.append(module.register_forward_pre_hook(self._checker(name)))

    def _recorder(self, name: str, layout: int):
        def record(module, args, output):
            if isinstance(output, torch.Tensor):
                # A convolution also takes an unbatched input, whose channels come first.
                unbatched = isinstance(module, nn.modules.conv._ConvNd) and (
                    output.dim() == len(module.kernel_size) + 1
                )
                self._made.append(
                    (weakref.ref(output), name, type(module), 0 if unbatched else layout, unbatched)
                )
        return record

    def _checker(self, layer_name: str):
        def check(layer, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                return
            for ref, maker, maker_type, layout, unbatched in self._made:
                if ref() is x:
                    if layout % x.dim() != layer.channel_dim % x.dim():
                        if unbatched:
                            raise ChannelAxisError(
                                f"layer {layer_name!r} reads its channels on axis "
                                f"{layer.channel_dim}, but its input of shape "
                                f"{tuple(x.shape)} comes from {maker_type.__name__} {maker!r} "
                                "called on an unbatched input, whose channels are on axis 0: "
                                "calibrate on batches, as the model will run"
                            )
                        raise ChannelAxisError(
                            f"layer {layer_name!r} reads its channels on axis "
                            f"{layer.channel_dim}, but its input of shape {tuple(x.shape)} "
                            f"comes from {maker_type.__name__} {maker!r}, whose channels are on "
                            f"axis {layout} (convert infers a layer's axis from the modules "
                            f"registered before it): set the layer's channel_dim = {layout} "
                            "before calibrating (or convert with channel_dim=... where every "
                            "activation reads one axis), or calibrate with granularity='tensor'"
                        )
                    return
        return check

    def clear(self) -> None:
        self._made.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _all_reduce_calibration(modules, group) -> None:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    for _, module in modules:
        stats = module.stats
        flags = torch.tensor(
            [module.sites_seen, module.sites_fed, int(module.has_stats)], dtype=torch.int64
        )
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
        module.sites_seen, module.sites_fed, ranks_with_stats = (int(v) for v in flags)
        if ranks_with_stats == 0:  # redundant or never reached, on every rank
            continue
        if ranks_with_stats != world:
            raise RuntimeError(
                f"{module.layer_name}: has statistics on {ranks_with_stats} of {world} ranks; "
                "distributed calibration needs every converted layer to run on every rank"
            )
        module.stats = stats.all_reduce(group)
        if module.hist.numel():
            dist.all_reduce(module.hist, op=dist.ReduceOp.SUM, group=group)


def _layer_report(name: str, module: lnn.RemapAct) -> LayerReport:
    stats = module.stats  # None for a redundant input remap
    return LayerReport(
        name=name,
        kind=module.kind,
        act=module.act,
        channels=0 if stats is None else stats.channels,
        count=0 if stats is None else int(stats.count.sum()),
        amax=None if stats is None else float(stats.amax.max()),
        threshold=module.threshold.detach().cpu().clone() if module.calibrated else None,
        redundant=module.redundant,
        fed_by=module.fed_by,
    )


def _report(modules, ratio, batches) -> CalibrationReport:
    first = modules[0][1]
    report = CalibrationReport(
        ratio=ratio,
        granularity=first.granularity,
        statistic=first.statistic,
        center=first.center_mode,
        batches=batches,
    )
    report.layers = [_layer_report(name, m) for name, m in modules if m.ready]
    return report


def calibrate(
    model: nn.Module,
    data: Iterable,
    c_r: float = 2**-7,
    granularity: str = "tensor",
    statistic: str = "max",
    center: Optional[str] = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
    measure: bool = False,
    group=None,
) -> CalibrationReport:
    """Scan ``data`` once and set every converted layer's threshold (see module docstring).

    ``data``: any iterable of tensors, of ``(x, y, ...)`` tuples (only ``x`` is used) or of
    mappings of the model's keyword arguments (``model(**batch)``: a Hugging Face
    ``BatchEncoding`` with its attention mask), alone or first in a tuple; tensors are moved to
    the model's device. A model wrapped by ``torch.compile`` is scanned through its original
    module. ``measure=True`` adds a second pass over data (the same batches unless a loader
    shuffles them) that fills the report's remapped fractions (needs re-iterable data).
    ``group``: the torch.distributed process group.
    With ``granularity="channel"`` each activation's input is checked against the channel axis
    of the layer that made it (:class:`ChannelAxisError`).
    """
    c_r = thresholds.check_ratio(c_r)
    thresholds.check_settings(granularity, statistic, center)
    _check_flag("measure", measure)
    # The second pass over an iterator would find it spent, or (with max_batches) measure
    # other batches than the calibration read.
    if measure and isinstance(data, collections.abc.Iterator):
        raise ValueError(
            "measure=True scans data twice, the same batches each time, and needs re-iterable "
            f"data (a list, a DataLoader), got a one-shot iterator ({type(data).__name__})"
        )
    modules = _converted(model)
    with _state_change(modules, "calibrate"):
        report = _calibrate(
            model, modules, data, c_r, granularity, statistic, center, max_batches, progress, group
        )
        if measure:
            fractions = measure_remapped(
                model, data, max_batches=max_batches, progress=progress, group=group
            )
            for layer in report.layers:
                layer.remapped_fraction = fractions.get(layer.name)
    return report


def _calibrate(
    model, modules, data, c_r, granularity, statistic, center, max_batches, progress, group
) -> CalibrationReport:
    """:func:`calibrate`'s work, which :func:`_state_change` undoes on any error."""
    tracker = lnn.ScanTracker()
    for _, module in modules:
        module.begin_calibration(granularity, statistic, center, tracker)
    axes = None
    try:
        if granularity == "channel":
            axes = _ChannelAxes(model, modules)
        batches = _scan(
            model, modules, data, max_batches, progress, "lipkern calibrate", True, group,
            (tracker,) if axes is None else (tracker, axes),
        )
    finally:
        for _, module in modules:
            module.end_scan()
        if axes is not None:
            axes.remove()
    if _distributed():
        _all_reduce_calibration(modules, group)
    if not any(module.reached for _, module in modules):
        raise RuntimeError(
            f"lipkern.calibrate: none of the model's {len(modules)} converted layers was called on "
            "the data, so nothing would be calibrated: the model's forward does not run them (a "
            "fused path that bypasses its submodules?)"
        )
    unused, empty, mixed = [], [], []
    for name, module in modules:
        if module.has_stats and int(module.count.sum()) == 0:
            # Called with empty inputs only (an expert no token was routed to): no value to
            # take a threshold from, so it is left as an unreached layer is.
            empty.append(name)
            module.stats = None
            module.hist = torch.zeros(0, dtype=torch.int64, device=module.threshold.device)
        elif not module.reached:
            unused.append(name)
        else:
            module.finish_calibration(c_r)
            if 0 < module.sites_fed < module.sites_seen:
                mixed.append(name)
            continue
        module.threshold = torch.zeros(0, dtype=torch.float32, device=module.threshold.device)
        module.mode = "apply"
    if len(unused) + len(empty) == len(modules):
        raise RuntimeError(
            "lipkern.calibrate: no converted layer saw a value, so nothing would be calibrated: "
            f"these were called with empty inputs (numel 0) only: {empty}"
        )
    if empty:
        warnings.warn(
            "lipkern.calibrate: layers called on the data with empty inputs (numel 0) only, "
            f"which hold no value to take a threshold from, stay uncalibrated: {empty}; they "
            "pass empty inputs on, and called later with values they raise rather than run "
            "unremapped: calibrate on data that gives them values, or set their mode to 'off'"
        )
    if unused:
        warnings.warn(
            f"lipkern.calibrate: layers never called on the data stay uncalibrated: {unused}; "
            "called later (a branch the data did not take) they raise rather than run "
            "unremapped: calibrate on data that reaches them, or set their mode to 'off'"
        )
    if mixed:
        warnings.warn(
            "lipkern.calibrate: these input remaps read a converted activation's output at some "
            f"calls only; their thresholds come from the other calls and apply to all: {mixed}"
        )
    return _report(modules, c_r, batches)


def measure_remapped(
    model: nn.Module,
    data: Iterable,
    max_batches: Optional[int] = None,
    progress: bool = False,
    group=None,
) -> dict[str, Optional[float]]:
    """Fraction of elements each calibrated layer remaps over ``data`` (applying the remap).

    Redundant input remaps (fed by a converted activation) map to None; uncalibrated layers are
    left out. All-reduced across ranks when torch.distributed is initialised.
    """
    modules = [(name, m) for name, m in _converted(model) if m.calibrated]
    if not modules:
        raise RuntimeError("no calibrated layer to measure; run lipkern.calibrate first")
    previous_modes = [m.mode for _, m in modules]
    with _state_change(modules, "measure_remapped"):
        for _, module in modules:
            module.mode = "monitor"
            device = module.threshold.device
            module.monitor_remapped = torch.zeros(0, dtype=torch.int64, device=device)
            module.monitor_count = torch.zeros(0, dtype=torch.int64, device=device)
        _scan(model, modules, data, max_batches, progress, "lipkern measure", False, group)
        for (_, module), mode in zip(modules, previous_modes):
            module.mode = mode
    fractions: dict[str, Optional[float]] = {}
    for name, module in modules:
        if module.redundant or module.monitor_count.numel() == 0:
            fractions[name] = None
            continue
        counts = torch.stack([module.monitor_remapped.sum(), module.monitor_count.sum()])
        if _distributed():
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        fractions[name] = float(counts[0]) / max(int(counts[1]), 1)
    return fractions


def set_ratio(model: nn.Module, c_r: float) -> CalibrationReport:
    """Re-derive every layer's threshold at ratio ``c_r`` from the stored statistics (no scan)."""
    c_r = thresholds.check_ratio(c_r)
    modules = _converted(model)
    with _state_change(modules, "set_ratio"):
        # Layers the calibration data never reached (e.g. a registered but unused block) have no
        # statistics and stay uncalibrated, as calibrate left them.
        with_stats = [(name, m) for name, m in modules if m.has_stats]
        if not with_stats:
            raise RuntimeError(
                f"{modules[0][0]}: no stored statistics; run lipkern.calibrate or "
                "load_calibration first"
            )
        for _, module in with_stats:
            module.set_ratio(c_r)
    return _report(with_stats, c_r, batches=0)


def _layer_metadata(name: str, module: lnn.RemapAct) -> dict:
    return {"name": name, "channels": _expected_channels(module), **module.config()}


def _expected_channels(module: lnn.RemapAct) -> Optional[int]:
    """The channel count this layer is known to have (calibrated per channel), else None."""
    if module.granularity == "channel" and module.has_stats:
        return module.amax.numel()
    return module.expected_channels


def save_calibration(model: nn.Module, path) -> None:
    """Write every converted layer's thresholds, centres, statistics and settings to ``path``.

    Written to a temporary file beside ``path`` and renamed over it, so an error (a full disk,
    Ctrl-C) never leaves a truncated file in place of a previous good one.
    """
    from safetensors.torch import save_file

    modules = _converted(model)
    # Read while holding the layers, so that no other thread's scan is caught half done.
    with _state_change(modules, "save_calibration"):
        # A file without a calibration would switch every layer off when loaded into a
        # calibrated model.
        if not any(module.holds_state for _, module in modules):
            raise ValueError(
                "no converted layer holds a calibration to save; run lipkern.calibrate (or "
                "load_calibration) first"
            )
        lnn.refuse_scanning(
            [(name, module.mode) for name, module in modules], "lipkern.save_calibration",
            "save it once the scan has finished",
        )
        tensors = {}
        for name, module in modules:
            for buffer in _SAVED_BUFFERS:
                value = getattr(module, buffer)
                if value.numel():
                    tensors[f"{name}/{buffer}"] = value.detach().cpu().contiguous()
        layers = [_layer_metadata(name, m) for name, m in modules]
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file path")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=".lipkern-calibration-", dir=directory)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": FORMAT, "layers": json.dumps(layers)})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _mismatch(name: str, what: str) -> ValueError:
    return ValueError(
        f"calibration file does not fit the model: first mismatching layer {name!r}: {what}"
    )


def _read_calibration(path) -> tuple[dict, dict]:
    """``(layers by name, tensors by key)`` of a :func:`save_calibration` file."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a lipkern calibration file")
    try:
        opened = safe_open(os.fspath(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a lipkern calibration file (not safetensors: {error})") from None
    with opened as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lipkern calibration file (format {FORMAT})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        entries = json.loads(metadata["layers"])
        saved = {entry["name"]: entry for entry in entries}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: the metadata's layer list is malformed ({error!r})") from None
    return saved, tensors


def load_calibration(model: nn.Module, path) -> None:
    """Load a :func:`save_calibration` file into a converted model.

    Every layer, tensor and setting is checked before anything changes (module docstring);
    errors name the first layer that does not fit.
    """
    modules = _converted(model)
    with torch.inference_mode(False):
        saved, tensors = _read_calibration(path)
    lnn.refuse_scanning(
        [(name, entry.get("mode")) for name, entry in saved.items()], "lipkern.load_calibration",
        f"{path} was saved mid-scan; save the calibration again once its scan has finished",
    )
    # Checked while holding the layers, so no other thread's calibration changes them between
    # the checks and the load.
    with _state_change(modules, "load_calibration"):
        names = {name for name, _ in modules}
        for name, module in modules:
            entry = saved.get(name)
            if entry is None:
                raise _mismatch(name, "converted in the model but not in the file")
            for key in ("kind", "act", "channel_dim"):
                if entry.get(key) != getattr(module, key):
                    have = getattr(module, key)
                    raise _mismatch(name, f"{key} is {have!r}, the file has {entry.get(key)!r}")
            known = _expected_channels(module)
            channels = entry.get("channels")
            if known is not None and channels is not None and known != channels:
                raise _mismatch(name, f"{known} channels, the file has {channels}")
            layer_tensors = {
                b: tensors[f"{name}/{b}"] for b in _SAVED_BUFFERS if f"{name}/{b}" in tensors
            }
            try:
                module.check_state(layer_tensors, entry, exact_dtypes=True)
            except thresholds.LayerStateError as error:
                raise _mismatch(name, error.reason) from None
        for name in saved:
            if name not in names:
                raise _mismatch(name, "in the file but not converted in the model")
        known_keys = {f"{name}/{b}" for name in names for b in _SAVED_BUFFERS}
        unknown = sorted(set(tensors) - known_keys)
        if unknown:
            raise ValueError(f"{path}: tensor {unknown[0]!r} belongs to no converted layer")
        for name, module in modules:
            device = module.threshold.device
            for buffer in _SAVED_BUFFERS:
                value = tensors.get(f"{name}/{buffer}")
                if value is None:
                    value = torch.zeros(0, dtype=getattr(module, buffer).dtype)
                setattr(module, buffer, value.to(device))
            module.set_extra_state(saved[name])


__all__ = [
    "CalibrationReport",
    "ChannelAxisError",
    "LayerReport",
    "NonFiniteActivationError",
    "calibrate",
    "load_calibration",
    "measure_remapped",
    "save_calibration",
    "set_ratio",
]
