"""Data-parallel training over several processes (torch.distributed; torchrun starts them).

Every process holds the whole model and the whole batch plan. Each optimizer step's
micro-batches are dealt out by rank (rank r takes micro-batches r, r + N, ...); every
micro-batch's loss is divided by the step's total count as in one process, and the
gradients are summed across ranks before clipping and the optimizer step. So N processes
take the step one process takes over the same micro-batches, up to float summation order,
and their adapters stay identical. The EWC term is added on rank 0 only (it would
otherwise be summed N times). What DDP does, written out for the few LoRA tensors: one
all-reduce of their gradients flattened together, no wrapper around the model.

Backends: gloo on CPU, nccl on CUDA (one GPU per process: ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process' place in a data-parallel job."""

    rank: int
    world: int
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        """Rank 0 writes files (checkpoints, the adapter) and adds the EWC term."""
        return self.rank == 0

    def share(self, group: Sequence[object]) -> list[object]:
        """This rank's micro-batches of one optimizer step."""
        return list(group[self.rank :: self.world])


def ranks_from_env() -> Ranks | None:
    """Join the job torchrun started (``WORLD_SIZE`` > 1); None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every trainable tensor's gradient over the ranks, in one all-reduce."""
    tensors = list(params)
    for p in tensors:
        if p.grad is None:  # a rank without micro-batches this step still takes part
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in tensors if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def summed(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (the step's loss and token count, for the report)."""
    found = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(found, op=dist.ReduceOp.SUM)
    return [float(v) for v in found]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on one (a stop asked of any of them)."""
    found = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item())
