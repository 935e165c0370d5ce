"""Triton kernels for the fused activation + threshold remap, and their raw launchers.

Memory layouts. A normalised ``x`` (see :mod:`lipkern.ops.api`) is dense, so it is one of:

- ``LAYOUT_FLAT``: the thresholds are per tensor and no statistics are wanted, so the channel of
  an element does not matter and the kernel walks the storage as a flat array.
- ``LAYOUT_COLS``: a row-major ``[rows, C]`` matrix; the channel is the column. This covers
  ``[..., C]`` with ``channel_dim=-1`` and channels_last NCHW with ``channel_dim=1``.
- ``LAYOUT_ROWS``: a row-major ``[outer * C, inner]`` matrix (contiguous ``[outer, C, inner]``,
  e.g. NCHW with ``channel_dim=1``); row ``r`` belongs to channel ``r % C``, computed once per
  row rather than once per element (an int64 division is costly on a GPU).

Numerics. The activation is evaluated in the compute type chosen by ``MATH_F64``. On a GPU it is
float32 (float64 for float32 tanh-GELU: see ``math_f64``) with libdevice's
``expf`` / ``erff`` and correctly rounded division (Triton's own
``tl.exp`` is ``ex2.approx`` of a rounded ``x * log2(e)``, which loses ulps as ``|x|`` grows, and
its float32 ``/`` is ``div.full``). Under the interpreter, libdevice does not exist, so the same
formulas run in float64 and are rounded once to float32: the result is at least as close to the
exact value as PyTorch's float32 kernels. The remap compare is always in
float32 on the float32-rounded activation, as the reference does.

Statistics use a two-stage deterministic reduction: each program owns a fixed slice of the
tensor (fixed by the shape only) and writes its partial results to a workspace, then
``stats_finalize_kernel`` combines the partials of each channel in program order. Sums are
accumulated in float64 lanes; max |a| is taken on the float32 bit pattern as an int32, where
NaN (exponent all ones, non-zero mantissa) orders above +inf, so NaN propagates without any
special case.

The interpreter converts bfloat16 incorrectly (it truncates float32 -> bfloat16 and mis-reads
bfloat16 subnormals), so under it the launchers pass bfloat16 tensors as int16 views and the
kernels convert the bits themselves (``BF16_BITS``), rounding to nearest-even like PyTorch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from lipkern.ops.activations import ACT_CODES, GELU_TANH_CUBIC, GELU_TANH_SCALE

LAYOUT_FLAT, LAYOUT_COLS, LAYOUT_ROWS = 0, 1, 2

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# gelu_tanh: 0.5 x (1 + tanh(u)) with u = BETA (x + KAPPA x^3), BETA = sqrt(2 / pi).
_BETA = tl.constexpr(GELU_TANH_SCALE)
_KAPPA = tl.constexpr(GELU_TANH_CUBIC)
_INF = tl.constexpr(float("inf"))


# ----------------------------------------------------------------------------- element helpers


@triton.jit
def _load_f32(ptr, offs, valid, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        bits = tl.load(ptr + offs, mask=valid, other=0).to(tl.uint16, bitcast=True)
        value = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return value


@triton.jit
def _store(ptr, offs, value, valid, BF16_BITS: tl.constexpr):
    if BF16_BITS:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # PyTorch's scalar conversion writes NaN as the canonical quiet NaN 0x7FC0.
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=valid)


@triton.jit
def _exp(z, MATH_F64: tl.constexpr):
    if MATH_F64:
        result = tl.exp(z)
    else:
        result = libdevice.exp(z)
    return result


@triton.jit
def _erf(z, MATH_F64: tl.constexpr):
    if MATH_F64:
        result = tl.math.erf(z)
    else:
        result = libdevice.erf(z)
    return result


@triton.jit
def _div(a, b, MATH_F64: tl.constexpr):
    # Triton's float32 "/" is div.full.f32 (about 2 ulp); float64 "/" is already IEEE.
    if MATH_F64:
        result = a / b
    else:
        result = tl.math.div_rn(a, b)
    return result


@triton.jit
def _compute(x, MATH_F64: tl.constexpr):
    if MATH_F64:
        result = x.to(tl.float64)
    else:
        result = x
    return result


@triton.jit
def _activation(x, ACT: tl.constexpr, MATH_F64: tl.constexpr):
    """act(x) for float32 x, rounded once to float32."""
    if ACT == 0:
        a = x
    elif ACT == 1:
        # x < 0 rather than max(x, 0): keeps NaN and -0.0, as torch.relu does.
        a = tl.where(x < 0, 0.0, x)
    else:
        z = _compute(x, MATH_F64)
        if ACT == 2:
            a = (z * 0.5 * (1.0 + _erf(z * _SQRT1_2, MATH_F64))).to(tl.float32)
        elif ACT == 3:
            # 0.5 x (1 + tanh(u)) = x * sigmoid(2u): no cancellation for negative x.
            u = _BETA * (z + _KAPPA * z * z * z)
            a = _div(z, 1.0 + _exp(-2.0 * u, MATH_F64), MATH_F64).to(tl.float32)
        else:
            a = _div(z, 1.0 + _exp(-z, MATH_F64), MATH_F64).to(tl.float32)
        # The limits at infinity (+inf, -0): the formulas give inf * 0 = NaN there. (A -0.0
        # literal would lose its sign in Triton's constant handling; negating zeros keeps it.)
        a = tl.where(x == _INF, x, tl.where(x == -_INF, -tl.zeros_like(a), a))
    return a


@triton.jit
def _activation_grad(g, x, ACT: tl.constexpr, MATH_F64: tl.constexpr):
    """g * act'(x) for float32 g and x, rounded once to float32."""
    if ACT == 0:
        dx = g
    elif ACT == 1:
        # A select, not a product: +0 where x <= 0 whatever g is, as PyTorch's threshold_backward.
        dx = tl.where(x > 0, g, 0.0)
    else:
        z = _compute(x, MATH_F64)
        if ACT == 2:
            cdf = 0.5 * (1.0 + _erf(z * _SQRT1_2, MATH_F64))
            pdf = _exp(-0.5 * z * z, MATH_F64) * _INV_SQRT_2PI
            slope = cdf + z * pdf
        elif ACT == 3:
            u = _BETA * (z + _KAPPA * z * z * z)
            s = _div(1.0, 1.0 + _exp(-2.0 * u, MATH_F64), MATH_F64)
            slope = s + 2.0 * z * s * (1.0 - s) * _BETA * (1.0 + 3.0 * _KAPPA * z * z)
        else:
            s = _div(1.0, 1.0 + _exp(-z, MATH_F64), MATH_F64)
            slope = s * (1.0 + z * (1.0 - s))
        dx = (_compute(g, MATH_F64) * slope).to(tl.float32)
        # The derivative's limits at infinity (1, 0), selected rather than multiplied.
        dx = tl.where(x == _INF, g, tl.where(x == -_INF, 0.0, dx))
    return dx


@triton.jit
def _params(t_ptr, c_ptr, ch, ch_valid, HAS_CENTER: tl.constexpr, PER_CHANNEL: tl.constexpr,
            LAYOUT: tl.constexpr):
    """Threshold and centre of channels ``ch`` (or the per-tensor scalars), broadcast over the
    tile: along columns for LAYOUT_COLS, along rows for LAYOUT_ROWS. Loading one value per
    channel and broadcasting after the load keeps it one load per row or column, not per
    element."""
    if PER_CHANNEL:
        t = _expand(tl.load(t_ptr + ch, mask=ch_valid, other=0.0), LAYOUT)
    else:
        t = tl.load(t_ptr)
    if HAS_CENTER:
        if PER_CHANNEL:
            c = _expand(tl.load(c_ptr + ch, mask=ch_valid, other=0.0), LAYOUT)
        else:
            c = tl.load(c_ptr)
    else:
        c = 0.0
    return t, c


@triton.jit
def _expand(v, LAYOUT: tl.constexpr):
    if LAYOUT == 1:
        v = v[None, :]
    elif LAYOUT == 2:
        v = v[:, None]
    return v


@triton.jit
def _remap_mask(a, t, c, HAS_CENTER: tl.constexpr):
    if HAS_CENTER:
        distance = tl.abs(a - c)
    else:
        distance = tl.abs(a)
    # NaN distances compare false, and t = 0 never remaps.
    return distance < t


@triton.jit
def _tile(pid, n_rows, n_cols, C, LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """int64 offsets and validity of program ``pid``'s tile, and its channels (1-D: one per
    column for LAYOUT_COLS, one per row for LAYOUT_ROWS; unused for LAYOUT_FLAT)."""
    if LAYOUT == 0:
        offs = pid.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        valid = offs < n_cols
        ch = offs
        ch_valid = valid
    else:
        n_kb = tl.cdiv(n_cols, BLOCK_K)
        rows = (pid // n_kb).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (pid % n_kb).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs = rows[:, None] * n_cols + cols[None, :]
        valid = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        if LAYOUT == 1:
            ch = cols
            ch_valid = cols < n_cols
        else:
            ch = rows % C
            ch_valid = rows < n_rows
    return offs, valid, ch, ch_valid


# ----------------------------------------------------------------------------- kernels


@triton.jit
def remap_fwd_kernel(x_ptr, y_ptr, t_ptr, c_ptr, n_rows, n_cols, C,
                     ACT: tl.constexpr, LAYOUT: tl.constexpr, HAS_CENTER: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, BF16_BITS: tl.constexpr,
                     MATH_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = remap(act(x)); y_ptr may equal x_ptr (in place: each element is read before written)."""
    offs, valid, ch, ch_valid = _tile(tl.program_id(0), n_rows, n_cols, C, LAYOUT, BLOCK_R,
                                      BLOCK_K)
    x = _load_f32(x_ptr, offs, valid, BF16_BITS)
    t, c = _params(t_ptr, c_ptr, ch, ch_valid, HAS_CENTER, PER_CHANNEL, LAYOUT)
    a = _activation(x, ACT, MATH_F64)
    y = tl.where(_remap_mask(a, t, c, HAS_CENTER), c, a)
    _store(y_ptr, offs, y, valid, BF16_BITS)


@triton.jit
def remap_bwd_kernel(dy_ptr, x_ptr, dx_ptr, t_ptr, c_ptr, n_rows, n_cols, C,
                     ACT: tl.constexpr, LAYOUT: tl.constexpr, HAS_CENTER: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
                     BF16_BITS: tl.constexpr, DY_BF16_BITS: tl.constexpr,
                     MATH_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = act'(x) * (dy, zeroed where remapped unless STRAIGHT_THROUGH)."""
    offs, valid, ch, ch_valid = _tile(tl.program_id(0), n_rows, n_cols, C, LAYOUT, BLOCK_R,
                                      BLOCK_K)
    x = _load_f32(x_ptr, offs, valid, BF16_BITS)
    g = _load_f32(dy_ptr, offs, valid, DY_BF16_BITS)
    if not STRAIGHT_THROUGH:
        t, c = _params(t_ptr, c_ptr, ch, ch_valid, HAS_CENTER, PER_CHANNEL, LAYOUT)
        # A select, not a product: a remapped element gets 0 even when dy is inf or NaN.
        g = tl.where(_remap_mask(_activation(x, ACT, MATH_F64), t, c, HAS_CENTER), 0.0, g)
    _store(dx_ptr, offs, _activation_grad(g, x, ACT, MATH_F64), valid, BF16_BITS)


@triton.jit
def _remap_tile_and_accumulate(x_ptr, y_ptr, offs, valid, t, c, acc_sum, acc_sumsq, acc_amax,
                               acc_remapped, ACT: tl.constexpr, HAS_CENTER: tl.constexpr,
                               BF16_BITS: tl.constexpr, MATH_F64: tl.constexpr):
    """Remap one tile into y and add it to the running statistics (both stats layouts)."""
    x = _load_f32(x_ptr, offs, valid, BF16_BITS)
    a = _activation(x, ACT, MATH_F64)
    remap = _remap_mask(a, t, c, HAS_CENTER) & valid
    _store(y_ptr, offs, tl.where(remap, c, a), valid, BF16_BITS)
    a = tl.where(valid, a, 0.0)
    a64 = a.to(tl.float64)
    acc_sum += a64
    acc_sumsq += a64 * a64
    # Max of |a| as an integer max on the fp32 bits: NaN's pattern exceeds inf's, so NaN wins.
    acc_amax = tl.maximum(acc_amax, a.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    acc_remapped += remap.to(tl.int32)
    return acc_sum, acc_sumsq, acc_amax, acc_remapped


@triton.jit
def remap_stats_kernel(x_ptr, y_ptr, t_ptr, c_ptr, ws_amax_ptr, ws_remapped_ptr, ws_sum_ptr,
                       ws_sumsq_ptr, n_rows, n_cols, C, span, n_parts,
                       ACT: tl.constexpr, LAYOUT: tl.constexpr, HAS_CENTER: tl.constexpr,
                       PER_CHANNEL: tl.constexpr, BF16_BITS: tl.constexpr,
                       MATH_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward plus per-program partial statistics, written to workspaces of shape [n_parts, C].

    LAYOUT_COLS: program (part, column block) scans rows [part * span, (part + 1) * span).
    LAYOUT_ROWS: program (part, channel) scans outer indices [part * span, (part + 1) * span)
    of channel ``ch``, i.e. matrix rows ``o * C + ch``, each ``n_cols`` (= inner) long.
    ``span`` is a multiple of BLOCK_R.
    """
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_R).to(tl.int64)
    k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc_sum = tl.zeros((BLOCK_R, BLOCK_K), tl.float64)
    acc_sumsq = tl.zeros((BLOCK_R, BLOCK_K), tl.float64)
    acc_amax = tl.zeros((BLOCK_R, BLOCK_K), tl.int32)
    acc_remapped = tl.zeros((BLOCK_R, BLOCK_K), tl.int32)
    if LAYOUT == 1:
        n_kb = tl.cdiv(n_cols, BLOCK_K)
        part = pid // n_kb
        cols = (pid % n_kb).to(tl.int64) * BLOCK_K + k
        col_valid = cols < n_cols
        t, c = _params(t_ptr, c_ptr, cols, col_valid, HAS_CENTER, PER_CHANNEL, 1)
        row_start = part.to(tl.int64) * span
        row_end = tl.minimum(row_start + span, n_rows)
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + r
            offs = rows[:, None] * n_cols + cols[None, :]
            valid = (rows < row_end)[:, None] & col_valid[None, :]
            acc_sum, acc_sumsq, acc_amax, acc_remapped = _remap_tile_and_accumulate(
                x_ptr, y_ptr, offs, valid, t, c, acc_sum, acc_sumsq, acc_amax, acc_remapped,
                ACT, HAS_CENTER, BF16_BITS, MATH_F64)
        out = part.to(tl.int64) * C + cols
        tl.store(ws_sum_ptr + out, tl.sum(acc_sum, axis=0), mask=col_valid)
        tl.store(ws_sumsq_ptr + out, tl.sum(acc_sumsq, axis=0), mask=col_valid)
        tl.store(ws_amax_ptr + out, tl.max(acc_amax, axis=0), mask=col_valid)
        tl.store(ws_remapped_ptr + out, tl.sum(acc_remapped.to(tl.int64), axis=0),
                 mask=col_valid)
    else:
        part = pid % n_parts
        ch = pid // n_parts
        # One channel per program: scalar parameters, no broadcast.
        t, c = _params(t_ptr, c_ptr, ch, True, HAS_CENTER, PER_CHANNEL, 0)
        o_start = part.to(tl.int64) * span
        o_end = tl.minimum(o_start + span, n_rows // C)
        for o0 in range(o_start, o_end, BLOCK_R):
            outer = o0 + r
            row_base = (outer * C + ch) * n_cols
            for i0 in range(0, n_cols, BLOCK_K):
                inner = i0 + k
                offs = row_base[:, None] + inner[None, :]
                valid = (outer < o_end)[:, None] & (inner < n_cols)[None, :]
                acc_sum, acc_sumsq, acc_amax, acc_remapped = _remap_tile_and_accumulate(
                    x_ptr, y_ptr, offs, valid, t, c, acc_sum, acc_sumsq, acc_amax, acc_remapped,
                    ACT, HAS_CENTER, BF16_BITS, MATH_F64)
        out = part.to(tl.int64) * C + ch
        tl.store(ws_sum_ptr + out, tl.sum(tl.sum(acc_sum, axis=1), axis=0))
        tl.store(ws_sumsq_ptr + out, tl.sum(tl.sum(acc_sumsq, axis=1), axis=0))
        tl.store(ws_amax_ptr + out, tl.max(tl.max(acc_amax, axis=1), axis=0))
        # A program may see more than 2**31 elements here (one channel's rows can be that
        # long): each lane's int32 count cannot overflow, their total can.
        remapped = tl.sum(tl.sum(acc_remapped.to(tl.int64), axis=1), axis=0)
        tl.store(ws_remapped_ptr + out, remapped)


@triton.jit
def stats_finalize_kernel(ws_amax_ptr, ws_remapped_ptr, ws_sum_ptr, ws_sumsq_ptr, amax_ptr,
                          remapped_ptr, sum_ptr, sumsq_ptr, C, n_parts, BLOCK_C: tl.constexpr):
    """Combine the [n_parts, C] partials of each channel, in part order (deterministic)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = cols < C
    amax = tl.zeros((BLOCK_C,), tl.int32)
    remapped = tl.zeros((BLOCK_C,), tl.int64)
    total = tl.zeros((BLOCK_C,), tl.float64)
    total_sq = tl.zeros((BLOCK_C,), tl.float64)
    offs = cols
    for _ in range(0, n_parts):
        amax = tl.maximum(amax, tl.load(ws_amax_ptr + offs, mask=valid, other=0))
        remapped += tl.load(ws_remapped_ptr + offs, mask=valid, other=0)
        total += tl.load(ws_sum_ptr + offs, mask=valid, other=0.0)
        total_sq += tl.load(ws_sumsq_ptr + offs, mask=valid, other=0.0)
        offs += C
    tl.store(amax_ptr + cols, amax.to(tl.float32, bitcast=True), mask=valid)
    tl.store(remapped_ptr + cols, remapped, mask=valid)
    tl.store(sum_ptr + cols, total, mask=valid)
    tl.store(sumsq_ptr + cols, total_sq, mask=valid)



# ----------------------------------------------------------------------------- launchers

INTERPRETED = isinstance(remap_fwd_kernel, InterpretedFunction)



class LaunchConfig(NamedTuple):
    tile: int  # elements per program of the forward / backward kernels
    max_block_k: int  # widest tile row
    stats_tile: int  # elements per loop step of the statistics kernel
    stats_max_block_k: int  # narrower for statistics: column blocks are its parallelism
    stats_work: int  # elements per statistics program, at least
    stats_min_rows: int  # rows per statistics program, at least, for LAYOUT_COLS
    num_warps: int


# 4096 elements over 8 warps is 16 per thread: 128-bit accesses for every dtype. The stats tile
# is smaller because each element carries two float64 accumulators. For LAYOUT_COLS each
# statistics program writes a 28-byte record per column to the workspace (and the finaliser
# reads it back), i.e. 56 / rows-per-program bytes per element: 512 rows make that 0.11.
GPU_CONFIG = LaunchConfig(tile=4096, max_block_k=256, stats_tile=2048, stats_max_block_k=64,
                          stats_work=32768, stats_min_rows=512, num_warps=8)
# The interpreter runs one Python iteration per program: big tiles amortise its overhead.
INTERPRETER_CONFIG = LaunchConfig(tile=1 << 16, max_block_k=1 << 16, stats_tile=1 << 16,
                                  stats_max_block_k=1 << 16, stats_work=1 << 20,
                                  stats_min_rows=1, num_warps=1)
CONFIG = INTERPRETER_CONFIG if INTERPRETED else GPU_CONFIG
FINALIZE_BLOCK = 128
# The finaliser walks a channel's partial results one part after another: [2^24, 64] made
# 32768 parts at 512 rows each. Past this many parts a part takes more rows instead (still a
# function of the shape alone); 1024 keeps several programs per SM on an H100/H200 (132 SMs).
STATS_MAX_PARTS = 1024


def _geometry(x, channel_dim):
    """(x, layout, n_rows, n_cols, C) of the per-channel matrix view; x made dense if needed."""
    C = x.shape[channel_dim]
    channel_last = x.movedim(channel_dim, -1).is_contiguous()
    if not x.is_contiguous() and not channel_last:
        x = x.contiguous()
    if x.is_contiguous():
        inner = math.prod(x.shape[channel_dim + 1:])
        if inner > 1:
            return x, LAYOUT_ROWS, x.numel() // inner, inner, C
    return x, LAYOUT_COLS, x.numel() // C, C, C


def tile_shape(n_rows, n_cols, tile, max_block_k):
    """(block_r, block_k) of power-of-two tiles of at most ``tile`` elements over an
    ``[n_rows, n_cols]`` matrix, from row widths 16 ... max_block_k (narrower rows get their own
    power of two). The choice minimises a simple cost, programs x (fixed overhead + lanes),
    so that masked lanes (3136 = 49 x 64 fits exactly, 192 = 3 x 64) and tiny programs (6 rows
    of 33667 want wide tiles) are both avoided; on a tie the wider row wins.
    """
    if n_cols <= 16:
        widths = [triton.next_power_of_2(n_cols)]
    else:
        widths = [16 << i for i in range(max(min(max_block_k, tile), 16).bit_length() - 4)]
    overhead = tile // 4

    def cost(block_k):
        block_r = min(tile // block_k, triton.next_power_of_2(n_rows))
        programs = triton.cdiv(n_rows, block_r) * triton.cdiv(n_cols, block_k)
        return programs * (overhead + block_r * block_k), -block_k

    block_k = min(widths, key=cost)
    return min(tile // block_k, triton.next_power_of_2(n_rows)), block_k


def _bf16_bits(t):
    return INTERPRETED and t.dtype == torch.bfloat16


def math_f64(act, dtype):
    """Whether the kernels evaluate ``act`` in float64: always under the interpreter (it has no
    libdevice), and on a GPU for float32 tanh-GELU, in the forward, the statistics and the
    backward alike (the backward's mask must be the forward's decision, on the same value).
    Its float32 ``exp(-2u)`` carries u's
    rounding magnified by ``|2u|``: evaluated so with a correctly rounded expf, 1.1-1.4 % of
    ``randn * 3`` inputs came out over an ulp from PyTorch's (CPU) result and over an ulp less
    accurate (its formula, ``0.5 x (1 + tanh(u))``, errs elsewhere), all at x in [-3, 1.06].
    16-bit outputs round those ulps away, and GELU and SiLU use the formulas and libdevice
    functions of PyTorch's CUDA kernels."""
    return INTERPRETED or (act == "gelu_tanh" and dtype == torch.float32)


def _kernel_view(t):
    """The tensor as the kernels read it: bfloat16 as raw int16 bits under the interpreter."""
    return t.view(torch.int16) if _bf16_bits(t) else t


def _parameters(threshold, center, C):
    """(threshold, center, per_channel): both per-tensor, or both expanded to (C,)."""
    per_channel = threshold.dim() == 1 or (center is not None and center.dim() == 1)
    if per_channel:
        threshold = threshold.expand(C).contiguous()
        center = None if center is None else center.expand(C).contiguous()
    return threshold, center, per_channel


def _elementwise_grid(layout, n_rows, n_cols, block_r, block_k):
    if layout == LAYOUT_FLAT:
        return (triton.cdiv(n_cols, block_k),)
    return (triton.cdiv(n_rows, block_r) * triton.cdiv(n_cols, block_k),)


def _elementwise_layout(x, threshold, center, channel_dim):
    """Launch geometry shared by the forward and backward kernels."""
    C = x.shape[channel_dim]
    threshold, center, per_channel = _parameters(threshold, center, C)
    if per_channel:
        x, layout, n_rows, n_cols, C = _geometry(x, channel_dim)
        block_r, block_k = tile_shape(n_rows, n_cols, CONFIG.tile, CONFIG.max_block_k)
    else:
        if not x.is_contiguous() and not x.movedim(channel_dim, -1).is_contiguous():
            x = x.contiguous()
        layout, n_rows, n_cols, block_r, block_k = LAYOUT_FLAT, 1, x.numel(), 1, CONFIG.tile
    return x, threshold, center, per_channel, layout, n_rows, n_cols, C, block_r, block_k


def remap_forward(x, threshold, center, act, channel_dim, out=None):
    """Launch the fused forward into ``out`` (default: a new tensor like ``x``; ``x`` itself for
    in place) and return it. Outputs always have ``torch.empty_like(x)``'s layout, as the ops'
    fake kernels promise; an ``x`` without a dense layout is computed on a contiguous copy."""
    y = torch.empty_like(x) if out is None else out
    if x.numel() == 0:
        return y
    dense, threshold, center, per_channel, layout, n_rows, n_cols, C, block_r, block_k = (
        _elementwise_layout(x, threshold, center, channel_dim))
    target = y if dense is x else torch.empty_like(dense)
    remap_fwd_kernel[_elementwise_grid(layout, n_rows, n_cols, block_r, block_k)](
        _kernel_view(dense), _kernel_view(target), threshold,
        threshold if center is None else center, n_rows, n_cols, C,
        ACT=ACT_CODES[act], LAYOUT=layout, HAS_CENTER=center is not None,
        PER_CHANNEL=per_channel, BF16_BITS=_bf16_bits(dense),
        MATH_F64=math_f64(act, dense.dtype),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=CONFIG.num_warps,
    )
    if target is not y:
        y.copy_(target)
    return y


def remap_backward(grad_y, x, threshold, center, act, channel_dim, straight_through):
    """Launch the backward: ``dx`` in ``x``'s dtype, laid out like ``torch.empty_like(x)``."""
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    dense, threshold, center, per_channel, layout, n_rows, n_cols, C, block_r, block_k = (
        _elementwise_layout(x, threshold, center, channel_dim))
    if grad_y.stride() != dense.stride():
        grad_y = torch.empty_like(dense, dtype=grad_y.dtype).copy_(grad_y)
    target = dx if dense is x else torch.empty_like(dense)
    remap_bwd_kernel[_elementwise_grid(layout, n_rows, n_cols, block_r, block_k)](
        _kernel_view(grad_y), _kernel_view(dense), _kernel_view(target), threshold,
        threshold if center is None else center, n_rows, n_cols, C,
        ACT=ACT_CODES[act], LAYOUT=layout, HAS_CENTER=center is not None,
        PER_CHANNEL=per_channel, STRAIGHT_THROUGH=bool(straight_through),
        BF16_BITS=_bf16_bits(dense), DY_BF16_BITS=_bf16_bits(grad_y),
        MATH_F64=math_f64(act, dense.dtype),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=CONFIG.num_warps,
    )
    if target is not dx:
        dx.copy_(target)
    return dx


def stats_partition(layout, n_rows, n_cols, C, config=None):
    """(block_r, block_k, span, n_parts, grid) of the statistics kernel.

    A function of the shape (and the fixed configuration) only, so the order in which the sums
    are accumulated, and hence their last bits, never depends on the device's size or load.
    """
    config = config or CONFIG
    if layout == LAYOUT_COLS:
        extent, max_block_k, min_span = n_rows, config.stats_max_block_k, config.stats_min_rows
    else:
        extent, max_block_k, min_span = n_rows // C, config.max_block_k, 1
    block_r, block_k = tile_shape(extent, n_cols, config.stats_tile, max_block_k)
    if layout == LAYOUT_COLS:
        per_step, column_blocks = block_k, triton.cdiv(n_cols, block_k)
    else:
        per_step, column_blocks = n_cols, C
    span = max(min_span, config.stats_work // per_step, block_r,
               triton.cdiv(extent, STATS_MAX_PARTS))
    span = triton.cdiv(span, block_r) * block_r
    n_parts = triton.cdiv(extent, span)
    return block_r, block_k, span, n_parts, (n_parts * column_blocks,)


def remap_stats(x, threshold, center, act, channel_dim):
    """Launch forward + statistics: ``(y, amax, remapped, count, sum, sumsq)``."""
    C = x.shape[channel_dim]
    count = torch.full((C,), x.numel() // C if C else 0, dtype=torch.int64, device=x.device)
    amax = torch.zeros(C, dtype=torch.float32, device=x.device)
    remapped = torch.zeros(C, dtype=torch.int64, device=x.device)
    total = torch.zeros(C, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros(C, dtype=torch.float64, device=x.device)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y, amax, remapped, count, total, total_sq
    threshold, center, per_channel = _parameters(threshold, center, C)
    dense, layout, n_rows, n_cols, C = _geometry(x, channel_dim)
    target = y if dense is x else torch.empty_like(dense)
    block_r, block_k, span, n_parts, grid = stats_partition(layout, n_rows, n_cols, C)
    ws_amax = torch.empty((n_parts, C), dtype=torch.int32, device=x.device)
    ws_remapped = torch.empty((n_parts, C), dtype=torch.int64, device=x.device)
    ws_sum = torch.empty((n_parts, C), dtype=torch.float64, device=x.device)
    ws_sumsq = torch.empty((n_parts, C), dtype=torch.float64, device=x.device)
    remap_stats_kernel[grid](
        _kernel_view(dense), _kernel_view(target), threshold,
        threshold if center is None else center, ws_amax, ws_remapped, ws_sum, ws_sumsq,
        n_rows, n_cols, C, span, n_parts,
        ACT=ACT_CODES[act], LAYOUT=layout, HAS_CENTER=center is not None,
        PER_CHANNEL=per_channel, BF16_BITS=_bf16_bits(dense),
        MATH_F64=math_f64(act, dense.dtype),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=CONFIG.num_warps,
    )
    stats_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK),)](
        ws_amax, ws_remapped, ws_sum, ws_sumsq, amax, remapped, total, total_sq, C, n_parts,
        BLOCK_C=FINALIZE_BLOCK, num_warps=4,
    )
    if target is not y:
        y.copy_(target)
    return y, amax, remapped, count, total, total_sq
