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
    converted = {name: m for name, m in remap_modules(model) if m.ready}
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


def _small_mixed_nuts():
    """MixedNUTS's mixing around a tiny ConvNeXtV2 and a tiny Swin (the real ones' classes)."""
    import timm

    from lipkern.models.robustbench import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        _robustbench,
        mixed_nuts,
    )

    convnext_v2 = _robustbench("model_zoo.architectures.convnext_v2")
    utils = _robustbench("model_zoo.architectures.utils_architectures")
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
        depths=(1, 1), num_heads=(1, 2), window_size=7,
    )
    std = convnext_v2.ConvNeXtV2(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])
    return mixed_nuts(std, utils.normalize_model(swin, IMAGENET_MEAN, IMAGENET_STD)).eval()


def test_mixed_nuts_mixing_and_checkpoint_files(tmp_path, monkeypatch):
    """The mixing formula, what convert touches, and the two-file checkpoint layout, on small
    base models under the real ID (the full-size one: the next test)."""
    import lipkern.models.robustbench as rb

    monkeypatch.setitem(rb.EXTRA_MODELS, ("imagenet", "Bai2024MixedNUTS"), _small_mixed_nuts)
    model = build("robustbench:imagenet:Bai2024MixedNUTS")
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        out = model(x)
        std_logits, rob_logits = model.std_model(x), model.rob_model(x)
    # log((1 - alpha) onehot(argmax std) + alpha softmax(s * sign(g) |g|^p)), g = GELU(z + c),
    # z: the robust logits standardised over their top 250, in float64.
    top = rob_logits.double().topk(250, dim=1).values
    z = (rob_logits.double() - top.mean(1, keepdim=True)) / (top.var(1, keepdim=True) + 1e-8).sqrt()
    g = torch.nn.functional.gelu(z + model.rob_map.clamp_bias.double())
    mapped = (g.abs() ** model.rob_map.power.double() * g.sign() * model.rob_map.scale.double())
    alpha = model._alpha.double()
    onehot = torch.nn.functional.one_hot(std_logits.argmax(1), 1000).double()
    expected = torch.log((1 - alpha) * onehot + alpha * mapped.softmax(1)).float()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert 0.99 < float(model._alpha) < 1  # the published Swin-L weight at its default beta

    converted = convert(copy.deepcopy(model), acts=("gelu",))
    names = [info.name for info in describe(converted)]
    assert len(names) == 4 + 2  # one GELU per ConvNeXtV2 block and per Swin block
    assert all(n.startswith(("std_model.stages.", "rob_model.model.layers.")) for n in names)

    path = write_robustbench_checkpoint(model, "Bai2024MixedNUTS", "imagenet", tmp_path)
    files = rb.checkpoint_files("Bai2024MixedNUTS", "imagenet", tmp_path)
    assert path == tmp_path / "imagenet" / "Linf" / "Bai2024MixedNUTS.pt"
    assert [f.name for f in files] == ["Bai2024MixedNUTS.pt_m0.pt", "Bai2024MixedNUTS.pt_m1.pt"]
    member0 = torch.load(files[0], weights_only=True)["state_dict"]
    member1 = torch.load(files[1], weights_only=True)["state_dict"]
    assert member0.keys() == model.std_model.state_dict().keys()
    assert member1.keys() == model.rob_model.model.state_dict().keys()
    # RobustBench loads the accurate member without its (unused) normalisation parameters.
    torch.save({"state_dict": {k: v for k, v in member0.items() if k not in ("mean", "std")}},
               files[0])
    loaded = load_robustbench("Bai2024MixedNUTS", "imagenet", tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)

    torch.save({"state_dict": {**member0, "extra.weight": torch.zeros(1)}}, files[0])
    with pytest.raises(RuntimeError, match=r"_m0\.pt does not fit.*extra\.weight"):
        load_robustbench("Bai2024MixedNUTS", "imagenet", tmp_path)
    files[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"Bai2024MixedNUTS\.pt_m1\.pt.*cannot download"):
        load_robustbench("Bai2024MixedNUTS", "imagenet", tmp_path)


def test_mixed_nuts_full_size_loads_converts_and_runs_at_224(tmp_path):
    """The real ID: ConvNeXtV2-L + Swin-L (394M parameters, about 30 s and 6 GB here)."""
    model = build("robustbench:imagenet:Bai2024MixedNUTS")
    write_robustbench_checkpoint(model, "Bai2024MixedNUTS", "imagenet", tmp_path)
    loaded = load_robustbench("Bai2024MixedNUTS", "imagenet", tmp_path)
    expected = model.state_dict()
    del model
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    del expected, state
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        original = loaded(x)
    model = convert(loaded, acts=("gelu",), backend=model_backend())
    layers = describe(model)
    # ConvNeXtV2-L: 3 + 3 + 27 + 3 blocks, Swin-L: 2 + 2 + 18 + 2, one GELU each (channels last).
    assert len(layers) == 36 + 24
    assert sum(n.name.startswith("std_model.") for n in layers) == 36
    assert all(info.act == "gelu" and info.channel_dim == -1 for info in layers)
    with torch.no_grad():
        assert torch.equal(model(x), original)  # uncalibrated: the plain GELUs
    calibrate(model, [x], c_r=C_R, progress=False)
    with torch.no_grad():
        remapped = model(x)
    assert remapped.shape == (1, 1000) and torch.isfinite(remapped).all()
    assert not torch.equal(remapped, original)
