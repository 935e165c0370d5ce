"""The judging rules of lipkern.testing catch what they must (so the op suite can fail)."""

import torch

from lipkern.ops import reference
from lipkern.testing import compare_backward, compare_forward
from lipkern.ulp import ulp_distance


def _case(act, dtype=torch.float32):
    x = (torch.randn(64, 48) * 2).to(dtype)
    t = torch.rand(48) * 0.6
    return x, t, reference.remap_act_reference(x, t, None, act, 1)


def _nudge(y, index, ulps):
    bits = y.view(torch.int32 if y.dtype == torch.float32 else torch.int16).clone()
    bits.view(-1)[index] += ulps
    return bits.view(y.dtype)


def test_reference_passes_against_itself():
    for act in ("relu", "gelu", "silu"):
        x, t, y = _case(act)
        assert compare_forward(y, x, t, None, act, 1).ok


def test_one_ulp_is_a_failure_for_exact_activations():
    x, t, y = _case("relu")
    nonzero = int(y.flatten().nonzero()[0])
    assert not compare_forward(_nudge(y, nonzero, 1), x, t, None, "relu", 1).ok


def test_gelu_accepts_one_ulp_and_rejects_many():
    x, t, y = _case("gelu")
    index = int((y.flatten().abs() > 1).nonzero()[0])
    assert compare_forward(_nudge(y, index, 1), x, t, None, "gelu", 1).ok
    assert not compare_forward(_nudge(y, index, 64), x, t, None, "gelu", 1).ok


def test_a_flipped_mask_outside_the_tie_band_is_reported():
    x, t, y = _case("silu")
    a = reference.activation_reference(x, "silu")
    kept = ((a.abs() > t * 2) & (t > 0)).flatten().nonzero()
    wrong = y.clone()
    wrong.view(-1)[int(kept[0])] = 0.0
    result = compare_forward(wrong, x, t, None, "silu", 1)
    assert result.mask_mismatches == 1 and not result.ok


def test_backward_rejects_a_wrong_gradient():
    x, t, _ = _case("gelu")
    grad = torch.randn_like(x)
    dx = reference.remap_act_backward_reference(grad, x, t, None, "gelu", 1, False)
    assert compare_backward(dx, grad, x, t, None, "gelu", 1, False).ok
    wrong = dx * 1.001
    assert not compare_backward(wrong, grad, x, t, None, "gelu", 1, False).ok
    assert (ulp_distance(wrong, dx) > 0).any()


def test_backward_rejects_a_wrong_gradient_at_large_inputs():
    # Where x is large the derivative is 0 or 1 up to tiny terms: the rule must not loosen with
    # |x| there.
    for act in ("gelu", "gelu_tanh", "silu"):
        x = torch.tensor([[1e6, -1e6, 3e4, -3e4, 12.0, -12.0]])
        grad, t = torch.ones_like(x), torch.zeros(())
        dx = reference.remap_act_backward_reference(grad, x, t, None, act, 1, False)
        assert compare_backward(dx, grad, x, t, None, act, 1, False).ok, act
        for index in range(x.shape[1]):
            wrong = dx.clone()
            wrong[0, index] += 1e-4
            result = compare_backward(wrong, grad, x, t, None, act, 1, False)
            assert not result.ok, (act, float(x[0, index]))
