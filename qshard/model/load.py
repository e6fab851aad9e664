"""Build a base model without materialising it, then stream the checkpoint in, quantizing on the fly.

The skeleton is created with parameters on the meta device (no memory), the linear layers that will
be quantized are swapped for empty quantized shells, and each tensor of the safetensors checkpoint is
read, cast, quantized and placed one at a time. Peak memory is the quantized model plus one dense
tensor, never the dense model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qshard.errors import QShardError
from qshard.quant import ptq
from qshard.quant.base import QuantLinear
from qshard.quant.bnb4bit import Linear4bit
from qshard.quant.bnb8bit import Linear8bit

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_LAYERS = (QuantLinear,)


@dataclass(frozen=True)
class QuantSpec:
    """How base linears are stored: method none | nf4 | fp4 | int8, plus bitsandbytes options."""

    method: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32
    int8_threshold: float = 6.0
    skip_modules: tuple[str, ...] = ("lm_head",)


def resolve_model_dir(path: str) -> Path:
    """A local folder with config.json, or a hub id downloaded where a network exists."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise QShardError(f"{local} has no config.json, so it is not a Hugging Face model folder",
                              where="model.path", fix="point model.path at the folder that holds config.json "
                                                      "(create one with `qshard init-tiny DIR`)")
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                            "*.txt"]))
    except Exception as e:  # any hub failure is a user-facing "cannot find the model"
        raise QShardError(f"model {path!r} is not a local folder and could not be fetched from the hub ({e})",
                          where="model.path", fix="give the path of a local model folder") from None


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise QShardError(f"cannot load a tokenizer from {model_dir}: {e}", where="model.path",
                          fix="the model folder needs tokenizer files (tokenizer.json / tokenizer_config.json)")


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise QShardError(f"no safetensors weights in {model_dir}", where="model.path",
                      fix="qshard reads model.safetensors (or a sharded index); convert .bin weights with "
                          "`model.save_pretrained(dir, safe_serialization=True)`")


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    config = json.loads((model_dir / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return DTYPES.get(name, torch.float32)


def build_skeleton(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The architecture with every parameter on meta; buffers (rotary tables) are real and small."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def quantized_linear_names(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Every nn.Linear that the spec quantizes (all but skip_modules), in module order."""
    if spec.method in ("none", "checkpoint"):
        return []
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in spec.skip_modules)]


def swap_in_quantized_shells(model: nn.Module, names: list[str], spec: QuantSpec, dtype: torch.dtype) -> None:
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        dense = model.get_submodule(name)
        if spec.method == "int8":
            shell = Linear8bit(dense.in_features, dense.out_features, threshold=spec.int8_threshold,
                               weight_dtype=dtype, bias=dense.bias is not None)
        else:
            shell = Linear4bit(dense.in_features, dense.out_features, quant_type=spec.method,
                               double_quant=spec.double_quant, compute_dtype=spec.compute_dtype,
                               weight_dtype=dtype, bias=dense.bias is not None)
        setattr(model.get_submodule(parent_name), leaf, shell)


def quantized_like(shell: nn.Module, weight: torch.Tensor, spec: QuantSpec) -> QuantLinear:
    """A dense weight quantized as the empty shell's layer type and the spec say (a new, filled layer)."""
    if isinstance(shell, Linear8bit):
        return Linear8bit.from_float(weight, threshold=spec.int8_threshold)
    return Linear4bit.from_float(weight, quant_type=spec.method, double_quant=spec.double_quant,
                                 compute_dtype=spec.compute_dtype)


def quantize_into(shell: nn.Module, weight: torch.Tensor, spec: QuantSpec) -> None:
    """Fill an empty quantized shell's parameters from a dense weight."""
    for pname, p in quantized_like(shell, weight, spec).named_parameters():
        if pname != "bias":
            setattr(shell, pname, p)


def converted_ptq(layer: QuantLinear, target: nn.Module, quant: QuantSpec, dtype: torch.dtype,
                  error: list[float]) -> dict[str, torch.Tensor]:
    """A PTQ layer's tensors as `target` (a quantized shell, or a dense nn.Linear) stores them: dequantized
    to `dtype`, then quantized as `quant` says; adds the squared conversion error and the squared
    weight norm to `error`."""
    dense = layer.dequantize(dtype)
    if isinstance(target, QUANT_LAYERS):
        filled = quantized_like(target, dense, quant)
        error[0] += float((filled.dequantize().float() - dense.float()).square().sum())
        error[1] += float(dense.float().square().sum())
        tensors = {n: p for n, p in filled.named_parameters() if n != "bias"}
    else:
        tensors = {"weight": dense}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(dtype)
    return tensors


def log_conversion_error(fmt_name: str, quant: QuantSpec, error: list[float], log) -> None:
    if error[1]:
        log(f"converting the {fmt_name} base to {quant.method} added a relative weight error of "
            f"{(error[0] / error[1]) ** 0.5:.4f} (RMS over all quantized layers)")


def open_base(path: str, *, dtype: str = "auto", quant: QuantSpec = QuantSpec()) -> tuple[Path, nn.Module]:
    """Find the checkpoint and build its empty skeleton (quantized shells in place): cheap, so every
    check that needs the architecture (LoRA targets) runs before any weight is read."""
    model_dir = resolve_model_dir(path)
    checkpoint_files(model_dir)
    torch_dtype = checkpoint_dtype(model_dir) if dtype == "auto" else DTYPES[dtype]
    skeleton = build_skeleton(model_dir, torch_dtype)
    swap_in_quantized_shells(skeleton, quantized_linear_names(skeleton, quant), quant, torch_dtype)
    return model_dir, skeleton


def load_base_model(skeleton: nn.Module, model_dir: Path, *, quant: QuantSpec = QuantSpec(),
                    device: torch.device = torch.device("cpu"), log=print) -> nn.Module:
    """Stream the weights into the skeleton, quantizing on the fly. Frozen, in eval mode.

    A post-training-quantized checkpoint (GPTQ, AWQ, compressed-tensors) keeps its own layers with
    quantization.method `checkpoint`, is converted (dequantized, then quantized by bitsandbytes) with
    nf4/fp4/int8, or dequantized to dense with none."""
    fmt = ptq.detect(model_dir)
    if fmt is None:
        if quant.method == "checkpoint":
            raise QShardError(f"{model_dir} is not a GPTQ/AWQ/compressed-tensors checkpoint", where="quantization.method",
                              fix="use nf4 (or fp4 / int8 / none) for a dense checkpoint")
        _stream_tensors(skeleton, checkpoint_files(model_dir), quant, skeleton.dtype, device)
    else:
        _load_ptq(skeleton, model_dir, fmt, quant, skeleton.dtype, device, log)
    skeleton.tie_weights()
    check_materialised(skeleton, model_dir)
    skeleton.requires_grad_(False)
    skeleton.config.name_or_path = str(model_dir)
    return skeleton.to(device).eval()


def load_model(path: str, *, dtype: str = "auto", quant: QuantSpec = QuantSpec(),
               device: torch.device = torch.device("cpu"), log=print) -> nn.Module:
    """open_base + load_base_model in one call (for scripts and tests)."""
    model_dir, skeleton = open_base(path, dtype=dtype, quant=quant)
    return load_base_model(skeleton, model_dir, quant=quant, device=device, log=log)


def _stream_tensors(model: nn.Module, files: list[Path], quant: QuantSpec, dtype: torch.dtype,
                    device: torch.device) -> None:
    reader = CheckpointReader(files)
    for key in reader.keys():
        place_tensors(model, {key: reader.rows(key, dtype=dtype).to(device)}, quant, dtype)  # one tensor at a time
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A loader frees one transient tensor after another; glibc keeps most of those blocks in its heap
    (its mmap threshold rises to the largest block freed, up to 32 MiB), so resident memory grows
    with what was *read*, not with what is *held*. Called once per tensor or layer while loading."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = lambda _pad: 0  # noqa: E731  (not glibc)
    _malloc_trim(0)


_malloc_trim = None


class CheckpointReader:
    """Reads whole tensors or row ranges of safetensors files with plain file reads.

    safetensors' `safe_open` maps the file: every page it reads stays in the process's resident set
    until the file is closed, so a loader's memory looks like the checkpoint's size. Reading into
    our own tensors keeps resident memory to what is held, and lets a rank read only its rows."""

    CHUNK_BYTES = 4 * 2**20  # rows converted to another dtype are read this much at a time
    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, int, torch.dtype, list[int]]] = {}
        for file in files:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in self._DTYPES:
                    raise QShardError(f"{file.name}: tensor {key} has dtype {info['dtype']}, which qshard cannot read",
                                      where=str(file), fix="save the checkpoint in bf16, fp16 or fp32")
                self.entries[key] = (file, 8 + size + info["data_offsets"][0], self._DTYPES[info["dtype"]],
                                     info["shape"])

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return self.entries[key][3]

    def rows(self, key: str, start: int = 0, stop: int | None = None, *, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (all of it by default; a 0-d tensor has one row), floating
        values converted to `dtype` (or into `out`)."""
        shape = self.shape(key)
        count = shape[0] if shape else 1
        stop = count if stop is None else min(stop, count)
        row = math.prod(shape[1:])
        if out is None:
            out = torch.empty([stop - start, *shape[1:]] if shape else [], dtype=self._target(key, dtype))
        self.flat(key, start * row, stop * row, out=out.view(-1))
        return out

    def flat(self, key: str, start: int, stop: int, *, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a 1-d tensor (or written into `out`, on any
        device), floating values converted at most CHUNK_BYTES of stored elements at a time."""
        file, offset, stored, _ = self.entries[key]
        if out is None:
            out = torch.empty(stop - start, dtype=self._target(key, dtype))
        if out.numel() != stop - start:
            raise ValueError(f"{key}: {out.numel()} elements to fill, [{start}, {stop}) requested")
        with open(file, "rb") as f:
            f.seek(offset + start * stored.itemsize)
            if out.dtype == stored and out.device.type == "cpu":
                self._read_into(f, out.view(-1), key)
                return out
            step = max(1, self.CHUNK_BYTES // stored.itemsize)
            for e in range(start, stop, step):
                raw = self._read_into(f, torch.empty(min(step, stop - e), dtype=stored), key)
                out.view(-1)[e - start:e - start + raw.numel()].copy_(raw)
        return out

    def _target(self, key: str, dtype: torch.dtype | None) -> torch.dtype:
        stored = self.entries[key][2]
        return dtype if dtype is not None and stored.is_floating_point else stored

    def _read_into(self, f, buffer: torch.Tensor, key: str) -> torch.Tensor:
        want = buffer.numel() * buffer.element_size()
        if want and f.readinto(buffer.view(torch.uint8).numpy()) != want:
            raise QShardError(f"{f.name} ends inside tensor {key}: the file is truncated", where=str(f.name),
                              fix="copy or download the checkpoint again")
        return buffer


def _load_ptq(model: nn.Module, model_dir: Path, fmt, quant: QuantSpec, dtype: torch.dtype, device: torch.device,
              log) -> None:
    """PTQ tensors are compact (the packed model): read them all, then build layer by layer."""
    from safetensors import safe_open

    tensors = {}
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    modules, rest = ptq.group_tensors(tensors, fmt.marker)
    place_tensors(model, rest, quant, dtype)
    error = [0.0, 0.0]  # squared error of a conversion, squared norm of the PTQ weights
    for name, layer_tensors in modules.items():
        layer = fmt.build(layer_tensors, fmt.config, name)
        parent_name, _, leaf = name.rpartition(".")
        target = model.get_submodule(name)
        if quant.method == "checkpoint":
            layer.compute_dtype = dtype
            setattr(model.get_submodule(parent_name), leaf, layer)
            continue
        for pname, tensor in converted_ptq(layer, target, quant, dtype, error).items():
            setattr(target, pname, nn.Parameter(tensor, requires_grad=False))
        release_freed_memory()  # each layer's dense temporaries (else glibc keeps them: 7x the model's RSS)
    log_conversion_error(fmt.name, quant, error, log)


def place_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], quant: QuantSpec, dtype: torch.dtype) -> None:
    for key, tensor in tensors.items():
        module_name, _, pname = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if isinstance(module, QUANT_LAYERS) and pname == "weight":
            quantize_into(module, tensor.to(dtype), quant)
        elif pname in module._parameters:
            module._parameters[pname] = nn.Parameter(tensor.to(dtype), requires_grad=False)
        elif pname in module._buffers:
            module._buffers[pname] = tensor


def check_materialised(model: nn.Module, model_dir: Path) -> None:
    missing = []
    for name, module in model.named_modules():
        unread = [p for p, t in module.named_parameters(recurse=False) if t.device.type == "meta"]
        # a quantized layer's packed tensors all come from one checkpoint tensor: `<name>.weight`
        keys = ["weight"] if unread and isinstance(module, QUANT_LAYERS) and unread != ["bias"] else unread
        missing += [f"{name}.{k}" for k in keys]
    raise_if_missing(missing, model_dir)


def raise_if_missing(missing: list[str], model_dir: Path) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise QShardError(f"the checkpoint lacks {len(missing)} tensor(s) the architecture needs: {shown}",
                          where=str(model_dir), fix="check that the weights belong to this config.json")
