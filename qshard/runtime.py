"""Who am I in the job: rank, world size, device. Read from the launcher's environment at the entry
point (torchrun, deepspeed and accelerate all set RANK / WORLD_SIZE / LOCAL_RANK), never at import."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(timeout_s: float = 600.0) -> Runtime:
    """Start the process group when launched with several processes (nccl on CUDA, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        import datetime

        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(rank, world, local, device)


def all_reduce_sum(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def shutdown(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
