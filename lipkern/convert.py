"""Turn a trained model into a remapping one and back: :func:`convert`, :func:`unconvert`,
:func:`describe`, :func:`straight_through`.

``convert(model, acts=("relu", "gelu", "silu"), inputs_of=(), inplace=False)`` works in place and
returns the same model (a model that *is* an activation module is returned as its replacement):

- Activation modules are replaced by :class:`lipkern.nn.RemapAct`: ``nn.ReLU`` (``inplace=True``
  too), ``nn.GELU`` (``approximate="none"`` -> ``"gelu"``, ``"tanh"`` -> ``"gelu_tanh"``),
  ``nn.SiLU``, timm's ``GELU``, ``GELUTanh``, ``Swish`` and ``SwishMe``, and Hugging Face
  transformers' ``GELUActivation`` (``"gelu"``), ``GELUTanh``, ``NewGELUActivation``,
  ``AccurateGELUActivation`` (``"gelu_tanh"``: the same tanh formula) and ``SiLUActivation``.
  ``acts`` filters by family: ``"relu"``, ``"gelu"`` (both approximations, each mapped to its
  exact op), ``"gelu_tanh"`` (tanh-approximated GELU only) and ``"silu"``.
- Activations that no lipkern op computes exactly are left alone and named in one warning (class
  and qualified names): timm's ``QuickGELU``, transformers' ``QuickGELUActivation``,
  ``ClippedGELUActivation``, ``FastGELUActivation`` (its constant is sqrt(2/pi) cut after 10
  digits), ``nn.Hardswish``, ... Gates and squashing functions (sigmoid, tanh) and softmax are
  not what the remap is for and are left alone silently.
- A module object reached under several names (or called at several sites, as torchvision's
  ResNet ``relu``) becomes ONE RemapAct with one threshold over all its sites.
- ``inputs_of``: glob patterns (:mod:`fnmatch`) on qualified module names, each of which must
  match only ``nn.Linear``, transformers' ``Conv1D`` or convolution layers (another match, such
  as the GELU that a broad ``"blocks.*.mlp.*"`` also hits, is a TypeError naming it, before
  anything changes); each gets an :class:`lipkern.nn.InputRemap` on its input, keeping its
  parameter names (``fc1.weight`` stays, ``fc1.input_remap.*`` is added). Whether that input is
  already a converted activation's output is decided at calibration (see :mod:`lipkern.nn`).
- ``preset="paper"``: input remaps where the paper puts them, found by structure instead of
  names (which move between libraries and versions and are not in registration order): on every
  ``nn.Linear`` of a module that also holds a converted activation, but for one registered last
  (a network's classifier after its final activation): the layers of MLP blocks, as timm ``Mlp``
  (``fc1``, ``fc2``), Hugging Face ViT / Swin / BERT (``mlp.fc1``, ``intermediate.dense``),
  Llama-style gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``). Calibration turns a remap
  whose input is a converted activation's output (timm's FC2) into a pass-through; what stays are
  the remaps of inputs no activation remap covers: FC1's (a LayerNorm output), a gated MLP's down
  projection's (the gated product). CNNs (ResNet, WideResNet, EfficientNet) get only their
  activations; GPT-2's MLP, made of transformers' ``Conv1D`` (a linear layer with its weight
  transposed), gets them on ``c_fc`` and ``c_proj``.
  Combines with ``inputs_of``; :func:`describe` prints what was placed where.
- Warnings: a pattern of ``inputs_of`` that matches nothing, a selected activation held as a
  function (``nn.TransformerEncoderLayer(activation="relu")``), which no module stands for, and a
  conversion that changes nothing.
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` with a remap inside are kept off
  PyTorch's fused inference path, which would skip their submodules (``unconvert`` restores it).
- ``channel_dim`` of each activation: ``None`` infers it from what the activation sees. Inside a
  fused norm + activation layer (timm's ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``:
  ``1``; ``LayerNormAct``: ``-1``) it is that layer's layout; otherwise the nearest preceding
  sibling that tells decides: Linear / LayerNorm -> ``-1``; Conv / BatchNorm / GroupNorm / timm
  ``LayerNorm2d`` -> ``1``; a composite sibling (timm's ``ConvNormAct``, a residual block) by
  its last descendant of such a type; ``-1`` when nothing tells. An int forces it everywhere. It
  only matters for ``granularity="channel"``, and a per-channel layer called with another channel
  count raises an error naming the layer.
- ``inplace=True`` lets every converted activation overwrite its input at inference (as
  ``nn.ReLU(inplace=True)``); activations that were in place already stay in place. In place is
  as safe as it was in the original model: the layer never overwrites an input that requires
  grad under grad mode, and the op bumps the input's version counter, so where the input was
  also saved for another layer's backward (a pre-activation feeding a trainable layer) the
  backward raises, as the original model's does, instead of using overwritten values.
- Loading a state_dict into the converted model checks every converted layer's entries first
  (:meth:`lipkern.nn.RemapAct.check_state`), against the channels an input remap reads too, and
  refuses a state holding remap layers the model lacks, so a state saved from a different
  conversion raises before any weight is replaced.
- ``backend`` is stored on every created module and passed to the ops (default ``"auto"``).
- ``compile_form`` (default ``"decomposed"``): under ``torch.compile`` / ``torch.export`` an
  applying layer is traced as pointwise torch ops, which inductor fuses into the neighbouring
  kernels; ``"opaque"`` keeps the exact ``lipkern::remap_act`` op there too (see
  :class:`lipkern.nn.RemapAct`).

Checkpoints: an uncalibrated converted model has no state of its own, so a state dict of the
original model loads into it with ``strict=True``; load pretrained weights, then calibrate (or
load a converted model's own state dict, lipkern's entries included, at any time).
:func:`unconvert` puts the replaced modules back and removes input remaps.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from lipkern.ops.activations import ACTIVATIONS
from lipkern.ops.api import check_backend, index_channel_dim
from lipkern.nn import (
    COMPILE_FORMS,
    InputRemap,
    RemapAct,
    add_input_remap,
    config_from_state,
    has_input_remap,
    input_channel_dim,
    is_linear,
    remap_modules,
    remove_input_remap,
    unwrapped,
)

ACT_FAMILIES = tuple(act for act in ACTIVATIONS if act != "identity")
PRESETS = ("paper",)
# The attribute of a RemapAct made by convert that holds the module it replaced.
_ORIGINAL = "_lipkern_original"
# torch.nn modules that compute each lipkern act, for RemapActs that replaced nothing.
_TORCH_EQUIVALENTS = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}

# PyTorch runs these modules at inference (eval, no grad) through one native kernel that never
# calls their submodules: with a remap inside, the remap would be skipped without a word. Each
# flag, set to the value given, keeps a module off that path; unconvert puts the flag back.
_FUSED_PATH_FLAGS = (
    (nn.TransformerEncoderLayer, "activation_relu_or_gelu", 0),
    (nn.TransformerEncoder, "use_nested_tensor", False),
)
_SAVED_FUSED_PATH_FLAG = "_lipkern_fused_path_flag"
# Layers that may hold their activation as a function (activation="relu"), which convert cannot
# replace (see _function_activations).
_FUNCTION_ACTIVATION_HOLDERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

_CHANNEL_LAST_TYPES = (nn.Linear, nn.LayerNorm)
_CHANNEL_FIRST_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_CHANNEL_FIRST_TYPES = (nn.modules.conv._ConvNd,) + _CHANNEL_FIRST_NORMS


def _transformers_activation_types() -> dict[type, str]:
    """Hugging Face transformers' activation modules that compute a lipkern activation.

    Only looked up when transformers is imported already (a model holding its modules imported
    it), so converting other models never pays for importing transformers.
    """
    activations = sys.modules.get("transformers.activations")
    if activations is None:
        return {}
    return {
        activations.GELUActivation: "gelu",  # F.gelu (erf), or its erf formula in Python
        activations.GELUTanh: "gelu_tanh",  # F.gelu(approximate="tanh"), or its formula
        # The tanh formula written out: the same function, values within ulps of F.gelu's.
        activations.NewGELUActivation: "gelu_tanh",
        activations.AccurateGELUActivation: "gelu_tanh",
        activations.SiLUActivation: "silu",
    }


# Modules of these namespaces are activations; those without a lipkern op are named in a warning.
_ACTIVATION_NAMESPACES = (
    "torch.nn.modules.activation",
    "timm.layers.activations",
    "timm.layers.activations_me",
    "transformers.activations",
)
# Left alone without a warning: modules that are no pointwise activation though defined beside
# them, the identity that transformers puts where a config names no activation, and gates /
# squashing functions (squeeze-excitation gates, BERT's pooler), which are not what the remap
# is for.
_NOT_ACTIVATIONS = frozenset(
    (
        "MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU",
        "LinearActivation", "Sigmoid", "Hardsigmoid", "HardSigmoid", "HardSigmoidMe",
        "LogSigmoid", "Tanh", "Tanhshrink", "Softsign",
    )
)


def _unsupported_activation(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ in _ACTIVATION_NAMESPACES and cls.__name__ not in _NOT_ACTIVATIONS


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
    act = _timm_activation_types().get(type(module))
    return act if act is not None else _transformers_activation_types().get(type(module))


def _selected(act: str, acts: tuple[str, ...]) -> bool:
    return act in acts or (act == "gelu_tanh" and "gelu" in acts)


def _norm_act_layout(module: nn.Module) -> Optional[int]:
    """The channel axis of a fused norm + activation layer's output (timm's BatchNormAct2d,
    GroupNormAct, LayerNormAct2d, LayerNormAct, ...), whose activation child sees it; None for
    other modules."""
    if isinstance(module, _CHANNEL_FIRST_NORMS):
        return 1
    if type(module).__module__ == "timm.layers.norm_act":
        # timm names its channels-first variants ...2d (LayerNormAct2d is an nn.LayerNorm).
        return 1 if "2d" in type(module).__name__ else -1
    return None


def layout_of_type(module: nn.Module) -> Optional[int]:
    """The channel axis of ``module``'s output where its type decides it (linear, convolution,
    normalisation layers), else None."""
    if type(module).__name__ == "LayerNorm2d":  # timm's channels-first LayerNorm
        return 1
    layout = _norm_act_layout(module)
    if layout is not None:
        return layout
    if isinstance(module, _CHANNEL_LAST_TYPES) or is_linear(module):
        return -1
    if isinstance(module, _CHANNEL_FIRST_TYPES):
        return 1
    return None


def _output_layout(module: nn.Module) -> Optional[int]:
    """The channel axis of ``module``'s output: from its type, else from its last descendant
    of known type (timm's ConvNormAct ends in a BatchNormAct2d); None when nothing tells."""
    layout = layout_of_type(module)
    if layout is not None:
        return layout
    for child in reversed(list(module.children())):
        layout = _output_layout(child)
        if layout is not None:
            return layout
    return None


def _infer_channel_dim(parent: nn.Module, siblings: list[nn.Module], position: int) -> int:
    # An activation inside a norm-act layer sees that layer's normalised output.
    layout = _norm_act_layout(parent)
    if layout is not None:
        return layout
    for module in reversed(siblings[:position]):
        layout = _output_layout(module)
        if layout is not None:
            return layout
    return -1


def check_acts(acts) -> tuple[str, ...]:
    """``acts`` as a tuple of activation families; a TypeError for no iterable, a ValueError
    naming the accepted families for an unknown one."""
    if isinstance(acts, str):
        acts = (acts,)
    if not isinstance(acts, Iterable):
        raise TypeError(
            f"acts must be an activation family or several, among {ACT_FAMILIES}, got "
            f"{type(acts).__name__}"
        )
    acts = tuple(acts)
    for act in acts:
        if act not in ACT_FAMILIES:
            raise ValueError(f"acts entries must be among {ACT_FAMILIES}, got {act!r}")
    return acts


def _checked_arguments(acts, inputs_of, channel_dim, preset, compile_form, backend):
    """``(acts, inputs_of, channel_dim)`` in the forms :func:`convert` uses, or the error for
    the first bad argument."""
    check_backend(backend)
    if compile_form not in COMPILE_FORMS:
        raise ValueError(f"compile_form must be one of {COMPILE_FORMS}, got {compile_form!r}")
    if preset not in (None,) + PRESETS:
        raise ValueError(f"preset must be None or one of {PRESETS}, got {preset!r}")
    acts = check_acts(acts)
    if isinstance(inputs_of, str):
        inputs_of = (inputs_of,)
    try:
        inputs_of = tuple(inputs_of)
    except TypeError:
        raise TypeError(f"inputs_of must be a glob pattern or patterns, got {type(inputs_of).__name__}") from None
    if channel_dim is not None:
        try:
            channel_dim = index_channel_dim(channel_dim)
        except TypeError as error:
            raise TypeError(f"{error} (or None, which infers it)") from None
    return acts, inputs_of, channel_dim


def check_convert_arguments(**kwargs) -> None:
    """Raises what :func:`convert` would raise for these keyword arguments, without a model:
    for callers that convert only after long work."""
    bound = inspect.signature(convert).bind(None, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    _checked_arguments(arguments["acts"], arguments["inputs_of"], arguments["channel_dim"],
                       arguments["preset"], arguments["compile_form"], arguments["backend"])


def matched_inputs(model: nn.Module, inputs_of) -> dict[str, list[tuple[str, nn.Module]]]:
    """Each ``inputs_of`` pattern (one glob or several) and the ``(name, module)`` pairs of ``model``
    it matches, in module order: what :func:`convert` places input remaps on."""
    patterns = (inputs_of,) if isinstance(inputs_of, str) else tuple(inputs_of)
    matched = {pattern: [] for pattern in patterns}
    for name, module in model.named_modules():
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern):
                matched[pattern].append((name, module))
    return matched


def _mlp_linears(model: nn.Module, acts: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The linear children (:func:`lipkern.nn.is_linear`) of every module that also has a
    selected activation child, but for one registered last: the layers of MLP blocks whatever
    the library names them (preset ``"paper"``), without a network's classifier after its final
    activation."""
    found = []
    for name, parent in model.named_modules():
        children = [(n, c) for n, c in parent._modules.items() if c is not None]
        if not any(
            (act := activation_of(child)) is not None and _selected(act, acts)
            for _, child in children
        ):
            continue
        for child_name, child in children[:-1]:
            if is_linear(child):
                found.append((f"{name}.{child_name}" if name else child_name, child))
    return found


def convert(
    model: nn.Module,
    acts: Iterable[str] = ("relu", "gelu", "silu"),
    inputs_of: Iterable[str] = (),
    inplace: bool = False,
    backend: str = "auto",
    channel_dim: Optional[int] = None,
    preset: Optional[str] = None,
    compile_form: str = "decomposed",
) -> nn.Module:
    """Replace activations by RemapAct and add input remaps; returns ``model`` (see module doc)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    acts, inputs_of, channel_dim = _checked_arguments(
        acts, inputs_of, channel_dim, preset, compile_form, backend
    )

    unsupported: dict[int, tuple[str, str]] = {}  # id -> (class name, first qualified name)

    def make(module, name, parent, siblings, position):
        act = activation_of(module)
        if act is None:
            if _unsupported_activation(module):
                unsupported.setdefault(id(module), (type(module).__name__, name))
            return None
        if not _selected(act, acts):
            return None
        dim = (
            channel_dim
            if channel_dim is not None
            else _infer_channel_dim(parent, siblings, position)
        )
        new = RemapAct(
            act,
            dim,
            inplace=inplace or bool(getattr(module, "inplace", False)),
            backend=backend,
            compile_form=compile_form,
            layer_name=name,
        )
        # Kept outside the module tree (no state_dict entries) for unconvert and describe.
        object.__setattr__(new, _ORIGINAL, module)
        return new

    # Input remaps first, while names are those of the original model.
    matched = matched_inputs(model, inputs_of)
    if preset == "paper":
        matched["preset 'paper'"] = _mlp_linears(model, acts)
    # Every match checked before the first one changes: a refused match leaves the model as it was.
    for pattern, hits in matched.items():
        for name, module in hits:
            try:
                input_channel_dim(module)
            except TypeError as error:
                raise TypeError(f"inputs_of {pattern!r} matched {name!r}: {error}") from None
            parent = model.get_submodule(name.rpartition(".")[0])
            if isinstance(parent, nn.MultiheadAttention):
                raise TypeError(
                    f"inputs_of {pattern!r} matched {name!r}: nn.MultiheadAttention computes with "
                    "its projection's weights and never calls it, so an input remap there would "
                    "never run"
                )
    added = 0
    for pattern, hits in matched.items():
        if not hits and pattern in inputs_of:
            warnings.warn(f"lipkern.convert: inputs_of pattern {pattern!r} matched no module")
        for name, module in hits:
            if not has_input_remap(module):
                add_input_remap(
                    module,
                    backend=backend,
                    compile_form=compile_form,
                    layer_name=f"{name}.input_remap",
                )
                added += 1

    replaced: dict[int, RemapAct] = {}
    root_replacement = make(model, type(model).__name__, None, [], 0)
    if root_replacement is not None:
        return root_replacement
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        siblings = list(parent._modules.values())
        for position, (child_name, child) in enumerate(list(parent._modules.items())):
            if child is None:
                continue
            new = replaced.get(id(child))
            if new is None:
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                new = make(child, name, parent, siblings, position)
                if new is None:
                    continue
                replaced[id(child)] = new
            parent._modules[child_name] = new
    if (replaced or added) and not any(
        getattr(hook, "hook", None) is _check_remap_state
        for hook in model._load_state_dict_pre_hooks.values()
    ):
        model.register_load_state_dict_pre_hook(_check_remap_state)
    if unsupported:
        by_class: dict[str, list[str]] = {}
        for class_name, name in unsupported.values():
            by_class.setdefault(class_name, []).append(name)
        listing = "; ".join(
            f"{class_name} at {', '.join(names[:3])}"
            + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            for class_name, names in by_class.items()
        )
        warnings.warn(
            f"lipkern.convert: left activation modules that no lipkern op computes exactly: "
            f"{listing}"
        )
    if replaced or added:
        _keep_off_fused_paths(model)
    functions = _function_activations(model, acts)
    if functions:
        warnings.warn(
            f"lipkern.convert: left activations that are functions, not modules, which convert "
            f"cannot replace: {', '.join(functions[:3])}"
            + (f" and {len(functions) - 3} more" if len(functions) > 3 else "")
            + " (build the layer with a module: activation=nn.ReLU() or nn.GELU(), not a string)"
        )
    if not replaced and not added:
        warnings.warn(
            f"lipkern.convert: nothing was converted (acts={acts}, inputs_of={inputs_of}): no "
            "matching activation module or input layer that is not converted already"
        )
    return model


def _keep_off_fused_paths(model: nn.Module) -> None:
    for module in model.modules():
        for cls, flag, off in _FUSED_PATH_FLAGS:
            if (
                isinstance(module, cls)
                and hasattr(module, flag)
                and not hasattr(module, _SAVED_FUSED_PATH_FLAG)
                and remap_modules(module)  # input remaps are RemapAct children too
            ):
                setattr(module, _SAVED_FUSED_PATH_FLAG, getattr(module, flag))
                setattr(module, flag, off)


def _restore_fused_paths(model: nn.Module) -> None:
    for module in model.modules():
        for cls, flag, _ in _FUSED_PATH_FLAGS:
            if isinstance(module, cls) and hasattr(module, _SAVED_FUSED_PATH_FLAG):
                setattr(module, flag, getattr(module, _SAVED_FUSED_PATH_FLAG))
                delattr(module, _SAVED_FUSED_PATH_FLAG)


def _function_activations(model: nn.Module, acts: tuple[str, ...]) -> list[str]:
    """Qualified names of selected activations that a layer holds as a function, not a module."""
    import torch.nn.functional as F

    functions = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu"}
    return [
        f"{name}.activation" if name else "activation"
        for name, module in model.named_modules()
        if isinstance(module, _FUNCTION_ACTIVATION_HOLDERS)
        and not isinstance(module.activation, nn.Module)
        and _selected(functions.get(module.activation, ""), acts)
    ]


def _is_remap_config(value) -> bool:
    value = config_from_state(value)
    return isinstance(value, dict) and {"kind", "act", "channel_dim"} <= value.keys()


def _check_remap_state(model, state_dict, prefix, *args) -> None:
    """Check every converted layer's entries of ``state_dict`` before the load changes anything
    (the root's pre-hook runs before any module is loaded). A state with remap layers this model
    lacks is refused here too: torch would report their keys only after loading the others."""
    for name, module in remap_modules(model):
        module.check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)
    # Every name of a layer reached at several places holds its entries.
    prefixes = {
        f"{prefix}{name}." if name else prefix
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, RemapAct)
    }
    foreign = sorted(
        key.removesuffix("_extra_state")
        for key, value in state_dict.items()
        if key.startswith(prefix) and key.endswith("_extra_state") and _is_remap_config(value)
        and key.removesuffix("_extra_state") not in prefixes
    )
    # A model unconverted since keeps this hook: it then loads as one never converted.
    if foreign and prefixes:
        layers = ", ".join(repr(p.removesuffix(".")) for p in foreign)
        first = {p[len(prefix):].split(".", 1)[0] for p in foreign}
        own = {p for p in prefixes if any(key.startswith(p) for key in state_dict)}
        if len(first) == 1 and not hasattr(model, next(iter(first))):
            hint = (f"; their names start with '{next(iter(first))}.', as a wrapper's (DataParallel's) "
                    "state dict does: strip that prefix")
        elif not own and len(foreign) == len(prefixes):
            hint = ("; it holds as many as this model has, under other names: its keys were renamed (Hugging "
                    "Face's save_pretrained writes its checkpoint names): load the thresholds from a "
                    "lipkern.save_calibration file with lipkern.load_calibration")
        else:
            hint = " (convert both models alike; lipkern.describe lists a model's)"
        raise ValueError(
            f"state_dict is from another conversion: it holds remap layers this model lacks: "
            f"{layers}{hint}"
        )


def _original_of(layer: RemapAct) -> nn.Module:
    original = getattr(layer, _ORIGINAL, None)
    return original if original is not None else _TORCH_EQUIVALENTS[layer.act]()


def unconvert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: every RemapAct becomes the module it replaced (a RemapAct
    made by hand: the torch.nn module of its act) and every input remap is removed, so the
    state dict has no lipkern entries again. Returns ``model`` (or, for a model that is a
    RemapAct, its original). Calibrations are dropped with the modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, RemapAct) and not isinstance(model, InputRemap):
        return _original_of(model)
    # Decide every change before making any, so that an error leaves the model as it was.
    wrapped = [module for module in model.modules() if has_input_remap(module)]
    sites = [
        (parent, name, _original_of(child))
        for parent in model.modules()
        for name, child in parent._modules.items()
        if isinstance(child, RemapAct) and not isinstance(child, InputRemap)
    ]
    originals: dict[int, nn.Module] = {}
    for parent, name, original in sites:
        # A RemapAct shared by several sites gives them one original module back.
        parent._modules[name] = originals.setdefault(id(parent._modules[name]), original)
    for module in wrapped:
        remove_input_remap(module)
    _restore_fused_paths(model)
    return model


@dataclass
class LayerInfo:
    """One converted layer, as :func:`describe` lists it."""

    name: str
    kind: str  # "act" or "input"
    replaced: str  # class of the replaced activation, or of the layer whose input is remapped
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
        header = ("layer", "kind", "replaced", "act", "dim", "mode", "threshold", "note")
        rows = [header]
        for info in self:
            threshold = "-" if info.threshold_max is None else f"{info.threshold_max:.4g}"
            note = f"redundant: fed by {info.fed_by}" if info.redundant else ""
            rows.append(
                (
                    info.name,
                    info.kind,
                    info.replaced,
                    info.act,
                    str(info.channel_dim),
                    info.mode,
                    threshold,
                    note,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows
        )


def describe(model: nn.Module) -> Description:
    """What :func:`convert` did to ``model``: one :class:`LayerInfo` per RemapAct / InputRemap,
    named as calibrations name them (inside DataParallel's and torch.compile's wrappers)."""
    model = unwrapped(model)
    layers = remap_modules(model)
    infos = Description()
    wrapped_by = {
        id(layer.input_remap): type(layer).wrapped_class.__name__
        for layer in model.modules()
        if has_input_remap(layer)
    }
    for name, module in layers:
        calibrated = module.calibrated
        if module.kind == "input":
            replaced = f"input of {wrapped_by.get(id(module), '?')}"
        else:
            replaced = type(_original_of(module)).__name__
        infos.append(
            LayerInfo(
                name=name,
                kind=module.kind,
                replaced=replaced,
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
    on exit. A model without remap layers is refused (ValueError).
    """
    modules = [m for _, m in remap_modules(model)]
    if not modules:
        # An attack run through it would be a plain one and could pass for an adaptive one.
        raise ValueError(
            "straight_through: the model has no lipkern remap layers, so its backward is the plain "
            "one already; pass the converted model (lipkern.convert)"
        )
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
    "PRESETS",
    "Description",
    "LayerInfo",
    "activation_of",
    "convert",
    "describe",
    "straight_through",
    "unconvert",
]
