"""Who am I in the job: rank, world size, device. Read from the launcher's environment at the entry
point (torchrun, deepspeed and accelerate all set RANK / WORLD_SIZE / LOCAL_RANK), never at import."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qshard import _compat


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # True when init_runtime started the process group (and so ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_runtime(timeout_s: float = 600.0, need_group: bool = False) -> Runtime:
    """Start the process group when launched with several processes (nccl on CUDA, gloo on CPU), or
    when an engine needs one even for a single process (`need_group`: DDP/DeepSpeed/FSDP2 with one rank)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = (world > 1 or need_group) and not torch.distributed.is_initialized()
    if owns:
        import datetime

        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" not in os.environ:  # no launcher (one process): a private rendezvous on a free port
            torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=rank,
                                                 world_size=world, timeout=timeout)
        else:
            store = _compat.torchrun_attempt_store(rank, world, timeout)  # not the previous attempt's keys
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Runtime(rank, world, local, device, owns)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def shutdown(rt: Runtime) -> None:
    if rt.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
