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

Values and masks are judged by :mod:`lipkern.testing` (the rules the test suite uses: ReLU and
identity bit-exact, transcendental activations within 1 ulp or no less accurate than the
reference against fp64, masks equal outside the tie band). Statistics: ``count`` exact;
``remapped`` may differ from the reference only by the number of tie-band elements of the
channel; ``amax`` by :func:`lipkern.testing.amax_within_tolerance` (the forward's rule);
``sum`` and ``sumsq`` within ``1e-12 * sum|a|`` (resp. ``sum a^2``) of an fp64 sum of the
reference's ``a``, plus, for transcendental activations, the per-element allowance
``ulp32(a) + 2 |a - a64|`` that the value rule grants each ``a`` (a backend whose ``erf`` differs
from PyTorch's by an ulp is right, and its sum moves with it) - or, where the reference's fp32
activation is the worse one (it overflows at bf16's largest value), within ``1e-12`` plus one
fp32 ulp per element of the sum of the fp64 activation.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

import lipkern
from lipkern import testing
from lipkern.ops import api, reference
from lipkern.ulp import NAN_MISMATCH, same_bits, ulp_size

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ("fwd", "stats", "inplace", "bwd")
SUM_RTOL = 1e-12
# fp16's largest finite value: it overflows in intermediate fp16 arithmetic that a kernel must
# avoid, and is a plain large number in bf16/fp32.
FP16_MAX = 65504.0


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


def _special_values(dtype: torch.dtype) -> tuple[list[float], list[float]]:
    """(non-finite values, finite special values) for inputs of ``dtype``."""
    info = torch.finfo(dtype)
    smallest_subnormal = float(info.smallest_normal) * float(info.eps)
    finite = [
        -0.0,
        0.0,
        smallest_subnormal,
        -smallest_subnormal,
        float(info.smallest_normal),
        -3.0 * smallest_subnormal,
        1e-40,  # an fp32 subnormal (flushes to 0 in fp16, stays subnormal in bf16)
        FP16_MAX,
        -FP16_MAX,
        float(info.max),
        -float(info.max),
        -30.0,  # GELU / SiLU tails, where 1 + erf(x) cancels
        -9.0,
        9.0,
    ]
    return [float("nan"), float("inf"), float("-inf")], finite


def _logical_matrix(rows: int, channels: int, dtype, gen) -> torch.Tensor:
    """An fp32 [rows, C] matrix (C = channel axis), specials in the first half of the channels."""
    m = torch.randn(rows, channels, generator=gen) * 2.5
    nonfinite, finite = _special_values(dtype)
    nonfinite_channels = max(1, channels // 4)
    for k in range(nonfinite_channels):
        m[k % rows, k] = nonfinite[k % len(nonfinite)]
    for i, value in enumerate(finite):
        k = nonfinite_channels + i % max(1, channels // 2 - nonfinite_channels)
        m[i % rows, k] = value
    return m


def _tie_thresholds(a: torch.Tensor, c: torch.Tensor, channels: Sequence[int], gen) -> dict:
    """For channels of the [rows, C] activation ``a``: ``|a - c|`` of one finite, non-zero
    element (the exact fp32 tie that element then sits on)."""
    distance = (a - c).abs()
    ties = {}
    for k in channels:
        candidates = torch.nonzero(distance[:, k].isfinite() & (distance[:, k] > 0)).flatten()
        if candidates.numel():
            pick = candidates[torch.randint(candidates.numel(), (), generator=gen)]
            ties[k] = float(distance[pick, k])
    return ties


def _layout(m: torch.Tensor, layout: str, nhw: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    """Lay the logical [rows, C] matrix out as the op input; returns (x, channel_dim)."""
    if layout == "nc":
        return m, 1
    if layout == "strided":
        wide = torch.zeros(m.shape[0], 2 * m.shape[1], dtype=m.dtype)
        wide[:, ::2] = m
        return wide[:, ::2], 1
    n, h, w = nhw
    nhwc = m.reshape(n, h, w, m.shape[1])
    nchw = nhwc.permute(0, 3, 1, 2)  # channels_last strides, no copy
    return (nchw if layout == "nchw_cl" else nchw.contiguous()), 1


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
]


def make_cases(dtype: torch.dtype, act: str, quick: bool = False, seed: int = 0) -> list[Case]:
    """The verify inputs for one dtype and activation (on the CPU)."""
    cases = []
    for index, (name, layout, size, channels, per_channel, center_kind) in enumerate(
        _QUICK_SPECS if quick else _FULL_SPECS
    ):
        gen = torch.Generator().manual_seed(seed * 1000 + index)
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
            for k, tie in _tie_thresholds(a, c_rows, tie_channels[::2], gen).items():
                threshold[k] = tie
        else:
            ties = _tie_thresholds(a, c_rows, [channels - 1], gen)
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


def _per_channel_rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[C, everything else] view of an elementwise tensor."""
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


def _same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b) | (a.isnan() & b.isnan())


def check_stats(row: Row, case: Case, act: str, y, stats) -> None:
    """Add the forward comparison of ``y`` and the statistics checks to ``row``."""
    x, t, c, cd = case.x, case.threshold, case.center, case.channel_dim
    row.add(testing.compare_forward(y, x, t, c, act, cd))
    _, _, remapped_ref, count_ref, sum_ref, sumsq_ref = reference.remap_act_stats_reference(
        x, t, c, act, cd
    )
    a, _, _, band = testing.reference_mask_and_band(x, t, c, act, cd)
    if not torch.equal(stats.count.cpu(), count_ref.cpu()):
        row.note(case, "count differs")
    slack = _per_channel_rows(band, cd).sum(dim=1).to(torch.int64)
    excess = ((stats.remapped - remapped_ref).abs() - slack).clamp_min(0)
    row.mask_mismatches += int(excess.sum())

    if not bool(testing.amax_within_tolerance(stats.amax, x, act, cd).all()):
        row.note(case, "amax outside tolerance")
    # Sums: within the tolerance of the reference's, or, where the reference's fp32 activation
    # is worse (it overflows to inf at bf16's largest value, for instance), of the fp64 truth's.
    a64 = a.double()
    truth = testing.activation_float64(x, act)
    if act in testing.EXACT_ACTIVATIONS:
        allow = torch.zeros_like(a64)
    else:
        allow = ulp_size(a, torch.float32) + 2 * (a64 - truth).abs()
        allow = torch.where(a.isfinite() & truth.isfinite(), allow, 0.0)
    truth_allow = torch.where(truth.isfinite(), ulp_size(truth, torch.float32), 0.0)
    for name, got, want in (("sum", stats.sum, sum_ref), ("sumsq", stats.sumsq, sumsq_ref)):
        square = name == "sumsq"
        ok = _sum_close(got, want, a64, allow, cd, square)
        ok |= _sum_close(got, None, truth, truth_allow, cd, square)
        if not bool(ok.all()):
            finite = want.isfinite()
            if bool((~ok & finite & ~got.isfinite()).any()):
                row.note(case, f"{name} not finite where the reference is")
            elif bool((~ok & finite).any()):
                row.note(case, f"{name} beyond tolerance")
            else:
                row.note(case, f"{name} differs where the reference is not finite")


def _sum_close(got, want, values, allow, channel_dim, square) -> torch.Tensor:
    """Per channel: ``got`` within ``SUM_RTOL`` of the fp64 sum of ``values`` (or their squares),
    widened by the element-wise ``allow``ance; ``want`` (default: that fp64 sum) is the target.
    Non-finite targets must be matched exactly (NaN by NaN)."""
    v = _per_channel_rows(values, channel_dim)
    e = _per_channel_rows(allow, channel_dim)
    if square:
        target = (v * v).sum(dim=1) if want is None else want
        tol = SUM_RTOL * (v * v).sum(dim=1) + (2 * v.abs() * e + e * e).sum(dim=1)
    else:
        target = v.sum(dim=1) if want is None else want
        tol = SUM_RTOL * v.abs().sum(dim=1) + e.sum(dim=1)
    finite = target.isfinite()
    return (((got - target).abs() <= tol) & finite) | (_same_or_both_nan(got, target) & ~finite)


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
    try:
        reason = api.backend_object(name).supports(torch.device(device))
    except (RuntimeError, KeyError) as error:
        return str(error)
    return reason or "not available"


def run_verify(
    backends: Optional[Sequence] = None,
    acts: Sequence[str] = reference.ACTIVATIONS,
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
    header = ("op", "act", "dtype", "backend", "max ulp", "mask mism", "tie band", "verdict", "notes")
    body = []
    for r in report.rows:
        backend = r.backend if r.device == "cpu" else f"{r.backend}@{r.device}"
        body.append(
            (
                r.op,
                r.act,
                r.dtype,
                backend,
                _ulp_text(r.max_ulp),
                str(r.mask_mismatches),
                str(r.tie_band),
                r.verdict,
                r.describe(),
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    failed = sum(not r.passed for r in report.rows)
    lines.append("")
    lines.append(
        f"{len(report.rows)} checks, {failed} FAIL, backends {', '.join(report.backends) or 'none'}"
        f", {report.seconds:.1f} s" + (" (quick)" if report.quick else "")
    )
    for name, reason in report.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def _ulp_text(ulps: int) -> str:
    return "NaN-vs-num" if ulps >= NAN_MISMATCH else str(ulps)
