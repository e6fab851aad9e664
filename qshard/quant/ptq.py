"""Which post-training-quantized format a checkpoint is in, and how to build its layers.

One dispatch list, first match wins: each entry names config.json's `quant_method`, the tensor
that marks a quantized module, and how to turn that module's checkpoint tensors into a layer.
A pre-quantized bitsandbytes 4-bit checkpoint (as transformers saves a `load_in_4bit` model) is one
of them: its layers are qshard's own NF4/FP4 layer (qshard/quant/bnb4bit.py), so its table name is
the base it is, nf4 or fp4. Its tensor names have dots below the module (`<m>.weight.absmax`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qshard.errors import QShardError
from qshard.model.folder import read_config
from qshard.quant import awq, bnb4bit, compressed_tensors, gptq
from qshard.quant.base import QuantLinear


@dataclass(frozen=True)
class PTQFormat:
    name: str  # the compatibility table's base name
    marker: str  # tensor name that marks a quantized module (`<module>.<marker>`)
    config: object  # the format's parsed quantization_config
    build: Callable[[dict, object, str], QuantLinear]  # (module tensors, config, module name) -> layer
    layout_leaves: tuple[str, ...] = ()  # leaves (prefixes) whose values, not only shapes, define the layer


def _build_gptq(tensors: dict, config, name: str) -> QuantLinear:
    return gptq.GPTQLinear.from_checkpoint(tensors, config, where=name)


def _build_awq(tensors: dict, config, name: str) -> QuantLinear:
    return awq.AWQLinear.from_checkpoint(tensors, config, where=name)


def _build_ct(tensors: dict, config, name: str) -> QuantLinear:
    scheme = config.scheme_for(name)
    if scheme is None:
        raise QShardError(f"{name} has packed weights but no compressed-tensors scheme targets it", where=name)
    return compressed_tensors.PackQuantizedLinear.from_checkpoint(tensors, scheme, where=name)


def _build_bnb4bit(tensors: dict, config, name: str) -> QuantLinear:
    return bnb4bit.Linear4bit.from_checkpoint(tensors, config, where=name)


# quant_method -> (table name, marker, read_config, build, layout leaves); name None: the config's quant_type
FORMATS = {
    "gptq": ("gptq", "qweight", gptq.read_config, _build_gptq, ()),
    "awq": ("awq", "qweight", awq.read_config, _build_awq, ()),
    "compressed-tensors": ("compressed-tensors", "weight_packed", compressed_tensors.read_config, _build_ct, ()),
    "bitsandbytes": (None, "weight.quant_map", bnb4bit.read_config, _build_bnb4bit, bnb4bit.LAYOUT_LEAVES),
}


def detect(model_dir: Path) -> PTQFormat | None:
    """The checkpoint's PTQ format from config.json (None for a dense checkpoint). Unsupported
    formats and variants are refused here, before anything is loaded."""
    config_file = model_dir / "config.json"
    qc = read_config(model_dir).get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise QShardError(f"config.json's quantization_config is a JSON {type(qc).__name__}, not an object",
                          where=f"{config_file}: quantization_config",
                          fix="restore config.json from the model's source")
    method = str(qc.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise QShardError(f"checkpoint quantization {method!r} is not supported", where=f"{config_file}: "
                          "quantization_config.quant_method", fix="use a GPTQ, AWQ (gemm), compressed-tensors "
                          "(pack-quantized) or bitsandbytes 4-bit checkpoint, or the original model with "
                          "quantization.method nf4")
    name, marker, read_format_config, build, layout = FORMATS[method]
    try:
        config = read_format_config(qc, where=str(config_file))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # "bits": "four", a list for a mapping, ...
        raise QShardError(f"config.json's quantization_config cannot be read ({type(e).__name__}: {e})",
                          where=f"{config_file}: quantization_config", fix="restore config.json from the model's "
                                                                          "source") from None
    return PTQFormat(name or config.quant_type, marker, config, build, layout)


def quantized_modules(keys, marker: str) -> dict[str, list[str]]:
    """{quantized module: the leaf names of its tensors} from a checkpoint's tensor names: a module is
    quantized when it has a `<module>.<marker>` tensor, and every tensor under it is one of its leaves."""
    keys = list(keys)
    suffix = "." + marker
    leaves: dict[str, list[str]] = {key[:-len(suffix)]: [] for key in keys if key.endswith(suffix)}
    for key in keys:
        owner = layer_of(key, leaves)
        if owner is not None:
            leaves[owner[0]].append(owner[1])
    return leaves


def layer_of(key: str, layers) -> tuple[str, str] | None:
    """(module, leaf) when tensor `key` belongs to one of the quantized modules `layers`, else None. The
    leaf may hold dots (bitsandbytes' `weight.absmax`); a quantized linear has no submodules, so the
    module is the one prefix of the key in `layers`."""
    end = len(key)
    while (end := key.rfind(".", 0, end)) > 0:
        if key[:end] in layers:
            return key[:end], key[end + 1:]
    return None
