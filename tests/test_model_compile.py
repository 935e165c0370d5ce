"""Converted models under torch.compile, torch.export and AOTInductor (compile_form)."""

import copy
import re

import pytest
import torch
from torch import nn

import lipkern
from lipkern.ops.api import remap_act_traceable
from lipkern.ops.activations import ACTIVATIONS, EXACT_ACTIVATIONS
from lipkern.testing import activation_float64
from lipkern.ulp import ulp_distance, ulp_size


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv2(self.relu(self.bn(self.conv1(x)))))


def _calibrated(compile_form="decomposed", granularity="channel"):
    torch.manual_seed(0)
    model = ConvBlock().eval()
    lipkern.convert(model, inputs_of=("conv2",), compile_form=compile_form)
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    # 2^-3 remaps a visible share of elements, so the remap is exercised.
    lipkern.calibrate(model, data, c_r=2**-3, granularity=granularity, progress=False)
    return model


def _lipkern_targets(graph_module) -> set:
    return {
        str(node.target)
        for node in graph_module.graph.nodes
        if node.op == "call_function" and "lipkern" in str(node.target)
    }


@pytest.mark.parametrize("compile_form", ["decomposed", "opaque"])
def test_export_holds_the_op_only_in_the_opaque_form(compile_form):
    model = _calibrated(compile_form)
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    targets = _lipkern_targets(exported.graph_module)
    if compile_form == "opaque":
        assert targets and all("remap_act" in t for t in targets)
    else:
        assert targets == set()
    with torch.no_grad():
        got, want = exported.module()(x), model(x)
    # The only smooth activation is the last one: its output carries PyTorch's GELU numerics in
    # the decomposed form, within the float32 ulps documented in the README.
    assert int(ulp_distance(got, want).max()) <= (0 if compile_form == "opaque" else 64)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_aot_inductor_round_trip(tmp_path, granularity):
    model = _calibrated(granularity=granularity)
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "converted.pt2")
    )
    loaded = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        got, want = loaded(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_traceable_form_under_inductor(act, dtype):
    """Identity and ReLU are the op bit for bit under inductor; smooth activations carry the
    compiler's float32 error (README: up to 47 ulps of float32 for GELU, where PyTorch's own
    eager GELU is 37 ulps off too), which rounds away in 16-bit outputs but for an ulp."""
    torch._dynamo.reset()
    x = (torch.randn(64, 16) * 4).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, float("nan"), 1e-30])
    threshold = torch.rand(16) * 0.2
    center = torch.randn(16) * 0.05
    compiled = torch.compile(remap_act_traceable, fullgraph=True)
    got = compiled(x, threshold, center, act, 1)
    want = lipkern.remap_act(x, threshold, act, center, channel_dim=1)
    distance = ulp_distance(got, want)
    if act in EXACT_ACTIVATIONS:
        assert int(distance.max()) == 0
        return
    # PyTorch's float32 formulas cancel for negative x (1 + erf(x / sqrt 2) -> 0): there the
    # compiled value is off by a few ulps of 1 times |x| (2^-21 |x|; GELU(-6) ~ -6e-9 becomes
    # -0), however many ulps that is; elsewhere it is within 64 float32 ulps.
    bound = 64 if dtype == torch.float32 else 1
    cancellation = (got.double() - want.double()).abs() <= x.double().abs() * 2.0**-21
    # Where |a - c| lies within those errors of t, the two forms may decide the remap
    # differently: there either outcome (c or the activation) is right.
    a = activation_float64(x, act)
    c, t = center.double(), threshold.double()
    tie = ((a - c).abs() - t).abs() <= 64 * ulp_size(a.float(), torch.float32).double()
    tie &= (got == center.to(dtype)) | (want == center.to(dtype))
    assert bool(((distance <= bound) | cancellation | tie).all())
    assert int(tie.sum()) < x.numel() // 100  # the exemption covers few elements


def test_straight_through_keeps_the_op_under_export():
    """BPDA layers keep the op when exported: the decomposition's gradient would have the mask."""
    model = _calibrated()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with lipkern.straight_through(model):
        exported = torch.export.export(copy.deepcopy(model), (x,))
    assert _lipkern_targets(exported.graph_module)
    assert not _lipkern_targets(torch.export.export(model, (x,)).graph_module)


def test_compile_form_is_checked():
    with pytest.raises(ValueError, match="compile_form must be one of"):
        lipkern.convert(ConvBlock(), compile_form="fused")
    with pytest.raises(ValueError, match="compile_form must be one of"):
        lipkern.nn.RemapAct("relu", compile_form=None)


class _ConvThenMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.ln, self.fc1, self.act, self.fc2 = (
            nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        )

    def forward(self, x):
        tokens = self.relu(self.bn(self.conv1(x))).flatten(2).transpose(1, 2)
        return self.fc2(self.act(self.fc1(self.ln(tokens))))


def _inductor_code(model, x) -> str:
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model), x)
    return "\n".join(code)


def test_inductor_fuses_the_decomposed_remap():
    """The structural proof of fusion (speed is benchmarks/bench_models.py's): compiling the
    converted model (ReLU, LayerNorm -> input remap -> FC1, GELU) generates as many kernels and
    extern calls as compiling the original; the opaque form adds the lipkern op calls."""
    torch.manual_seed(0)
    original = _ConvThenMlp().eval()
    x = torch.randn(2, 3, 8, 8)
    forms = {}
    for form in ("decomposed", "opaque"):
        model = lipkern.convert(copy.deepcopy(original), inputs_of=("fc1",), compile_form=form)
        lipkern.calibrate(model, [x], c_r=2**-3, progress=False)
        forms[form] = _inductor_code(model, x)
    plain = _inductor_code(original, x)

    def kernels(code):
        return len(re.findall(r"cpp_fused_\w+ = ", code))

    assert kernels(forms["decomposed"]) == kernels(plain) > 0
    assert forms["decomposed"].count("extern_kernels") == plain.count("extern_kernels")
    assert "lipkern" not in forms["decomposed"]
    assert forms["opaque"].count("lipkern.remap_act") >= 3
