"""The engine protocol: everything the training loop asks of DDP, DeepSpeed, FSDP2 or one process.

The loop never branches on the engine; an engine never knows about data, logging or checkpoints.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Engine(Protocol):
    name: str

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard/replicate the model and build the optimizer over this rank's trainable parameters."""

    def accumulating(self) -> ContextManager:
        """Context for micro-batches before the last of a step (skip gradient sync where possible)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_grad_norm: float | None) -> float:
        """Sync and clip gradients, step the optimizer, zero gradients; return the pre-clip global norm."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) adapter tensors under PEFT naming, on CPU, on every rank."""

    def optimizer_state_dict(self) -> dict: ...

    def load_optimizer_state_dict(self, state: dict) -> None: ...


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                  scaler: torch.amp.GradScaler | None = None) -> float:
    """The shared tail of a step for engines whose gradients are local, complete tensors."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


nullcontext = contextlib.nullcontext
