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
  checkpoint with the same prefix rules as ``load_model``.
- ``Bai2024MixedNUTS`` (ImageNet) is MixedNUTS (Bai et al., "MixedNUTS: training-free
  accuracy-robustness balance via nonlinearly mixed classifiers"): an accurate ConvNeXtV2-L
  (robustbench's ``convnext_v2.convnextv2_large``, which reads raw [0, 1] pixels: its ``mean`` /
  ``std`` parameters are never used by its forward) and the robust Swin-L of
  ``Liu2023Comprehensive_Swin-L``, mixed by robustbench 1.1.1's own ``NonLinMixedClassifier``: the
  ConvNeXt's logits become a one-hot of their argmax (``HardMaxMap``), the Swin's are normalised
  over their top 250, shifted by ``c``, passed through GELU, raised to the power ``p`` (sign kept)
  and scaled by ``s`` (``LNClampPowerScaleMap``), and the output is
  ``log((1 - alpha) softmax(std) + alpha softmax(rob))``. The PyPI release ships those classes and
  the constants (``optimal_spca.yaml``, ImageNet / Swin-L, GELU entry at its default beta) but not
  the function that assembles them; :func:`mixed_nuts` assembles them as the RobustBench
  repository's ``get_nonlin_mixed_classifier`` does *(reconstructed from that repository's
  source)*, with one deliberate difference: the GELU of the logit map is passed as the function
  ``F.gelu`` instead of an ``nn.GELU`` module (the same values), so that :func:`lipkern.convert`
  converts the two networks' GELUs and not the float64 logit transform. Its checkpoint is two
  files, as RobustBench stores ensembles: ``<ID>.pt_m0.pt`` (the ConvNeXtV2 state dict) and
  ``<ID>.pt_m1.pt`` (the Swin-L one, the same file as ``Liu2023Comprehensive_Swin-L.pt``). Loading
  follows RobustBench's: ``module.`` prefixes stripped, timm's Swin ``checkpoint_filter_fn`` on
  the Swin state dict (it converts checkpoints of older timm versions), strict loading except that
  the ConvNeXtV2's unused ``mean`` / ``std`` may be absent (RobustBench lists that failure as
  known and loads without them).

:func:`write_robustbench_checkpoint` writes a model's weights in that checkpoint format, so the
whole pipeline (load, convert, calibrate, evaluate) runs offline on the real architectures with
random weights.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import io
import sys
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
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


def mixed_nuts(std_model: nn.Module, rob_model: nn.Module) -> nn.Module:
    """The ImageNet MixedNUTS classifier around ``std_model`` (accurate) and ``rob_model``
    (robust, behind robustbench's input normaliser), with the published mixing constants.

    ``Bai2024MixedNUTS`` is ``mixed_nuts(convnextv2_large(), Liu2023Comprehensive_Swin-L)``; other
    base models (smaller ones in tests) go through the same mixing (module docstring).
    """
    import yaml

    mixing_net = _robustbench("model_zoo.architectures.mixing_net")
    output_maps = _robustbench("model_zoo.architectures.output_maps")
    constants_file = importlib.resources.files("robustbench.model_zoo.architectures").joinpath(
        "optimal_spca.yaml"
    )
    constants = yaml.safe_load(constants_file.read_text())["imagenet"]
    constants = constants["Liu2023Comprehensive_Swin-L"]
    # "none": the mixing weight of the differentiable output (for attacks); "gelu": the logit map
    # and mixing weight of the prediction, each at its default beta (the clean-accuracy level).
    plain = constants["none"]
    nonlinear = constants["gelu"][constants["gelu"]["default_beta"]]
    settings = {
        "std_map": output_maps.HardMaxMap(),
        "rob_map": output_maps.LNClampPowerScaleMap(
            scale=nonlinear["s"],
            power=nonlinear["p"],
            clamp_bias=nonlinear["c"],
            ln_k=250,
            clamp_fn=F.gelu,  # a function, not a module: convert must not remap the logit map
        ),
        "alpha": nonlinear["alpha"],
        "alpha_diffable": plain[plain["default_beta"]]["alpha"],
    }
    # The constructor reports parameter counts and settings on stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        return mixing_net.NonLinMixedClassifier(std_model, rob_model, settings)


def _mixed_nuts_imagenet() -> nn.Module:
    convnext_v2 = _robustbench("model_zoo.architectures.convnext_v2")
    rob_model = _imagenet_timm("swin_large_patch4_window7_224")()
    return mixed_nuts(convnext_v2.convnextv2_large(num_classes=1000), rob_model)


EXTRA_MODELS: dict[tuple[str, str], Callable[[], nn.Module]] = {
    ("cifar10", "Chen2024Data_WRN_34_10"): _wide_resnet(34, 10, 10),
    ("cifar100", "Chen2024Data_WRN_34_10"): _wide_resnet(34, 10, 100),
    ("cifar100", "Cui2023Decoupled_WRN-34-10"): _wide_resnet(34, 10, 100),
    ("imagenet", "Liu2023Comprehensive_Swin-L"): _imagenet_timm("swin_large_patch4_window7_224"),
    ("imagenet", "Bai2024MixedNUTS"): _mixed_nuts_imagenet,
}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _zoo_entry(model_id: str, dataset: str, threat_model: str):
    zoo = _robustbench("model_zoo")
    enums = _robustbench("model_zoo.enums")
    models = zoo.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]
    return models.get(model_id)


def check_model_id(model_id: str, dataset: str = "cifar10", threat_model: str = "Linf") -> None:
    """Raises ValueError unless ``model_id`` is in the installed robustbench zoo or EXTRA_MODELS."""
    _check_dataset(dataset)
    if _zoo_entry(model_id, dataset, threat_model) is None and (dataset, model_id) not in EXTRA_MODELS:
        raise ValueError(
            f"unknown RobustBench model {model_id!r} for {dataset}/{threat_model}: neither in the "
            f"installed robustbench zoo nor in lipkern's EXTRA_MODELS {sorted(EXTRA_MODELS)}"
        )


def robustbench_architecture(model_id: str, dataset: str = "cifar10", threat_model: str = "Linf"):
    """The architecture of RobustBench model ``model_id``, random weights, eval mode."""
    check_model_id(model_id, dataset, threat_model)
    entry = _zoo_entry(model_id, dataset, threat_model)
    if entry is not None:
        return entry["model"]().eval()
    return EXTRA_MODELS[(dataset, model_id)]().eval()


def checkpoint_path(model_id: str, dataset: str, model_dir, threat_model: str = "Linf") -> Path:
    """``DIR/<dataset>/<threat_model>/<ID>.pt``: RobustBench's path for the model; an ensemble's
    files are this path plus ``_m<i>.pt`` (:func:`checkpoint_files`)."""
    return Path(model_dir) / dataset / threat_model / f"{model_id}.pt"


def _swin_filter(state_dict: dict, swin: nn.Module) -> dict:
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, swin)


def _keep(state_dict: dict, module: nn.Module) -> dict:
    return state_dict


# RobustBench converts Swin checkpoints of older timm versions with timm's filter before loading.
_STATE_FILTERS = {"Liu2023Comprehensive_Swin-L": _swin_filter}

# Ensembles are stored one file per member, ``<ID>.pt_m<i>.pt``: each member's module in file
# order and the filter RobustBench applies to its state dict.
_ENSEMBLES = {
    ("imagenet", "Bai2024MixedNUTS"): (
        (lambda model: model.std_model, _keep),
        (lambda model: model.rob_model.model, _swin_filter),
    ),
}

# Parameters RobustBench loads a checkpoint without (its _safe_load_state_dict lists the message
# as a known failure): robustbench's ConvNeXtV2 defines them but its forward never reads them.
_OPTIONAL_KEYS = {"Bai2024MixedNUTS": {"mean", "std"}}


def _checkpoint_parts(model: nn.Module, model_id: str, dataset: str) -> list:
    """``(module, state-dict filter)`` per checkpoint file of ``model``."""
    members = _ENSEMBLES.get((dataset, model_id))
    if members is not None:
        return [(member(model), state_filter) for member, state_filter in members]
    # ImageNet checkpoints hold the network behind robustbench's input normaliser.
    module = model.model if dataset == "imagenet" else model
    return [(module, _STATE_FILTERS.get(model_id, _keep))]


def checkpoint_files(
    model_id: str, dataset: str, model_dir, threat_model: str = "Linf"
) -> list[Path]:
    """The files RobustBench reads for ``model_id`` (one, or one per ensemble member)."""
    path = checkpoint_path(model_id, dataset, model_dir, threat_model)
    members = _ENSEMBLES.get((dataset, model_id))
    if members is None:
        return [path]
    return [path.with_name(f"{path.name}_m{i}.pt") for i in range(len(members))]


def write_robustbench_checkpoint(
    model: nn.Module, model_id: str, dataset: str, model_dir, threat_model: str = "Linf"
) -> Path:
    """Save ``model``'s weights where and how RobustBench's loader reads them; returns
    :func:`checkpoint_path` (an ensemble's files: :func:`checkpoint_files`)."""
    _check_dataset(dataset)
    files = checkpoint_files(model_id, dataset, model_dir, threat_model)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for file, (module, _) in zip(files, _checkpoint_parts(model, model_id, dataset)):
        torch.save({"state_dict": module.state_dict()}, file)
    return checkpoint_path(model_id, dataset, model_dir, threat_model)


def _load_part(module: nn.Module, state_dict: dict, optional: set, file: Path) -> None:
    expected = set(module.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if unexpected or missing - optional:
        raise RuntimeError(
            f"{file} does not fit the architecture: missing keys {sorted(missing - optional)}, "
            f"unexpected keys {sorted(unexpected)}"
        )
    module.load_state_dict(state_dict, strict=not missing)


def load_robustbench(
    model_id: str, dataset: str, model_dir, threat_model: str = "Linf"
) -> nn.Module:
    """Load RobustBench model ``model_id`` from ``model_dir`` (offline; module docstring).

    Raises FileNotFoundError instead of downloading when a checkpoint file is missing.
    """
    _check_dataset(dataset)
    files = checkpoint_files(model_id, dataset, model_dir, threat_model)
    absent = [str(file) for file in files if not file.is_file()]
    if absent:
        raise FileNotFoundError(
            f"no checkpoint at {', '.join(absent)}; place the RobustBench checkpoint there (this "
            "machine cannot download it)"
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
    optional = _OPTIONAL_KEYS.get(model_id, set())
    ensemble = (dataset, model_id) in _ENSEMBLES
    for file, (module, state_filter) in zip(files, _checkpoint_parts(model, model_id, dataset)):
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        state_dict = checkpoint.get("state_dict", checkpoint)
        state_dict = utils.rm_substr_from_state_dict(state_dict, "module.")
        if not ensemble:
            # A single file may hold the normaliser wrapper's prefix (load_model strips it too).
            state_dict = utils.rm_substr_from_state_dict(state_dict, "model.")
        _load_part(module, state_filter(state_dict, module), optional, file)
    return model.eval()


__all__ = [
    "DATASETS",
    "EXTRA_MODELS",
    "checkpoint_files",
    "checkpoint_path",
    "load_robustbench",
    "mixed_nuts",
    "robustbench_architecture",
    "write_robustbench_checkpoint",
]
