"""Real architectures (random weights, offline): converted + calibrated output == hook reference.

Inputs are small (CIFAR size, or timm transformers built for 64 / 112 pixel inputs, batch 1-2) to
keep the suite cheap on 2 cores; Swin-L is loaded from its 224-pixel checkpoint and then run at
112 pixels (timm's set_input_size), batch 1.
"""

import copy

import pytest
import torch

from lipkern.calibrate import calibrate
from lipkern.convert import convert, describe
from lipkern.models import build, load_robustbench, write_robustbench_checkpoint
from lipkern.nn import remap_modules
from model_helpers import activation_maxima, assert_matches_hook_reference, model_backend

C_R = 2**-6
TRANSFORMER_INPUTS = ("*.mlp.fc1", "*.mlp.fc2")

# spec, constructor kwargs, input shape, inputs_of, number of converted layers
ARCHITECTURES = [
    ("torchvision:resnet18", dict(num_classes=10), (2, 3, 32, 32), (), 9),
    ("timm:resnet18", dict(num_classes=10), (2, 3, 32, 32), (), 17),
    ("timm:vit_tiny_patch16_224", dict(img_size=64, num_classes=10), (2, 3, 64, 64),
     TRANSFORMER_INPUTS, 36),
    ("timm:swin_tiny_patch4_window7_224", dict(img_size=112, num_classes=10), (1, 3, 112, 112),
     TRANSFORMER_INPUTS, 36),
    ("timm:convnext_tiny", dict(num_classes=10), (1, 3, 64, 64), TRANSFORMER_INPUTS, 54),
]

# RobustBench: id, dataset, input shape, inputs_of, converted layers. Wu2020Adversarial_extra is in
# the installed zoo (robustbench's own load_model reads the checkpoint); the other two are IDs the
# PyPI release lacks (lipkern.models.robustbench.EXTRA_MODELS).
ROBUSTBENCH = [
    ("Wu2020Adversarial_extra", "cifar10", (2, 3, 32, 32), (), 33),  # WRN-28-10 (sub_block1)
    ("Chen2024Data_WRN_34_10", "cifar100", (2, 3, 32, 32), (), 31),  # WRN-34-10
    ("Liu2023Comprehensive_Swin-L", "imagenet", (1, 3, 112, 112), ("*.mlp.fc1",), 48),
]


def _check(original, shape, inputs_of, layers, heavy=False):
    """Convert, calibrate, then compare with the hook reference and c_r * max.

    ``heavy``: one calibration batch, compared on that batch, no per-layer judging (the kernels
    are judged inside the smaller models) and no comparison with the original (each forward of
    Swin-L costs seconds here)."""
    exact = not inputs_of  # the CNNs here are ReLU-only; transformers use GELU
    data = [torch.randn(shape) for _ in range(1 if heavy else 2)]
    model = convert(copy.deepcopy(original), inputs_of=inputs_of, backend=model_backend())
    assert len(describe(model)) == layers
    report = calibrate(model, data, c_r=C_R, progress=False)
    # WRN-28-10 with sub_block1 registers a block its forward never runs: left uncalibrated.
    converted = {name: m for name, m in remap_modules(model) if m.calibrated or m.redundant}
    assert [layer.name for layer in report.layers] == list(converted)
    if inputs_of and "*.mlp.fc2" in inputs_of:
        # Every FC2 reads its block's GELU output: those input remaps are pass-throughs.
        fc2 = [m for name, m in converted.items() if name.endswith("fc2.input_remap")]
        assert fc2 and all(m.redundant for m in fc2)
    active = [name for name, m in converted.items() if not m.redundant]
    maxima = activation_maxima(original, active, data)
    for name in active:
        expected = (C_R * maxima[name].double()).float()
        # GELU values may differ by ulps between PyTorch and the kernels, and so may everything
        # downstream of them.
        rtol = 0 if exact or model_backend() == "reference" else 1e-5
        torch.testing.assert_close(converted[name].threshold, expected, rtol=rtol, atol=0)
    x = data[0] if heavy else torch.randn(shape)
    assert_matches_hook_reference(model, original, x, judge_layers=not heavy)
    if not heavy:
        with torch.no_grad():
            assert not torch.equal(model(x), original(x))


@pytest.mark.parametrize(
    "spec, kwargs, shape, inputs_of, layers", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES]
)
def test_architecture_matches_hook_reference(spec, kwargs, shape, inputs_of, layers):
    torch.manual_seed(0)
    _check(build(spec, **kwargs), shape, inputs_of, layers)


@pytest.mark.parametrize(
    "model_id, dataset, shape, inputs_of, layers", ROBUSTBENCH, ids=[r[0] for r in ROBUSTBENCH]
)
def test_robustbench_offline_checkpoint(tmp_path, model_id, dataset, shape, inputs_of, layers):
    torch.manual_seed(0)
    random_weights = build(f"robustbench:{dataset}:{model_id}")
    path = write_robustbench_checkpoint(random_weights, model_id, dataset, tmp_path)
    assert path == tmp_path / dataset / "Linf" / f"{model_id}.pt"
    loaded = load_robustbench(model_id, dataset, tmp_path)
    for (key, a), (_, b) in zip(random_weights.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    del random_weights
    if dataset == "imagenet":
        # Same weights, 4x fewer tokens: Swin-L at 224 pixels costs seconds per forward here.
        loaded.model.set_input_size(img_size=shape[-2:])
    _check(loaded, shape, inputs_of, layers, heavy=dataset == "imagenet")


def test_robustbench_missing_checkpoint_and_unknown_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot download"):
        load_robustbench("Wu2020Adversarial_extra", "cifar10", tmp_path)
    with pytest.raises(ValueError, match="unknown RobustBench model"):
        build("robustbench:cifar10:NoSuchModel")
    with pytest.raises(ValueError, match="dataset"):
        build("robustbench:mnist:Wu2020Adversarial_extra")
    with pytest.raises(ValueError, match="source"):
        build("keras:resnet18")


@pytest.mark.parametrize("spec, kwargs, shape, inputs_of", [
    ("torchvision:resnet18", dict(num_classes=10), (1, 3, 32, 32), ()),
    ("timm:vit_tiny_patch16_224", dict(img_size=64, num_classes=10), (1, 3, 64, 64),
     TRANSFORMER_INPUTS),
], ids=["torchvision:resnet18", "timm:vit_tiny_patch16_224"])
def test_real_model_compiles_without_graph_breaks(spec, kwargs, shape, inputs_of):
    torch.manual_seed(0)
    model = convert(build(spec, **kwargs), inputs_of=inputs_of, backend=model_backend())
    x = torch.randn(shape)
    calibrate(model, [x], c_r=C_R, progress=False)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
