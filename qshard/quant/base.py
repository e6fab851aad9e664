"""What every quantized base layer shares: frozen storage in integer parameters, a dense view on demand.

A layer subclasses `QuantLinear`, stores everything it needs as frozen parameters (so engines shard
them), and implements `dequantize()` and `forward()`. PEFT wraps it with its standard LoRA Linear.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

RowReader = Callable[[int, int], torch.Tensor]


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def rows_per_slice(out_features: int, in_features: int, slices: int, align_values: int = 1) -> int:
    """About out_features / slices rows, rounded up so that every slice starts on a multiple of
    `align_values` flat elements (a quantization block)."""
    align = align_values // math.gcd(in_features, align_values)
    per_slice = -(-out_features // slices)
    return -(-per_slice // align) * align


def cut(full: torch.Tensor, span: tuple[int, int], start: int = 0) -> torch.Tensor:
    """Elements [span) of a tensor that holds elements [start, start + len(full)) along dim 0."""
    return full[max(span[0] - start, 0):max(min(span[1] - start, full.shape[0]), 0)]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's raw bytes as a flat uint8 tensor: engines never cast integer parameters."""
    return t.contiguous().view(torch.uint8).reshape(-1)


class QuantLinear(nn.Module):
    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    # Set while PEFT attaches adapters without DoRA: PEFT reads `.weight` ~20 times per layer only
    # for its device and dtype, and dequantizing each time costs seconds on a small model.
    weight_is_placeholder: bool = False

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def quantize_pieces(self, read_rows: RowReader, owned: dict[str, tuple[int, int]],
                        slices: int) -> dict[str, torch.Tensor]:
        """Load-time sharding: elements [start, stop) of each flattened storage parameter named in
        `owned` (1-d results), equal to the same elements of the whole weight's quantization, computed
        from the weight read `slices` row ranges at a time (`read_rows(start, stop)`), never all at once."""
        raise NotImplementedError(f"{type(self).__name__} cannot be quantized piecewise")

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer applies (PEFT reads it for DoRA and for the adapter's device).

        Empty while it is only needed for its device/dtype, or while the storage is partitioned
        (ZeRO-3 outside a gather)."""
        storage = next(self.parameters())
        if storage.device.type == "meta":
            return torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype, device="meta")
        if self.weight_is_placeholder or storage.numel() == 0:
            return torch.empty(0, dtype=self.compute_dtype, device=storage.device)
        return self.dequantize().to(self.compute_dtype)
