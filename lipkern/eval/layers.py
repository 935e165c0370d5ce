"""Inputs of the linear maps (nn.Linear, nn.Conv2d) of a model, captured with forward pre-hooks.

The remap acts on the *input* of the next linear map, so everything the analyses need (remapped proportion,
W * diag(mask(x)), per-feature remap frequency) is read off those inputs. With the default centre 0 an input
feature is remapped exactly when it is 0 after the remap (ReLU zeros count too: |0| < t for any t > 0, which is
the op's own mask). A layer given an input remap by ``lipkern.convert`` (e.g. FC1 after LayerNorm) applies it
inside its own forward, so its input is read at the output of that ``input_remap``. Layers are matched between
the original and the converted model by their order, which conversion does not change.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ._remap import has_input_remap

LINEAR_TYPES = (nn.Linear, nn.Conv2d)

# A layer counts as having a remapped input when, at the largest ratio, the fraction of its input features
# equal to 0 grows by more than this over the original model. (Downstream layers whose inputs merely shift
# do not gain exact zeros.)
REMAPPED_MIN_GAIN = 1e-3


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]


def input_vectors(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of features, (V, in_features): tokens for Linear, pixels for Conv2d.

    For a 1x1 conv only the positions its stride reads are kept, so each row meets W exactly once.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.kernel_size == (1, 1) and module.padding in ((0, 0), 0):
        x = x[:, :, ::module.stride[0], ::module.stride[1]]
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """(out, in) matrix of a Linear or 1x1 conv."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1) if isinstance(module, nn.Conv2d) else w


def is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                                             and module.groups == 1)


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str] | None = None, only=None):
    """Collects ``{layer name: [input rows of each call]}``; names are the original model's, matched by order.

    ``only``: the names of the layers to capture (default all), so that large layers nobody reads cost nothing.
    """
    layers = linear_layers(model)
    store: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook_for(name, layer):
        def pre_hook(module, args):
            store.setdefault(name, []).append(input_vectors(layer, args[0].detach()))

        def post_hook(module, args, output):
            store.setdefault(name, []).append(input_vectors(layer, output.detach()))
        return pre_hook, post_hook

    for i, (name, m) in enumerate(layers):
        name = names[i] if names is not None else name
        if only is not None and name not in only:
            continue
        pre_hook, post_hook = hook_for(name, m)
        if has_input_remap(m):
            handles.append(m.input_remap.register_forward_hook(post_hook))
        else:
            handles.append(m.register_forward_pre_hook(pre_hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def check_matching(original: nn.Module, converted: nn.Module) -> list[str]:
    a, b = linear_layers(original), linear_layers(converted)
    if len(a) != len(b) or any(m1.weight.shape != m2.weight.shape for (_, m1), (_, m2) in zip(a, b)):
        raise RuntimeError("converted model's Linear/Conv2d layers do not match the original's one to one")
    return [name for name, _ in a]


@torch.no_grad()
def remap_counts(original: nn.Module, converted: nn.Module, batches, names: list[str]) -> dict[str, torch.Tensor]:
    """Per layer, int64 counts over the input rows of ``batches`` (each an input tensor on the models' device):
    ``[rows, zero in the original per feature..., zero in the converted per feature..., remapped per feature...]``
    stacked as a (3, F + 1) tensor whose column 0 holds the row count. "Remapped": 0 in the converted model's
    input and not 0 in the original's for the same row (so ReLU's own zeros are not counted).

    Integer counts over batches add up exactly, so ranks can all-reduce them.
    """
    totals: dict[str, torch.Tensor] = {}
    for x in batches:
        with capture_inputs(original, names) as before:
            original(x)
        with capture_inputs(converted, names) as after:
            converted(x)
        for name in names:
            rows_before, rows_after = torch.cat(before[name]), torch.cat(after[name])
            zero_before, zero_after = rows_before == 0, rows_after == 0
            counts = torch.stack([zero_before.sum(0), zero_after.sum(0), (zero_after & ~zero_before).sum(0)])
            rows = torch.full((3, 1), len(rows_after), dtype=torch.int64, device=counts.device)
            counts = torch.cat([rows, counts.to(torch.int64)], 1)
            totals[name] = counts if name not in totals else totals[name] + counts
    return totals


@torch.no_grad()
def sample_layer_stats(model: nn.Module, x: torch.Tensor, names: list[str], selected: dict[str, nn.Module],
                       batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per selected layer and test sample, float64 ``[zero inputs, inputs, max sigma, sum of sigma, rows]``
    where sigma is the largest singular value of W diag(mask(row)) of each of the sample's input rows (Linear
    and 1x1 convs only; NaN for other layers). Returns ``{layer: (len(x), 5)}``; batch by batch, so the
    memory held is one batch's layer inputs."""
    from .lipschitz import masked_spectral_norms

    out: dict[str, list[torch.Tensor]] = {n: [] for n in selected}
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size]
        with capture_inputs(model, names, only=set(selected)) as store:
            model(batch)
        for name, module in selected.items():
            rows = torch.cat(store[name]).reshape(len(batch), -1, store[name][0].shape[-1])
            zeros = (rows == 0).flatten(1).sum(1).double()
            size = torch.full_like(zeros, rows[0].numel())
            n_rows = torch.full_like(zeros, rows.shape[1])
            if is_pointwise(module):
                sigma = masked_spectral_norms(weight_matrix(module), rows.flatten(0, 1)).reshape(len(batch), -1)
                smax, ssum = sigma.amax(1), sigma.sum(1)
            else:
                smax = ssum = torch.full_like(zeros, float("nan"))
            out[name].append(torch.stack([zeros, size, smax, ssum, n_rows], 1))
    return {n: torch.cat(v) for n, v in out.items()}
