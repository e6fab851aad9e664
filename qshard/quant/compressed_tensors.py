"""compressed-tensors "pack-quantized" checkpoints (llmcompressor's W4A16 / W8A16), read in pure torch.

On disk, for a linear layer [out, in] quantized to `bits` in groups of `group_size` inputs
(tests/fixtures/ptq/ checks this against compressed-tensors' own decompress):

    weight_packed      int32 [out, in * bits / 32]          codes packed along `in`, lowest bits first
    weight_scale       float [out, groups]                  (groups = 1 for the "channel" strategy)
    weight_zero_point  int32 [out * bits / 32, groups]      asymmetric only: packed along `out`
    weight_shape       int64 [2]                            (out, in)

Codes and zero points are stored unsigned, offset by 2**(bits-1) from the signed values the
library computes with; the offsets cancel in q - z. Symmetric schemes store no zero point (0).

    W[o, i] = weight_scale[o, i // group_size] * (q[o, i] - z[o, i // group_size])

rounded once to the scale's dtype, as the library computes it. Since compressed-tensors 0.12 packing is
"dense" (fields may straddle words); for 4 and 8 bits a field never straddles, so the layout is
the same in every version.
"""

from __future__ import annotations

import re
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
from qshard.quant.gptq import exact_product, pack_int32, require_tensors, unpack_int32

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
SUPPORTED_BITS = (4, 8)
_FIX = "use a pack-quantized W4A16/W8A16 checkpoint (llmcompressor's W4A16 or W8A16 scheme), or the bf16 model"


@dataclass(frozen=True)
class WeightScheme:
    """One config group's weight quantization, as far as the dequantization needs it."""

    bits: int
    group_size: int  # -1 for the "channel" strategy
    symmetric: bool


@dataclass(frozen=True)
class CompressedTensorsConfig:
    """The config groups (targets -> scheme) and the ignore list of a pack-quantized checkpoint."""

    groups: tuple[tuple[tuple[str, ...], WeightScheme], ...]
    ignore: tuple[str, ...]

    def scheme_for(self, module_name: str) -> WeightScheme | None:
        """The scheme of the nn.Linear `module_name`, or None where it stays dense (compressed-tensors'
        matching: a target is a class name, an exact module name or "re:<regex>" matched from the start)."""
        if any(_matches(module_name, t) for t in self.ignore):
            return None
        return next((scheme for targets, scheme in self.groups if any(_matches(module_name, t) for t in targets)),
                    None)


def _matches(module_name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return target == "Linear" or target == module_name


def read_config(qc: dict, where: str = "config.json") -> CompressedTensorsConfig:
    """Parse and vet a compressed-tensors `quantization_config`; unsupported variants raise a QShardError."""
    field = f"{where}: quantization_config"
    if qc.get("quant_method") != QUANT_METHOD:
        raise QShardError(f"not a compressed-tensors checkpoint (quant_method={qc.get('quant_method')!r})",
                          where=field)
    if qc.get("quantization_status", "compressed") != "compressed":
        raise QShardError(f"compressed-tensors checkpoints saved with status {qc['quantization_status']!r} "
                          "(not 'compressed') are not supported", where=f"{field}.quantization_status", fix=_FIX)
    for extra in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qc.get(extra):
            raise QShardError(f"compressed-tensors with a {extra} is not supported", where=f"{field}.{extra}",
                              fix=_FIX)
    groups = tuple(_read_group(name, group, qc.get("format"), f"{field}.config_groups.{name}")
                   for name, group in (qc.get("config_groups") or {}).items())
    if not groups:
        raise QShardError("compressed-tensors config has no config_groups", where=field, fix=_FIX)
    return CompressedTensorsConfig(groups=groups, ignore=tuple(qc.get("ignore") or ()))


def _read_group(name: str, group: dict, default_format: str | None, where: str):
    fmt = group.get("format") or default_format
    if fmt != FORMAT:
        raise QShardError(f"compressed-tensors format {fmt!r} is not supported (qshard reads {FORMAT!r})",
                          where=f"{where}.format", fix=_FIX)
    if group.get("input_activations") or group.get("output_activations"):
        raise QShardError("compressed-tensors schemes that quantize activations (e.g. W4A8, W8A8) are not supported",
                          where=f"{where}.input_activations", fix=_FIX)
    w = group.get("weights") or {}
    bits, strategy = int(w.get("num_bits", 0)), w.get("strategy")
    problems = {
        f"weight type {w.get('type')!r}": w.get("type") != "int",
        f"{bits}-bit weights": bits not in SUPPORTED_BITS,
        f"weight strategy {strategy!r}": strategy not in ("group", "channel"),
        "dynamic weight quantization": bool(w.get("dynamic")),
        "activation ordering 'group' (weight_g_idx)": w.get("actorder") == "group",
    }
    for problem, present in problems.items():
        if present:
            raise QShardError(f"compressed-tensors {problem} is not supported", where=f"{where}.weights", fix=_FIX)
    group_size = int(w["group_size"]) if strategy == "group" else -1
    scheme = WeightScheme(bits=bits, group_size=group_size, symmetric=bool(w.get("symmetric", True)))
    return tuple(group.get("targets") or ()), scheme


class PackQuantizedLinear(QuantLinear):
    """A frozen pack-quantized linear layer: every tensor is a parameter, so ZeRO-3 and FSDP2 shard it."""

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, *, bias: bool = False,
                 scale_dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype | None = None,
                 device="meta"):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.scale_dtype, self.compute_dtype = scale_dtype, compute_dtype or scale_dtype
        bits = scheme.bits
        groups = 1 if scheme.group_size == -1 else -(-in_features // scheme.group_size)
        empty = lambda *size, dtype=torch.int32: frozen(torch.empty(size, dtype=dtype, device=device))  # noqa: E731
        self.weight_packed = empty(out_features, in_features * bits // 32)
        self.weight_scale = empty(out_features * groups * scale_dtype.itemsize, dtype=torch.uint8)
        self.weight_zero_point = None if scheme.symmetric else empty(out_features * bits // 32, groups)
        self.bias = empty(out_features, dtype=scale_dtype) if bias else None

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], scheme: WeightScheme, *,
                        compute_dtype: torch.dtype | None = None, where: str = "") -> "PackQuantizedLinear":
        """Build a layer from its checkpoint tensors (keys without the module prefix: weight_packed, ...)."""
        require_tensors(tensors, ("weight_packed", "weight_scale", "weight_shape")
                        + (() if scheme.symmetric else ("weight_zero_point",)), where)
        if "weight_g_idx" in tensors:
            raise QShardError(f"{where or 'a layer'} has weight_g_idx (compressed-tensors 'group' activation "
                              "ordering), which is not supported", where=where, fix=_FIX)
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        out_f, in_f = (int(n) for n in tensors["weight_shape"])
        layer = cls(in_f, out_f, scheme, bias="bias" in tensors, scale_dtype=scale.dtype,
                    compute_dtype=compute_dtype, device=packed.device)
        expected = tuple(layer.weight_packed.shape), layer.weight_scale.numel() // scale.dtype.itemsize
        if (tuple(packed.shape), scale.numel()) != expected or packed.dtype != torch.int32:
            raise QShardError(f"pack-quantized tensors of {where or 'a layer'} do not match weight_shape "
                              f"{(out_f, in_f)} (weight_packed {tuple(packed.shape)}, weight_scale "
                              f"{tuple(scale.shape)})", where=where, fix=_FIX)
        layer.weight_packed.data = packed.contiguous()
        layer.weight_scale.data = as_bytes(scale)
        if not scheme.symmetric:
            layer.weight_zero_point.data = tensors["weight_zero_point"].contiguous()
        if "bias" in tensors:
            layer.bias.data = tensors["bias"].contiguous()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight. In the scale's dtype (the default) it is bit-identical to
        compressed-tensors' decompress; see gptq.exact_product for other dtypes."""
        bits, group_size, device = self.scheme.bits, self.scheme.group_size, self.weight_packed.device
        zeros = (1 << (bits - 1) if self.weight_zero_point is None  # the offset alone: signed zero point 0
                 else unpack_int32(self.weight_zero_point, bits, dim=0))  # [out, groups], same offset
        scale = self.weight_scale.view(self.scale_dtype).view(self.out_features, -1).float()  # [out, groups], exact
        group = torch.arange(self.in_features, device=device) // group_size if group_size != -1 else None

        def rows(start: int, stop: int) -> torch.Tensor:  # output rows [start, stop) of the [out, in] weight
            q = unpack_int32(self.weight_packed[start:stop], bits, dim=1)  # offset by 2**(bits-1)
            s, z = scale[start:stop], zeros[start:stop] if torch.is_tensor(zeros) else zeros
            if group is not None:  # per group -> per input column
                s, z = s.index_select(1, group), z.index_select(1, group) if torch.is_tensor(z) else z
            q -= z
            return exact_product(q, s, dtype or self.scale_dtype)

        return dequantize_by_rows(self.out_features, self.in_features, dtype or self.scale_dtype, device, rows)

    def requantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """weight_packed for `weight` [out, in] on this layer's scales and zero points (see QuantLinear):
        unsigned codes, offset by 2**(bits-1) as stored, so the signed range [-2**(bits-1), 2**(bits-1))
        the library clamps to is [0, 2**bits) here."""
        bits, group_size = self.scheme.bits, self.scheme.group_size
        zeros = (torch.tensor(1 << (bits - 1)) if self.weight_zero_point is None
                 else unpack_int32(self.weight_zero_point, bits, dim=0))  # [out, groups], offset
        scale = self.weight_scale.view(self.scale_dtype).view(self.out_features, -1).float()  # [out, groups]
        if group_size != -1:
            group = torch.arange(self.in_features, device=scale.device) // group_size
            scale = scale.index_select(1, group)
            zeros = zeros.index_select(1, group) if zeros.dim() else zeros
        return {"weight_packed": pack_int32(nearest_codes(weight, scale, zeros, bits), bits, dim=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return redequantizing_linear(x, self, bias)  # keeps no dense weight for backward

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, pack-quantized {s.bits}-bit, "
                f"group_size={s.group_size}, symmetric={s.symmetric}")
