"""Mixed precision: which dtype the forward runs in, checked against the hardware before loading."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qshard.errors import QShardError

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device, gpu_capability: tuple[int, int] | None = None,
                      gpu_name: str = "") -> Precision:
    """auto -> bf16 on GPUs with compute capability >= 8.0, fp16 on older GPUs, fp32 on CPU."""
    if device.type == "cuda" and gpu_capability is None:
        gpu_capability = torch.cuda.get_device_capability(device)
        gpu_name = torch.cuda.get_device_name(device)
    if requested == "auto":
        if device.type != "cuda":
            return Precision("fp32", device)
        return Precision("bf16" if gpu_capability >= (8, 0) else "fp16", device)
    if requested == "bf16" and device.type == "cuda" and gpu_capability < (8, 0):
        major, minor = gpu_capability
        raise QShardError(f"bf16 needs compute capability 8.0 or newer; {gpu_name or 'this GPU'} has "
                          f"{major}.{minor} (e.g. RTX 20xx, V100, T4)", where="train.precision",
                          fix="use train.precision: fp16 (or auto)")
    return Precision(requested, device)
