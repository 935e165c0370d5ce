"""The memory-traffic model of the Triton kernels: bytes per element against eager and compiled
references, and the time they would take at a given bandwidth (what ``lipkern bench`` prints on a
machine without a GPU)."""

from __future__ import annotations

import logging
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lipkern.ops import reference, triton_kernels
from lipkern.tools.table import format_table

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
_TRAFFIC_SHAPE = (16384, 1024)  # 16 Mi elements, [rows, C]: the size of the bandwidth target


class ByteCounter(TorchDispatchMode):
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
    with ByteCounter() as counter:
        fn(*args)
    return counter.bytes


def compiled_bytes(fn, *args):
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
                inductor = compiled_bytes(compiled_cases[kernel], *make_small("cpu"))
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
        return None if value is None else format(value, spec)

    numel = math.prod(shape)
    header = ("kernel", "dtype", "triton B", "eager B", "compiled B", "triton us", "eager us",
              "compiled us")
    body = [
        (
            row["kernel"], row["dtype"], fmt(row["triton_B_per_elem"], ".2f"),
            fmt(row["eager_B_per_elem"], ".2f"), fmt(row["compiled_B_per_elem"], ".2f"),
            fmt(row["triton_us_at_3.35TB/s"], ".1f"), fmt(row["eager_us_at_3.35TB/s"], ".1f"),
            fmt(row["compiled_us_at_3.35TB/s"], ".1f"),
        )
        for row in static_traffic(shape, compiled)
    ]
    return "\n".join([
        f"bytes moved per element (B) and predicted time at {H100_BANDWIDTH / 1e12:.2f} TB/s "
        f"(H100), x of shape {list(shape)} ({numel / 2**20:.0f} Mi elements), act=gelu, "
        "per-channel t",
        format_table(header, body),
        "triton: the kernels' streams (x read once, y written once; PTX checked by "
        "tests/test_triton_aot.py) + O(C) thresholds and stats workspace; eager: every aten "
        "op's operands and results, counted; compiled: inductor's own byte count of the "
        "compiled reference graph (CPU inductor; the CUDA graph may fuse differently).",
    ])
