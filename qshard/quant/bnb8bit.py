"""LLM.int8() base layers (bitsandbytes), stored as engine-shardable parameters.

`weight_int8` holds the row-wise int8 codes [out, in]; `row_scale` the float32 bytes of the per-row
absmax (bitsandbytes' SCB). As in `bnb4bit`, float constants are kept as bytes so that no engine
casts them; the forward is bitsandbytes' own `bnb.matmul`, so results match `Linear8bitLt`.
"""

from __future__ import annotations

import torch

from qshard.quant.base import QuantLinear, as_bytes, cut, frozen


class Linear8bit(QuantLinear):
    """A frozen int8 linear layer with bitsandbytes' outlier threshold (6.0 as in LLM.int8())."""

    def __init__(self, in_features: int, out_features: int, *, threshold: float = 6.0,
                 weight_dtype: torch.dtype = torch.float32, bias: bool = False, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.weight_dtype = threshold, weight_dtype
        self.compute_dtype = weight_dtype
        self.weight_int8 = frozen(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.row_scale = frozen(torch.empty(4 * out_features, dtype=torch.uint8, device=device))
        self.bias = frozen(torch.empty(out_features, dtype=weight_dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   threshold: float = 6.0, **_: object) -> "Linear8bit":
        """Quantize exactly as bitsandbytes' Int8Params does (row-wise absmax of the fp16 weight)."""
        import bitsandbytes.functional as bnbF

        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, threshold=threshold, weight_dtype=weight.dtype, bias=bias is not None,
                    device=weight.device)
        cb, scb, _ = bnbF.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        layer.weight_int8.data = cb
        layer.row_scale.data = as_bytes(scb.float())
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    def quantize_pieces(self, read_rows, owned, slices):
        """Row-wise quantization: the codes and the scale of a row depend on that row alone, so only the
        rows that hold this rank's elements are read (its code elements may start or end inside a row,
        its scale bytes may belong to slightly other rows)."""
        import bitsandbytes.functional as bnbF

        def quantize(span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            rows = read_rows(*span)
            if rows.shape[0] == 0:  # owns nothing here: empty pieces, on the device the rows are read to
                return rows.new_empty(0, self.in_features, dtype=torch.int8), rows.new_empty(0, dtype=torch.float32)
            cb, scb, _ = bnbF.int8_vectorwise_quant(rows.to(self.weight_dtype).to(torch.float16))
            return cb, scb.float()

        def rows_holding(span: tuple[int, int], row: int) -> tuple[int, int]:
            return span[0] // row, -(-span[1] // row)

        code_rows = rows_holding(owned["weight_int8"], self.in_features)
        codes, _ = quantize(code_rows)
        scale_rows = rows_holding(owned["row_scale"], 4)
        _, scales = quantize(scale_rows)
        return {"weight_int8": cut(codes.reshape(-1), owned["weight_int8"], start=self.in_features * code_rows[0]),
                "row_scale": cut(as_bytes(scales), owned["row_scale"], start=4 * scale_rows[0])}

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbF

        return bnbF.int8_vectorwise_dequant(self.weight_int8, self.row_scale.view(torch.float32)).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        state = bnb.MatmulLtState()
        state.threshold, state.has_fp16_weights, state.is_training = self.threshold, False, self.training
        state.CB, state.SCB = self.weight_int8, self.row_scale.view(torch.float32)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul(x, self.weight_int8, bias=bias, state=state)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, threshold={self.threshold}"
