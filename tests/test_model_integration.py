"""Converted models in users' hands: Hugging Face transformers, timm norm-act layers, checkpoints
of the original model, pickling, deepcopy and unconvert. Tiny random-weight models, built offline.
"""

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import transformers
from torch import nn

import lipkern
from lipkern.convert import describe, unconvert
from lipkern.nn import InputRemap, RemapAct, remap_modules
from model_helpers import model_backend

C_R = 2**-5
REPO = Path(__file__).resolve().parents[1]


def _tiny_vit():
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, num_labels=3,
    )
    return transformers.ViTForImageClassification(config), torch.randn(2, 3, 32, 32)


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )
    return transformers.BertModel(config), torch.randint(0, 50, (2, 8))


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config), torch.randint(0, 50, (2, 8))


def _tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2Model(config), torch.randint(0, 50, (2, 8))


def _output(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# builder, converted layer names (one per block), replaced class, lipkern act
HF_MODELS = [
    (_tiny_vit, "vit.layers.{}.mlp.activation_fn", "GELUActivation", "gelu"),
    (_tiny_bert, "encoder.layer.{}.intermediate.intermediate_act_fn", "GELUActivation", "gelu"),
    (_tiny_llama, "model.layers.{}.mlp.act_fn", "SiLUActivation", "silu"),
    (_tiny_gpt2, "h.{}.mlp.act", "NewGELUActivation", "gelu_tanh"),
]


@pytest.mark.parametrize(
    "builder, name, replaced, act", HF_MODELS, ids=["vit", "bert", "llama", "gpt2"]
)
def test_hugging_face_activations_are_converted(builder, name, replaced, act):
    original, inputs = builder()
    original.eval()
    model = convert_quietly(copy.deepcopy(original))
    layers = describe(model)
    assert [info.name for info in layers] == [name.format(0), name.format(1)]
    assert {(info.replaced, info.act, info.channel_dim) for info in layers} == {(replaced, act, -1)}
    assert f"{replaced}" in str(layers)
    reference = _output(original, inputs)
    if replaced != "NewGELUActivation":
        # Uncalibrated: the plain activations, computed as transformers computes them.
        assert torch.equal(_output(model, inputs), reference)
    lipkern.calibrate(model, [inputs], c_r=C_R, progress=False)
    remapped = _output(model, inputs)
    assert torch.isfinite(remapped).all() and not torch.equal(remapped, reference)


def convert_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised model converts without any warning
        return lipkern.convert(model, backend=model_backend(), **kwargs)


def test_hugging_face_activations_without_a_lipkern_op_are_named():
    from transformers import activations

    model = nn.Sequential(
        nn.Linear(4, 4), activations.QuickGELUActivation(), nn.Linear(4, 4),
        activations.ClippedGELUActivation(-10, 10), nn.Linear(4, 4),
        activations.FastGELUActivation(), nn.Linear(4, 4), activations.GELUActivation(),
        nn.Sigmoid(),
    )
    with pytest.warns(UserWarning, match=r"QuickGELUActivation at 1; ClippedGELUActivation at 3; "
                                         r"FastGELUActivation at 5$"):
        lipkern.convert(model)
    assert [name for name, _ in remap_modules(model)] == ["7"]


# timm models whose activations sit inside fused norm-act layers (BatchNormAct2d) or after
# composite blocks (RegNet's act3 after a ConvNormAct); ConvNeXt-atto's MLP is convolutional.
TIMM_NORM_ACT = ["efficientnet_b0", "mobilenetv3_small_050", "convnext_atto", "regnetx_002"]


@pytest.mark.parametrize("name", TIMM_NORM_ACT)
def test_per_channel_thresholds_follow_the_real_channel_axis(name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MobileNetV3's Hardswish has no lipkern op
        lipkern.convert(model, backend=model_backend())
    inputs = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda _, args, n=n: inputs.setdefault(n, args[0].shape) and None
        )
        for n, layer in remap_modules(model)
    ]
    lipkern.calibrate(model, [torch.randn(1, 3, 64, 64)], c_r=C_R, granularity="channel",
                      progress=False)
    for handle in handles:
        handle.remove()
    layers = remap_modules(model)
    assert layers and all(layer.channel_dim == 1 for _, layer in layers)
    for n, layer in layers:
        shape = inputs[n]
        assert layer.threshold.shape == (shape[1],), n
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 80)).shape == (1, 10)  # another resolution


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("mode", ["apply", "monitor"])
def test_other_channel_count_than_calibrated_names_the_layer(backend, mode):
    model = lipkern.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
                            backend=backend)
    lipkern.calibrate(model, [torch.randn(2, 3, 5, 5)], c_r=C_R, granularity="channel",
                      progress=False)
    model[2].mode = mode
    with pytest.raises(ValueError, match=r"^2: input of shape \(2, 6, 5, 5\) has 6 channels along "
                                         r"channel_dim=1, but the layer was calibrated per "
                                         r"channel for 4"):
        model[2](torch.randn(2, 6, 5, 5))


def _block():
    """Conv stem with one ReLU shared by two sites, then LayerNorm -> FC1 -> GELU -> FC2; plain
    torch.nn classes only, so that a pickle of it loads in any process."""
    relu = nn.ReLU()
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), relu, nn.Conv2d(8, 8, 1), relu,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(),
        nn.Linear(16, 4),
    ).eval()


def _converted_block():
    original = _block()
    model = lipkern.convert(copy.deepcopy(original), inputs_of=("2", "7"), backend=model_backend())
    return original, model


def test_original_state_dict_loads_strictly_before_calibration_only():
    original, model = _converted_block()
    trained = _block().state_dict()  # "pretrained" weights of the original architecture
    model.load_state_dict(trained, strict=True)
    for key, value in trained.items():
        assert torch.equal(model.state_dict()[key], value)
    x = torch.randn(2, 3, 6, 6)
    lipkern.calibrate(model, [x], c_r=C_R, progress=False)
    # A calibrated layer holds state: a state dict without it is incomplete.
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"8\.threshold\""):
        model.load_state_dict(trained, strict=True)
    # Its own state dict (lipkern's entries included) loads into a fresh converted model.
    _, fresh = _converted_block()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_converted_models_save_with_tensor_only_formats(tmp_path):
    """safetensors and Hugging Face's save_pretrained store tensors only: a converted model's
    settings travel as a tensor, before and after calibration, and load back exactly; a state
    dict that holds them as a dict (as earlier versions saved it) loads too."""
    import safetensors.torch

    torch.manual_seed(0)
    model, x = _tiny_vit()
    lipkern.convert(model, preset="paper")
    model.eval()
    model.save_pretrained(tmp_path / "uncalibrated")
    lipkern.calibrate(model, [x], c_r=C_R, granularity="channel", progress=False)
    model.save_pretrained(tmp_path / "calibrated")
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(model, str(path))
    fresh, _ = _tiny_vit()
    lipkern.convert(fresh, preset="paper")
    fresh.eval()
    safetensors.torch.load_model(fresh, str(path))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    old_style = {
        k: lipkern.nn.config_from_state(v) if k.endswith("_extra_state") else v
        for k, v in model.state_dict().items()
    }
    assert any(isinstance(v, dict) for v in old_style.values())
    again, _ = _tiny_vit()
    lipkern.convert(again, preset="paper")
    again.eval().load_state_dict(old_style)
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_a_hugging_face_model_comes_back_with_from_pretrained_and_its_calibration_file(tmp_path):
    """save_pretrained's file renames the keys (transformers' checkpoint names): loaded into a
    converted model it is refused saying so; from_pretrained, convert, load_calibration gives
    the calibrated model back exactly."""
    import safetensors.torch

    torch.manual_seed(0)
    model, x = _tiny_vit()
    lipkern.convert(model, preset="paper")
    model.eval()
    lipkern.calibrate(model, [x], c_r=C_R, granularity="channel", progress=False)
    model.save_pretrained(tmp_path)
    lipkern.save_calibration(model, tmp_path / "calibration.pt")
    saved = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) != set(model.state_dict())  # the pinned transformers renames on save
    fresh, _ = _tiny_vit()
    lipkern.convert(fresh, preset="paper")
    with pytest.raises(ValueError, match="its keys were renamed"):
        fresh.load_state_dict(saved)
    loaded = type(model).from_pretrained(tmp_path).eval()
    lipkern.convert(loaded, preset="paper")
    lipkern.load_calibration(loaded, tmp_path / "calibration.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_whole_model_pickles_into_a_new_process_and_deepcopies(tmp_path):
    _, model = _converted_block()
    x = torch.randn(2, 3, 6, 6)
    lipkern.calibrate(model, [x], c_r=C_R, progress=False)
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": model, "x": x, "expected": expected}, tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "model = saved['model']\n"
        "assert type(model[7]).__name__ == 'InputRemappedLinear', type(model[7])\n"
        "assert isinstance(model[7], torch.nn.Linear) and model[1] is model[3]\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model(saved['x']), saved['expected'])\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

    twin = copy.deepcopy(model)
    assert type(twin[7]) is type(model[7]) and twin[7].input_remap is not model[7].input_remap
    assert twin[1] is twin[3]
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
    twin[8].threshold.fill_(0)
    assert model[8].threshold.item() > 0


def test_unconvert_gives_back_the_original_modules():
    original, model = _converted_block()
    x = torch.randn(2, 3, 6, 6)
    lipkern.calibrate(model, [x], c_r=C_R, progress=False)
    back = unconvert(model)
    assert back is model and not remap_modules(model)
    assert [type(m) for m in model] == [type(m) for m in original]
    assert model[1] is model[3]  # the shared ReLU is one module again
    assert model.state_dict().keys() == original.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    gelu = nn.GELU(approximate="tanh")
    assert unconvert(lipkern.convert(gelu)) is gelu  # a model that is an activation
    hand_made = nn.Sequential(nn.Linear(2, 2), RemapAct("silu"), InputRemap())
    unconvert(hand_made)
    assert type(hand_made[1]) is nn.SiLU
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unconvert("model")


def test_paper_preset_places_input_remaps_on_mlp_blocks():
    vit, pixels = _tiny_vit()
    llama, tokens = _tiny_llama()
    gpt2, gpt2_tokens = _tiny_gpt2()
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    mlp = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3)
    for model, x in (
        (vit, pixels), (llama, tokens), (gpt2, gpt2_tokens), (resnet, torch.randn(1, 3, 32, 32)),
        (mlp, torch.randn(1, 3, 32, 32)),
    ):
        model.eval()
        convert_quietly(model, preset="paper")
        lipkern.calibrate(model, [x], c_r=C_R, progress=False)
    inputs = lambda model: {  # noqa: E731
        info.name: (info.replaced, info.redundant)
        for info in describe(model)
        if info.kind == "input"
    }
    assert inputs(vit) == {
        f"vit.layers.{i}.mlp.fc1.input_remap": ("input of Linear", False) for i in range(2)
    }
    # Gated MLP: both projections of the normalised input and the down projection's input.
    assert inputs(llama) == {
        f"model.layers.{i}.mlp.{proj}.input_remap": ("input of Linear", False)
        for i in range(2) for proj in ("gate_proj", "up_proj", "down_proj")
    }
    # GPT-2's linear layers are transformers' Conv1D; c_proj takes the activation's output.
    assert inputs(gpt2) == {
        f"h.{i}.mlp.{layer}.input_remap": ("input of Conv1D", layer == "c_proj")
        for i in range(2) for layer in ("c_fc", "c_proj")
    }
    assert inputs(resnet) == {}  # its classifier follows the last activation
    # timm's Mlp registers fc2 after its GELU and feeds it the GELU output: a pass-through.
    assert inputs(mlp) == {
        "blocks.0.mlp.fc1.input_remap": ("input of Linear", False),
        "blocks.0.mlp.fc2.input_remap": ("input of Linear", True),
    }
    assert "input of Linear" in str(describe(vit))
    with pytest.raises(ValueError, match="preset must be None or one of"):
        lipkern.convert(_tiny_bert()[0], preset="swin")


def test_a_text_model_calibrates_on_batches_with_their_attention_mask():
    """Mapping batches (a BatchEncoding, a plain dict, first in a tuple with labels) are passed as
    keyword arguments, so a text
    model's padding is masked during the scan: its statistics are those of a model that applies
    the mask itself, and not those of the ids alone."""
    model, ids = _tiny_bert()
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})

    class WithMask(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, attention_mask=mask)

    def amax_after(scanned, data):
        lipkern.calibrate(scanned, data, c_r=C_R, progress=False)
        return {name.removeprefix("inner."): m.amax for name, m in remap_modules(scanned)}

    def converted():
        return lipkern.convert(copy.deepcopy(model), preset="paper").eval()

    by_keywords = amax_after(converted(), [batch, dict(batch), (batch, torch.zeros(2))])
    masked_by_the_model = amax_after(WithMask(converted()), [ids])
    ids_alone = amax_after(converted(), [ids])
    assert by_keywords.keys() == masked_by_the_model.keys() == ids_alone.keys()
    assert all(torch.equal(by_keywords[k], masked_by_the_model[k]) for k in by_keywords)
    assert any(not torch.equal(by_keywords[k], ids_alone[k]) for k in by_keywords)
    with pytest.raises(TypeError, match="or a mapping of the model's keyword arguments, got str"):
        lipkern.calibrate(converted(), ["text"], progress=False)
