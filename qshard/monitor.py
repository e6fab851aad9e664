"""Health checks that stop a run early instead of letting it fail silently for hours."""

from __future__ import annotations

import torch
from torch import nn

from qshard.errors import QShardError


class GradFlowCheck:
    """Records which trainable tensors received a non-zero, finite gradient during the first steps.

    LoRA's B starts at zero, so A's gradient is exactly zero on step 1 by construction; every tensor
    must have had a non-zero gradient by the end of step 2, or it is not training.
    """

    def __init__(self, model: nn.Module, steps: int = 2):
        self.steps, self.seen, self.nonfinite = steps, set(), set()
        self.names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.handles = [p.register_post_accumulate_grad_hook(self._record)
                        for p in model.parameters() if p.requires_grad]

    def _record(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if not bool(torch.isfinite(p.grad).all()):
            self.nonfinite.add(self.names[id(p)])
        elif bool(p.grad.any()):
            self.seen.add(self.names[id(p)])

    def after_step(self, step: int) -> None:
        if step == 1 and self.nonfinite:
            self._fail(sorted(self.nonfinite), "a non-finite gradient", "lower train.learning_rate or use fp32/bf16")
        if step < self.steps:
            return
        self.close()
        silent = sorted(set(self.names.values()) - self.seen)
        if silent:
            self._fail(silent, "no gradient in the first steps",
                       "the layer is detached from the loss (e.g. wrapped or frozen after LoRA was attached)")

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @staticmethod
    def _fail(names: list[str], what: str, cause: str) -> None:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise QShardError(f"{len(names)} LoRA tensor(s) got {what}: {shown}", where="gradient flow check",
                          fix=f"likely cause: {cause}")
