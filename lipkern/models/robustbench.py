"""RobustBench models without a network connection.

What was checked (robustbench 1.1.1, the PyPI release, installed with ``--no-deps``):

- ``robustbench.utils.load_model(model_name=ID, model_dir=DIR, dataset=..., threat_model="Linf")``
  builds the architecture and reads ``DIR/<dataset>/Linf/<ID>.pt`` without downloading anything
  when that file exists (it is read with ``torch.load``; a ``{"state_dict": ...}`` dict or a bare
  state dict, ``module.`` / ``model.`` prefixes stripped). :func:`load_robustbench` uses it for
  every model of the installed zoo.
- Importing robustbench needs ``pkg_resources``, which setuptools >= 81 no longer ships (this
  environment has setuptools 84). robustbench only calls ``pkg_resources.resource_filename`` to
  find its ImageNet file lists, so while robustbench is imported a minimal stand-in
  (``importlib.resources``) is put in ``sys.modules`` when the real module is missing, and removed
  afterwards. Nothing else is missing.
- The PyPI release predates some of the seed's models (METHOD.md section 6). For these
  :data:`EXTRA_MODELS` builds the architecture from robustbench's own code (``WideResNet``) or
  timm behind robustbench's ``normalize_model``, as the RobustBench repository defines them
  *(reconstructed: the exact definition of these IDs could not be read here)*, and reads the
  checkpoint with the same prefix rules as ``load_model``. ``Bai2024MixedNUTS`` (an ensemble with
  its own mixing code) is not provided.

:func:`write_robustbench_checkpoint` writes a model's weights in that checkpoint format, so the
whole pipeline (load, convert, calibrate, evaluate) runs offline on the real architectures with
random weights.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import sys
import types
from pathlib import Path
from typing import Callable

import torch
from torch import nn

DATASETS = ("cifar10", "cifar100", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _pkg_resources_available():
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, resource: str(
            importlib.resources.files(package).joinpath(resource)
        )
        sys.modules["pkg_resources"] = shim
        try:
            yield
        finally:
            if sys.modules.get("pkg_resources") is shim:
                del sys.modules["pkg_resources"]
    else:
        yield


def _robustbench(module: str):
    """Import ``robustbench.<module>`` (works without pkg_resources)."""
    with _pkg_resources_available():
        return importlib.import_module(f"robustbench.{module}")


def _wide_resnet(depth: int, widen_factor: int, num_classes: int) -> Callable[[], nn.Module]:
    def make():
        wide_resnet = _robustbench("model_zoo.architectures.wide_resnet")
        return wide_resnet.WideResNet(
            depth=depth, widen_factor=widen_factor, num_classes=num_classes
        )

    return make


def _imagenet_timm(name: str) -> Callable[[], nn.Module]:
    def make():
        import timm

        utils = _robustbench("model_zoo.architectures.utils_architectures")
        model = timm.create_model(name, pretrained=False)
        return utils.normalize_model(model, IMAGENET_MEAN, IMAGENET_STD)

    return make


EXTRA_MODELS: dict[tuple[str, str], Callable[[], nn.Module]] = {
    ("cifar10", "Chen2024Data_WRN_34_10"): _wide_resnet(34, 10, 10),
    ("cifar100", "Chen2024Data_WRN_34_10"): _wide_resnet(34, 10, 100),
    ("cifar100", "Cui2023Decoupled_WRN-34-10"): _wide_resnet(34, 10, 100),
    ("imagenet", "Liu2023Comprehensive_Swin-L"): _imagenet_timm("swin_large_patch4_window7_224"),
}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _zoo_entry(model_id: str, dataset: str, threat_model: str):
    zoo = _robustbench("model_zoo")
    enums = _robustbench("model_zoo.enums")
    models = zoo.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]
    return models.get(model_id)


def robustbench_architecture(model_id: str, dataset: str = "cifar10", threat_model: str = "Linf"):
    """The architecture of RobustBench model ``model_id``, random weights, eval mode."""
    _check_dataset(dataset)
    entry = _zoo_entry(model_id, dataset, threat_model)
    if entry is not None:
        return entry["model"]().eval()
    if (dataset, model_id) in EXTRA_MODELS:
        return EXTRA_MODELS[(dataset, model_id)]().eval()
    raise ValueError(
        f"unknown RobustBench model {model_id!r} for {dataset}/{threat_model}: neither in the "
        f"installed robustbench zoo nor in lipkern's EXTRA_MODELS {sorted(EXTRA_MODELS)}"
    )


def checkpoint_path(model_id: str, dataset: str, model_dir, threat_model: str = "Linf") -> Path:
    return Path(model_dir) / dataset / threat_model / f"{model_id}.pt"


def _checkpoint_target(model: nn.Module, dataset: str) -> nn.Module:
    # ImageNet checkpoints hold the network behind robustbench's input normaliser.
    return model.model if dataset == "imagenet" else model


def write_robustbench_checkpoint(
    model: nn.Module, model_id: str, dataset: str, model_dir, threat_model: str = "Linf"
) -> Path:
    """Save ``model``'s weights where and how RobustBench's loader reads them; returns the path."""
    _check_dataset(dataset)
    path = checkpoint_path(model_id, dataset, model_dir, threat_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _checkpoint_target(model, dataset).state_dict()}, path)
    return path


def load_robustbench(
    model_id: str, dataset: str, model_dir, threat_model: str = "Linf"
) -> nn.Module:
    """Load RobustBench model ``model_id`` from ``model_dir`` (offline; module docstring).

    Raises FileNotFoundError instead of downloading when the checkpoint is missing.
    """
    _check_dataset(dataset)
    path = checkpoint_path(model_id, dataset, model_dir, threat_model)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; place the RobustBench checkpoint there (this machine "
            "cannot download it)"
        )
    if _zoo_entry(model_id, dataset, threat_model) is not None:
        utils = _robustbench("utils")
        return utils.load_model(
            model_name=model_id,
            model_dir=str(model_dir),
            dataset=dataset,
            threat_model=threat_model,
        )
    model = robustbench_architecture(model_id, dataset, threat_model)
    utils = _robustbench("utils")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = utils.rm_substr_from_state_dict(state_dict, "module.")
    state_dict = utils.rm_substr_from_state_dict(state_dict, "model.")
    _checkpoint_target(model, dataset).load_state_dict(state_dict, strict=True)
    return model.eval()


__all__ = [
    "DATASETS",
    "EXTRA_MODELS",
    "checkpoint_path",
    "load_robustbench",
    "robustbench_architecture",
    "write_robustbench_checkpoint",
]
