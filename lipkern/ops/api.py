"""Public op functions: argument checking, normalisation, and the backend dispatcher.

Every backend receives the same normalised arguments (float32 ``()``/``(C,)`` threshold and
centre on ``x``'s device, non-negative ``channel_dim``) and must agree with
:mod:`lipkern.ops.reference`. Backends:

- ``"reference"``: :mod:`lipkern.ops.reference`, pure PyTorch, any device.
- ``"cpu"``: the C++ kernels of ``lipkern._C``, through the ``lipkern::*`` ops.
- ``"triton"``: :mod:`lipkern.ops.triton_backend`; on CUDA through the ``lipkern::*`` ops, on CPU
  tensors only under ``TRITON_INTERPRET=1`` (the Triton interpreter).
- ``"auto"``: ``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors.

Under forward-mode AD or a ``torch.func`` transform every backend gives way to the reference
(see :func:`_differentiated_by_transform`).

Besides the public ops: :func:`normalise_arguments` (the normalisation above),
:func:`remap_act_prechecked` / :func:`remap_act_stats_prechecked` (the entry for callers that
hold checked buffers, such as :mod:`lipkern.nn`) and :func:`remap_act_traceable` (the remap as
pointwise ops, what a compiled or exported model sees).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import operator
from typing import Optional, Protocol

import torch
from torch.autograd import forward_ad

from lipkern import _ext
from lipkern.ops import library  # noqa: F401  (defines the lipkern::* ops)
from lipkern.ops import reference
from lipkern.ops.activations import ACTIVATIONS, lookup
from lipkern.ops.reference import broadcast_per_channel
from lipkern.ops.stats import ChannelStats

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The smallest magnitude that rounds to infinity in float32 (FLT_MAX plus half an ulp).
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
BACKENDS = ("auto", "cpu", "reference", "triton")


class Backend(Protocol):
    """What a backend provides; all arguments are normalised (see module docstring)."""

    name: str
    # True when the backend rejects NaN / negative thresholds and NaN / infinite centres itself,
    # with the same messages; the API then skips its own check.
    checks_parameter_values: bool

    def supports(self, device: torch.device) -> Optional[str]:
        """``None`` if tensors on ``device`` can run here, else the reason they cannot."""

    def remap_act(self, x, threshold, center, act, channel_dim, straight_through): ...

    def remap_act_stats(self, x, threshold, center, act, channel_dim): ...

    def remap_act_(self, x, threshold, center, act, channel_dim): ...


_REGISTRY: dict[str, Backend] = {}
# Backends that live in their own module (its ``BACKEND``), imported on first use: importing
# triton is slow and must happen after TRITON_INTERPRET is decided.
_LAZY_BACKENDS = {"triton": "lipkern.ops.triton_backend"}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def backend_object(name: str) -> Backend:
    """The backend registered as ``name`` (importing a lazy one now)."""
    if name not in _REGISTRY and name in _LAZY_BACKENDS:
        try:
            module = importlib.import_module(_LAZY_BACKENDS[name])
        except ImportError as error:
            raise RuntimeError(
                f"backend={name!r} is unavailable: importing {_LAZY_BACKENDS[name]} failed "
                f"({error})"
            ) from error
        register_backend(module.BACKEND)
    return _REGISTRY[name]


class ReferenceBackend:
    name = "reference"
    checks_parameter_values = False

    def supports(self, device):
        return None

    def remap_act(self, x, threshold, center, act, channel_dim, straight_through):
        return reference.remap_act_reference(
            x, threshold, center, act, channel_dim, straight_through
        )

    def remap_act_stats(self, x, threshold, center, act, channel_dim):
        return reference.remap_act_stats_reference(x, threshold, center, act, channel_dim)

    def remap_act_(self, x, threshold, center, act, channel_dim):
        # copy_ alone would write into an inference tensor before refusing it.
        library.overwrite(
            x, lambda: reference.remap_act_inplace_reference(x, threshold, center, act, channel_dim)
        )


class OpsBackend:
    """A backend whose kernels are registered on the ``lipkern::*`` ops for one device type."""

    def __init__(self, name: str, device_type: str, checks_parameter_values: bool):
        self.name, self.device_type = name, device_type
        self.checks_parameter_values = checks_parameter_values

    def supports(self, device):
        if device.type != self.device_type:
            return f"backend {self.name!r} runs on {self.device_type} tensors, x is on {device}"
        return _ext.missing_reason()

    def remap_act(self, x, threshold, center, act, channel_dim, straight_through):
        return torch.ops.lipkern.remap_act(
            x, threshold, center, act, channel_dim, straight_through
        )

    def remap_act_stats(self, x, threshold, center, act, channel_dim):
        return torch.ops.lipkern.remap_act_stats(x, threshold, center, act, channel_dim)

    def remap_act_(self, x, threshold, center, act, channel_dim):
        torch.ops.lipkern.remap_act_(x, threshold, center, act, channel_dim)


register_backend(ReferenceBackend())
register_backend(OpsBackend("cpu", "cpu", checks_parameter_values=True))


def available_backends(device="cpu") -> list[str]:
    """Names of the backends that can run tensors on ``device`` in this process."""
    device = torch.device(device)
    names = []
    for name in ("reference", "cpu", "triton"):
        try:
            backend = backend_object(name)
        except RuntimeError:
            continue
        if backend.supports(device) is None:
            names.append(name)
    return names


def _auto_backend(x: torch.Tensor) -> str:
    """What ``backend="auto"`` means for ``x``: Triton on CUDA, the reference on the meta device
    (a model built there runs for its shapes, and PyTorch's ops have meta kernels), the C++
    kernels elsewhere."""
    return {"cuda": "triton", "meta": "reference"}.get(x.device.type, "cpu")


def check_backend(backend) -> None:
    """A ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _differentiated_by_transform() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``)
    or another ``torch.func`` transform (``grad``, ``vmap``, ...) is active. The ops' autograd
    is reverse mode only, registered in C++ for CPU tensors, which forward-mode AD passes by with
    a zero tangent and functorch refuses; the reference is plain PyTorch, which every transform
    differentiates, by the rule the kernels' backward implements. The two reads cost about 70 ns
    a call; dynamo traces them without a graph break (a compiled ``torch.func.jvp`` takes the
    reference too)."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _resolve_backend(backend, x: torch.Tensor) -> Backend:
    check_backend(backend)
    if _differentiated_by_transform():
        return backend_object("reference")
    if backend == "auto":
        backend = _auto_backend(x)
    chosen = backend_object(backend)
    reason = chosen.supports(x.device)
    if reason is not None:
        error = _ext.ExtensionNotBuiltError if backend == "cpu" and x.is_cpu else RuntimeError
        raise error(f"backend={backend!r} cannot run here: {reason}")
    return chosen


def _runs_cpu_kernels(backend, x: torch.Tensor) -> bool:
    """Whether ``backend`` runs ``x`` on the C++ kernels, which check x, the thresholds and the
    centres themselves (so a pre-checked caller may skip the API's checks). ``"auto"`` means
    the C++ kernels for every CPU tensor (:func:`_auto_backend`), asked here without building
    its answer on every layer call."""
    return (
        x.is_cpu
        and (backend == "cpu" or backend == "auto")
        and _ext.missing_reason() is None
        and not _differentiated_by_transform()
    )


def _refuse_layout(x: torch.Tensor) -> None:
    """Raise for an ``x`` without strides (sparse, nested, mkldnn), in place of any error being
    handled: the kernels and the reference index x by its strides, and PyTorch's own errors for
    such a tensor name neither x nor what was expected."""
    if x.is_nested:
        raise TypeError("x must be a dense (strided) tensor, got a nested tensor") from None
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}") from None


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _refuse_layout(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the channel axis), got a 0-d tensor")


def index_channel_dim(channel_dim) -> int:
    """``channel_dim`` as a Python int. Any integer is taken (``operator.index``: an int, a numpy
    integer, an integer tensor of one element), not a bool, which would read as axis 0 or 1."""
    if type(channel_dim) is int:  # every call's case, spared the checks below
        return channel_dim
    is_bool = isinstance(channel_dim, bool) or (
        isinstance(channel_dim, torch.Tensor) and channel_dim.dtype == torch.bool
    )
    if not is_bool:
        try:
            return operator.index(channel_dim)
        except TypeError:
            pass
    raise TypeError(
        f"channel_dim must be an integer (an int or a numpy integer), got "
        f"{type(channel_dim).__name__}"
    )


def _normalise_channel_dim(channel_dim, x: torch.Tensor) -> int:
    channel_dim = index_channel_dim(channel_dim)
    if not -x.dim() <= channel_dim < x.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for x with {x.dim()} dimensions "
            f"(expected {-x.dim()} <= channel_dim < {x.dim()})"
        )
    return channel_dim % x.dim()


def _normalise_parameter(
    name: str, value, x: torch.Tensor, channels: int, check_values: bool
) -> torch.Tensor:
    """A threshold or centre as a float32 tensor of shape () or (C,) on x's device.

    Tensor values are checked here only with ``check_values``; the C++ kernels check them
    themselves, which saves this function's three small ops on every call.
    """
    is_threshold = name == "threshold"
    # numbers.Real: Python's int and float, and numpy's scalars (np.float32 is not a float).
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64
            number = math.inf if value > 0 else -math.inf
        # Comparisons only, no math.isnan and the like: torch.compile turns a float that changes
        # between calls into a symbolic one, which comparisons trace (as guards) and math cannot.
        if number != number:
            raise ValueError(f"{name} must not be NaN")
        # Parameters are float32: beyond its range a number is +-inf, as a float64 tensor is.
        if abs(number) >= _FLOAT32_OVERFLOW:
            number = math.inf if number > 0 else -math.inf
        if is_threshold and number < 0:
            raise ValueError(f"threshold must be >= 0, got {value}")
        if not is_threshold and abs(number) == math.inf:
            raise ValueError(f"center must be finite in float32, got {value}")
        return torch.full((), number, dtype=torch.float32, device=x.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a real number or a tensor, got {type(value).__module__}."
            f"{type(value).__qualname__}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.shape not in ((), (channels,)):
        raise ValueError(
            f"{name} must have shape () or ({channels},) (the size of x along channel_dim), "
            f"got {tuple(value.shape)}"
        )
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
    if value.requires_grad:
        # Where autograd records, detaching it would make its gradient vanish without a word.
        if torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but the remap is not differentiable with respect to its "
                f"{name} (only x gets a gradient); pass {name}.detach()"
            )
        value = value.detach()
    # Attribute checks first: each of these calls costs a dispatch even when it returns value.
    if value.dtype != torch.float32:
        value = value.to(torch.float32)
    if not value.is_contiguous():
        value = value.contiguous()
    if check_values and value.is_cpu and not torch.compiler.is_compiling():
        # On CUDA this check would cost a device sync per call; there the kernels trust the
        # model layer, which validates thresholds when it sets them. One reduction on the
        # common path (NaN fails both tests); the message is worked out only on failure.
        valid = (value >= 0) if is_threshold else value.isfinite()
        if not bool(valid.all()):
            if torch.isnan(value).any():
                raise ValueError(f"{name} must not contain NaN")
            if is_threshold:
                raise ValueError(f"threshold must be >= 0, got min {value.min().item()}")
            raise ValueError("center must be finite")
    return value


def normalise_arguments(x, threshold, act, center, channel_dim, check_values=True):
    """``(threshold, center, channel_dim)`` in the form every backend receives (x checked)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    channel_dim = _normalise_channel_dim(channel_dim, x)
    channels = x.shape[channel_dim]
    threshold = _normalise_parameter("threshold", threshold, x, channels, check_values)
    if center is not None:
        center = _normalise_parameter("center", center, x, channels, check_values)
    return threshold, center, channel_dim


def _prepare(x, threshold, act, center, channel_dim, backend):
    """The chosen backend and the arguments :func:`normalise_arguments` makes for it."""
    _check_x(x)
    chosen = _resolve_backend(backend, x)
    check_values = not chosen.checks_parameter_values
    return (chosen, *normalise_arguments(x, threshold, act, center, channel_dim, check_values))


def remap_act(
    x: torch.Tensor,
    threshold,
    act: str = "gelu",
    center=None,
    channel_dim: int = -1,
    backend: str = "auto",
    straight_through: bool = False,
) -> torch.Tensor:
    """Fused ``act`` + threshold remap: ``a = act(x)``; ``y = c if |a - c| < t else a``.

    Args:
        x: float16, bfloat16 or float32 tensor; any strided layout (channels_last without a
            copy); sparse and nested tensors are refused.
        threshold: ``t >= 0``, a float or a tensor of shape ``()`` or ``(C,)``. The op is not
            differentiable with respect to ``threshold`` or ``center``: where autograd records, a
            tensor that requires grad is refused (ValueError) rather than silently given no
            gradient; pass ``.detach()``.
        act: ``"identity"``, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"silu"``.
        center: ``None`` (remap to 0, the paper's forged function) or a float / ``()`` / ``(C,)``
            tensor (the MeanSparse variant).
        channel_dim: the channel axis of ``x`` (``-1`` for ``[..., C]``, ``1`` for NCHW), any
            integer (a numpy integer too), not a bool.
        backend: ``"auto"``, ``"cpu"``, ``"reference"`` or ``"triton"``.
        straight_through: backward ignores the mask (``dx = dy * act'(x)``): the BPDA gradient
            an adaptive attack uses. The forward value is unchanged.

    Returns ``y`` in ``x``'s dtype and memory format, differentiable with respect to ``x``.
    """
    # bool("no") would be True.
    if not isinstance(straight_through, bool):
        raise TypeError(f"straight_through must be a bool, got {straight_through!r}")
    chosen, threshold, center, channel_dim = _prepare(
        x, threshold, act, center, channel_dim, backend
    )
    return chosen.remap_act(x, threshold, center, act, channel_dim, straight_through)


def remap_act_stats(
    x: torch.Tensor,
    threshold,
    act: str = "gelu",
    center=None,
    channel_dim: int = -1,
    backend: str = "auto",
) -> tuple[torch.Tensor, ChannelStats]:
    """:func:`remap_act` plus per-channel statistics of ``act(x)`` taken in the same pass."""
    chosen, threshold, center, channel_dim = _prepare(
        x, threshold, act, center, channel_dim, backend
    )
    y, amax, remapped, count, total, total_sq = chosen.remap_act_stats(
        x, threshold, center, act, channel_dim
    )
    return y, ChannelStats(amax, remapped, count, total, total_sq)


def remap_act_(
    x: torch.Tensor,
    threshold,
    act: str = "relu",
    center=None,
    channel_dim: int = -1,
    backend: str = "auto",
) -> torch.Tensor:
    """In-place :func:`remap_act` for inference: overwrites and returns ``x``."""
    chosen, threshold, center, channel_dim = _prepare(
        x, threshold, act, center, channel_dim, backend
    )
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "remap_act_ is for inference and overwrites x, which requires grad; "
            "use lipkern.remap_act or run under torch.no_grad()"
        )
    threshold = _apart_from(threshold, x)
    center = _apart_from(center, x)
    chosen.remap_act_(x, threshold, center, act, channel_dim)
    return x


def _apart_from(value: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """``value``, or a copy of it where it may lie in ``x``'s memory (``remap_act_(x, x[0])``):
    the kernels read the thresholds and centres while they overwrite x, so they would read
    values already remapped, and :func:`_normalise_parameter` passes an fp32 contiguous view of x
    through as it is. The copy is of C floats at most. Under torch.compile the aliasing cannot be
    asked, so the copy is always made."""
    if value is not None and (torch.compiler.is_compiling() or torch._C._is_alias_of(value, x)):
        return value.clone()
    return value


def remap_act_traceable(x, threshold, center, act: str, channel_dim: int) -> torch.Tensor:
    """The remap as plain pointwise torch ops, for ``torch.compile`` and ``torch.export``.

    Inductor fuses these into the producer's epilogue (a convolution's, a normalisation's), where
    the opaque ``lipkern::*`` op would cost its own pass over memory. The activation is computed
    in ``x``'s dtype, as the original model computes it (an explicit float32 copy made inductor
    keep a float32 buffer between two loops in bf16 ResNets); the comparison is in float32, as
    the op's. Identity and ReLU are therefore bit-identical to the op; smooth activations carry
    the compiler's numerics (those of the compiled original model, rounded to ``x``'s dtype
    before the comparison), and at +-inf the activation formulas' own values (the op takes the
    limits). ``threshold`` / ``center``: float32 ``()`` / ``(C,)`` tensors; ``channel_dim``
    non-negative.
    """
    a = lookup(act).torch_fn(x)
    t = broadcast_per_channel(threshold, x.dim(), channel_dim)
    if center is None:
        return torch.where(a.float().abs() < t, 0.0, a)
    c = broadcast_per_channel(center, x.dim(), channel_dim)
    return torch.where((a.float() - c).abs() < t, c, a.float()).to(x.dtype)


def remap_act_prechecked(
    x: torch.Tensor,
    threshold: torch.Tensor,
    center: Optional[torch.Tensor],
    act: str,
    channel_dim: int,
    backend: str = "auto",
    straight_through: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """:func:`remap_act` (or :func:`remap_act_` with ``inplace``) for callers that hold the
    threshold and centre as float32 ``()`` / ``(C,)`` tensors on ``x``'s device, checked when
    they were set (a model layer's buffers).

    Where the C++ kernels run, they check x and the parameters themselves, so the op is called
    directly: inside a model, a microsecond of Python between two multi-threaded ops costs
    several (see benchmarks/RESULTS.md), and the public API's checks and dispatch
    are about 3 us per call. Elsewhere, and for a ``channel_dim`` that ``x`` lacks (whose error
    the checked API raises), the checked API runs.
    """
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "remap_act_prechecked(inplace=True) overwrites x, which requires grad; "
            "run under torch.no_grad() or pass inplace=False"
        )
    dim = x.dim()
    if _runs_cpu_kernels(backend, x) and -dim <= channel_dim < dim:
        # x's layout is asked only once the op has failed (the dispatcher's NotImplementedError,
        # a RuntimeError, for a sparse x): a try block costs nothing until then.
        try:
            if inplace:
                torch.ops.lipkern.remap_act_.default(x, threshold, center, act, channel_dim % dim)
                return x
            return torch.ops.lipkern.remap_act.default(
                x, threshold, center, act, channel_dim % dim, straight_through
            )
        except RuntimeError:
            _refuse_layout(x)
            raise
    if inplace:
        return remap_act_(x, threshold, act, center, channel_dim, backend)
    return remap_act(x, threshold, act, center, channel_dim, backend, straight_through)


def remap_act_stats_prechecked(
    x: torch.Tensor,
    threshold: torch.Tensor,
    center: Optional[torch.Tensor],
    act: str,
    channel_dim: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`remap_act_stats` for pre-checked parameters (see :func:`remap_act_prechecked`);
    the statistics as :meth:`ChannelStats.as_tuple` (a calibration scan merges them into a
    layer's buffers without building a ChannelStats)."""
    dim = x.dim()
    if _runs_cpu_kernels(backend, x) and -dim <= channel_dim < dim:
        try:
            y, *fields = torch.ops.lipkern.remap_act_stats.default(
                x, threshold, center, act, channel_dim % dim
            )
        except RuntimeError:
            _refuse_layout(x)
            raise
        return y, tuple(fields)
    y, stats = remap_act_stats(x, threshold, act, center, channel_dim, backend)
    return y, stats.as_tuple()


# With a GPU, register the Triton CUDA kernels of the lipkern::* ops now, so that the first
# call may come from inside torch.compile (which must not trace an import).
if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    backend_object("triton")
