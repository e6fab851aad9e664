"""The engine protocol: everything the training loop asks of DDP, DeepSpeed, FSDP2 or one process.

The loop never branches on the engine; an engine never knows about data, logging or checkpoints.
Optimizer state crosses the protocol as a *full*, parameter-name-keyed state dict, so a checkpoint
does not depend on the world size (see `full_optimizer_state`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Engine(Protocol):
    name: str
    model: nn.Module       # what the loop calls forward on (possibly wrapped)
    peft_model: nn.Module  # the PeftModel inside (config, generate)

    notes: tuple[str, ...]  # after wrap: lines for the log, saying what the engine chose and how to change it

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard/replicate the model and build the optimizer; returns the torch optimizer the scheduler drives."""

    def accumulating(self) -> ContextManager:
        """Context for the micro-batches before the last of a step (skip gradient sync where possible)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def local_grads(self) -> dict[str, torch.Tensor | None]:
        """Trainable parameter name -> this rank's gradient (or shard of it), between backward and step."""

    def step(self, max_grad_norm: float | None) -> float:
        """Sync and clip gradients, step the optimizer, zero gradients; return the pre-clip global norm."""

    def skip_step(self) -> None:
        """Drop this step's gradients without updating anything (train.on_nonfinite: skip)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) adapter tensors under PEFT file naming, on CPU, on every rank."""

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Set the adapter from full tensors under PEFT file naming (every rank passes the same)."""

    def optimizer_state_dict(self) -> dict:
        """Full optimizer state keyed by parameter name (collective; meaningful on rank 0)."""

    def load_optimizer_state_dict(self, state: dict) -> None: ...

    def close(self) -> None:
        """Let go of what ties the engine to the process group, after a run (finished or failed) and before
        the group is destroyed. The engine is not used afterwards."""


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                  scaler: torch.amp.GradScaler | None = None) -> float:
    """The tail of a step for engines whose gradients are torch tensors (DTensors included)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
            for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_into(peft_model: nn.Module, state: dict[str, torch.Tensor], to_local) -> None:
    """Copy full adapter tensors into the (possibly sharded) parameters; `to_local(param, full)` cuts
    out this rank's piece. Every key must match, both ways."""
    from qshard.model.lora import adapter_params_by_file_key

    params = adapter_params_by_file_key(peft_model)
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise ValueError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(to_local(param, state[key].to(param.device, param.dtype)))


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores for a parameter: its shard under FSDP2 (DTensor) or ZeRO-3 (ds_tensor)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    return p.numel()


def shard_span(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Items [start, stop) of `rows` that `rank` holds: torch.chunk's split, which FSDP2 uses for the
    rows of a parameter and ZeRO-3 for its flattened elements."""
    per_rank = -(-rows // world_size)
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


nullcontext = contextlib.nullcontext


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, found by the class names transformers marks as not-to-be-split."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"no decoder layers ({names or 'no _no_split_modules'}) found in {type(base).__name__}")
    return layers
