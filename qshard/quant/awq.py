"""AWQ "gemm" checkpoints (AutoAWQ / gptqmodel layout), read in pure torch.

On disk, for a linear layer of `in` inputs and `out` outputs, 4-bit, groups of `group_size` inputs
(tests/fixtures/ptq/ checks this against autoawq's and gptqmodel's own dequantization):

    qweight  int32 [in, out / 8]       codes packed along `out`, 8 to a word, INTERLEAVED
    qzeros   int32 [groups, out / 8]   zero points, packed and interleaved the same way
    scales   fp16  [groups, out]       (gptqmodel keeps the model's dtype, e.g. bf16)
    bias     [out]                     optional

    W[o, i] = scales[i // group_size, o] * (q[i, o] - z[i // group_size, o])

The interleave: the 4-bit field k (bits 4k..4k+3) of a word holds output column AWQ_ORDER[k] of
that word's 8 columns, AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (it suits the GEMM kernel's
dequantization). The zero point is stored as is (no GPTQ-style minus one). A checkpoint saved
"without zero point" still stores qzeros, all 8 (2**(bits-1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qshard.errors import QShardError
from qshard.quant.base import (
    QuantLinear,
    as_bytes,
    dequantize_by_rows,
    frozen,
    nearest_codes,
    redequantizing_linear,
)
from qshard.quant.gptq import exact_product, pack_int32, require_tensors

QUANT_METHOD = "awq"
BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# column m of each group of 8 sits in field AWQ_REVERSE_ORDER[m]
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(m) for m in range(8))
_FIX = "use a 4-bit AWQ checkpoint saved in the 'gemm' version, or the original bf16 model"


@dataclass(frozen=True)
class AWQConfig:
    """What qshard needs from config.json's `quantization_config` for an AWQ checkpoint."""

    group_size: int
    zero_point: bool
    modules_to_not_convert: tuple[str, ...] = ()  # left dense by the quantizer


def read_config(qc: dict, where: str = "config.json") -> AWQConfig:
    """Parse and vet an AWQ `quantization_config`; unsupported variants raise a QShardError naming them."""
    field = f"{where}: quantization_config"
    if qc.get("quant_method") != QUANT_METHOD:
        raise QShardError(f"not an AWQ checkpoint (quant_method={qc.get('quant_method')!r})", where=field)
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if version != "gemm":
        raise QShardError(f"AWQ version {version!r} is not supported: its weights are packed for a specific kernel "
                          "(qshard reads 'gemm')", where=f"{field}.version", fix=_FIX)
    backend = str(qc.get("backend") or "autoawq").lower()
    if backend not in ("autoawq", "gptqmodel"):
        raise QShardError(f"AWQ backend {backend!r} (its own packing) is not supported", where=f"{field}.backend",
                          fix=_FIX)
    bits = int(qc.get("bits") or qc.get("w_bit") or 0)
    if bits != BITS:
        raise QShardError(f"{bits}-bit AWQ is not supported (qshard reads 4-bit gemm)", where=f"{field}.bits",
                          fix=_FIX)
    group_size = int(qc.get("group_size") or qc.get("q_group_size") or 0)
    if group_size <= 0:
        raise QShardError(f"AWQ group_size {group_size} is not supported (qshard reads grouped AWQ)",
                          where=f"{field}.group_size", fix=_FIX)
    return AWQConfig(group_size=group_size, zero_point=bool(qc.get("zero_point", True)),
                     modules_to_not_convert=tuple(qc.get("modules_to_not_convert") or ()))


def _unpack_awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """[rows, out / 8] interleaved words -> [rows, out] codes in column order: column 8w + j is field
    AWQ_REVERSE_ORDER[j] of word w, so each column is shifted out of its word directly (a gather of the
    fields into column order made AWQ's dequantization ~1.3x GPTQ's)."""
    shifts = torch.tensor([BITS * field for field in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    codes = packed.unsqueeze(2) >> shifts
    codes &= (1 << BITS) - 1  # arithmetic shift; the mask drops sign bits
    return codes.reshape(packed.shape[0], -1)


def _pack_awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """`_unpack_awq_columns`' inverse: [rows, out] codes -> [rows, out / 8] interleaved words."""
    fields = codes.reshape(codes.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]  # field k holds column AWQ_ORDER[k]
    return pack_int32(fields.reshape(codes.shape[0], -1), BITS, dim=1)


class AWQLinear(QuantLinear):
    """A frozen AWQ gemm linear layer: every tensor is a parameter, so ZeRO-3 and FSDP2 shard it."""

    def __init__(self, in_features: int, out_features: int, config: AWQConfig, *, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, compute_dtype: torch.dtype | None = None,
                 device="meta"):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.scale_dtype, self.compute_dtype = scale_dtype, compute_dtype or scale_dtype
        groups = -(-in_features // config.group_size)
        empty = lambda *size, dtype=torch.int32: frozen(torch.empty(size, dtype=dtype, device=device))  # noqa: E731
        self.qweight = empty(in_features, out_features * BITS // 32)
        self.qzeros = empty(groups, out_features * BITS // 32)
        self.scales = empty(groups * out_features * scale_dtype.itemsize, dtype=torch.uint8)
        self.bias = empty(out_features, dtype=scale_dtype) if bias else None

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], config: AWQConfig, *,
                        compute_dtype: torch.dtype | None = None, where: str = "") -> "AWQLinear":
        """Build a layer from its checkpoint tensors (keys without the module prefix: qweight, ...)."""
        require_tensors(tensors, ("qweight", "qzeros", "scales"), where)
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        in_f, out_f = qweight.shape[0], qweight.shape[1] * 32 // BITS
        groups = -(-in_f // config.group_size)
        if qweight.dtype != torch.int32 or tuple(qzeros.shape) != (groups, qweight.shape[1]) \
                or tuple(scales.shape) != (groups, out_f):
            raise QShardError(f"AWQ tensors of {where or 'a layer'} do not have the gemm layout (qweight "
                              f"{tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)})",
                              where=where, fix=_FIX)
        layer = cls(in_f, out_f, config, bias="bias" in tensors, scale_dtype=scales.dtype,
                    compute_dtype=compute_dtype, device=qweight.device)
        layer.qweight.data = qweight.contiguous()
        layer.qzeros.data = qzeros.contiguous()
        layer.scales.data = as_bytes(scales)
        if "bias" in tensors:
            layer.bias.data = tensors["bias"].contiguous()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight. In the scales' dtype (the default) it is bit-identical to AWQ's
        dequantize_gemm (autoawq and gptqmodel); see gptq.exact_product for other dtypes."""
        zeros = _unpack_awq_columns(self.qzeros)  # [groups, out]
        scales = self.scales.view(self.scale_dtype).view(-1, self.out_features).float()  # exact

        def rows(start: int, stop: int) -> torch.Tensor:  # input rows [start, stop) of the [in, out] weight
            group = torch.arange(start, stop, device=self.qweight.device) // self.config.group_size
            q = _unpack_awq_columns(self.qweight[start:stop])
            q -= zeros.index_select(0, group)  # index_select: ~5x faster than zeros[group] on a CPU
            return exact_product(q, scales.index_select(0, group), dtype or self.scale_dtype)

        return dequantize_by_rows(self.in_features, self.out_features, dtype or self.scale_dtype,
                                  self.qweight.device, rows).T

    def requantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """qweight for `weight` [out, in] on this layer's scales and zero points (see QuantLinear)."""
        zeros = _unpack_awq_columns(self.qzeros)  # [groups, out]
        scales = self.scales.view(self.scale_dtype).view(-1, self.out_features).float()
        group = torch.arange(self.in_features, device=self.qweight.device) // self.config.group_size
        codes = nearest_codes(weight.T, scales.index_select(0, group), zeros.index_select(0, group), BITS)
        return {"qweight": _pack_awq_columns(codes)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return redequantizing_linear(x, self, bias)  # keeps no dense weight for backward

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, awq gemm 4-bit, "
                f"group_size={self.config.group_size}, zero_point={self.config.zero_point}")
