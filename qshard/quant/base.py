"""What every quantized base layer shares: frozen storage in integer parameters, a dense view on demand.

A layer subclasses `QuantLinear`, stores everything it needs as frozen parameters (so engines shard
them), and implements `dequantize()` and `forward()`. PEFT wraps it with its standard LoRA Linear.
Layers that dequantize in torch (GPTQ, AWQ, compressed-tensors) multiply through `redequantizing_linear`,
which keeps no dense weight for backward.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
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


# Elements of the dense weight dequantized at a time (see `dequantize_by_rows`). CPU: a slice whose
# integer and float32 temporaries (~16 B per element) stay in cache; a GPTQ 5632 x 2048 weight to bf16,
# one thread, took 13.5 ms in slices of 2**18 (19-36 ms at 2**15..2**20) against 120 ms in one piece,
# whose every temporary is freshly page-faulted memory. Elsewhere (GPUs, not measured yet): few kernel
# launches per layer, with temporaries about one bf16 weight of 2048 x 5632.
SLICE_ELEMENTS = {"cpu": 2**18}
SLICE_ELEMENTS_DEFAULT = 2**20


def dequantize_by_rows(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                       rows_of: Callable[[int, int], torch.Tensor], align: int = 1) -> torch.Tensor:
    """A dense [rows, cols] tensor in `dtype`, filled by `rows_of(start, stop)` a slice of rows at a time
    (`start` a multiple of `align`), so that the dequantization's temporaries stay a slice's size:
    the only whole-weight allocation is the result, as in bitsandbytes' dequantize_4bit."""
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    budget = SLICE_ELEMENTS.get(device.type, SLICE_ELEMENTS_DEFAULT)
    step = max(align, budget // max(cols, 1) // align * align)
    for start in range(0, rows, step):
        out[start:start + step] = rows_of(start, min(start + step, rows))
    return out


def nearest_codes(weight: torch.Tensor, scale: torch.Tensor, zero, bits: int) -> torch.Tensor:
    """The `bits`-wide unsigned code c whose value scale * (c - zero) is nearest to `weight` (round(weight /
    scale) + zero, clamped; ties to even, as the quantizers round), int32. All three broadcast; a zero scale
    (a group of zeros) gives the code of 0. A weight that is already scale * (c - zero) in float32 gives c
    back exactly: the quotient is exact."""
    ratio = weight.float() / scale
    ratio = torch.where(scale == 0, 0.0, ratio).round_()
    return (ratio + zero).clamp_(0, (1 << bits) - 1).to(torch.int32)


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

    def requantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """`weight` ([out, in], float32; e.g. the merged weight of an export) on this layer's own scales and zero
        points: {leaf: tensor} for the leaves that hold codes, packed as the checkpoint stores them. The other
        leaves (scales, zero points, g_idx) stay as they are. `requantize(dequantize(torch.float32))` gives back
        the stored codes."""
        raise NotImplementedError(f"{type(self).__name__} cannot be re-quantized onto its own scales")

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


class _RedequantizingLinear(torch.autograd.Function):
    """y = x @ W.T + b with W = layer.dequantize(x.dtype), dequantized again in backward instead of saved.

    F.linear would save the dense W of every layer until backward (the whole model, dense, at the
    training peak); like bitsandbytes' 4-bit matmul we keep only the packed storage and pay one more
    dequantization per layer in backward. The base is frozen: W gets no gradient, so nothing else
    needs saving (not even x). Invariants the backward relies on:
    - the storage parameters hold this layer's values again when its backward runs. DeepSpeed ZeRO-3
      re-gathers a module's parameters in a hook on the module's outputs, and FSDP2 a unit's (here:
      the decoder layer's) in a hook on the unit's outputs, both before the gradient reaches this
      backward (tests/test_quant_backward.py runs both, with and without activation checkpointing);
    - the same dense values come out: `dequantize` is deterministic, and under autocast the forward's
      F.linear and the backward below cast W to the same lower dtype as F.linear's own backward does,
      so outputs and input gradients equal F.linear(x, dequantize(x.dtype), b) bit for bit.
    The backward is written in differentiable ops, so double backward works too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer, ctx.weight_dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if next(ctx.layer.parameters()).numel() == 0:  # an engine that gathers only for forward
                raise RuntimeError(f"{type(ctx.layer).__name__}'s partitioned storage was not gathered for backward")
            weight = ctx.layer.dequantize(ctx.weight_dtype)
            grad_x = grad_out.matmul(weight.to(grad_out.dtype))  # autocast ran the forward in grad_out's dtype
        if ctx.needs_input_grad[1]:  # a frozen base has no trainable bias; kept correct all the same
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def redequantizing_linear(x: torch.Tensor, layer: "QuantLinear", bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, layer.dequantize(x.dtype), bias), with the same values and input gradient, that keeps
    no dense weight alive for backward (see _RedequantizingLinear)."""
    return _RedequantizingLinear.apply(x, bias, layer)
