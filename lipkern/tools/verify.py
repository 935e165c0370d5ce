"""``lipkern verify``: every available backend against the reference, on hostile inputs.

For each backend, op (forward, forward+stats, in-place forward, backward), activation and dtype,
the inputs mix random values with the special ones a kernel gets wrong first: NaN, +-inf, -0.0,
subnormals of the storage dtype and of fp32, fp16's largest value and the dtype's largest value,
thresholds of 0 and +inf, and elements whose ``|a - c|`` equals the threshold exactly (the
threshold is taken from the reference activation of a chosen element, so the tie is exact in
fp32). Several layouts are covered: ``[N, C]`` with a per-channel threshold, channels_last NCHW
with a scalar threshold and a per-channel centre, and (full run) contiguous NCHW and a strided
view. Special values sit in a subset of the channels so that the other channels keep finite
statistics.

Values, masks and statistics are judged by :mod:`lipkern.testing`, with the rules the test
suite uses (ReLU and identity bit-exact, smooth activations within 1 ulp or no less accurate than
the reference against fp64, masks equal outside the tie band, statistics by
:func:`lipkern.testing.compare_stats`); the special values, layouts and tie thresholds come
from there too.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

import lipkern
from lipkern import testing
from lipkern.ops import reference
from lipkern.ops.activations import ACTIVATIONS
from lipkern.tools.table import format_table as _table
from lipkern.ulp import NAN_MISMATCH, same_bits

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ("fwd", "stats", "inplace", "bwd")


@dataclass
class Case:
    """One input configuration (normalised arguments, as the ops receive them)."""

    name: str
    x: torch.Tensor
    threshold: torch.Tensor
    center: Optional[torch.Tensor]
    channel_dim: int
    grad_y: torch.Tensor

    def to(self, device) -> "Case":
        return Case(
            self.name,
            self.x.to(device),
            self.threshold.to(device),
            None if self.center is None else self.center.to(device),
            self.channel_dim,
            self.grad_y.to(device),
        )


@dataclass
class Row:
    """The verdict for one (op, act, dtype, backend, device), aggregated over the cases."""

    op: str
    act: str
    dtype: str
    backend: str
    device: str
    max_ulp: int = 0
    max_ulp_exact: int = 0
    mask_mismatches: int = 0
    failures: int = 0
    tie_band: int = 0
    cases: int = 0
    notes: dict = field(default_factory=dict)  # message -> names of the cases it came from

    @property
    def passed(self) -> bool:
        return self.failures == 0 and self.mask_mismatches == 0 and not self.notes

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def add(self, comparison: testing.Comparison) -> None:
        self.max_ulp = max(self.max_ulp, comparison.max_ulp)
        self.max_ulp_exact = max(self.max_ulp_exact, comparison.max_ulp_exact)
        self.mask_mismatches += comparison.mask_mismatches
        self.failures += comparison.failures
        self.tie_band += comparison.tie_band

    def note(self, case: Case, message: str) -> None:
        self.notes.setdefault(message, []).append(case.name)

    def describe(self) -> str:
        """What went wrong, for the table's last column."""
        parts = [f"{self.failures} bad elements"] if self.failures else []
        parts += [f"{message} ({', '.join(cases)})" for message, cases in self.notes.items()]
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


# --------------------------------------------------------------------------------------------
# Inputs


def _logical_matrix(rows: int, channels: int, dtype, gen) -> torch.Tensor:
    """An fp32 [rows, C] matrix (C = channel axis), specials in the first half of the channels."""
    m = torch.randn(rows, channels, generator=gen) * 2.5
    nonfinite, finite = testing.special_values(dtype)
    nonfinite_channels = max(1, channels // 4)
    for k in range(nonfinite_channels):
        m[k % rows, k] = nonfinite[k % len(nonfinite)]
    for i, value in enumerate(finite):
        k = nonfinite_channels + i % max(1, channels // 2 - nonfinite_channels)
        m[i % rows, k] = value
    return m


def _layout(m: torch.Tensor, layout: str, nhw: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    """Lay the logical [rows, C] matrix out as the op input; returns (x, channel_dim)."""
    if layout in ("nc", "strided"):
        return testing.lay_out(m, "contiguous" if layout == "nc" else "strided"), 1
    n, h, w = nhw
    nchw = m.reshape(n, h, w, m.shape[1]).permute(0, 3, 1, 2)
    return testing.lay_out(nchw, "channels_last" if layout == "nchw_cl" else "contiguous"), 1


# name, layout, rows or (N, H, W), channels, per-channel threshold, centre kind
_QUICK_SPECS = [
    ("nc/t(C)", "nc", 48, 24, True, None),
    ("nchw_cl/t()/c(C)", "nchw_cl", (2, 4, 5), 12, False, "channel"),
]
_FULL_SPECS = [
    ("nc/t(C)", "nc", 300, 40, True, None),
    ("nchw_cl/t()/c(C)", "nchw_cl", (3, 7, 9), 24, False, "channel"),
    ("nchw/t(C)/c()", "nchw", (2, 5, 6), 16, True, "scalar"),
    ("strided/t(C)/c(C)", "strided", 64, 20, True, "channel"),
    # From 1024 elements per channel the C++ backward of the 16-bit smooth activations decides
    # its mask on x's bits instead of on act(x).
    ("nc/t(C)/c(C) 1536 rows", "nc", 1536, 8, True, "channel"),
]


# Case ``index`` seeds its generator with ``seed * _SEED_STRIDE + index``, which
# torch.Generator.manual_seed takes only in [-2^63, 2^64): the seeds that keep every case there.
_SEED_STRIDE = 1000
SEEDS = range(-(2**63 // _SEED_STRIDE), 2**64 // _SEED_STRIDE)


def seed_argument(text: str) -> int:
    """An argparse type for ``--seed``: an integer in :data:`SEEDS`."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if seed not in SEEDS:
        raise argparse.ArgumentTypeError(
            f"must be between {SEEDS.start} and {SEEDS.stop - 1}, got {text}"
        )
    return seed


def make_cases(dtype: torch.dtype, act: str, quick: bool = False, seed: int = 0) -> list[Case]:
    """The verify inputs for one dtype and activation (on the CPU)."""
    cases = []
    for index, (name, layout, size, channels, per_channel, center_kind) in enumerate(
        _QUICK_SPECS if quick else _FULL_SPECS
    ):
        gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + index)
        rows = size if isinstance(size, int) else size[0] * size[1] * size[2]
        m = _logical_matrix(rows, channels, dtype, gen).to(dtype)
        if center_kind == "channel":
            center = torch.randn(channels, generator=gen) * 0.3
            center[::3] = 0.0
        elif center_kind == "scalar":
            center = torch.tensor(0.25)
        else:
            center = None
        a = reference.activation_reference(m.float(), act)
        c = torch.zeros(()) if center is None else center
        c_rows = c if c.dim() == 0 else c.expand(rows, channels)
        if per_channel:
            scale = a.abs().nan_to_num(0.0, 0.0, 0.0).amax(dim=0).clamp_min(1.0)
            threshold = scale * torch.empty(channels).uniform_(0.02, 0.3, generator=gen)
            half = channels // 2
            threshold[half] = 0.0
            threshold[half + 1] = float("inf")
            tie_channels = [k for k in range(channels) if k != half and k != half + 1]
            for k, tie in testing.tie_thresholds(a, c_rows, tie_channels[::2], gen).items():
                threshold[k] = tie
        else:
            ties = testing.tie_thresholds(a, c_rows, [channels - 1], gen)
            threshold = torch.tensor(ties.get(channels - 1, 0.5))
        x, channel_dim = _layout(m, layout, size if isinstance(size, tuple) else (0, 0, 0))
        grad_y = torch.randn(x.shape, generator=gen).to(dtype)
        cases.append(Case(name, x, threshold.float(), center, channel_dim, grad_y))
    return cases


# --------------------------------------------------------------------------------------------
# Backends under test


class BackendUnderTest:
    """Runs the ops of one backend through the public API (what users call).

    The backward goes through autograd (``y.backward``), so it checks the registered autograd
    formula and the backend's backward kernel together.
    """

    def __init__(self, name: str):
        self.name = name

    def forward(self, case: Case, act: str) -> torch.Tensor:
        return lipkern.remap_act(
            case.x, case.threshold, act, case.center, case.channel_dim, backend=self.name
        )

    def stats(self, case: Case, act: str):
        y, stats = lipkern.remap_act_stats(
            case.x, case.threshold, act, case.center, case.channel_dim, backend=self.name
        )
        return y, stats

    def inplace(self, case: Case, act: str) -> torch.Tensor:
        x = case.x.clone()
        with torch.no_grad():
            lipkern.remap_act_(x, case.threshold, act, case.center, case.channel_dim, self.name)
        return x

    def backward(self, case: Case, act: str, straight_through: bool) -> torch.Tensor:
        x = case.x.detach().clone().requires_grad_(True)
        y = lipkern.remap_act(
            x,
            case.threshold,
            act,
            case.center,
            case.channel_dim,
            backend=self.name,
            straight_through=straight_through,
        )
        y.backward(case.grad_y)
        return x.grad


# --------------------------------------------------------------------------------------------
# Checks


def check_stats(row: Row, case: Case, act: str, y, stats) -> None:
    """Add the forward comparison of ``y`` and the statistics' verdict to ``row``."""
    x, t, c, cd = case.x, case.threshold, case.center, case.channel_dim
    row.add(testing.compare_forward(y, x, t, c, act, cd))
    verdict = testing.compare_stats(stats, x, t, c, act, cd)
    row.mask_mismatches += verdict.mask_mismatches
    for problem in verdict.problems:
        row.note(case, problem)


def _note_signed_zeros(row: Row, case: Case, act: str, out, ref) -> None:
    """Name the usual cause of a bit-exactness failure: +0 where the reference has -0 or back."""
    if act not in testing.EXACT_ACTIVATIONS:
        return
    flipped = int(((out == 0) & (ref == 0) & ~same_bits(out, ref)).sum())
    if flipped:
        row.note(case, f"{flipped} zeros of the wrong sign")


def _run_op(row: Row, backend: BackendUnderTest, op: str, case: Case, act: str, full: bool):
    x, t, c, cd = case.x, case.threshold, case.center, case.channel_dim
    if op in ("fwd", "inplace"):
        y = backend.forward(case, act) if op == "fwd" else backend.inplace(case, act)
        row.add(testing.compare_forward(y, x, t, c, act, cd))
        _note_signed_zeros(row, case, act, y, reference.remap_act_reference(x, t, c, act, cd))
    elif op == "stats":
        check_stats(row, case, act, *backend.stats(case, act))
    else:
        # The straight-through gradient skips the mask: checked in the full run only.
        for st in (False, True) if full else (False,):
            dx = backend.backward(case, act, st)
            row.add(testing.compare_backward(dx, case.grad_y, x, t, c, act, cd, st))
            ref = reference.remap_act_backward_reference(case.grad_y, x, t, c, act, cd, st)
            _note_signed_zeros(row, case, act, dx, ref)
    row.cases += 1


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class Report:
    rows: list
    backends: list
    skipped: dict
    devices: list
    seconds: float
    quick: bool

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "quick": self.quick,
            "devices": self.devices,
            "backends": self.backends,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "torch": torch.__version__,
            "legend": legend(self),
            "rows": [r.as_dict() for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def default_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_to_test(device: str, requested: Optional[Iterable[str]] = None):
    """(names to run, {name: reason} for the requested or known ones that cannot run here).

    The reference is compared with itself only when asked for explicitly.
    """
    available = lipkern.available_backends(device)
    wanted = list(requested) if requested else [b for b in available if b != "reference"]
    skipped = {}
    expected = ("cpu", "triton") if torch.device(device).type == "cpu" else ("triton",)
    for name in wanted if requested else expected:
        if name not in available:
            skipped[name] = _unavailable_reason(name, device)
    return [b for b in wanted if b in available], skipped


def _unavailable_reason(name: str, device: str) -> str:
    """Why backend ``name`` cannot run on ``device``, in the public API's own words."""
    # A call on one element raises the error a user would get, naming the cause.
    try:
        lipkern.remap_act(torch.zeros(1, device=device), 0.0, backend=name)
    except (RuntimeError, AssertionError) as error:
        return str(error)
    return "not available"


def run_verify(
    backends: Optional[Sequence] = None,
    acts: Sequence[str] = ACTIVATIONS,
    dtypes: Sequence[str] = tuple(DTYPES),
    ops: Sequence[str] = OPS,
    devices: Optional[Sequence[str]] = None,
    quick: bool = False,
    seed: int = 0,
    progress: Optional[Callable[[Row], None]] = None,
) -> Report:
    """Run the checks; ``backends`` are names or :class:`BackendUnderTest` objects."""
    start = time.perf_counter()
    devices = list(devices or default_devices())
    rows, names, skipped = [], [], {}
    for device in devices:
        if backends is None or all(isinstance(b, str) for b in backends):
            chosen, missing = backends_to_test(device, backends)
            skipped.update({f"{k}@{device}": v for k, v in missing.items()})
            under_test = [BackendUnderTest(name) for name in chosen]
        else:
            under_test = list(backends)
        names += [f"{b.name}@{device}" for b in under_test]
        for dtype_name in dtypes:
            for act in acts:
                cases = [
                    case.to(device)
                    for case in make_cases(DTYPES[dtype_name], act, quick=quick, seed=seed)
                ]
                for backend in under_test:
                    for op in ops:
                        row = Row(op, act, dtype_name, backend.name, device)
                        for case in cases:
                            try:
                                with warnings.catch_warnings():
                                    # The Triton interpreter runs kernels in numpy, which warns
                                    # on the overflows that inf / NaN inputs are here to cause.
                                    warnings.filterwarnings(
                                        "ignore", category=RuntimeWarning, module=r"triton\."
                                    )
                                    _run_op(row, backend, op, case, act, full=not quick)
                            except Exception as error:  # noqa: BLE001 - reported as a FAIL row
                                first_line = (str(error).strip().splitlines() or [""])[0]
                                row.note(case, f"{type(error).__name__}: {first_line[:160]}")
                        rows.append(row)
                        if progress is not None:
                            progress(row)
    return Report(rows, names, skipped, devices, time.perf_counter() - start, quick)


def format_table(report: Report) -> str:
    header = ("op", "act", "dtype", "backend", "ulp vs torch", "ulp vs f64", "mask mism", "tie band",
              "verdict", "notes")
    body = [
        (
            r.op,
            r.act,
            r.dtype,
            r.backend if r.device == "cpu" else f"{r.backend}@{r.device}",
            _ulp_text(r.max_ulp),
            _ulp_text(r.max_ulp_exact),
            r.mask_mismatches,
            r.tie_band,
            r.verdict,
            r.describe(),
        )
        for r in report.rows
    ]
    lines = [_table(header, body), ""]
    failed = sum(not r.passed for r in report.rows)
    checks = f"{len(report.rows)} check" + ("" if len(report.rows) == 1 else "s")
    lines.append(
        f"{checks}, {failed} FAIL, backends {', '.join(report.backends) or 'none'}"
        f", {report.seconds:.1f} s" + (" (quick)" if report.quick else "")
    )
    lines += [f"{term}: {meaning}" for term, meaning in legend(report).items()]
    for name, reason in report.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def legend(report: Report) -> dict[str, str]:
    """What the table's terms mean, for those that ``report``'s rows need explained (the
    table prints them under it, the JSON holds them as ``legend``)."""
    entries = {}
    if any(r.passed and 1 < r.max_ulp < NAN_MISMATCH for r in report.rows):
        entries["ulp vs torch"] = (
            "the largest distance from PyTorch's fp32 reference; a smooth activation also passes "
            "where it is no further from the float64 value than that reference is (plus 1 ulp), "
            "as where PyTorch's formula cancels, so a PASS row can show more than 1; ulp vs f64: "
            "the largest distance from the float64 value rounded to the dtype"
        )
    if any(r.max_ulp >= NAN_MISMATCH for r in report.rows):
        entries["NaN-vs-num"] = (
            f"(max_ulp {NAN_MISMATCH} in the JSON) at some element one of the backend's value and "
            "PyTorch's reference is NaN and the other a number. A NaN from the backend against a "
            "number fails, and so does a number where the reference's forward is NaN. It passes "
            "only in a backward, where PyTorch's fp32 formula gives NaN for a finite input whose "
            "derivative is finite (GELU-tanh's once x * x overflows float32, |x| above about "
            "1.8e19, where the derivative is 1 or 0), and only if the backend's number is within "
            "the backward rule's absolute bound of the float64 value "
            f"({8 * (1 + testing.DERIVATIVE_TERMS_FLAT_FROM):g} x 2^-24 x |dy| there, plus an ulp; "
            "of either remap decision in the tie band)"
        )
    return entries


def _ulp_text(ulps: int) -> str:
    return "NaN-vs-num" if ulps >= NAN_MISMATCH else str(ulps)
