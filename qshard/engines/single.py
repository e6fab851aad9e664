"""One process, one device: the reference every sharded engine is compared against."""

from __future__ import annotations

import torch
from torch import nn

from qshard.engines.base import (
    OptimizerFactory,
    clip_and_step,
    full_optimizer_state,
    load_adapter_into,
    load_full_optimizer_state,
    nullcontext,
    trainable_grads,
)
from qshard.model.lora import adapter_state_dict


class SingleEngine:
    name = "none"
    notes: tuple[str, ...] = ()

    def __init__(self, device: torch.device, scaler: torch.amp.GradScaler | None = None):
        self.device, self.scaler = device, scaler

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory):
        self.model = self.peft_model = model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        return self.model, self.optimizer

    def accumulating(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def local_grads(self):
        return trainable_grads(self.peft_model)

    def step(self, max_grad_norm: float | None) -> float:
        return clip_and_step(self.params, self.optimizer, max_grad_norm, self.scaler)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in adapter_state_dict(self.peft_model).items()}

    def optimizer_state_dict(self) -> dict:
        return full_optimizer_state(self.model, self.optimizer)

    def load_optimizer_state_dict(self, state: dict) -> None:
        load_full_optimizer_state(self.model, self.optimizer, state)

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_into(self.peft_model, state, lambda param, full: full)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass
