"""Which post-training-quantized format a checkpoint is in, and how to build its layers.

One dispatch list, first match wins: each entry names config.json's `quant_method`, the tensor
that marks a quantized module, and how to turn that module's checkpoint tensors into a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qshard.errors import QShardError
from qshard.model.folder import read_config
from qshard.quant import awq, compressed_tensors, gptq
from qshard.quant.base import QuantLinear


@dataclass(frozen=True)
class PTQFormat:
    name: str  # the compatibility table's base name
    marker: str  # tensor name that marks a quantized module (`<module>.<marker>`)
    config: object  # the format's parsed quantization_config
    build: Callable[[dict, object, str], QuantLinear]  # (module tensors, config, module name) -> layer


def _build_gptq(tensors: dict, config, name: str) -> QuantLinear:
    return gptq.GPTQLinear.from_checkpoint(tensors, config, where=name)


def _build_awq(tensors: dict, config, name: str) -> QuantLinear:
    return awq.AWQLinear.from_checkpoint(tensors, config, where=name)


def _build_ct(tensors: dict, config, name: str) -> QuantLinear:
    scheme = config.scheme_for(name)
    if scheme is None:
        raise QShardError(f"{name} has packed weights but no compressed-tensors scheme targets it", where=name)
    return compressed_tensors.PackQuantizedLinear.from_checkpoint(tensors, scheme, where=name)


FORMATS = {  # quant_method -> (table name, marker, read_config, build)
    "gptq": ("gptq", "qweight", gptq.read_config, _build_gptq),
    "awq": ("awq", "qweight", awq.read_config, _build_awq),
    "compressed-tensors": ("compressed-tensors", "weight_packed", compressed_tensors.read_config, _build_ct),
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
                          "quantization_config.quant_method", fix="use a GPTQ, AWQ (gemm) or compressed-tensors "
                          "(pack-quantized) checkpoint, or the original model with quantization.method nf4")
    name, marker, read_format_config, build = FORMATS[method]
    try:
        config = read_format_config(qc, where=str(config_file))
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # "bits": "four", a list for a mapping, ...
        raise QShardError(f"config.json's quantization_config cannot be read ({type(e).__name__}: {e})",
                          where=f"{config_file}: quantization_config", fix="restore config.json from the model's "
                                                                          "source") from None
    return PTQFormat(name, marker, config, build)


def quantized_modules(keys, marker: str) -> dict[str, list[str]]:
    """{quantized module: the leaf names of its tensors} from a checkpoint's tensor names."""
    leaves: dict[str, list[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        leaves.setdefault(module, []).append(leaf)
    return {module: names for module, names in leaves.items() if marker in names}
