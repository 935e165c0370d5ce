"""Shared pieces of the model-layer tests: the backend they run, and the hook-based reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

import lipkern.ops.api as ops_api
from lipkern.nn import remap_modules
from lipkern.ops.reference import remap_act_reference


def model_backend() -> str:
    """The C++ kernels when built (what backend='auto' picks on CPU), else the reference."""
    return "cpu" if "cpu" in ops_api.available_backends("cpu") else "reference"


def _module_at(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _parameters(layer, x):
    dim = layer.channel_dim % x.dim()
    center = layer.center if layer.center.numel() else None
    return layer.threshold, center, layer.act, dim


def hooked_reference(original: nn.Module, converted: nn.Module, straight_through=False) -> list:
    """Hooks on ``original`` that apply the reference remap with ``converted``'s thresholds.

    Activation modules get a forward hook replacing their output by
    ``remap_act_reference(input)``; input remaps become forward pre-hooks on the wrapped layer.
    Returns the hook handles (call ``.remove()``).
    """
    handles = []
    for name, layer in remap_modules(converted):
        if layer.kind == "input":
            if layer.redundant:
                continue
            target = _module_at(original, name.rsplit(".", 1)[0])

            def pre_hook(module, inputs, layer=layer):
                x = inputs[0]
                y = remap_act_reference(x, *_parameters(layer, x), straight_through)
                return (y, *inputs[1:])

            handles.append(target.register_forward_pre_hook(pre_hook))
        else:
            target = _module_at(original, name)

            def hook(module, inputs, output, layer=layer):
                # An in-place ReLU has already overwritten its input with relu(x): the remap of
                # relu(relu(x)) is the same.
                x = inputs[0]
                return remap_act_reference(x, *_parameters(layer, x), straight_through)

            handles.append(target.register_forward_hook(hook))
    return handles


def activation_maxima(model: nn.Module, names: list[str], data, channel_dims=None) -> dict:
    """max |a| at the named converted layers, measured on the UNconverted ``model`` with plain
    hooks: an activation's output, or (``"<layer>.input_remap"``) the layer's input. Per channel
    when ``channel_dims[name]`` is given."""
    maxima: dict = {}

    def record(name, tensor):
        a = tensor.detach().float().abs()
        if channel_dims is None:
            value = a.amax()
        else:
            dim = channel_dims[name] % a.dim()
            value = a.movedim(dim, 0).reshape(a.shape[dim], -1).amax(dim=1)
        maxima[name] = value if name not in maxima else torch.maximum(maxima[name], value)

    handles = []
    for name in names:
        if name.endswith(".input_remap"):
            target = _module_at(model, name.rsplit(".", 1)[0])
            handles.append(
                target.register_forward_pre_hook(lambda m, i, name=name: record(name, i[0]))
            )
        else:
            target = _module_at(model, name)
            handles.append(
                target.register_forward_hook(lambda m, i, o, name=name: record(name, o))
            )
    with torch.no_grad():
        for x in data:
            model(x)
    for handle in handles:
        handle.remove()
    return maxima


def assert_close_model_outputs(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:
        scale = expected.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(actual, expected, rtol=0, atol=float(scale) * 1e-4)


def layer_comparisons(model: nn.Module, x: torch.Tensor) -> dict:
    """Run ``model`` on ``x`` and judge every remapping layer's output against the reference
    applied to that layer's own input (lipkern.testing's rules: exact for ReLU / identity,
    ulp bounds and the tie band for GELU / SiLU). Returns ``{layer: Comparison}``."""
    from lipkern.testing import compare_forward

    inputs, results, handles = {}, {}, []
    for name, layer in remap_modules(model):
        if layer.redundant:
            continue

        def pre_hook(module, args, name=name):
            inputs[name] = args[0].detach().clone()  # an in-place layer overwrites its input

        def hook(module, args, output, name=name):
            x = inputs[name]
            threshold, center, act, dim = _parameters(module, x)
            results[name] = compare_forward(output.detach(), x, threshold, center, act, dim)

        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return results


def set_backend(model: nn.Module, backend: str) -> None:
    for _, layer in remap_modules(model):
        layer.backend = backend


def assert_matches_hook_reference(
    model: nn.Module, original: nn.Module, x: torch.Tensor, judge_layers: bool = True
) -> None:
    """The converted model == the original with reference hooks.

    End to end, with the backend the model runs, for ReLU / identity layers only (bit-exact ops).
    With GELU layers a legitimate 1-ulp difference can flip a remap decision inside the tie band
    and the flip (a jump of ``t``) propagates, so there each layer is judged on its own input,
    and the end-to-end comparison (which checks where remaps sit) runs with the reference backend.
    ``judge_layers=False`` skips the per-layer judging (for models too big to judge cheaply).
    """
    reference_model = copy.deepcopy(original)
    hooked_reference(reference_model, model)
    with torch.no_grad():
        expected = reference_model(x)
    layers = remap_modules(model)
    if all(layer.act in ("relu", "identity") for _, layer in layers):
        with torch.no_grad():
            assert_close_model_outputs(model(x), expected, exact=True)
        return
    if judge_layers:
        failures = {n: c for n, c in layer_comparisons(model, x).items() if not c.ok}
        assert not failures, failures
    backends = {name: layer.backend for name, layer in layers}
    set_backend(model, "reference")
    try:
        with torch.no_grad():
            assert_close_model_outputs(model(x), expected, exact=True)
    finally:
        for name, layer in layers:
            layer.backend = backends[name]
