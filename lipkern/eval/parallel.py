"""Device choice and the processes of one evaluation (``torchrun`` ranks through ``torch.distributed``).

Work is split into fixed chunks of test samples; chunk ``i`` belongs to rank ``i % world``, and every chunk
runs the same way whichever rank takes it, so per-sample outcomes do not depend on the number of processes.
Calibration batches are dealt out the same way and the statistics are all-reduced by ``lipkern.calibrate``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(spec: str | torch.device | None, local_rank: int = 0, argument: str = "device") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a missing device is a clear error
    naming ``argument`` as the caller spells it (``--device`` on the command line, ``device`` in Python).

    Under several processes, plain ``cuda`` / ``auto`` means ``cuda:LOCAL_RANK``.
    """
    text = "auto" if spec is None else str(spec)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"{argument}: cannot parse {text!r}; give auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            # PyTorch has one CPU device; cpu:3 would run on it without a word.
            raise DeviceError(f"{argument}: {text!r} is not a device; PyTorch has one CPU device, cpu")
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"{argument}: {text!r} is not supported; give auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"{argument}={text}: no CUDA GPU is available on this machine "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use {argument}=cpu")
    if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DeviceError(f"{argument}={text}: under several processes each rank takes cuda:LOCAL_RANK; give "
                          "cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"{argument}={text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:{index} does not exist")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed, so that no rank waits for a dead one in a later
        collective; the failing rank re-raises its own error."""
        failed = int(error is not None)
        if self.world > 1:
            flag = torch.tensor([failed], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = int(flag.item())
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("lipkern eval: another process failed (see its error); stopping this one too")

    def broadcast_error(self, message: str | None) -> str | None:
        """Rank 0's error message (or None) on every rank, so that all ranks stop together."""
        if self.world == 1:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_processes() -> Processes:
    """The ranks of a ``torchrun`` launch (environment variables), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    return Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(processes: Processes, device: torch.device) -> None:
    """gloo for CPU work, NCCL for CUDA (each rank on its own GPU); a no-op for a single process.

    On CUDA, gloo stays registered for CPU tensors: small bookkeeping collectives (error flags, counts in
    ``lipkern.calibrate``) use CPU tensors, which NCCL alone cannot reduce."""
    if processes.world == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def current() -> Processes:
    """The processes of the initialised default group (one process when torch.distributed is not in use)."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Processes()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
