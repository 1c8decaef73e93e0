"""The ranks: process-group set-up from torchrun's environment, and gradient reduction during backward."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ranks(device_pref: str) -> Ranks:
    """Join torchrun's group (NCCL on CUDA, gloo on CPU); a single process needs no group at all."""
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but torch sees no CUDA GPU; use device=auto or cpu")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=device if want_cuda else None)
    return Ranks(rank, world, local, device)


class GradientReducer:
    """Sum gradients over ranks, each one launched as soon as backward has finished with it.

    Only the last micro-batch of a step reduces (the earlier ones just accumulate locally), and the
    all-reduce of late layers overlaps the backward of early ones. The loss is pre-scaled by
    1/grad_accum_total, so a sum over ranks is the mean over all micro-batches.
    """

    def __init__(self, params, world: int, deferrable=()):
        self.world = world
        self.armed = False
        # gradients that may be left to add up locally over steps (record-39's Adam every other step): a step that
        # defers them does not reduce them, so the step that does reduces their local sum once
        self.deferrable = {id(p) for p in deferrable}
        self.defer = False
        self.pending: list = []
        if world > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.Tensor) -> None:
        if self.armed and not (self.defer and id(p) in self.deferrable):
            self.pending.append(dist.all_reduce(p.grad, async_op=True))

    def arm(self, last_micro_batch: bool, defer: bool = False) -> None:
        self.armed = last_micro_batch and self.world > 1
        self.defer = defer

    def wait(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()
        self.armed = False


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank raised the flag (so every rank takes the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def sum_to_host(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks, copied into host memory without waiting: the (1,) float64 result is valid once
    the work queued so far is done (synchronise on a later event before reading it). On CUDA the sum and
    the copy are queued behind the work that produces t, so the host can go on queueing."""
    t = t.detach().double().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    host = torch.empty(1, dtype=torch.float64, pin_memory=t.is_cuda)
    return host.copy_(t, non_blocking=True)


def barrier() -> None:
    """Ranks leave together: a gloo rank that tears its group down while rank 0 still writes the
    checkpoint can abort at exit ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
