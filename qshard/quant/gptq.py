"""GPTQ checkpoints (gptqmodel / AutoGPTQ / optimum layout), read in pure torch.

On disk, for a linear layer of `in` inputs and `out` outputs quantized to `bits` in groups of
`group_size` input rows (tests/fixtures/ptq/ checks all of this against gptqmodel's own dequant):

    qweight  int32 [in * bits / 32, out]      codes packed along `in`, lowest bits first
    qzeros   int32 [groups, out * bits / 32]  zero points packed along `out`, lowest bits first
    scales   fp16  [groups, out]
    g_idx    int32 [in]                       group of each input row (act-order permutes it)
    bias     fp16  [out]                      optional

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])

The zero point is stored as `z - 1` in the original ("gptq", v1) format and as `z` in "gptq_v2".
The v1 offset is undone on whole int32 words, `qzeros + 0x11111111` (4-bit) with carries, exactly
as gptqmodel converts v1 to v2: gptqmodel writes v1 as `v2 - 0x11111111`, so a zero point of 0
borrows from its neighbour and only the word-level addition restores both.
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

QUANT_METHOD = "gptq"
SUPPORTED_BITS = (4, 8)
# what each v1 word holds less than its v2 word: 1 in every field
V1_ZERO_OFFSET = {4: 0x11111111, 8: 0x01010101}
_FIX = "use a 4- or 8-bit GPTQ checkpoint in the plain 'gptq'/'gptq_v2' layout, or the original bf16 model"


@dataclass(frozen=True)
class GPTQConfig:
    """What qshard needs from config.json's `quantization_config` for a GPTQ checkpoint."""

    bits: int
    group_size: int  # -1: one group per output channel (per-channel quantization)
    desc_act: bool  # act-order: g_idx is a permutation of groups rather than i // group_size
    sym: bool
    v1_zeros: bool  # checkpoint_format "gptq": zero points stored minus one


def read_config(qc: dict, where: str = "config.json") -> GPTQConfig:
    """Parse and vet a GPTQ `quantization_config`; unsupported variants raise a QShardError naming them."""
    field = f"{where}: quantization_config"
    if qc.get("quant_method") != QUANT_METHOD:
        raise QShardError(f"not a GPTQ checkpoint (quant_method={qc.get('quant_method')!r})", where=field)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if qc.get("is_marlin_format") or fmt == "marlin":
        raise QShardError("Marlin-packed GPTQ checkpoints are not supported (their weights are re-tiled "
                          "for the Marlin kernel)", where=f"{field}.checkpoint_format", fix=_FIX)
    if fmt not in ("gptq", "gptq_v2"):
        raise QShardError(f"GPTQ checkpoint format {fmt!r} is not supported (qshard reads 'gptq' and 'gptq_v2')",
                          where=f"{field}.checkpoint_format", fix=_FIX)
    bits = int(qc.get("bits", 0))
    if bits not in SUPPORTED_BITS:
        raise QShardError(f"{bits}-bit GPTQ is not supported (qshard reads 4 and 8 bits)", where=f"{field}.bits",
                          fix=_FIX)
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise QShardError(f"GPTQ packed into {qc['pack_dtype']} is not supported (qshard reads int32 words)",
                          where=f"{field}.pack_dtype", fix=_FIX)
    if qc.get("dynamic"):
        raise QShardError("GPTQ with per-module `dynamic` overrides (mixed bits or group sizes) is not supported",
                          where=f"{field}.dynamic", fix=_FIX)
    if qc.get("lm_head"):
        raise QShardError("a GPTQ-quantized lm_head is not supported", where=f"{field}.lm_head",
                          fix="quantize the model with lm_head=False")
    group_size = int(qc.get("group_size", -1))
    if group_size != -1 and group_size <= 0:
        raise QShardError(f"invalid GPTQ group_size {group_size}", where=f"{field}.group_size", fix=_FIX)
    return GPTQConfig(bits=bits, group_size=group_size, desc_act=bool(qc.get("desc_act", False)),
                      sym=bool(qc.get("sym", True)), v1_zeros=fmt == "gptq")


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The `bits`-wide codes packed 32 // bits to an int32 along `dim` (2-D), lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    # fields laid out right after `dim`, so the reshape below is a view, not a copy
    codes = packed.unsqueeze(dim + 1) >> shifts.view(-1, *[1] * (packed.dim() - dim - 1))
    codes &= (1 << bits) - 1  # arithmetic shift; the mask drops sign bits
    shape = list(packed.shape)
    shape[dim] *= 32 // bits
    return codes.reshape(shape)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """`unpack_int32`'s inverse: 2-D codes in [0, 2**bits) packed 32 // bits to an int32 along `dim`."""
    per_word = 32 // bits
    shape = list(codes.shape)
    shape[dim:dim + 1] = [shape[dim] // per_word, per_word]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    fields = codes.to(torch.int64).reshape(shape) << shifts.view(-1, *[1] * (codes.dim() - dim - 1))
    words = fields.sum(dim + 1)  # the fields do not overlap: the sum is their bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement, as stored


def exact_product(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scales rounded once, to `dtype`.

    A code (|c| < 256) times a 16-bit float is exact in float32, so rounding that product to the
    scales' own dtype gives what the libraries' half-precision multiply gives, bit for bit, and to
    float32 gives the exact value (what transformers' float32 load of compressed-tensors computes;
    float32 scales round once, as in the libraries). Rounding the scale first (scales.to(bf16) for
    a bf16 run on fp16 scales) would round twice.
    """
    product = codes.to(torch.float32, copy=True)
    product *= scales  # in float32 (type promotion), in place: one float32 temporary, not three
    return product.to(dtype)


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


class GPTQLinear(QuantLinear):
    """A frozen GPTQ linear layer: every tensor is a parameter, so ZeRO-3 and FSDP2 shard it.

    `scales` holds the raw bytes of the checkpoint's float scales (an engine never casts integer
    parameters); zero points are kept in v2 form (the true zero point), whatever the checkpoint had.
    """

    def __init__(self, in_features: int, out_features: int, config: GPTQConfig, *, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, compute_dtype: torch.dtype | None = None,
                 device="meta"):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.scale_dtype, self.compute_dtype = scale_dtype, compute_dtype or scale_dtype
        bits, groups = config.bits, n_groups(in_features, config.group_size)
        empty = lambda *size, dtype=torch.int32: frozen(torch.empty(size, dtype=dtype, device=device))  # noqa: E731
        self.qweight = empty(in_features * bits // 32, out_features)
        self.qzeros = empty(groups, out_features * bits // 32)
        self.scales = empty(groups * out_features * scale_dtype.itemsize, dtype=torch.uint8)
        self.g_idx = empty(in_features)
        self.bias = empty(out_features, dtype=scale_dtype) if bias else None

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], config: GPTQConfig, *,
                        compute_dtype: torch.dtype | None = None, where: str = "") -> "GPTQLinear":
        """Build a layer from its checkpoint tensors (keys without the module prefix: qweight, ...)."""
        require_tensors(tensors, ("qweight", "qzeros", "scales"), where)
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        in_f, out_f = qweight.shape[0] * 32 // config.bits, qweight.shape[1]
        expected = (n_groups(in_f, config.group_size), out_f * config.bits // 32)
        if qweight.dtype != torch.int32 or tuple(qzeros.shape) != expected or scales.shape[1] != out_f:
            raise QShardError(f"GPTQ tensors of {where or 'a layer'} do not have the plain GPTQ layout "
                              f"(qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros {tuple(qzeros.shape)}, "
                              f"expected {expected}) -- exllama/Marlin re-packed weights are not supported",
                              where=where, fix=_FIX)
        layer = cls(in_f, out_f, config, bias="bias" in tensors, scale_dtype=scales.dtype,
                    compute_dtype=compute_dtype, device=qweight.device)
        layer.qweight.data = qweight.contiguous()
        layer.qzeros.data = _v1_to_v2(qzeros, config.bits) if config.v1_zeros else qzeros.contiguous()
        layer.scales.data = as_bytes(scales)
        g_idx = tensors.get("g_idx")
        layer.g_idx.data = g_idx.to(torch.int32).contiguous() if g_idx is not None else _plain_g_idx(in_f, config)
        if "bias" in tensors:
            layer.bias.data = tensors["bias"].contiguous()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight. In the scales' dtype (the default) it is bit-identical to
        gptqmodel's dequantize_weight(); see `exact_product` for other dtypes."""
        bits, per_word = self.config.bits, 32 // self.config.bits
        zeros = unpack_int32(self.qzeros, bits, dim=1)  # [groups, out]
        scales = self.scales.view(self.scale_dtype).view(-1, self.out_features).float()  # exact

        def rows(start: int, stop: int) -> torch.Tensor:  # input rows [start, stop) of the [in, out] weight
            q = unpack_int32(self.qweight[start // per_word:stop // per_word], bits, dim=0)
            g = self.g_idx[start:stop].long()
            q -= zeros.index_select(0, g)  # index_select: ~5x faster than zeros[g] on a CPU
            return exact_product(q, scales.index_select(0, g), dtype or self.scale_dtype)

        return dequantize_by_rows(self.in_features, self.out_features, dtype or self.scale_dtype,
                                  self.qweight.device, rows, align=per_word).T

    def requantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """qweight for `weight` [out, in] on this layer's scales, zero points and g_idx (see QuantLinear)."""
        bits = self.config.bits
        zeros = unpack_int32(self.qzeros, bits, dim=1)  # [groups, out]
        scales = self.scales.view(self.scale_dtype).view(-1, self.out_features).float()
        g = self.g_idx.long()
        codes = nearest_codes(weight.T, scales.index_select(0, g), zeros.index_select(0, g), bits)  # [in, out]
        return {"qweight": pack_int32(codes, bits, dim=0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return redequantizing_linear(x, self, bias)  # keeps no dense weight for backward

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, gptq {c.bits}-bit, "
                f"group_size={c.group_size}, desc_act={c.desc_act}, sym={c.sym}")


def _v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Add one to every packed zero point, on whole words with carries and 32-bit wrap-around."""
    words = (qzeros.to(torch.int64) + V1_ZERO_OFFSET[bits]) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _plain_g_idx(in_features: int, config: GPTQConfig) -> torch.Tensor:
    """Input row i in group i // group_size: what a checkpoint without act-order (or without g_idx) means."""
    size = in_features if config.group_size == -1 else config.group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def require_tensors(tensors: dict, names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise QShardError(f"checkpoint tensors {', '.join(missing)} missing for {where or 'a quantized layer'} "
                          f"(found: {', '.join(sorted(tensors)) or 'none'})", where=where,
                          fix="the checkpoint does not match its quantization_config; re-export it")
