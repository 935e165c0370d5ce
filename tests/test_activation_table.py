"""Every backend implements exactly the activations of ``lipkern.ops.activations.TABLE``."""

import re
from pathlib import Path

import pytest
import torch

import lipkern
from conftest import kernel_backends
from lipkern.ops import activations

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_backend_accepts_every_table_entry_and_nothing_else(backend):
    x = torch.linspace(-3, 3, 64).view(8, 8)
    for entry in activations.TABLE:
        y = lipkern.remap_act(x, 0.0, act=entry.name, backend=backend)
        expected = entry.torch_fn(x)
        torch.testing.assert_close(y, expected, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="act must be one of"):
        lipkern.remap_act(x, 0.0, act="gelu_erf", backend=backend)


def _cpp_enum_names() -> list[str]:
    """The table's names as the C++ enum spells them (gelu_tanh -> GeluTanh)."""
    return [entry.name.title().replace("_", "") for entry in activations.TABLE]


def test_cpp_enum_follows_the_table_codes():
    header = (CSRC / "remap_act.h").read_text()
    enum_body = re.search(r"enum class Act : int \{([^}]*)\}", header).group(1)
    cpp_names = [name.strip() for name in enum_body.split(",")]
    assert cpp_names == _cpp_enum_names()  # enum values are positions: code i is the i-th name
    assert [entry.code for entry in activations.TABLE] == list(range(len(activations.TABLE)))


def test_cpp_parses_every_table_name():
    source = (CSRC / "ops.cpp").read_text()
    parsed = re.findall(r'if \(act == "(\w+)"\) return Act::(\w+);', source)
    assert parsed == list(zip(activations.ACTIVATIONS, _cpp_enum_names()))


def test_gelu_tanh_constants_agree_across_backends():
    kernels = (CSRC / "cpu" / "act_eval.h").read_text()
    cubic = float(re.search(r"kTanhKappa = ([0-9.e-]+);", kernels).group(1))
    assert cubic == activations.GELU_TANH_CUBIC
    # The scale is written as M_SQRT2 * M_2_SQRTPI * 0.5 = sqrt(2/pi) in C++.
    assert "kTanhBeta = M_SQRT2 * M_2_SQRTPI * 0.5" in kernels
    # The table's constants give PyTorch's tanh-GELU (checked in float64 at x = 1.5).
    x = torch.tensor(1.5, dtype=torch.float64)
    u = activations.GELU_TANH_SCALE * (x + activations.GELU_TANH_CUBIC * x**3)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    assert float(0.5 * x * (1 + torch.tanh(u))) == pytest.approx(float(expected), rel=1e-15)
