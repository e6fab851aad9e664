"""DistributedDataParallel: every rank holds the whole (quantized) model; gradients are all-reduced.

Only the LoRA tensors are trainable, so DDP's reducer buckets just those. Its start-up broadcast does
copy the frozen quantized base from rank 0 (one model-sized transfer); every rank loaded the same
bytes anyway, so the copy also guarantees they agree.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qshard import _compat
from qshard.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    name = "ddp"

    def wrap(self, model: nn.Module, make_optimizer):
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.peft_model = model
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        return self.model, self.optimizer

    def accumulating(self):
        return self.model.no_sync()

    def close(self) -> None:
        if hasattr(self, "model"):
            _compat.release_ddp_reducer(self.model)
