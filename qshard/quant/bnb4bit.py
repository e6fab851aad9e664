"""NF4 / FP4 base layers (QLoRA), quantized by bitsandbytes, stored as engine-shardable parameters.

bitsandbytes' own `Linear4bit` keeps its quantization constants in a `QuantState` object beside a
`Params4bit` weight. Sharding engines only see parameters, so FSDP2 trips over the detached state
(`fix_4bit_weight_quant_state_from_module`) and DeepSpeed's `module.bfloat16()` would cast float
constants. Here every tensor needed to dequantize is a frozen *uint8 parameter*:

    packed         4-bit codes, two per byte, flat [(out*in + 1) // 2]
    absmax         per-block scales: uint8 codes with double quant, else float32 bytes
    nested_absmax  float32 bytes of the second-level scales (double quant only)
    offset         float32 bytes of the double-quant offset (double quant only)

Engines partition and all-gather integer parameters like any other, never cast them (FSDP2 skips
non-float params in mixed precision; DeepSpeed only casts floating tensors), and the forward calls
the very same `bnb.matmul_4bit` as `Linear4bit`, so results match bitsandbytes bit for bit.
"""

from __future__ import annotations

import torch

from qshard.quant.base import QuantLinear, as_bytes, cut, frozen, rows_per_slice

BLOCKSIZE = 64  # bitsandbytes' default, the one transformers' BitsAndBytesConfig uses
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for double quant


class Linear4bit(QuantLinear):
    """A frozen 4-bit linear layer: y = x @ dequant(W).T + b, computed in `compute_dtype`."""

    def __init__(self, in_features: int, out_features: int, *, quant_type: str = "nf4",
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype = torch.float32, bias: bool = False, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.double_quant = quant_type, double_quant
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        n = in_features * out_features
        blocks = -(-n // BLOCKSIZE)
        empty = lambda size: frozen(torch.empty(size, dtype=torch.uint8, device=device))  # noqa: E731
        self.packed = empty((n + 1) // 2)
        if double_quant:
            self.absmax = empty(blocks)
            self.nested_absmax = empty(4 * -(-blocks // NESTED_BLOCKSIZE))
            self.offset = empty(4)
        else:
            self.absmax = empty(4 * blocks)
        self.bias = frozen(torch.empty(out_features, dtype=weight_dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quant_type: str = "nf4",
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        """Quantize a dense [out, in] weight exactly as bitsandbytes' Linear4bit does."""
        import bitsandbytes.functional as bnbF

        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                    weight_dtype=weight.dtype, bias=bias is not None, device=weight.device)
        packed, state = bnbF.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE,
                                           compress_statistics=double_quant, quant_type=quant_type)
        layer.packed.data = as_bytes(packed)
        layer.absmax.data = as_bytes(state.absmax)
        if double_quant:
            layer.nested_absmax.data = as_bytes(state.state2.absmax.float())
            layer.offset.data = as_bytes(state.offset.float().reshape(1))
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    def quantize_pieces(self, read_rows, owned, slices):
        """Blocks of 64 values are quantized independently, so the packed codes of a row range are the
        codes of those rows; the double-quant offset, however, is the mean of *all* block scales. Each
        rank therefore reads every row range once (one range in memory at a time), keeps the codes it
        owns and the float32 block scales of all (1/32 of the bf16 weight), then double-quantizes the
        scales exactly as `bitsandbytes.functional.quantize_4bit` does and keeps its own part."""
        import bitsandbytes.functional as bnbF

        rows = rows_per_slice(self.out_features, self.in_features, slices, BLOCKSIZE)
        codes, scales = [], []
        for r0 in range(0, self.out_features, rows):
            weight = read_rows(r0, min(r0 + rows, self.out_features)).to(self.weight_dtype)
            packed, state = bnbF.quantize_4bit(weight.reshape(-1), blocksize=BLOCKSIZE, compress_statistics=False,
                                               quant_type=self.quant_type)
            codes.append(cut(packed.reshape(-1), owned["packed"], start=r0 * self.in_features // 2))
            scales.append(state.absmax)
        absmax = torch.cat(scales)
        pieces = {"packed": torch.cat(codes)}
        if not self.double_quant:
            return pieces | {"absmax": cut(as_bytes(absmax), owned["absmax"])}
        offset = absmax.mean()  # bitsandbytes' own double quant, on the same full vector
        qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        return pieces | {"absmax": cut(qabsmax, owned["absmax"]),
                         "nested_absmax": cut(as_bytes(state2.absmax.float()), owned["nested_absmax"]),
                         "offset": cut(as_bytes(offset.float().reshape(1)), owned["offset"])}

    def quant_state(self):
        """Rebuild bitsandbytes' QuantState from our parameters (views, no copies)."""
        import bitsandbytes.functional as bnbF

        device = self.packed.device
        code = bnbF.get_4bit_type(self.quant_type, device=device)
        shape = torch.Size([self.out_features, self.in_features])
        if not self.double_quant:
            return bnbF.QuantState(absmax=self.absmax.view(torch.float32), shape=shape, code=code,
                                   blocksize=BLOCKSIZE, quant_type=self.quant_type, dtype=self.weight_dtype)
        state2 = bnbF.QuantState(absmax=self.nested_absmax.view(torch.float32), code=_nested_code(device),
                                 blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return bnbF.QuantState(absmax=self.absmax, shape=shape, code=code, blocksize=BLOCKSIZE,
                               quant_type=self.quant_type, dtype=self.weight_dtype,
                               offset=self.offset.view(torch.float32)[0], state2=state2)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(self.packed.view(-1, 1), self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        # Same casts as bitsandbytes.nn.Linear4bit.forward, so the numerics are identical.
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return bnb.matmul_4bit(x, self.packed.view(-1, 1), bias=bias, quant_state=self.quant_state()).to(inp_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


_NESTED_CODE: dict[torch.device, torch.Tensor] = {}


def _nested_code(device: torch.device) -> torch.Tensor:
    """The 8-bit dynamic map bitsandbytes uses for double quant (a constant; cached per device)."""
    import bitsandbytes.functional as bnbF

    if device not in _NESTED_CODE:
        _NESTED_CODE[device] = bnbF.create_dynamic_map(signed=True).to(device)
    return _NESTED_CODE[device]
