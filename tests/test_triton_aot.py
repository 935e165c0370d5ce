"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

The kernels are compiled the way the launchers specialise them on a GPU (16-byte aligned
pointers, sizes divisible by 16, libdevice math in float32, or float64 where
``math_f64`` says), then the PTX is read: the main paths
must use 128-bit global loads and stores, the forward must load each element of x once and store
each element of y once, and ``ptxas -v`` must report no spill stores.

The compilation runs in a subprocess: under ``TRITON_INTERPRET=1`` (set by conftest.py when there
is no GPU) ``@triton.jit`` yields interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from lipkern.ops.activations import ACTIVATIONS  # noqa: E402

ARCHS = (80, 90)
DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ACTS = ACTIVATIONS
# Representative per-channel shapes: [rows, C=1024] and NCHW with H*W = 56*56.
COLS_C, ROWS_INNER = 1024, 3136

# ----------------------------------------------------------------------------- compile side


def _variants():
    """(name, kernel, dtype, arch, signature, constexprs) for every compiled case."""
    from lipkern.ops import triton_kernels as K

    config = K.GPU_CONFIG
    block = config.tile
    base = {"HAS_CENTER": False, "PER_CHANNEL": False, "BF16_BITS": False, "MATH_F64": False}
    sizes = {"n_rows": "i32", "n_cols": "i32", "C": "i32"}
    params = {"t_ptr": "*fp32", "c_ptr": "*fp32"}
    out = []
    for arch in ARCHS:
        for dtype in DTYPES:
            io = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
            # Forward, every activation, on the per-tensor (flat) path, plus the per-channel
            # layouts with a centre.
            for act in ACTS:
                flat = dict(base, ACT=K.ACT_CODES[act], LAYOUT=K.LAYOUT_FLAT, BLOCK_R=1,
                            BLOCK_K=block, MATH_F64=K.math_f64(act, TORCH_DTYPES[dtype]))
                out.append((f"fwd-{act}-flat", "remap_fwd_kernel", dtype, arch,
                            {**io, **params, **sizes}, flat))
            for layout, width in ((K.LAYOUT_COLS, COLS_C), (K.LAYOUT_ROWS, ROWS_INNER)):
                block_r, block_k = K.tile_shape(4096, width, config.tile, config.max_block_k)
                per_channel = dict(base, ACT=K.ACT_CODES["gelu"], LAYOUT=layout, HAS_CENTER=True,
                                   PER_CHANNEL=True, BLOCK_R=block_r, BLOCK_K=block_k)
                out.append((f"fwd-gelu-layout{layout}", "remap_fwd_kernel", dtype, arch,
                            {**io, **params, **sizes}, per_channel))
            # Backward, every activation, masked; and straight-through for gelu.
            bwd_io = {"dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}"}
            for act, straight in [(a, False) for a in ACTS] + [("gelu", True)]:
                flags = dict(base, ACT=K.ACT_CODES[act], LAYOUT=K.LAYOUT_FLAT,
                             STRAIGHT_THROUGH=straight, DY_BF16_BITS=False, BLOCK_R=1,
                             BLOCK_K=block, MATH_F64=K.math_f64(act, TORCH_DTYPES[dtype]))
                out.append((f"bwd-{act}-st{int(straight)}", "remap_bwd_kernel", dtype, arch,
                            {**bwd_io, **params, **sizes}, flags))
            # Forward + statistics, both per-channel layouts (the int64 loop bounds included).
            ws = {"ws_amax_ptr": "*i32", "ws_remapped_ptr": "*i64", "ws_sum_ptr": "*fp64",
                  "ws_sumsq_ptr": "*fp64"}
            for act in ("gelu", "gelu_tanh"):
                for layout, width in ((K.LAYOUT_COLS, COLS_C), (K.LAYOUT_ROWS, ROWS_INNER)):
                    block_r, block_k = K.stats_partition(layout, 4096, width, 4, config)[:2]
                    flags = dict(base, ACT=K.ACT_CODES[act], LAYOUT=layout, HAS_CENTER=True,
                                 PER_CHANNEL=True, BLOCK_R=block_r, BLOCK_K=block_k,
                                 MATH_F64=K.math_f64(act, TORCH_DTYPES[dtype]))
                    sig = {**io, **params, **ws, **sizes, "span": "i32", "n_parts": "i32"}
                    out.append((f"stats-{act}-layout{layout}", "remap_stats_kernel", dtype, arch,
                                sig, flags))
        out.append(("finalize", "stats_finalize_kernel", "fp32", arch,
                    {"ws_amax_ptr": "*i32", "ws_remapped_ptr": "*i64", "ws_sum_ptr": "*fp64",
                     "ws_sumsq_ptr": "*fp64", "amax_ptr": "*fp32", "remapped_ptr": "*i64",
                     "sum_ptr": "*fp64", "sumsq_ptr": "*fp64", "C": "i32", "n_parts": "i32"},
                    {"BLOCK_C": 128}))
    return out


def _ptxas():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.(b|f|u|s)(\d+)\b")


def _accesses(ptx):
    """[(kind, bits)] of every global load / store instruction in the PTX."""
    return [
        (m.group(1), int(m.group(2) or 1) * int(m.group(4)))
        for m in _ACCESS.finditer(ptx)
    ]


def _compile_one(case):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lipkern.ops import triton_kernels as K

    name, kernel_name, dtype, arch, sig, constexprs = case
    kernel = getattr(K, kernel_name)
    signature = {arg: sig.get(arg, "constexpr") for arg in kernel.arg_names}
    # What the JIT launcher specialises for aligned tensors and sizes divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, arg in enumerate(kernel.arg_names) if arg in sig}
    compiled = triton.compile(
        ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": 4 if kernel_name == "stats_finalize_kernel"
                 else K.GPU_CONFIG.num_warps},
    )
    ptx = compiled.asm["ptx"]
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    ptx_path = Path(os.environ["LIPKERN_AOT_DIR"]) / f"{name}-{dtype}-{arch}.ptx"
    ptx_path.write_text(ptx)
    report = subprocess.run(
        [str(_ptxas()), f"-arch={sm}", "-v", str(ptx_path), "-o", os.devnull],
        capture_output=True, text=True, check=True,
    ).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = re.search(r"Used (\d+) registers", report)
    return {
        "name": name, "kernel": kernel_name, "dtype": dtype, "arch": arch,
        "accesses": _accesses(ptx), "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)), "registers": int(regs.group(1)),
        "libdevice_calls": sorted(set(re.findall(r"__nv_\w+", ptx))),
        "divisions": sorted(set(re.findall(r"\bdiv\.[a-z.]*f32\b", ptx))),
        "f64_divisions": sorted(set(re.findall(r"\bdiv\.[a-z.]*f64\b", ptx))),
    }


def compile_all(jobs=2):
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, _variants()))


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LIPKERN_AOT_DIR"] = str(out_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result_file = out_dir / "results.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(result_file)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(r["name"], r["dtype"], r["arch"]): r for r in json.loads(result_file.read_text())}


def test_every_kernel_compiles_for_every_dtype_and_arch(compiled):
    kernels = {(r["kernel"], r["dtype"], r["arch"]) for r in compiled.values()}
    for kernel in ("remap_fwd_kernel", "remap_bwd_kernel", "remap_stats_kernel"):
        for dtype in DTYPES:
            for arch in ARCHS:
                assert (kernel, dtype, arch) in kernels
    assert all(("stats_finalize_kernel", "fp32", arch) in kernels for arch in ARCHS)


def test_no_spills(compiled):
    spilling = {k: (r["spill_stores"], r["spill_loads"]) for k, r in compiled.items()
                if r["spill_stores"] or r["spill_loads"]}
    assert not spilling


def _per_thread_bits(dtype):
    """Bits of x one thread moves in the forward / backward tile (tile / threads * itemsize)."""
    from lipkern.ops.triton_kernels import GPU_CONFIG

    return GPU_CONFIG.tile // (32 * GPU_CONFIG.num_warps) * DTYPES[dtype] * 8


def _element_traffic(result):
    """Load and store bits of the data stream, leaving out the 32-bit threshold/centre loads."""
    loads = [bits for kind, bits in result["accesses"] if kind == "ld" and bits != 32]
    stores = [bits for kind, bits in result["accesses"] if kind == "st"]
    return loads, stores


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
def test_forward_reads_x_once_and_writes_y_once_with_128_bit_accesses(compiled, act, dtype, arch):
    result = compiled[(f"fwd-{act}-flat", dtype, arch)]
    loads, stores = _element_traffic(result)
    per_thread_bits = _per_thread_bits(dtype)
    assert loads and set(loads) == {128}, result["accesses"]
    assert stores and set(stores) == {128}, result["accesses"]
    # Straight-line code: the instruction count is the per-thread count.
    assert sum(loads) == per_thread_bits and sum(stores) == per_thread_bits
    # The only other global load is the per-tensor threshold.
    assert sum(1 for kind, bits in result["accesses"] if kind == "ld" and bits == 32) == 1


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_per_channel_forward_and_backward_are_vectorised(compiled, dtype, arch):
    per_thread_bits = _per_thread_bits(dtype)
    for name in ("fwd-gelu-layout1", "fwd-gelu-layout2"):
        accesses = compiled[(name, dtype, arch)]["accesses"]
        wide_loads = sum(b for k, b in accesses if k == "ld" and b == 128)
        stores = [b for k, b in accesses if k == "st"]
        # x in 128-bit loads; the per-row / per-column threshold and centre add at most two
        # loads (vectorised themselves when a thread's rows are adjacent).
        assert per_thread_bits <= wide_loads <= per_thread_bits + 2 * 128, accesses
        assert stores and set(stores) == {128} and sum(stores) == per_thread_bits, accesses
    for act in ACTS:
        result = compiled[(f"bwd-{act}-st0", dtype, arch)]
        loads, stores = _element_traffic(result)
        # dy and x read once, dx written once.
        assert set(loads) == {128} and sum(loads) == 2 * per_thread_bits
        assert set(stores) == {128} and sum(stores) == per_thread_bits


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_stats_stream_is_vectorised(compiled, dtype, arch):
    for name in ("stats-gelu-layout1", "stats-gelu-layout2"):
        accesses = compiled[(name, dtype, arch)]["accesses"]
        # x loads and y stores in the loop are 128-bit; the rest are the O(C) parameter loads
        # and workspace stores.
        assert any(k == "ld" and b == 128 for k, b in accesses), accesses
        assert any(k == "st" and b == 128 for k, b in accesses), accesses


def test_gpu_math_is_libdevice_and_ieee_division(compiled):
    """erf from libdevice, and float32 divisions correctly rounded (not div.full / div.approx)."""
    for arch in ARCHS:
        assert "__nv_erff" in compiled[("fwd-gelu-flat", "fp32", arch)]["libdevice_calls"]
        tanh_gelu = ("fwd-gelu_tanh-flat", "bwd-gelu_tanh-st0", "stats-gelu_tanh-layout1",
                     "stats-gelu_tanh-layout2")
        for name in ("fwd-silu-flat", "bwd-silu-st0") + tanh_gelu:
            for dtype in DTYPES:
                if name in tanh_gelu and dtype == "fp32":
                    # In float64 (math_f64): libdevice's exp, IEEE division.
                    result = compiled[(name, dtype, arch)]
                    assert result["libdevice_calls"] == ["__nv_exp"], name
                    assert result["divisions"] == [] and result["f64_divisions"] == ["div.rn.f64"]
                else:
                    assert compiled[(name, dtype, arch)]["divisions"] == ["div.rn.f32"], name


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(compile_all()))
