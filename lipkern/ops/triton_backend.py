"""The ``"triton"`` backend: CUDA kernels of the ``lipkern::*`` ops, and the interpreter path.

On CUDA tensors the Triton launchers of :mod:`lipkern.ops.triton_kernels` are the ``CUDA``
kernels of the ops defined in :mod:`lipkern.ops.library`, so autograd, ``torch.compile`` and
``torch.export`` see the same ops as on CPU. On CPU tensors the kernels run only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is first imported); the CPU
dispatch key belongs to the C++ kernels, so there the backend calls the launchers directly,
with a :class:`torch.autograd.Function` for the gradient.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as error:
    raise ImportError(
        "backend='triton' needs the triton package (pip install triton; it ships with the CUDA "
        "builds of torch)"
    ) from error

import functools

import torch

from lipkern.ops import library
from lipkern.ops.triton_kernels import (
    INTERPRETED,
    remap_backward,
    remap_forward,
    remap_stats,
)

__all__ = ["BACKEND", "TritonBackend"]


# ----------------------------------------------------------------------------- CUDA registration


def _on_tensor_device(launcher):
    """Run ``launcher`` with its first argument's GPU current: Triton launches on the current
    device, which need not be the one the tensors live on."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    return launch


@_on_tensor_device
def _cuda_remap_act(x, threshold, center, act, channel_dim, straight_through=False):
    return remap_forward(x, threshold, center, act, channel_dim)


@_on_tensor_device
def _cuda_remap_act_(x, threshold, center, act, channel_dim):
    remap_forward(x, threshold, center, act, channel_dim, out=x)


_LIB = torch.library.Library("lipkern", "IMPL")
_LIB.impl("remap_act", _cuda_remap_act, "CUDA")
_LIB.impl("remap_act_backward", _on_tensor_device(remap_backward), "CUDA")
_LIB.impl("remap_act_stats", _on_tensor_device(remap_stats), "CUDA")
_LIB.impl("remap_act_", _cuda_remap_act_, "CUDA")


# ----------------------------------------------------------------------------- interpreter path


def _refuse_higher_order() -> None:
    # The interpreter emulates the CUDA kernels for tests; its backward is not differentiable, so a
    # create_graph backward would silently drop the second-order term (on CUDA the lipkern::* ops
    # support it, see library.py).
    if torch.is_grad_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors (the Triton interpreter) does not support "
            "higher-order gradients (create_graph=True); use backend='cpu' or a CUDA device"
        )


class _RemapAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, center, act, channel_dim, straight_through):
        ctx.save_for_backward(x, threshold, center)
        ctx.args = (act, channel_dim, straight_through)
        return remap_forward(x, threshold, center, act, channel_dim)

    @staticmethod
    def backward(ctx, grad_y):
        _refuse_higher_order()
        x, threshold, center = ctx.saved_tensors
        return remap_backward(grad_y, x, threshold, center, *ctx.args), None, None, None, None, None


class _RemapActStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, center, act, channel_dim):
        ctx.save_for_backward(x, threshold, center)
        ctx.args = (act, channel_dim, False)
        outputs = remap_stats(x, threshold, center, act, channel_dim)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_y, *stats_grads):
        _refuse_higher_order()
        x, threshold, center = ctx.saved_tensors
        return remap_backward(grad_y, x, threshold, center, *ctx.args), None, None, None, None


class TritonBackend:
    name = "triton"
    # Interpreted, the API checks the values; on CUDA nothing does, to spare a device sync.
    checks_parameter_values = False

    def supports(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device.type == "cpu":
            if INTERPRETED:
                return None
            return (
                "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 in the "
                "environment before triton is first imported (or use a CUDA device)"
            )
        return f"backend 'triton' runs on CUDA tensors (or CPU ones when interpreted), not {device}"

    def remap_act(self, x, threshold, center, act, channel_dim, straight_through):
        if x.is_cuda:
            return torch.ops.lipkern.remap_act(
                x, threshold, center, act, channel_dim, straight_through
            )
        return _RemapAct.apply(x, threshold, center, act, channel_dim, straight_through)

    def remap_act_stats(self, x, threshold, center, act, channel_dim):
        if x.is_cuda:
            return torch.ops.lipkern.remap_act_stats(x, threshold, center, act, channel_dim)
        return _RemapActStats.apply(x, threshold, center, act, channel_dim)

    def remap_act_(self, x, threshold, center, act, channel_dim):
        if x.is_cuda:
            torch.ops.lipkern.remap_act_(x, threshold, center, act, channel_dim)
        else:
            library.overwrite(
                x, lambda: remap_forward(x, threshold, center, act, channel_dim, out=x)
            )


BACKEND = TritonBackend()
