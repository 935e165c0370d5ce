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
import logging
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lipkern.ops import library, reference, triton_kernels
from lipkern.ops.triton_kernels import (
    INTERPRETED,
    remap_backward,
    remap_forward,
    remap_stats,
)

__all__ = ["BACKEND", "TritonBackend", "static_traffic", "static_traffic_table"]


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


# ----------------------------------------------------------------------------- static figures

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
_TRAFFIC_SHAPE = (16384, 1024)  # 16 Mi elements, [rows, C]: the size of the bandwidth target


class _ByteCounter(TorchDispatchMode):
    """Bytes each aten op reads and writes (its tensor operands and results), views excluded.

    This is what eager PyTorch moves through memory: every op is its own pass."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            leaves = tree_leaves((args, kwargs, out))
            self.bytes += sum(_operand_bytes(t) for t in leaves if isinstance(t, torch.Tensor))
        return out


def _operand_bytes(t):
    # A broadcast (stride-0) operand is read from its storage, not once per element.
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _eager_bytes(fn, *args):
    with _ByteCounter() as counter:
        fn(*args)
    return counter.bytes


def _compiled_bytes(fn, *args):
    """Bytes inductor's scheduler counts for the compiled graph (its own memory model)."""
    from torch._inductor import compile_fx, metrics

    log = compile_fx.inductor_metrics_log
    level = log.level
    log.setLevel(logging.INFO)  # count_bytes runs only when this logger is enabled
    try:
        torch._dynamo.reset()
        metrics.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            torch.compile(fn, fullgraph=True)(*args)
        return metrics.num_bytes_accessed
    finally:
        log.setLevel(level)
        torch._dynamo.reset()


def _reference_cases(shape, dtype):
    """(kernel, eager/compiled reference function, its inputs on the meta device or CPU)."""
    channels = shape[-1]

    def make(device):
        x = torch.empty(shape, dtype=dtype, device=device)
        dy = torch.empty(shape, dtype=dtype, device=device)
        threshold = torch.full((channels,), 0.5, device=device)
        return x, dy, threshold

    cases = {
        "forward": lambda x, dy, t: reference.remap_act_reference(x, t, None, "gelu", 1),
        "forward+stats": lambda x, dy, t: reference.remap_act_stats_reference(
            x, t, None, "gelu", 1),
        "backward": lambda x, dy, t: reference.remap_act_backward_reference(
            dy, x, t, None, "gelu", 1, False),
        "in-place": lambda x, dy, t: reference.remap_act_inplace_reference(x, t, None, "gelu", 1),
    }
    return cases, make


def _triton_bytes(kernel, shape, itemsize):
    numel = math.prod(shape)
    channels = shape[-1]
    streams = {"forward": 2, "forward+stats": 2, "backward": 3, "in-place": 2}[kernel]
    total = streams * itemsize * numel + 4 * channels  # + the per-channel thresholds
    if kernel == "forward+stats":
        # The GPU launch configuration, whichever one this process launches with.
        n_parts = triton_kernels.stats_partition(
            triton_kernels.LAYOUT_COLS, numel // channels, channels, channels,
            triton_kernels.GPU_CONFIG)[3]
        record = 4 + 8 + 8 + 8  # amax bits, remapped, sum, sumsq per (part, channel)
        # workspace written then read back, and the (C,) results written
        total += 2 * n_parts * channels * record + channels * record
    return total


def static_traffic(shape=_TRAFFIC_SHAPE, compiled=True):
    """Bytes per element of each Triton kernel against the eager and compiled reference.

    Triton: the kernels' own streams (one read of x, one write of y; see
    tests/test_triton_aot.py for the PTX that shows it) plus their O(C) side traffic. Eager:
    counted op by op on meta tensors. Compiled: inductor's byte count of the compiled reference
    (on this machine's CPU inductor graph, at a quarter of ``shape``'s rows; None when
    ``compiled`` is false). Returns a list of dicts.
    """
    rows = []
    numel = math.prod(shape)
    small = (max(shape[0] // 4, 1),) + tuple(shape[1:])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cases, make = _reference_cases(shape, dtype)
        compiled_cases, make_small = _reference_cases(small, dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        for kernel, fn in cases.items():
            eager = _eager_bytes(fn, *make("meta")) / numel
            inductor = None
            if compiled and kernel != "in-place":
                inductor = _compiled_bytes(compiled_cases[kernel], *make_small("cpu"))
                inductor /= math.prod(small)
            fused = _triton_bytes(kernel, shape, itemsize) / numel
            rows.append({
                "kernel": kernel, "dtype": str(dtype).replace("torch.", ""),
                "triton_B_per_elem": fused, "eager_B_per_elem": eager,
                "compiled_B_per_elem": inductor,
                "triton_us_at_3.35TB/s": fused * numel / H100_BANDWIDTH * 1e6,
                "eager_us_at_3.35TB/s": eager * numel / H100_BANDWIDTH * 1e6,
                "compiled_us_at_3.35TB/s": (
                    None if inductor is None else inductor * numel / H100_BANDWIDTH * 1e6),
            })
    return rows


def static_traffic_table(shape=_TRAFFIC_SHAPE, compiled=True) -> str:
    """:func:`static_traffic` as a text table (what ``lipkern bench`` prints without a GPU)."""
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    numel = math.prod(shape)
    lines = [
        f"bytes moved per element and predicted time at {H100_BANDWIDTH / 1e12:.2f} TB/s (H100), "
        f"x of shape {list(shape)} ({numel / 2**20:.0f} Mi elements), act=gelu, per-channel t",
        f"{'kernel':<14}{'dtype':<9}{'triton':>8}{'eager':>8}{'compiled':>9}"
        f"{'triton us':>11}{'eager us':>10}{'compiled us':>12}",
    ]
    for row in static_traffic(shape, compiled):
        lines.append(
            f"{row['kernel']:<14}{row['dtype']:<9}{row['triton_B_per_elem']:>8.2f}"
            f"{row['eager_B_per_elem']:>8.2f}{fmt(row['compiled_B_per_elem'], '.2f'):>9}"
            f"{row['triton_us_at_3.35TB/s']:>11.1f}{row['eager_us_at_3.35TB/s']:>10.1f}"
            f"{fmt(row['compiled_us_at_3.35TB/s'], '.1f'):>12}"
        )
    lines.append(
        "triton: the kernels' streams (x read once, y written once; PTX checked by "
        "tests/test_triton_aot.py) + O(C) thresholds and stats workspace; eager: every aten "
        "op's operands and results, counted; compiled: inductor's own byte count of the "
        "compiled reference graph (CPU inductor; the CUDA graph may fuse differently)."
    )
    return "\n".join(lines)
