"""Fit the piecewise polynomials the CPU kernels evaluate GELU, tanh-GELU, SiLU and the first
two's derivatives with in fp32.

Writes ``csrc/activation_tables.h``; run it again (``python scripts/fit_activation_tables.py``)
only to change the fit. It needs numpy and scipy (a dependency of scikit-learn).

Why tables: an fp32 evaluation through ``erf`` / ``exp`` either cancels (PyTorch's
``1 + erf`` for negative x) or rounds its Gaussian argument (``exp(-x^2/2)``), several ulps off
either way, while the accuracy rule (``lipkern.testing``) needs every result within 1.5 ulp of
the truth. Evaluating in float64 gets there at about three times the cost of ``F.gelu``. Here
the activation itself is approximated near each point of a grid, so no intermediate cancels:

    q = round(x / w),  h = x - q w  (exact, |h| <= w/2),
    act(x) = hi[q] + (lo[q] + c1[q] h + h (h P_q(h)))

with ``hi + lo`` the activation at ``q w`` in two floats and ``P_q`` a degree-(DEGREE-2)
polynomial. The centre interval has ``hi = lo = -0``, so ``act(+-0)`` keeps the sign of zero and
``0.5 h`` is formed exactly, which keeps tiny inputs relative-accurate. Outside the grid
(``|x| >= (GRID/2 - 1/2) w``) the kernels use their float64 path.

The fit is a weighted least-squares fit on Chebyshev nodes (relative error) with each
coefficient rounded to fp32 before the next is refitted, so later terms absorb earlier
roundings. The script reports the worst error of the fp32 evaluation it emulates, in ulps of the
float64 truth; the kernels' own error is tested in tests/test_cpu_kernels.py.

The derivatives of GELU and tanh-GELU (the backward's act'(x)) are fitted the same way,
weighted by 1 / (1 + |x|) instead: they cross zero (GELU' near x = -0.75), where no fp32
evaluation is relative-accurate, and the backward's accuracy rule (``lipkern.testing.compare_backward``) asks
for |dy| (1 + |x|) 8 2^-24. Their error is reported in units of (1 + |x|) 2^-24. SiLU's
derivative needs no table: s (1 + x (1 - s)) with s = sigmoid(x) in fp32 is within 2 of those
units at a third of a polynomial's cost (csrc/cpu/act_grid.h).

Off its grid GELU's derivative is [x > 0] + s(a) on the right and -s(a) on the left, with
a = |x| and s(a) = a phi(a) - Q(a) (Q = 1 - Phi), which falls from 8e-4 at a = 3.875 to below
0.18 (1 + a) 2^-24 from a = 5.875 on, where the kernels take the limits. In between a second
grid over a (``GeluGradTail``: GRID columns of w = 1/16 centred at (k + 1/2) w, a cubic in h
each, fitted for relative error) gives s within 4.3e-6 relative, 0.0013 (1 + a) 2^-24 absolute,
so that nearly only the rounding of 1 + s to fp32 shows: its error is reported over every fp32
of the range.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.special import erfc, expit

GRID = 32  # intervals: one AVX-512 two-register permute looks up 32 entries
DEGREE = 6
SQRT_2_OVER_PI = np.sqrt(2 / np.pi)


def gelu(x):
    return 0.5 * x * erfc(-x / np.sqrt(2))


def gelu_tanh(x):
    return x * expit(2 * SQRT_2_OVER_PI * (x + 0.044715 * x**3))


def silu(x):
    return x * expit(x)


def gelu_grad(x):
    return 0.5 * erfc(-x / np.sqrt(2)) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def gelu_grad_tail(a):
    """s(a) = GELU'(a) - 1 = -GELU'(-a), for a > 0."""
    return a * np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi) - 0.5 * erfc(a / np.sqrt(2))


def gelu_tanh_grad(x):
    s = expit(2 * SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    du = SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return s + 2 * x * du * s * (1 - s)


# name in the header, function, grid step w (a power of two, so x / w and q w are exact)
ACTIVATIONS = (("Gelu", gelu, 0.25), ("GeluTanh", gelu_tanh, 0.25), ("Silu", silu, 0.5))
DERIVATIVES = (
    ("GeluGrad", gelu_grad, 0.25),
    ("GeluTanhGrad", gelu_tanh_grad, 0.25),
)


def chebyshev_nodes(w: float) -> np.ndarray:
    """The offsets h in [-w/2, w/2] every column is fitted on."""
    return np.cos(np.pi * (np.arange(400) + 0.5) / 400) * w / 2


def fit_rounded(h: np.ndarray, target: np.ndarray, weight: np.ndarray, powers: range) -> list:
    """Coefficients of h**p (p in powers) for target, weighted least squares, each rounded to
    fp32 before the next ones are refitted, so later terms absorb earlier roundings."""
    coefs: list[np.float32] = []
    for j in powers:
        fitted = sum(np.float64(c) * h**p for p, c in zip(powers, coefs))
        basis = np.stack([h**p for p in range(j, powers.stop)], 1)
        sol, *_ = np.linalg.lstsq(basis * weight[:, None], (target - fitted) * weight, rcond=None)
        coefs.append(np.float32(sol[0]))
    return coefs


def fit_table(f, w: float, derivative: bool = False) -> np.ndarray:
    """Rows: hi, lo, c1 .. c_DEGREE; one column per grid point q = -GRID/2 .. GRID/2 - 1."""
    table = np.zeros((DEGREE + 2, GRID), np.float32)
    h = chebyshev_nodes(w)
    for col in range(GRID):
        a = (col - GRID // 2) * w
        y = f(a + h)
        fa = f(a)
        hi = np.float32(fa) if a or derivative else np.float32(-0.0)
        lo = np.float32(fa - np.float64(hi)) if a or derivative else np.float32(-0.0)
        weight = 1 / (1 + np.abs(a + h)) if derivative else 1 / np.abs(y)
        table[:, col] = [hi, lo, *fit_rounded(h, y - fa, weight, range(1, DEGREE + 1))]
    return table


# GELU's derivative tail grid: its first centre's column index k, step, degree, and the end of
# the range (where the derivative becomes its limit).
TAIL_FIRST_K, TAIL_STEP, TAIL_DEGREE, TAIL_END = 62, 1 / 16, 3, 5.875


def fit_tail_table() -> np.ndarray:
    """Rows: c0 .. c_TAIL_DEGREE of s((k + 1/2) w + h); column k stored at (k + GRID/2) mod GRID,
    where the kernels' grid point (rounding x / w with an offset of GRID/2) reads it."""
    table = np.zeros((TAIL_DEGREE + 1, GRID), np.float32)
    h = chebyshev_nodes(TAIL_STEP)
    for k in range(TAIL_FIRST_K, TAIL_FIRST_K + GRID):
        y = gelu_grad_tail((k + 0.5) * TAIL_STEP + h)
        table[:, (k + GRID // 2) % GRID] = fit_rounded(h, y, 1 / y, range(TAIL_DEGREE + 1))
    return table


def evaluate_tail(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The kernels' fp32 evaluation of GELU's derivative from the tail grid, emulated (for
    3.875 <= |x| < TAIL_END)."""
    x = x.astype(np.float32)
    u = (np.abs(x) - np.float32(TAIL_STEP / 2)).astype(np.float32)  # exact
    q = np.rint(u / np.float32(TAIL_STEP)).astype(np.int64)
    h = (u - q.astype(np.float32) * np.float32(TAIL_STEP)).astype(np.float32)
    col = (q + GRID // 2) % GRID
    s = table[-1, col]
    for k in range(TAIL_DEGREE - 1, -1, -1):
        s = _fma32(s, h, table[k, col])
    return np.where(x > 0, (np.float32(1) + s).astype(np.float32), -s)


def worst_tail(table: np.ndarray) -> float:
    """Over every fp32 with 3.875 <= |x| < TAIL_END, in (1 + |x|) 2^-24."""
    first, end = np.array([3.875, TAIL_END], np.float32).view(np.int32)
    right = np.arange(first, end, dtype=np.int32).view(np.float32)
    x = np.concatenate([right, -right])
    a = np.abs(x.astype(np.float64))
    truth = np.where(x > 0, 1 + gelu_grad_tail(a), -gelu_grad_tail(a))
    return float((np.abs(evaluate_tail(table, x) - truth) / ((1 + a) * 2.0**-24)).max())


def _fma32(a, b, c):
    # fp32 products are exact in float64; the sum then rounds twice, which shifts the estimate
    # by far less than an ulp.
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def evaluate(table: np.ndarray, w: float, x: np.ndarray) -> np.ndarray:
    """The kernels' fp32 evaluation, emulated (for |x| inside the grid)."""
    x = x.astype(np.float32)
    q = np.rint(x / np.float32(w)).astype(np.int32)
    col = q + GRID // 2
    h = (x - q.astype(np.float32) * np.float32(w)).astype(np.float32)
    p = table[-1, col]
    for k in range(DEGREE, 2, -1):
        p = _fma32(p, h, table[k, col])
    hp = (h.astype(np.float64) * p).astype(np.float32)
    r = _fma32(h, hp, _fma32(table[2, col], h, table[1, col]))
    return (r.astype(np.float64) + table[0, col]).astype(np.float32)


def worst_ulps(f, w: float, table: np.ndarray, derivative: bool = False) -> float:
    rng = np.random.default_rng(0)
    bound = (GRID / 2 - 0.5) * w
    x = np.concatenate(
        [
            rng.uniform(-bound, bound, 3_000_000),
            np.linspace(-bound, bound, 2_000_001),
            rng.uniform(-1e-3, 1e-3, 100_000),
        ]
    ).astype(np.float32)
    x = x[np.abs(x) < bound]
    truth = f(x.astype(np.float64))
    if derivative:
        ulp = (1 + np.abs(x.astype(np.float64))) * 2.0**-24
    else:
        ulp = np.spacing(np.abs(truth.astype(np.float32))).astype(np.float64)
    return float((np.abs(evaluate(table, w, x).astype(np.float64) - truth) / ulp).max())


def _c_float(v: np.float32) -> str:
    mantissa, exponent = float(v).hex().split("p")
    return f"{mantissa.rstrip('0').rstrip('.')}p{exponent}f"


def _c_floats(row: np.ndarray) -> str:
    return ", ".join(_c_float(v) for v in row)


def render(tables, tail_table) -> str:
    lines = [
        "// Generated by scripts/fit_activation_tables.py; do not edit. Piecewise polynomials for",
        "// GELU, tanh-GELU, SiLU and the first two's derivatives in fp32 (the method and its error are",
        "// described there).",
        "#pragma once",
        "",
        "namespace lipkern {",
        "",
        f"constexpr int kActGrid = {GRID};",
        f"constexpr int kActTableRows = {DEGREE + 2};  // hi, lo, c1 .. c{DEGREE}",
        "",
        "struct ActTable {",
        "  float step;      // w: x = q w + h",
        "  float inv_step;  // 1 / w",
        "  float bound;     // |x| >= bound is outside the grid",
        "  float coef[kActTableRows][kActGrid];",
        "};",
        "",
        f"constexpr int kActTailRows = {TAIL_DEGREE + 1};  // c0 .. c{TAIL_DEGREE}",
        "",
        "struct ActTailTable {",
        "  float step;      // w: |x| - w / 2 = q w + h",
        "  float inv_step;  // 1 / w",
        "  float end;       // |x| >= end takes the limits",
        "  float coef[kActTailRows][kActGrid];",
        "};",
        "",
    ]
    for name, w, table, worst in tables:
        unit = "(1 + |x|) 2^-24" if name.endswith("Grad") else "ulp"
        lines.append(f"// Worst error of the emulated fp32 evaluation: {worst:.2f} {unit}.")
        lines.append(f"inline constexpr ActTable k{name}Table = {{")
        lines.append(f"    {_c_float(w)}, {_c_float(1 / w)}, {_c_float((GRID / 2 - 0.5) * w)},")
        lines.append("    {")
        for row in table:
            lines.append(f"        {{{_c_floats(row)}}},")
        lines.append("    }};")
        lines.append("")
    tail, worst = tail_table
    lines.append(f"// Worst error of the emulated fp32 evaluation: {worst:.4f} (1 + |x|) 2^-24.")
    lines.append("inline constexpr ActTailTable kGeluGradTailTable = {")
    lines.append(f"    {_c_float(TAIL_STEP)}, {_c_float(1 / TAIL_STEP)}, {_c_float(TAIL_END)},")
    lines.append("    {")
    for row in tail:
        lines.append(f"        {{{_c_floats(row)}}},")
    lines.append("    }};")
    lines.append("")
    lines.append("}  // namespace lipkern")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "csrc" / "activation_tables.h"
    )
    args = parser.parse_args()
    tables = []
    for (name, f, w), derivative in [(a, False) for a in ACTIVATIONS] + [(d, True) for d in DERIVATIVES]:
        table = fit_table(f, w, derivative)
        worst = worst_ulps(f, w, table, derivative)
        print(f"{name}: worst {worst:.3f} over |x| < {(GRID / 2 - 0.5) * w}")
        tables.append((name, w, table, worst))
    tail = fit_tail_table()
    worst = worst_tail(tail)
    print(f"GeluGradTail: worst {worst:.4f} over 3.875 <= |x| < {TAIL_END}")
    args.out.write_text(render(tables, (tail, worst)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
