"""Empirical Lipschitz constant of each linear map with a remapped input (the paper's appendix C).

For a layer y = W x whose input x has mask m(x) (1 where the feature is kept, 0 where it is 0 after the remap),
the local map is W diag(m(x)). Reported per layer: sigma_max(W); the worst case and the mean over the data of
sigma_max(W diag(m(x))) for the original model (its own zero pattern, e.g. ReLU zeros) and for each ratio;
and worst / sigma_max(W). Only Linear and 1x1 convs (a kxk conv's operator norm is not a per-row matrix norm).
"""
from __future__ import annotations

import torch

from .layers import is_pointwise, weight_matrix


# float64 elements of W diag(mask) held at once (1 GiB): a wide layer (Swin-L's 1536 x 6144) takes few masks
# per step, a small one up to 2048.
MASKED_COPIES_ELEMENTS = 2 ** 27


def masked_spectral_norms(w: torch.Tensor, rows: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """sigma_max(W diag(rows[i] != 0)) for every row, computed once per distinct mask."""
    masks, inverse = torch.unique(rows != 0, dim=0, return_inverse=True)
    w = w.double()
    if chunk is None:
        chunk = max(1, min(2048, MASKED_COPIES_ELEMENTS // w.numel()))
    out = []
    for i in range(0, len(masks), chunk):
        wm = w[None] * masks[i:i + chunk, None, :].double()
        # Largest eigenvalue of the (out x out) Gram matrix: cheaper than an SVD and exact in fp64.
        gram = wm @ wm.transpose(1, 2)
        out.append(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt())
    return torch.cat(out)[inverse]


def lipschitz_table(modules: dict[str, torch.nn.Module], stats_by_config: dict[str, dict[str, torch.Tensor]]):
    """``{layer: {"sigma_W": s, "<config>": {"worst": w, "mean": m, "worst_ratio": w / s}}}`` for pointwise layers.

    ``stats_by_config[config][layer]``: the per-sample rows of :func:`lipkern.eval.layers.sample_layer_stats`
    (max and sum of sigma over each sample's input rows, and the row count), so "worst" is the maximum over all
    rows of all samples and "mean" the mean over all rows.
    """
    table = {}
    for name, module in modules.items():
        if not is_pointwise(module):
            continue
        sigma = torch.linalg.matrix_norm(weight_matrix(module).double().cpu(), ord=2).item()
        row = {"sigma_W": sigma}
        for config, stats in stats_by_config.items():
            s = stats[name].double()
            worst, mean = s[:, 2].max().item(), (s[:, 3].sum() / s[:, 4].sum()).item()
            row[config] = {"worst": worst, "mean": mean, "worst_ratio": worst / sigma}
        table[name] = row
    return table
