"""lipkern.convert: what gets replaced, names, sharing, warnings, describe, straight_through."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision
from timm.layers import activations as timm_acts
from torch import nn

from lipkern.convert import convert, describe, straight_through
from lipkern.nn import InputRemap, RemapAct, remap_modules
from lipkern.testing import compare_forward
from model_helpers import model_backend


class Mlp(nn.Module):
    def __init__(self, act: nn.Module, width=8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = act
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu(self.conv2(x))  # the same ReLU object at a second site
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize(
    "module, act",
    [
        (nn.ReLU(), "relu"),
        (nn.ReLU(inplace=True), "relu"),
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.SiLU(), "silu"),
        (timm_acts.GELU(), "gelu"),
        (timm_acts.GELUTanh(), "gelu_tanh"),
        (timm_acts.Swish(), "silu"),
    ],
)
def test_replaces_each_activation_type(module, act):
    model = convert(Mlp(module), backend=model_backend())
    assert isinstance(model.act, RemapAct)
    assert model.act.act == act
    assert model.act.channel_dim == -1  # preceded by a Linear
    assert model.act.inplace == bool(getattr(module, "inplace", False))


def test_off_mode_is_bit_identical_to_the_original():
    for act in (nn.ReLU(), nn.ReLU(inplace=True), nn.GELU(), nn.GELU(approximate="tanh"),
                nn.SiLU(), nn.SiLU(inplace=True)):
        for dtype in (torch.float32, torch.bfloat16):
            original = Mlp(act).eval().to(dtype)
            converted = convert(copy.deepcopy(original))
            x = torch.randn(4, 5, 8, dtype=dtype)
            assert torch.equal(converted(x), original(x))


def test_acts_filter_and_families():
    model = nn.Sequential(
        nn.Linear(2, 2), nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()
    )
    convert(model, acts=("gelu_tanh",))
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "GELU", "RemapAct", "SiLU"]
    convert(model, acts="gelu")  # the family: both approximations
    assert isinstance(model[2], RemapAct) and model[2].act == "gelu"
    assert not isinstance(model[1], RemapAct)
    with pytest.raises(ValueError, match="acts"):
        convert(model, acts=("tanh",))


def test_quick_gelu_is_not_converted():
    # timm's QuickGELU is x * sigmoid(1.702 x): no lipkern op computes it.
    model = nn.Sequential(nn.Linear(2, 2), timm_acts.QuickGELU())
    with pytest.warns(UserWarning, match="nothing was converted"):
        convert(model)
    assert not remap_modules(model)


def test_shared_module_becomes_one_remap_act():
    model = torchvision.models.resnet18(num_classes=10)
    sites = sum(isinstance(m, nn.ReLU) for m in model.modules())
    convert(model)
    layers = remap_modules(model)
    assert len(layers) == sites == 9  # 1 stem + one shared ReLU per BasicBlock
    assert model.layer1[0].relu.channel_dim == 1  # preceded by BatchNorm2d


def test_same_object_under_two_names():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 1, 1), relu, nn.Conv2d(1, 1, 1), relu)
    convert(model)
    assert model[1] is model[3] and isinstance(model[1], RemapAct)


def test_inputs_of_keeps_parameter_names_and_class():
    original = Mlp(nn.GELU())
    keys = set(original.state_dict())
    model = convert(copy.deepcopy(original), inputs_of=("fc1", "fc2"))
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc1.input_remap, InputRemap)
    state = model.state_dict()
    for key in keys:
        assert torch.equal(state[key], original.state_dict()[key])
    assert "fc1.input_remap.threshold" in state
    assert model.fc1.input_remap.channel_dim == -1
    assert model.fc1.input_remap.expected_channels == 8
    # The original weights load strictly into the uncalibrated converted model.
    model.load_state_dict(original.state_dict(), strict=True)
    with pytest.warns(UserWarning, match="nothing was converted"):
        convert(model, inputs_of=("fc1",))  # converting twice adds nothing
    assert len(remap_modules(model)) == 3


def test_inputs_of_conv_and_bad_target():
    model = convert(ConvNet(), inputs_of=("conv2",))
    assert model.conv2.input_remap.channel_dim == 1
    assert model.conv2.input_remap.expected_channels == 4
    with pytest.raises(TypeError, match="Linear, transformers' Conv1D or convolution"):
        convert(ConvNet(), inputs_of=("bn",))
    # A refused match leaves the model as it was, the matches before it included.
    model = ConvNet()
    keys = list(model.state_dict())
    with pytest.raises(TypeError, match="inputs_of 'bn' matched 'bn': input remaps go on nn.Linear"):
        convert(model, inputs_of=("conv2", "bn"))
    assert list(model.state_dict()) == keys and type(model.conv2) is nn.Conv2d


def test_warnings_when_nothing_matches():
    with pytest.warns(UserWarning, match="matched no module"):
        convert(Mlp(nn.GELU()), inputs_of=("*.nothing",))
    with pytest.warns(UserWarning, match="nothing was converted"):
        convert(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(Mlp(nn.GELU()), inputs_of=("fc*",))


def test_root_activation_and_bad_arguments():
    assert isinstance(convert(nn.GELU()), RemapAct)
    with pytest.raises(TypeError, match="model"):
        convert("not a model")
    with pytest.raises(TypeError, match="channel_dim"):
        convert(Mlp(nn.GELU()), channel_dim=1.0)
    with pytest.raises(ValueError, match="act"):
        RemapAct("tanh")
    with pytest.raises(ValueError, match="mode"):
        RemapAct("relu", mode="on")
    # A backend is checked when the layer is made: in "off" mode no call would report it.
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(Mlp(nn.GELU()), backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        RemapAct("relu", backend="gpu")
    with pytest.raises(TypeError, match="inputs_of must be a glob pattern or patterns, got int"):
        convert(Mlp(nn.GELU()), inputs_of=3)
    with pytest.raises(TypeError, match="acts must be an activation family or several, .* got NoneType"):
        convert(Mlp(nn.GELU()), acts=None)


def test_channel_dim_override_and_inference():
    model = convert(ConvNet(), channel_dim=-1)
    assert model.relu.channel_dim == -1
    assert convert(ConvNet()).relu.channel_dim == 1


def test_channel_dim_may_be_a_numpy_integer_and_is_kept_as_an_int():
    """An axis computed with numpy (np.int64) is an integer; the layer keeps a Python int, which
    its config (stored as JSON in the state dict) can hold."""
    model = convert(ConvNet(), channel_dim=np.int64(-1))
    assert type(model.relu.channel_dim) is int and model.relu.channel_dim == -1
    layer = RemapAct("relu", channel_dim=np.int32(1))
    assert type(layer.channel_dim) is int and layer.channel_dim == 1
    assert layer.get_extra_state().numel() > 0
    for bad in (True, np.float32(1), 1.0):
        with pytest.raises(TypeError, match="channel_dim must be an integer"):
            RemapAct("relu", channel_dim=bad)
        with pytest.raises(TypeError, match=r"channel_dim must be an integer .*\(or None, which infers it\)"):
            convert(ConvNet(), channel_dim=bad)


def test_describe_lists_layers():
    model = convert(ConvNet(), inputs_of=("conv2",))
    info = describe(model)
    assert [i.name for i in info] == ["relu", "conv2.input_remap"]
    assert [i.kind for i in info] == ["act", "input"]
    assert not any(i.calibrated for i in info)
    text = str(info)
    assert "conv2.input_remap" in text and "identity" in text


def test_apply_before_calibration_names_the_layer():
    model = convert(ConvNet(), inputs_of=("conv2",))
    model.relu.mode = "apply"
    with pytest.raises(RuntimeError, match="'?relu'?.*never calibrated"):
        model(torch.randn(1, 3, 4, 4))


def test_straight_through_context_restores_flags():
    model = convert(ConvNet(), inputs_of=("conv2",))
    with straight_through(model) as same:
        assert same is model
        assert all(m.straight_through for _, m in remap_modules(model))
    assert not any(m.straight_through for _, m in remap_modules(model))


def test_straight_through_refuses_a_model_without_remap_layers():
    with pytest.raises(ValueError, match="no lipkern remap layers.*lipkern.convert"):
        with straight_through(ConvNet()):
            pass


def test_dtype_casts_keep_buffer_dtypes():
    model = convert(Mlp(nn.GELU()), inputs_of=("fc1",))
    model.act.threshold = torch.tensor(0.1)
    model.act.sum = torch.ones(3, dtype=torch.float64)
    model.to(torch.bfloat16)
    assert model.fc1.weight.dtype == torch.bfloat16
    assert model.act.threshold.dtype == torch.float32
    assert model.act.threshold.item() == pytest.approx(0.1)
    assert model.act.sum.dtype == torch.float64


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("straight_through", [False, True])
def test_apply_mode_calls_the_cpu_kernels_directly(monkeypatch, inplace, straight_through):
    """In apply mode on CPU tensors with backend auto/cpu, a layer hands its buffers straight to
    the C++ op through lipkern.ops.api.remap_act_prechecked (the op checks them); results and gradients equal the public API's, and other
    backends, missing thresholds and bad channel axes still take the checked path."""
    pytest.importorskip("lipkern._C", reason="lipkern's C++ extension is not built")
    import lipkern
    import lipkern.ops.api as ops_api

    layer = RemapAct("gelu", channel_dim=1, inplace=inplace, straight_through=straight_through)
    layer.threshold = torch.rand(5) * 0.5
    layer.center = torch.randn(5) * 0.1
    layer.mode = "apply"
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    expected = lipkern.remap_act(x, layer.threshold, "gelu", layer.center, 1)

    calls = []

    def recorded(name, op):
        def call(*args, **kwargs):
            calls.append(name)
            return op(*args, **kwargs)

        return call

    monkeypatch.setattr(ops_api, "remap_act", recorded("api", lipkern.remap_act))
    monkeypatch.setattr(ops_api, "remap_act_", recorded("api_", lipkern.remap_act_))
    with torch.no_grad():
        assert torch.equal(layer(x.clone()), expected)
    leaf = x.clone().requires_grad_(True)
    layer(leaf).sum().backward()
    api_leaf = x.clone().requires_grad_(True)
    api_y = lipkern.remap_act(
        api_leaf, layer.threshold, "gelu", layer.center, 1, straight_through=straight_through
    )
    api_y.sum().backward()
    assert torch.equal(leaf.grad, api_leaf.grad)
    assert calls == []

    layer.backend = "reference"
    with torch.no_grad():
        # The reference's GELU is not the C++ kernels' bit for bit: judged by the project's rule.
        assert compare_forward(layer(x.clone()), x, layer.threshold, layer.center, "gelu", 1).ok
    assert calls and set(calls) <= {"api", "api_"}
    layer.backend = "auto"
    layer.channel_dim = 4
    with pytest.raises(ValueError, match="channel_dim=4 is out of range"):
        layer(x)
    layer.channel_dim = 1
    layer.threshold = torch.zeros(0)
    with pytest.raises(RuntimeError, match="never calibrated"):
        layer(x)


def test_describe_names_the_layers_inside_wrappers():
    """As calibrations and reports do: no module. or _orig_mod. prefix."""
    model = convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    names = [info.name for info in describe(model)]
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        assert [info.name for info in describe(wrapped)] == names == ["1"]


def test_transformer_encoder_layers_run_their_remaps_at_inference():
    """PyTorch's fused inference path for nn.TransformerEncoderLayer (and the encoder's nested
    tensors) never calls the layer's submodules: a converted layer is kept off it, so its remaps
    act under no_grad in eval as they do under grad, padding mask included; unconvert puts the
    fused path back."""
    import lipkern

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, activation=nn.GELU(), batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    with torch.no_grad():
        original = model(x)
    convert(model, preset="paper")
    report = lipkern.calibrate(model, [x], c_r=0.5, progress=False)
    assert len(report.layers) == 6  # two GELUs, two linear1 and two linear2 inputs
    with torch.no_grad():
        remapped, masked = model(x), model(x, src_key_padding_mask=padding)
    assert not torch.allclose(remapped, original, atol=1e-3)
    # Not bit for bit: under grad mode nn.MultiheadAttention picks another attention kernel
    # (measured 6e-7 apart on these outputs of size ~1), a difference of PyTorch's, not the remap's.
    torch.testing.assert_close(remapped, model(x).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        masked[0], model(x, src_key_padding_mask=padding)[0].detach(), rtol=0, atol=1e-6
    )
    lipkern.unconvert(model)
    assert model.use_nested_tensor and all(m.activation_relu_or_gelu == 2 for m in model.layers)
    with torch.no_grad():
        assert torch.equal(model(x), original)


@pytest.mark.filterwarnings("ignore:lipkern.convert. nothing was converted")
def test_an_activation_held_as_a_function_is_named_in_a_warning():
    layers = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, activation="relu"),
        nn.TransformerDecoderLayer(8, 2, 16, activation="gelu"),
    )
    with pytest.warns(UserWarning, match=r"functions, not modules.*: 0\.activation, 1\.activation "):
        convert(layers, acts=("relu", "gelu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="lipkern.convert: nothing was converted")
        convert(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, activation="relu")), acts=("silu",))


def test_transformers_identity_activation_is_no_unsupported_activation():
    """transformers' LinearActivation (where a config names no activation) is the identity, not an
    activation lipkern lacks: no warning names it."""
    from transformers import activations
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        convert(nn.Sequential(nn.Linear(2, 2), activations.LinearActivation(), nn.ReLU()))


def test_an_input_remap_inside_multihead_attention_is_refused():
    """nn.MultiheadAttention uses out_proj's weights without calling it: a remap there never runs."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=nn.GELU())
    with pytest.raises(TypeError, match="matched 'self_attn.out_proj': nn.MultiheadAttention computes"):
        convert(layer, inputs_of=("linear1", "self_attn.*"))
    assert not remap_modules(layer) and isinstance(layer.activation, nn.GELU)
