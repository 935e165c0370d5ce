"""Per-channel activation statistics and their exact merging."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# The dtype of each statistic, in the order of the lipkern::remap_act_stats outputs after y.
STAT_DTYPES = {
    "amax": torch.float32,
    "remapped": torch.int64,
    "count": torch.int64,
    "sum": torch.float64,
    "sumsq": torch.float64,
}


@dataclass
class ChannelStats:
    """Statistics of ``a = act(x)`` (before the remap) for each of C channels.

    ``amax`` is float32, the counts int64 and the sums float64, so that merging many batches or
    processes neither stalls (a bf16 sum stops growing at 256 x the addend) nor overflows
    (an ImageNet scan passes 2**31 elements per channel). Merging is associative and, for
    ``amax`` and the counts, exact: merging the statistics of two scans equals one scan over
    both. NaN in ``amax`` propagates, as in :func:`torch.amax`.
    """

    amax: torch.Tensor
    remapped: torch.Tensor
    count: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor

    def __post_init__(self):
        channels = None
        for f in fields(self):
            value = getattr(self, f.name)
            expected = STAT_DTYPES[f.name]
            if not isinstance(value, torch.Tensor) or value.dtype != expected or value.dim() != 1:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"ChannelStats.{f.name} must be a 1-D {expected} tensor, got {got}")
            if channels is None:
                channels = value.shape[0]
            elif value.shape[0] != channels:
                raise ValueError(
                    f"ChannelStats fields disagree on the channel count: {f.name} has "
                    f"{value.shape[0]}, amax has {channels}"
                )

    @classmethod
    def empty(cls, channels: int, device=None) -> "ChannelStats":
        """The identity of :meth:`merge`: no element seen."""
        return cls(
            **{
                name: torch.zeros(channels, dtype=dtype, device=device)
                for name, dtype in STAT_DTYPES.items()
            }
        )

    @property
    def channels(self) -> int:
        return self.amax.shape[0]

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Statistics of the union of the two scans (a new object; see :meth:`merge_`)."""
        return self.to(self.amax.device, copy=True).merge_(other)

    def merge_(self, other: "ChannelStats") -> "ChannelStats":
        """:meth:`merge` into this object's tensors (in place; returns self)."""
        if not isinstance(other, ChannelStats):
            raise TypeError(f"other must be ChannelStats, got {type(other).__name__}")
        if other.channels != self.channels:
            raise ValueError(
                f"cannot merge statistics of {self.channels} and {other.channels} channels"
            )
        merge_fields_(self.as_tuple(), other.as_tuple())
        return self

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """``(amax, remapped, count, sum, sumsq)``: the order of the ``lipkern::remap_act_stats``
        outputs after ``y``."""
        return (self.amax, self.remapped, self.count, self.sum, self.sumsq)

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean of ``a`` (float64; NaN where no element was seen)."""
        return self.sum / self.count.to(torch.float64)

    @property
    def var(self) -> torch.Tensor:
        """Per-channel population variance of ``a`` (float64, clamped at 0)."""
        mean = self.mean
        return (self.sumsq / self.count.to(torch.float64) - mean * mean).clamp_min(0.0)

    @property
    def remapped_fraction(self) -> torch.Tensor:
        """Per-channel fraction of elements that were remapped (float64)."""
        return self.remapped.to(torch.float64) / self.count.clamp_min(1).to(torch.float64)

    def total(self) -> "ChannelStats":
        """The statistics of all channels pooled into one (a layer-wide, 1-channel view)."""
        return ChannelStats(
            amax=self.amax.amax(dim=0, keepdim=True)
            if self.channels
            else torch.zeros(1, dtype=torch.float32, device=self.amax.device),
            remapped=self.remapped.sum(dim=0, keepdim=True),
            count=self.count.sum(dim=0, keepdim=True),
            sum=self.sum.sum(dim=0, keepdim=True),
            sumsq=self.sumsq.sum(dim=0, keepdim=True),
        )

    def to(self, device, copy: bool = False) -> "ChannelStats":
        return ChannelStats(
            **{f.name: getattr(self, f.name).to(device, copy=copy) for f in fields(self)}
        )

    def all_reduce(self, group=None) -> "ChannelStats":
        """Combine the statistics of every process of ``group`` (in place; returns self).

        MAX for ``amax`` and SUM for the counts and sums, so every rank ends with the statistics
        of a single scan over all ranks' data. A no-op when torch.distributed is not initialised.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        dist.all_reduce(self.amax, op=dist.ReduceOp.MAX, group=group)
        counts = torch.stack([self.remapped, self.count])
        sums = torch.stack([self.sum, self.sumsq])
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        self.remapped, self.count = counts[0].clone(), counts[1].clone()
        self.sum, self.sumsq = sums[0].clone(), sums[1].clone()
        return self


def merge_fields_(target, other) -> None:
    """Merge the statistics ``other`` into ``target`` in place, both as
    :meth:`ChannelStats.as_tuple` tuples of one channel count.

    Two kernel calls whatever the channel count. A calibration scan merges once per layer and
    batch, on tensors straight from the op, so no ChannelStats is built there.
    """
    torch.maximum(target[0], other[0], out=target[0])
    torch._foreach_add_(list(target[1:]), list(other[1:]))
