"""Real architectures with random weights, built offline.

:func:`build` takes ``"<source>:<name>"``:

- ``"torchvision:<name>"``: ``torchvision.models.get_model(name, weights=None)``.
- ``"timm:<name>"``: ``timm.create_model(name, pretrained=False)``.
- ``"robustbench:<dataset>:<ID>"``: the RobustBench architecture of model ``ID`` (random weights);
  see :mod:`lipkern.models.robustbench` for loading checkpoints.

Keyword arguments go to the constructor (e.g. ``num_classes=10``, ``img_size=64`` for timm
transformers to keep tests small).
"""

from __future__ import annotations

from torch import nn

from lipkern.models.robustbench import (
    load_robustbench,
    robustbench_architecture,
    write_robustbench_checkpoint,
)

SOURCES = ("torchvision", "timm", "robustbench")


def build(spec: str, **kwargs) -> nn.Module:
    """A model with random weights, in eval mode, from ``"<source>:<name>"`` (module docstring)."""
    source, _, name = spec.partition(":")
    if source not in SOURCES or not name:
        raise ValueError(
            f"spec must look like '<source>:<name>' with source in {SOURCES}, got {spec!r}"
        )
    if source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        dataset, _, model_id = name.partition(":")
        model = robustbench_architecture(model_id, dataset, **kwargs)
    return model.eval()


__all__ = [
    "SOURCES",
    "build",
    "load_robustbench",
    "robustbench_architecture",
    "write_robustbench_checkpoint",
]
