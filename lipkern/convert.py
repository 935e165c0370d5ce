"""Turn a trained model into a remapping one: :func:`convert`, :func:`describe`,
:func:`straight_through`.

``convert(model, acts=("relu", "gelu", "silu"), inputs_of=(), inplace=False)`` works in place and
returns the same model (a model that *is* an activation module is returned as its replacement):

- Activation modules are replaced by :class:`lipkern.nn.RemapAct`: ``nn.ReLU`` (``inplace=True``
  too), ``nn.GELU`` (``approximate="none"`` -> ``"gelu"``, ``"tanh"`` -> ``"gelu_tanh"``),
  ``nn.SiLU``, and timm's ``GELU``, ``GELUTanh``, ``Swish`` and ``SwishMe``. ``acts`` filters by
  family: ``"relu"``, ``"gelu"`` (both approximations, each mapped to its exact op),
  ``"gelu_tanh"`` (tanh-approximated GELU only) and ``"silu"``. timm's ``QuickGELU``
  (``x * sigmoid(1.702 x)``) has no lipkern op and is left alone.
- A module object reached under several names (or called at several sites, as torchvision's
  ResNet ``relu``) becomes ONE RemapAct with one threshold over all its sites.
- ``inputs_of``: glob patterns (:mod:`fnmatch`) on qualified module names; each matching
  ``nn.Linear`` / convolution gets an :class:`lipkern.nn.InputRemap` on its input, keeping its
  parameter names (``fc1.weight`` stays, ``fc1.input_remap.*`` is added). Whether that input is
  already a converted activation's output is decided at calibration (see :mod:`lipkern.nn`).
- Warnings: a pattern of ``inputs_of`` that matches nothing, and a conversion that changes nothing.
- ``channel_dim`` of each activation: ``None`` infers it from the nearest preceding sibling module
  (Linear / LayerNorm -> ``-1``; Conv / BatchNorm / GroupNorm / timm ``LayerNorm2d`` -> ``1``; else
  ``-1``); an int forces it everywhere. It only matters for ``granularity="channel"``.
- ``inplace=True`` lets every converted activation overwrite its input at inference (as
  ``nn.ReLU(inplace=True)``); activations that were in place already stay in place. In place is
  as safe as it was in the original model: the layer never overwrites an input that requires
  grad under grad mode, and the op bumps the input's version counter, so where the input was
  also saved for another layer's backward (a pre-activation feeding a trainable layer) the
  backward raises, as the original model's does, instead of using overwritten values.
- Loading a state_dict into the converted model checks every converted layer's entries first
  (:meth:`lipkern.nn.RemapAct.check_state`), so a state saved from a different conversion raises
  before any weight is replaced.
- ``backend`` is stored on every created module and passed to the ops (default ``"auto"``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from lipkern.nn import RemapAct, add_input_remap, has_input_remap, remap_modules

ACT_FAMILIES = ("relu", "gelu", "gelu_tanh", "silu")

_CHANNEL_LAST_TYPES = (nn.Linear, nn.LayerNorm)
_CHANNEL_FIRST_TYPES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _timm_activation_types() -> dict[type, str]:
    try:
        from timm.layers import activations, activations_me
    except ImportError:
        return {}
    return {
        activations.GELU: "gelu",
        activations.GELUTanh: "gelu_tanh",
        activations.Swish: "silu",
        activations_me.SwishMe: "silu",
    }


def activation_of(module: nn.Module) -> Optional[str]:
    """The lipkern ``act`` equivalent to ``module``, or None if it is no supported activation."""
    if isinstance(module, RemapAct):
        return None
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module) is nn.SiLU:
        return "silu"
    return _timm_activation_types().get(type(module))


def _selected(act: str, acts: tuple[str, ...]) -> bool:
    return act in acts or (act == "gelu_tanh" and "gelu" in acts)


def _infer_channel_dim(siblings: list[nn.Module], position: int) -> int:
    for module in reversed(siblings[:position]):
        if type(module).__name__ == "LayerNorm2d":  # timm's channels-first LayerNorm
            return 1
        if isinstance(module, _CHANNEL_LAST_TYPES):
            return -1
        if isinstance(module, _CHANNEL_FIRST_TYPES):
            return 1
    return -1


def _check_acts(acts) -> tuple[str, ...]:
    if isinstance(acts, str):
        acts = (acts,)
    acts = tuple(acts)
    for act in acts:
        if act not in ACT_FAMILIES:
            raise ValueError(f"acts entries must be among {ACT_FAMILIES}, got {act!r}")
    return acts


def convert(
    model: nn.Module,
    acts: Iterable[str] = ("relu", "gelu", "silu"),
    inputs_of: Iterable[str] = (),
    inplace: bool = False,
    backend: str = "auto",
    channel_dim: Optional[int] = None,
) -> nn.Module:
    """Replace activations by RemapAct and add input remaps; returns ``model`` (see module doc)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    acts = _check_acts(acts)
    if isinstance(inputs_of, str):
        inputs_of = (inputs_of,)
    inputs_of = tuple(inputs_of)
    if channel_dim is not None and (
        isinstance(channel_dim, bool) or not isinstance(channel_dim, int)
    ):
        raise TypeError(f"channel_dim must be None or an int, got {type(channel_dim).__name__}")

    def make(module, siblings, position):
        act = activation_of(module)
        if act is None or not _selected(act, acts):
            return None
        dim = channel_dim if channel_dim is not None else _infer_channel_dim(siblings, position)
        return RemapAct(
            act,
            dim,
            inplace=inplace or bool(getattr(module, "inplace", False)),
            backend=backend,
        )

    # Input remaps first, while names are those of the original model.
    matched = {pattern: [] for pattern in inputs_of}
    for name, module in model.named_modules():
        for pattern in inputs_of:
            if fnmatch.fnmatchcase(name, pattern):
                matched[pattern].append((name, module))
    added = 0
    for pattern, hits in matched.items():
        if not hits:
            warnings.warn(f"lipkern.convert: inputs_of pattern {pattern!r} matched no module")
        for name, module in hits:
            if not has_input_remap(module):
                add_input_remap(module, backend=backend).layer_name = f"{name}.input_remap"
                added += 1

    replaced: dict[int, RemapAct] = {}
    root_replacement = make(model, [], 0)
    if root_replacement is not None:
        return root_replacement
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        siblings = list(parent._modules.values())
        for position, (child_name, child) in enumerate(list(parent._modules.items())):
            if child is None:
                continue
            new = replaced.get(id(child))
            if new is None:
                new = make(child, siblings, position)
                if new is None:
                    continue
                new.layer_name = f"{parent_name}.{child_name}" if parent_name else child_name
                replaced[id(child)] = new
            parent._modules[child_name] = new
    if (replaced or added) and not any(
        getattr(hook, "hook", None) is _check_remap_state
        for hook in model._load_state_dict_pre_hooks.values()
    ):
        model.register_load_state_dict_pre_hook(_check_remap_state)
    if not replaced and not added:
        warnings.warn(
            f"lipkern.convert: nothing was converted (acts={acts}, inputs_of={inputs_of}): no "
            "matching activation module or input layer that is not converted already"
        )
    return model


def _check_remap_state(model, state_dict, prefix, *args) -> None:
    """Check every converted layer's entries of ``state_dict`` before the load changes anything
    (the root's pre-hook runs before any module is loaded)."""
    for name, module in remap_modules(model):
        module.check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)


@dataclass
class LayerInfo:
    """One converted layer, as :func:`describe` lists it."""

    name: str
    kind: str  # "act" or "input"
    act: str
    channel_dim: int
    mode: str
    calibrated: bool
    granularity: Optional[str]
    ratio: Optional[float]
    threshold_max: Optional[float]
    redundant: bool
    fed_by: Optional[str]


class Description(list):
    """A list of :class:`LayerInfo` that prints as a table."""

    def __str__(self) -> str:
        header = ("layer", "kind", "act", "dim", "mode", "threshold", "note")
        rows = [header]
        for info in self:
            threshold = "-" if info.threshold_max is None else f"{info.threshold_max:.4g}"
            note = f"redundant: fed by {info.fed_by}" if info.redundant else ""
            rows.append(
                (info.name, info.kind, info.act, str(info.channel_dim), info.mode, threshold, note)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows
        )


def describe(model: nn.Module) -> Description:
    """What :func:`convert` did to ``model``: one :class:`LayerInfo` per RemapAct / InputRemap."""
    infos = Description()
    for name, module in remap_modules(model):
        calibrated = module.calibrated
        infos.append(
            LayerInfo(
                name=name,
                kind=module.kind,
                act=module.act,
                channel_dim=module.channel_dim,
                mode=module.mode,
                calibrated=calibrated,
                granularity=module.granularity if calibrated else None,
                ratio=module.ratio if calibrated else None,
                threshold_max=float(module.threshold.max()) if calibrated else None,
                redundant=module.redundant,
                fed_by=module.fed_by,
            )
        )
    return infos


@contextlib.contextmanager
def straight_through(model: nn.Module):
    """Within the block every RemapAct's backward ignores the remap mask (BPDA).

    The forward is unchanged; gradients are those of the plain activations, which is what an
    adaptive attack (backward-pass differentiable approximation) uses. Previous flags are restored
    on exit.
    """
    modules = [m for _, m in remap_modules(model)]
    previous = [m.straight_through for m in modules]
    for m in modules:
        m.straight_through = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, previous):
            m.straight_through = flag


__all__ = [
    "ACT_FAMILIES",
    "Description",
    "LayerInfo",
    "activation_of",
    "convert",
    "describe",
    "straight_through",
]
