"""Multi-process training: joining the process group that ``torchrun`` describes, and the cross-process
reductions that method statistics go through.

Without an initialised process group every reduction here is the identity, so methods call them
unconditionally: a statistic that decides a coefficient or weight must be reduced across ranks before
it acts, so that N processes decide as one process on the whole batch.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from poise.errors import ConfigError

#: generous, because rank 0 alone fits the linear probe while the other ranks wait
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; the global rank when unset)."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else rank()


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or a launcher that sets the same variables) started as one of
    several ranks. A worker of a process pool inherits those variables but is not a rank."""
    if multiprocessing.parent_process() is not None:
        return False
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_distributed(device: torch.device, backend: str = "auto") -> torch.device:
    """Join the process group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK, as torchrun sets them) unless one is already initialised, and return this rank's
    device: ``cuda:LOCAL_RANK`` when ``device`` is a CUDA device, else ``device``.

    ``backend``: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``."""
    if device.type == "cuda":
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"this process has LOCAL_RANK {index} but the machine shows {torch.cuda.device_count()} CUDA devices; "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not is_distributed():
        chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        if chosen == "nccl" and device.type != "cuda":
            raise ConfigError(f"trainer.dist_backend nccl needs CUDA devices, but trainer.device is '{device}'; use gloo")
        dist.init_process_group(backend=chosen, timeout=PROCESS_GROUP_TIMEOUT)
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---- reductions of method statistics --------------------------------------------------------------------
def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is left as it is)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: Tensor) -> Tensor:
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / world_size()


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate a per-rank tensor along dimension 0 (equal sizes on every rank)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate a per-rank tensor along dimension 0 when the ranks hold different numbers of rows (a
    sharded pass over a split, a selection of present samples): padded to the longest for the collective,
    then trimmed, in rank order."""
    if not is_distributed():
        return tensor
    n = world_size()
    sizes = torch.zeros(n, dtype=torch.long, device=tensor.device)
    sizes[rank()] = tensor.shape[0]
    sizes = all_reduce_sum(sizes).tolist()
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


# ---- objects ---------------------------------------------------------------------------------------------
def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_strided(local: Sequence[Any]) -> list[Any]:
    """Rank r holds items r, r + W, r + 2W, ... of a sequence (W ranks): the whole sequence, in order,
    on every rank."""
    if not is_distributed():
        return list(local)
    parts = all_gather_objects(list(local))
    out: list[Any] = []
    for j in range(max(len(p) for p in parts)):
        out.extend(p[j] for p in parts if j < len(p))
    return out


# ---- parameters and gradients ----------------------------------------------------------------------------
def broadcast_tensors(tensors: Iterable[Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank: DistributedDataParallel does this
    at each training forward; evaluation and checkpoints need it too."""
    broadcast_tensors(module.buffers())


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks, in place: for parameters that no
    DistributedDataParallel wrapper reduces (a method's own heads, steps a method takes itself). A
    gradient missing (None) on some ranks counts as zero there; one missing on every rank stays None."""
    if not is_distributed() or not params:
        return
    device = params[0].device
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
    with_grad = [p for p, n in zip(params, all_reduce_sum(has_grad).tolist()) if n > 0]
    n = world_size()
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in with_grad:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for p in group:
            averaged = flat[offset: offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = averaged.clone()
            else:
                p.grad.copy_(averaged)
            offset += p.numel()


__all__ = [
    "PROCESS_GROUP_TIMEOUT", "all_gather_cat", "all_gather_objects", "all_reduce_mean", "all_reduce_sum",
    "average_gradients", "barrier", "broadcast_buffers", "broadcast_object", "broadcast_tensors", "gather_objects",
    "gather_strided", "init_distributed", "is_distributed", "is_main_process", "launched_by_torchrun", "local_rank",
    "rank", "shutdown", "world_size",
]
