"""Build a base model without materialising it, then stream the checkpoint in, quantizing on the fly.

The skeleton is created with parameters on the meta device (no memory), the linear layers that will
be quantized are swapped for empty quantized shells, and each tensor of the safetensors checkpoint is
read, cast, quantized and placed one at a time. Peak memory is the quantized model plus one dense
tensor, never the dense model.

Opening a base (`open_base`) reads no weight but checks everything else first: the folder's files
(qshard/model/folder.py: no code of the folder runs, nothing outside it is read, every header is well
formed), then the checkpoint against the architecture config.json describes (`check_checkpoint_fits`):
every tensor it needs is there, with the shape the config implies. A tensor the architecture has no
place for is ignored and named in the log, as transformers does.

Checkpoint names are read as transformers reads them (qshard/model/convert.py): its own conversion
rules rename tensors (GPT-NeoX's `embed_out` -> `lm_head`) and stack Mixture-of-Experts tensors
(`experts.N.w1/w3` -> `experts.gate_up_proj`), one target (at most one layer's experts) at a time;
the header check compares the converted names and shapes. Fused expert parameters (3-D, one per
MoE layer and projection) become ExpertStacks (qshard/model/experts.py): quantized per expert as the
linear layers are (nf4/fp4/int8), dense otherwise; the router stays in the recipe's dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qshard.errors import QShardError
from qshard.model import convert, experts, folder, vocab
from qshard.quant import ptq
from qshard.quant.base import QuantLinear
from qshard.quant.bnb4bit import Linear4bit
from qshard.quant.bnb8bit import Linear8bit

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_LAYERS = (QuantLinear,)
# The tokenizer files that are JSON: each is checked (an object, no custom code) before transformers reads it.
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")


@dataclass(frozen=True)
class QuantSpec:
    """How base linears are stored: method none | nf4 | fp4 | int8, plus bitsandbytes options."""

    method: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32
    int8_threshold: float = 6.0
    skip_modules: tuple[str, ...] = ("lm_head",)


def resolve_model_dir(path: str) -> Path:
    """A local folder with config.json, or a hub id downloaded where a network exists; either way the
    files qshard may read from it are checked first (folder.check_entries)."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise QShardError(f"{local} has no config.json, so it is not a Hugging Face model folder",
                              where="model.path", fix="point model.path at the folder that holds config.json "
                                                      "(create one with `qshard init-tiny DIR`)")
        folder.check_entries(local)
        return local
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path, allow_patterns=list(folder.READ_PATTERNS)))
    except Exception as e:  # any hub failure is a user-facing "cannot find the model"
        raise QShardError(f"model {path!r} is not a local folder and could not be fetched from the hub ({e})",
                          where="model.path", fix="give the path of a local model folder") from None
    folder.check_entries(local)
    return local


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer, built by transformers without running any code of the folder."""
    from transformers import AutoTokenizer

    folder.check_entries(model_dir)  # as resolve_model_dir does: for a caller that did not go through it
    present = [model_dir / name for name in TOKENIZER_JSON if (model_dir / name).exists()]
    for file in present:
        data = folder.read_json(file)
        if file.name == "tokenizer_config.json":
            folder.refuse_custom_code(data, file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers and tokenizers refuse a bad file with many exception types
        names = ", ".join(f.name for f in present) or "none of tokenizer.json, tokenizer_config.json"
        raise QShardError(f"transformers cannot build a tokenizer from the files of {model_dir} ({names}): "
                          f"{type(e).__name__}: {str(e)[:300]}", where=str(present[0] if present else model_dir),
                          fix="the model folder needs intact tokenizer files, as save_pretrained writes them "
                              "(tokenizer.json / tokenizer_config.json)") from None
    check_ids_fit(tokenizer, model_dir, present)
    return tokenizer


def check_ids_fit(tokenizer, model_dir: Path, files: list[Path]) -> None:
    """The ids any text can produce (the base vocabulary) and those qshard inserts (bos, eos, pad) have a
    row in the embedding (config.json's vocab_size): a larger id fails inside the first forward pass,
    after the output folder was written. Added tokens beyond it are left alone: some published
    tokenizers carry unused ones, and they appear only where the data spells them."""
    config = folder.read_json(model_dir / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    size = config.get("vocab_size") or text.get("vocab_size")
    added = tokenizer.get_added_vocab()
    used = {token: i for token, i in tokenizer.get_vocab().items() if token not in added}
    for special in ("bos", "eos", "pad"):
        if getattr(tokenizer, f"{special}_token_id") is not None:
            used[getattr(tokenizer, f"{special}_token")] = getattr(tokenizer, f"{special}_token_id")
    token, top = max(used.items(), key=lambda item: item[1], default=(None, -1))
    if isinstance(size, int) and top >= size:
        file = next((f for f in files if f.name == "tokenizer.json"), files[0] if files else model_dir)
        raise QShardError(f"the tokenizer gives {token!r} the id {top} but config.json's vocab_size is {size}: "
                          f"ids from {size} on have no embedding row", where=str(file),
                          fix="use the tokenizer that belongs to this model")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's (plain file names of the folder) or model.safetensors."""
    return folder.weight_files(model_dir)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    config = folder.read_json(model_dir / "config.json")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return DTYPES.get(name, torch.float32)


def build_skeleton(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The architecture with every parameter on meta; buffers (rotary tables) are real and small.

    Whatever transformers refuses while reading config.json or building the model from it (a field of
    the wrong type, a zero head count) is config.json's fault: a QShardError naming it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    file = model_dir / "config.json"
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:
        raise QShardError(f"transformers cannot read config.json ({type(e).__name__}: {e})", where=str(file),
                          fix="restore config.json from the model's source") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise QShardError(f"config.json's model_type {config.model_type!r} is not a causal language model "
                          "transformers implements", where=f"{file}: model_type",
                          fix="qshard fine-tunes decoder-only language models (Llama, Qwen2, Mistral, ...): use one")
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        raise QShardError(f"transformers cannot build a causal language model from config.json "
                          f"({type(e).__name__}: {e})", where=str(file),
                          fix="restore config.json from the model's source (qshard trains the decoder-only "
                              "models transformers implements)") from None


def quantized_linear_names(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Every nn.Linear that the spec quantizes (all but skip_modules), in module order. A subclass with its
    own forward (a Mixture-of-Experts router such as Phi-MoE's, which returns the chosen experts) is not a
    plain linear layer: it stays dense, as the fused experts do. The output embedding is skipped whatever its
    name (`lm_head`, BioGPT's `output_projection`): it may be tied to the input embedding."""
    if spec.method in ("none", "checkpoint"):
        return []
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and m is not head
            and not any(name == s or name.endswith("." + s) for s in spec.skip_modules)]


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
    """Find the checkpoint, check it, and build its empty skeleton (quantized shells in place): cheap, so
    every check that needs the files or the architecture (LoRA targets) runs before any weight is read."""
    model_dir = resolve_model_dir(path)
    folder.read_config(model_dir)  # a JSON object that asks for no code of its own
    fmt = ptq.detect(model_dir)
    check_method_fits(fmt, quant, model_dir)
    reader = CheckpointReader(checkpoint_files(model_dir))  # every header checked; no tensor read
    folder.check_index(model_dir, {key: entry[0] for key, entry in reader.entries.items()})
    torch_dtype = checkpoint_dtype(model_dir) if dtype == "auto" else DTYPES[dtype]
    skeleton = build_skeleton(model_dir, torch_dtype)
    check_checkpoint_fits(skeleton, reader, fmt, model_dir)  # on the dense linears, before shells replace them
    swap_in_quantized_shells(skeleton, quantized_linear_names(skeleton, quant), quant, torch_dtype)
    experts.swap_in_stacks(skeleton, torch_dtype, expert_layer_factory(quant, torch_dtype))
    return model_dir, skeleton


def expert_layer_factory(quant: QuantSpec, dtype: torch.dtype):
    """How an ExpertStack stores one expert: as the quantized linear layer of this method would (in, out ->
    an empty layer), or None (dense) for none / checkpoint."""
    if quant.method in ("none", "checkpoint"):
        return None
    if quant.method == "int8":
        return lambda n_in, n_out: Linear8bit(n_in, n_out, threshold=quant.int8_threshold, weight_dtype=dtype)
    return lambda n_in, n_out: Linear4bit(n_in, n_out, quant_type=quant.method, double_quant=quant.double_quant,
                                          compute_dtype=quant.compute_dtype, weight_dtype=dtype)


def check_method_fits(fmt, quant: QuantSpec, model_dir: Path) -> None:
    """A bitsandbytes 4-bit checkpoint is already what nf4/fp4 would make: refuse re-quantizing it (it would
    dequantize and quantize again, moving the double-quantized scales, for nothing) and name `checkpoint`,
    which keeps its layers bit for bit. int8 and none convert it, as they convert any PTQ checkpoint."""
    if fmt is not None and fmt.name in ("nf4", "fp4") and quant.method in ("nf4", "fp4"):
        raise QShardError(f"{model_dir} is already quantized by bitsandbytes ({fmt.name}); quantization.method "
                          f"{quant.method} would dequantize it and quantize it again", where="quantization.method",
                          fix="set quantization.method: checkpoint to train on its stored 4-bit layers as they are "
                              "(or int8 / none to convert it)")


def load_base_model(skeleton: nn.Module, model_dir: Path, *, quant: QuantSpec = QuantSpec(),
                    device: torch.device = torch.device("cpu"), log=print) -> nn.Module:
    """Stream the weights into the skeleton, quantizing on the fly. Frozen, in eval mode.

    A post-training-quantized checkpoint (GPTQ, AWQ, compressed-tensors, bitsandbytes 4-bit) keeps its own
    layers with quantization.method `checkpoint`, is converted (dequantized, then quantized by bitsandbytes)
    with nf4/fp4/int8 (a bitsandbytes 4-bit one only to int8: see check_method_fits), or dequantized to dense
    with none."""
    fmt = ptq.detect(model_dir)
    if fmt is None and quant.method == "checkpoint":
        raise QShardError(f"{model_dir} is not a GPTQ/AWQ/compressed-tensors checkpoint "
                          "(nor a bitsandbytes 4-bit one)", where="quantization.method",
                          fix="use nf4 (or fp4 / int8 / none) for a dense checkpoint")
    reader = CheckpointReader(checkpoint_files(model_dir))
    layers = ptq_layers(skeleton, reader.keys(), fmt)
    register_packed_experts(skeleton, reader, fmt, layers)
    targets, ignored = checkpoint_plan(skeleton, reader, layers)
    log_ignored(ignored, log)
    if fmt is None:
        _stream_tensors(skeleton, reader, targets, quant, skeleton.dtype, device)
    else:
        _load_ptq(skeleton, reader, targets, layers, fmt, quant, skeleton.dtype, device, log)
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


def load_float32(path: str, quant: QuantSpec) -> nn.Module:
    """A model for comparing logits, in eval mode, nothing logged: dense tensors in float32, and the quantized
    layers (their integer storage as loaded) computing in float32 too."""
    model = load_model(path, dtype="float32", quant=quant, log=lambda *_: None).eval()
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS):
            module.compute_dtype = torch.float32
    return model


def _stream_tensors(model: nn.Module, reader: CheckpointReader, targets: list[convert.Target], quant: QuantSpec,
                    dtype: torch.dtype, device: torch.device) -> None:
    """One target at a time: one tensor, or the tensors one conversion rule combines (one layer's experts)."""
    for target in targets:
        place_tensors(model, target.build(model, lambda key: reader.rows(key, dtype=dtype).to(device)), quant, dtype)
        release_freed_memory()


def checkpoint_plan(model: nn.Module, reader: CheckpointReader,
                    layers: dict[str, list[str]]) -> tuple[list[convert.Target], list[str]]:
    """The checkpoint's tensors as the model's parameters, by transformers' conversion rules
    (qshard/model/convert.py), and the keys the architecture has no place for. A PTQ layer's tensors
    (`layers`) are read by their own names."""
    headers = {key: (stored, shape) for key, (_, _, stored, shape) in reader.entries.items()
               if ptq.layer_of(key, layers) is None
               and (key in reader.dequantized or ptq.layer_of(key, reader.packed) is None)}
    return convert.plan(model, headers, checkpoint_names(model))


def checkpoint_names(model: nn.Module) -> list[str]:
    """Every parameter and buffer of `model` as a checkpoint names it: LoRA wrappers' `base_layer` dropped,
    a quantized layer's packed tensors as the one `<layer>.weight` they come from."""
    names = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name.replace('.base_layer', '')}." if module_name else ""
        leaves = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if isinstance(module, QUANT_LAYERS):
            leaves = ["weight", *(n for n in leaves if n == "bias")]
        if isinstance(module, experts.ExpertStack):  # stored as the fused parameter it replaced
            names.append(prefix[:-1])
            continue
        names += [prefix + leaf for leaf in leaves]
    return names


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
    our own tensors keeps resident memory to what is held, and lets a rank read only its rows.
    Every header is checked when the reader is made (folder.read_header), so a read stays inside the
    file and inside its tensor."""

    CHUNK_BYTES = 4 * 2**20  # rows converted to another dtype are read this much at a time

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, int, torch.dtype, list[int]]] = {}
        # dense tensors that exist only as packed layers (register_packed_experts): key -> dtype -> tensor
        self.dequantized: dict[str, Callable[[torch.dtype], torch.Tensor]] = {}
        self.packed: dict[str, list[str]] = {}  # their layers: {module: leaves}
        for file in files:
            for key, (offset, dtype, shape) in folder.read_header(file).items():
                if key in self.entries:
                    raise QShardError(f"tensor {key} is in both {self.entries[key][0].name} and {file.name}",
                                      where=f"{file}: tensor {key}", fix="the checkpoint's files do not belong "
                                                                         "together: download it again")
                self.entries[key] = (file, offset, dtype, shape)

    def keys(self) -> list[str]:
        return list(self.entries)

    def add_dequantized(self, key: str, shape: list[int], file: Path, build: Callable[[torch.dtype], torch.Tensor]):
        """A dense float32 tensor `key` that the checkpoint stores as a packed layer: `build(dtype)` dequantizes
        it when it is read."""
        self.entries[key] = (file, -1, torch.float32, shape)
        self.dequantized[key] = build

    def shape(self, key: str) -> list[int]:
        return self.entries[key][3]

    def rows(self, key: str, start: int = 0, stop: int | None = None, *, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (all of it by default; a 0-d tensor has one row), floating
        values converted to `dtype` (or into `out`)."""
        shape = self.shape(key)
        count = shape[0] if shape else 1
        stop = count if stop is None else min(stop, count)
        if key in self.dequantized:
            rows = self.dequantized[key](dtype or torch.float32)[start:stop]
            return rows if out is None else out.copy_(rows)
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
        if key in self.dequantized:
            values = self.dequantized[key](dtype or torch.float32).reshape(-1)[start:stop]
            return values if out is None else out.copy_(values)
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


def _load_ptq(model: nn.Module, reader: CheckpointReader, targets: list[convert.Target], layers: dict[str, list[str]],
              fmt, quant: QuantSpec, dtype: torch.dtype, device: torch.device, log) -> None:
    """PTQ tensors are compact (the packed model): the other tensors are placed, then each layer is read
    whole and built (kept, or converted)."""
    for target in targets:
        place_tensors(model, target.build(model, lambda key: reader.rows(key).to(device)), quant, dtype)
    error = [0.0, 0.0]  # squared error of a conversion, squared norm of the PTQ weights
    for name, leaves in layers.items():
        layer = fmt.build({leaf: reader.rows(f"{name}.{leaf}").to(device) for leaf in leaves}, fmt.config, name)
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
        role, module, leaf = tensor_role(model, key, {})
        if role == "experts":
            parts = [module.quantize_expert(w, functools.partial(quantized_like, spec=quant)) for w in tensor]
            for pname, _ in module.storage():
                module._parameters[pname] = nn.Parameter(torch.stack([p[pname] for p in parts]), requires_grad=False)
        elif role == "quantized":
            quantize_into(module, tensor.to(dtype), quant)
        elif role == "dense":
            module._parameters[leaf] = nn.Parameter(tensor.to(dtype), requires_grad=False)
        elif role == "buffer":
            module._buffers[leaf] = tensor


# -- what a checkpoint tensor is to the model, and whether the checkpoint fits it ----------------------

def ptq_layers(model: nn.Module, keys, fmt) -> dict[str, list[str]]:
    """{module: the leaf names of its tensors} of each post-training-quantized layer of the checkpoint
    that `model` has a linear layer for (none for a dense checkpoint)."""
    if fmt is None:
        return {}
    return {name: leaves for name, leaves in ptq.quantized_modules(keys, fmt.marker).items()
            if isinstance(_submodule(model, name), (nn.Linear, *QUANT_LAYERS))}


def tensor_role(model: nn.Module, key: str, layers: dict[str, list[str]]) -> tuple[str, nn.Module | None, str]:
    """What checkpoint tensor `key` is to `model` (empty or loaded; quantized shells, PTQ layers or LoRA
    wrappers in place), with its module and leaf name. The one answer of the whole and the sharded load:
    ptq (a tensor of a PTQ layer in `layers`), quantized (the dense weight of a quantized layer), experts
    (a fused expert parameter: an ExpertStack), dense (a parameter), buffer, vocab (this rank's rows of a
    vocabulary-parallel embedding or head, qshard/model/vocab.py), or ignored (no place in this
    architecture: logged, as transformers does)."""
    owner = ptq.layer_of(key, layers) if layers else None
    if owner is not None:
        return "ptq", _submodule(model, owner[0]), owner[1]
    module_name, _, leaf = key.rpartition(".")
    module = _submodule(model, module_name)
    if module is None:
        return "ignored", None, leaf
    if isinstance(module._modules.get(leaf), experts.ExpertStack):
        return "experts", module._modules[leaf], ""
    if isinstance(module, QUANT_LAYERS) and leaf == "weight":
        return "quantized", module, leaf
    if module._parameters.get(leaf) is not None:
        return "dense", module, leaf
    if leaf in module._buffers:
        return ("vocab" if vocab.rows(module) else "buffer"), module, leaf
    return "ignored", module, leaf


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under LoRA wrapper(s)


def log_ignored(ignored: list[str], log) -> None:
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        log(f"ignoring {len(ignored)} checkpoint tensor(s) this architecture has no place for: {shown}")


def check_checkpoint_fits(skeleton: nn.Module, reader: CheckpointReader, fmt, model_dir: Path) -> None:
    """The checkpoint's headers against the empty dense skeleton, before any weight is read: every tensor
    with the skeleton's shape and kind of dtype, every PTQ layer of its linear's size, every parameter
    present (a tied output embedding may be absent). A refusal names the tensor, both shapes, the file
    and the config.json key that probably disagrees."""
    layers = ptq_layers(skeleton, reader.keys(), fmt)
    register_packed_experts(skeleton, reader, fmt, layers)
    targets, ignored = checkpoint_plan(skeleton, reader, layers)
    check_packed_experts_placed(reader, ignored, fmt, skeleton, model_dir)
    stored = converted_headers(reader, targets, layers)
    order = {name: i for i, name in enumerate(skeleton.state_dict())}  # the first disagreement in model order
    for name in sorted(stored, key=lambda n: order.get(n, len(order))):
        role, module, leaf = tensor_role(skeleton, name, layers)
        # a PTQ layer's bias, not its codes (bitsandbytes' are `weight`): ptq_layout checks those
        expected = getattr(module, leaf, None) if role != "ignored" and (role != "ptq" or leaf == "bias") else None
        if isinstance(expected, torch.Tensor):
            what, file, dtype, shape = stored[name]
            if list(expected.shape) != shape:
                raise _mismatch(what, shape, list(expected.shape), file, skeleton.config)
            if expected.is_floating_point() != dtype.is_floating_point:
                raise QShardError(f"{file.name}: {what} is stored as {dtype}, but {name} of the architecture "
                                  f"is {expected.dtype}", where=f"{file}: {what}",
                                  fix="the weights do not belong to this config.json: use the model's own files")
    for name, leaves in layers.items():
        layer, linear = ptq_layout(reader, fmt, name, leaves), skeleton.get_submodule(name)
        got, want = [layer.out_features, layer.in_features], [linear.out_features, linear.in_features]
        if got != want:
            file = reader.entries[f"{name}.{leaves[0]}"][0]
            raise _mismatch(f"{fmt.name} layer {name} [out, in]", got, want, file, skeleton.config)
    provided = set(stored) | {f"{name}.weight" for name in layers}
    optional = _tied_output_names(skeleton)
    raise_if_missing([n for n, _ in skeleton.named_parameters() if n not in provided and n not in optional],
                     model_dir)


def register_packed_experts(skeleton: nn.Module, reader: CheckpointReader, fmt, layers: dict[str, list[str]]) -> None:
    """A post-training-quantized Mixture-of-Experts checkpoint stores each expert as a packed layer
    (`experts.0.gate_proj.qweight`), while the architecture transformers builds fuses a layer's experts into one
    3-D tensor. As transformers does, such layers are decompressed: each becomes a dense tensor `<layer>.weight`
    of the reader, dequantized (one expert at a time) when read, which transformers' rules then stack like the
    experts of a dense checkpoint. Kept packed they are not (yet): the fused weight is stored as the recipe's
    quantization.method says (dense with `checkpoint` / `none`, NF4 with nf4, ...)."""
    if fmt is None or not experts.has_experts(skeleton):
        return
    reader.packed = {name: leaves for name, leaves in ptq.quantized_modules(reader.keys(), fmt.marker).items()
                     if name not in layers}
    shapes: dict[tuple, list[int]] = {}  # one layout per distinct set of stored shapes (one per expert kind)
    for name, leaves in reader.packed.items():
        stored = tuple((leaf, tuple(reader.shape(f"{name}.{leaf}"))) for leaf in leaves)
        if stored not in shapes:
            layout = ptq_layout(reader, fmt, name, leaves)
            shapes[stored] = [layout.out_features, layout.in_features]
        reader.add_dequantized(f"{name}.weight", shapes[stored], reader.entries[f"{name}.{leaves[0]}"][0],
                               functools.partial(_dequantized_layer, reader, fmt, name, leaves))


def _dequantized_layer(reader: CheckpointReader, fmt, name: str, leaves: list[str], dtype: torch.dtype) -> torch.Tensor:
    layer = fmt.build({leaf: reader.rows(f"{name}.{leaf}") for leaf in leaves}, fmt.config, name)
    return layer.dequantize(dtype)


def check_packed_experts_placed(reader: CheckpointReader, ignored: list[str], fmt, skeleton: nn.Module,
                                model_dir: Path) -> None:
    """Packed expert layers that transformers' rules give no place (llm-compressor's `block_sparse_moe.experts.0.
    gate_proj` in a Mixtral, whose rules stack `experts.*.w1`): refused by name before any weight is read,
    rather than reported as missing fused tensors."""
    unplaced = sorted(key.removesuffix(".weight") for key in ignored if key in reader.dequantized)
    if unplaced:
        raise QShardError(f"this {fmt.name} checkpoint stores its Mixture-of-Experts experts as packed per-expert "
                          f"layers ({convert.shown(unplaced)}) under names transformers' rules for "
                          f"{type(skeleton).__name__} do not stack into its fused expert weights (transformers "
                          "itself would leave those experts uninitialised)", where=f"{model_dir}: {unplaced[0]}",
                          fix="train on the original dense checkpoint with quantization.method nf4 (each expert is "
                              "quantized to NF4 per expert and sharded by ZeRO-3 / FSDP2)")


def converted_headers(reader: CheckpointReader, targets: list[convert.Target],
                      layers: dict[str, list[str]]) -> dict[str, tuple[str, Path, torch.dtype, list[int]]]:
    """{parameter name: (what to call it in a message, file, stored dtype, shape once converted)} of the
    checkpoint: a PTQ layer's tensors as stored, the others as transformers' rules convert them."""
    headers = {}
    for key, (file, _, dtype, shape) in reader.entries.items():
        if ptq.layer_of(key, layers) is not None:
            headers[key] = (f"tensor {key}", file, dtype, shape)
    for target in targets:
        file, _, dtype, _ = reader.entries[target.sources[0]]
        for name, shape in target.shapes.items():
            what = f"tensor {name}" if not target.renamed else \
                f"tensor {name} (converted by transformers' rules from {convert.shown(target.sources)})"
            headers[name] = (what, file, dtype, list(shape))
    return headers


def ptq_layout(reader: CheckpointReader, fmt, name: str, leaves: list[str]) -> QuantLinear:
    """A PTQ layer built from stand-ins of its checkpoint tensors and moved to meta, its dequantization
    traced there: the format's own builder and dequantizer check the layout, and no tensor is read."""
    file = reader.entries[f"{name}.{leaves[0]}"][0]
    try:
        tensors = {leaf: stand_in(reader, f"{name}.{leaf}", leaf.startswith(fmt.layout_leaves)) for leaf in leaves}
        layer = fmt.build(tensors, fmt.config, name).to("meta")
        dense_shape = list(layer.dequantize(torch.float32).shape)
    except QShardError as e:
        raise QShardError(e.what, where=f"{file}: {name}", fix=e.fix) from None
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # shapes the format's code cannot combine
        raise QShardError(f"the {fmt.name} tensors of {name} ({', '.join(leaves)}) do not form a layer ({e})",
                          where=f"{file}: {name}", fix="the checkpoint does not match its quantization_config: "
                                                       "export it again") from None
    if dense_shape != [layer.out_features, layer.in_features]:
        raise QShardError(f"the {fmt.name} tensors of {name} describe a [{layer.out_features}, {layer.in_features}] "
                          f"layer but dequantize to {dense_shape}", where=f"{file}: {name}",
                          fix="the checkpoint does not match its quantization_config: export it again")
    return layer


def stand_in(reader: CheckpointReader, key: str, read: bool = False) -> torch.Tensor:
    """A stand-in for a checkpoint tensor when only a layer's layout is wanted: uninitialised, of its
    shape and dtype (builders rewrite values, e.g. GPTQ v1 zero points, so meta tensors would not do);
    read when tiny or `read` (a format's layout leaves), since a layer's shape may be stored as values
    (compressed-tensors' weight_shape, bitsandbytes' QuantState JSON)."""
    shape = reader.shape(key)
    return reader.rows(key) if read or math.prod(shape) <= 16 else torch.empty(shape, dtype=reader.entries[key][2])


def _mismatch(what: str, stored: list[int], expected: list[int], file: Path, config) -> QShardError:
    keys = [] if len(stored) != len(expected) else \
        [k for s, e in zip(stored, expected) if s != e for k in _config_keys_of_size(config, e)]
    blame = (f"config.json's {' or '.join(dict.fromkeys(keys))} probably disagrees with the weights" if keys
             else "config.json probably describes another model")
    return QShardError(f"{file.name}: {what} is {stored} but config.json makes it {expected}: {blame}",
                       where=f"{file}: {what}", fix="use the config.json that belongs to these weights")


def _config_keys_of_size(config, size: int) -> list[str]:
    """The config.json sizes (or products of them) a skeleton dimension of `size` may come from."""
    text = config.get_text_config()
    get = lambda name: getattr(text, name, None) or 0
    head_dim = get("head_dim") or get("hidden_size") // max(get("num_attention_heads"), 1)
    sizes = {"vocab_size": get("vocab_size"), "hidden_size": get("hidden_size"),
             "intermediate_size": get("intermediate_size"),
             "num_attention_heads x head_dim": get("num_attention_heads") * head_dim,
             "num_key_value_heads x head_dim": get("num_key_value_heads") * head_dim,
             "num_local_experts": get("num_local_experts"), "num_experts": get("num_experts"),
             "moe_intermediate_size": get("moe_intermediate_size")}
    return [key for key, value in sizes.items() if value == size]


def _tied_output_names(model: nn.Module) -> set[str]:
    """The output embedding's parameter name when config.json ties it to the input embedding (the
    checkpoint may then omit it)."""
    config = model.config
    if not (getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings",
                                                                     False)):
        return set()
    out = model.get_output_embeddings()
    return {name for name, p in model.named_parameters() if out is not None and p is out.weight}


def check_materialised(model: nn.Module, model_dir: Path) -> None:
    missing = []
    for name, module in model.named_modules():
        unread = [p for p, t in module.named_parameters(recurse=False) if t.device.type == "meta"]
        if unread and isinstance(module, experts.ExpertStack):  # all from the one fused tensor `<name>`
            missing.append(name)
            continue
        # a quantized layer's packed tensors all come from one checkpoint tensor: `<name>.weight`
        keys = ["weight"] if unread and isinstance(module, QUANT_LAYERS) and unread != ["bias"] else unread
        missing += [f"{name}.{k}" for k in keys]
    raise_if_missing(missing, model_dir)


def raise_if_missing(missing: list[str], model_dir: Path) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = ", ".join(f.name for f in checkpoint_files(model_dir))
        raise QShardError(f"the checkpoint lacks {len(missing)} tensor(s) the architecture needs: {shown}",
                          where=f"{model_dir}: {files} (against config.json)",
                          fix="check that the weights belong to this config.json")
