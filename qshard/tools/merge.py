"""The pieces of `qshard export`: the base as training saw it, one unit at a time; the adapter; the
merge formula; and a safetensors writer that streams.

The base "as trained" is what the LoRA adapter was fitted against, not the checkpoint's stored values:
- quantization.method nf4 / fp4 / int8: each stored weight cast to model.dtype, quantized by
  bitsandbytes exactly as the loader does (qshard.model.load.quantized_like), then dequantized;
- a GPTQ / AWQ / compressed-tensors checkpoint: the packed weights dequantized (method checkpoint:
  in float32, as its forward dequantizes to the input's dtype; none: in model.dtype; nf4/int8: then
  quantized and dequantized again, as the loader converts them);
- method none, and every tensor that is not a quantized linear: the stored values in model.dtype.

For `--format nf4` the merged weights of the linears the base quantized are quantized again by bitsandbytes
and written as transformers saves a load_in_4bit model (packed codes + QuantState tensors, planned up
front like every other tensor).

A unit is what the loader reads at once (one tensor, one conversion target, or one PTQ layer), so an
export holds one unit (plus its merged copy) at a time, never the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qshard.errors import QShardError
from qshard.model import folder
from qshard.model.load import (
    QUANT_LAYERS,
    CheckpointReader,
    QuantSpec,
    checkpoint_files,
    checkpoint_plan,
    open_base,
    ptq_layers,
    quantized_like,
    quantized_linear_names,
    register_packed_experts,
    tensor_role,
)
from qshard.quant import ptq
from qshard.quant.bnb4bit import BLOCKSIZE, Linear4bit
from qshard.quant.bnb8bit import Linear8bit

PEFT_PREFIX = "base_model.model."
ST_DTYPES = {v: k for k, v in folder.SAFETENSORS_DTYPES.items()}


# -- the base, as training saw it ---------------------------------------------------------------------

@dataclass
class Packed:
    """A GPTQ / AWQ / compressed-tensors layer as its checkpoint stores it (`qshard export --format checkpoint`)."""

    module: str
    stored: dict[str, tuple[torch.dtype, list[int]]]  # its tensors' full names -> (stored dtype, shape)
    read: Callable[[], dict[str, torch.Tensor]]  # {leaf: tensor}, as stored
    build: Callable[[dict[str, torch.Tensor]], nn.Module]  # {leaf: tensor} -> the layer (qshard/quant)


@dataclass
class Unit:
    """Tensors read together: `shapes` {model name: (stored dtype, shape)}; `load()` reads them now, as trained.
    A PTQ layer's unit also has its stored form (`packed`)."""

    shapes: dict[str, tuple[torch.dtype, list[int]]]
    load: Callable[[], dict[str, torch.Tensor]]
    packed: Packed | None = None


@dataclass
class Base:
    model_dir: Path
    skeleton: nn.Module  # empty (meta), quantized shells in place: for shapes and roles only
    units: list[Unit]
    packed_experts: bool = False  # MoE experts the checkpoint packs per expert, read decompressed
    format: ptq.PTQFormat | None = None  # the checkpoint's PTQ format (None: dense)
    by_name: dict[str, Unit] = field(default_factory=dict)

    def __post_init__(self):
        self.by_name = {name: unit for unit in self.units for name in unit.shapes}

    def shapes(self) -> dict[str, tuple[torch.dtype, list[int]]]:
        return {name: entry for unit in self.units for name, entry in unit.shapes.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self.by_name[name].load()[name]


def open_trained_base(path: str, dtype: str, quant: QuantSpec) -> Base:
    """The base of a run (or any dense checkpoint with QuantSpec('none')), checked, no weight read."""
    model_dir, skeleton = open_base(path, dtype=dtype, quant=quant)
    fmt = ptq.detect(model_dir)
    reader = CheckpointReader(checkpoint_files(model_dir))
    layers = ptq_layers(skeleton, reader.keys(), fmt)
    register_packed_experts(skeleton, reader, fmt, layers)
    targets, _ = checkpoint_plan(skeleton, reader, layers)
    units = [_dense_unit(skeleton, reader, target, quant) for target in targets]
    units += [_ptq_unit(skeleton, reader, fmt, name, leaves, quant) for name, leaves in layers.items()]
    return Base(model_dir, skeleton, units, packed_experts=bool(reader.packed), format=fmt)


def _dense_unit(skeleton: nn.Module, reader: CheckpointReader, target, quant: QuantSpec) -> Unit:
    dtype = skeleton.dtype
    stored = reader.entries[target.sources[0]][2]
    shapes = {name: (stored, list(shape)) for name, shape in target.shapes.items()}

    def load() -> dict[str, torch.Tensor]:
        built = target.build(skeleton, lambda key: reader.rows(key, dtype=dtype))
        return {name: _as_trained(skeleton, name, t, quant) for name, t in built.items()}
    return Unit(shapes, load)


def _as_trained(skeleton: nn.Module, name: str, tensor: torch.Tensor, quant: QuantSpec) -> torch.Tensor:
    role, module, _ = tensor_role(skeleton, name, {})
    if role == "experts":  # each expert as the loader stores it (qshard/model/experts.py)
        return module.as_stored(tensor, lambda layer, weight: quantized_like(layer, weight, quant))
    if role != "quantized":
        return tensor
    return exact(quantized_like(module, tensor.to(skeleton.dtype), quant))


def exact(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized layer's float32 forward applies: a 4-bit layer's code x scale products in float32
    (bitsandbytes' matmul uses them unrounded, whatever dtype its QuantState names: the recipe's bf16 included;
    Linear4bit.dequantize), an int8 layer's dequantized weight. An export's base "as trained"."""
    return layer.dequantize(torch.float32) if isinstance(layer, Linear4bit) else layer.dequantize()


def _ptq_unit(skeleton: nn.Module, reader: CheckpointReader, fmt, name: str, leaves: list[str],
              quant: QuantSpec) -> Unit:
    linear = skeleton.get_submodule(name)
    shapes = {f"{name}.weight": (torch.float32, [linear.out_features, linear.in_features])}
    if "bias" in leaves:
        shapes[f"{name}.bias"] = (torch.float32, [linear.out_features])

    packed = Packed(name, {f"{name}.{leaf}": (reader.entries[f"{name}.{leaf}"][2], list(reader.shape(f"{name}.{leaf}")))
                           for leaf in leaves},
                    read=lambda: {leaf: reader.rows(f"{name}.{leaf}") for leaf in leaves},
                    build=lambda tensors: fmt.build(tensors, fmt.config, name))

    def load() -> dict[str, torch.Tensor]:
        layer = packed.build(packed.read())
        if quant.method == "checkpoint":
            weight = layer.dequantize(torch.float32)
        else:
            weight = layer.dequantize(skeleton.dtype)
            if isinstance(linear, QUANT_LAYERS):  # converted to nf4/int8 by the loader
                weight = exact(quantized_like(linear, weight, quant))
        out = {f"{name}.weight": weight}
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.to(skeleton.dtype)
        return out
    return Unit(shapes, load, packed)


# -- the adapter ----------------------------------------------------------------------------------------

@dataclass
class Adapter:
    folder: Path
    r: int
    alpha: float
    scaling: float
    use_dora: bool
    targets: list[str]
    modules: dict[str, dict[str, torch.Tensor]]  # module name -> {"A", "B", "m" (DoRA)}
    target_parameters: list[str] = field(default_factory=list)  # PEFT's LoRA on fused MoE expert weights
    # fused expert weight name -> {"A", "B", "experts", "transposed"}: filled by check_adapter_fits
    experts: dict[str, dict] = field(default_factory=dict)

    def file_state(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's file keys (as adapter_model.safetensors holds them)."""
        from safetensors.torch import load_file

        return load_file(str(self.folder / "adapter_model.safetensors"))


UNSUPPORTED = {"fan_in_fan_out": False, "modules_to_save": None, "layer_replication": None, "bias": "none",
               "rank_pattern": {}, "alpha_pattern": {}}


def read_adapter(adapter_dir: Path) -> Adapter:
    """A PEFT LoRA/DoRA folder as qshard writes it; anything a merge here would get wrong is refused."""
    from safetensors.torch import load_file

    config_file = adapter_dir / "adapter_config.json"
    config = folder.read_json(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise QShardError(f"adapter type {config.get('peft_type')!r} is not LoRA", where=str(config_file),
                          fix="qshard export merges LoRA / DoRA adapters")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False, "none"):
            raise QShardError(f"adapter option {key}={config[key]!r} is not supported by qshard export",
                              where=f"{config_file}: {key}", fix="merge it with PEFT's merge_and_unload instead")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise QShardError(f"adapter_config.json has r={r!r}, lora_alpha={alpha!r}", where=str(config_file),
                          fix="restore the adapter folder the run wrote")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = adapter_dir / "adapter_model.safetensors"
    folder.read_header(weights)  # bounded, well formed, before safetensors reads it
    modules = _group_by_module(load_file(str(weights)), weights)
    targets = config.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else sorted({m.rpartition(".")[2] for m in modules})
    parameters = config.get("target_parameters") or []
    return Adapter(adapter_dir, r, float(alpha), scaling, bool(config.get("use_dora")), targets, modules,
                   sorted(parameters) if isinstance(parameters, list) else [])


def _group_by_module(state: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
             ".lora_magnitude_vector.weight": "m"}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in parts if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise QShardError(f"{file.name} holds {key}, which is not a LoRA tensor qshard can merge",
                              where=f"{file}: {key}", fix="export adapters trained by qshard (PEFT LoRA/DoRA)")
        modules.setdefault(key[len(PEFT_PREFIX):-len(suffix)], {})[parts[suffix]] = tensor
    broken = [m for m, t in modules.items() if not {"A", "B"} <= t.keys()]
    if broken:
        raise QShardError(f"{file.name} lacks lora_A or lora_B for {broken[0]}", where=str(file),
                          fix="restore the adapter folder the run wrote")
    return modules


def check_adapter_fits(adapter: Adapter, skeleton: nn.Module, names: set[str], base_dir: Path) -> None:
    """Every adapted module is a linear layer of the base whose shape fits A [r, in], B [out, r], m [out]; the
    tensors of PEFT's LoRA on fused MoE expert weights (`target_parameters`: A [r*E, in], B [out, r*E]) move to
    `adapter.experts`, by the expert weight they adapt."""
    from qshard.model import experts

    where = str(adapter.folder / "adapter_model.safetensors")
    for key, stack, n_in, n_out, name in experts.adapted(skeleton, adapter.target_parameters):
        t = adapter.modules.pop(key.removeprefix(PEFT_PREFIX), None)
        if t is None:
            continue
        want = {"A": [adapter.r * stack.num_experts, n_in], "B": [n_out, adapter.r * stack.num_experts]}
        got = {k: list(v.shape) for k, v in t.items()}
        if got != want:
            shown = ", ".join(f"{k} {shape}" for k, shape in got.items())
            raise QShardError(f"the adapter's tensors for {name} ({shown}) do not fit the base's {stack.num_experts} "
                              f"experts (expected A {want['A']}, B {want['B']})", where=f"{where}: {key}",
                              fix="export with the base the adapter was trained on (recipe.yaml model.path)")
        transposed = bool(getattr(skeleton.get_submodule(name.rpartition(".")[0]), "is_transposed", False))
        adapter.experts[name] = {**t, "experts": stack.num_experts, "transposed": transposed}
    for module_name, t in adapter.modules.items():
        try:
            module = skeleton.get_submodule(module_name)
        except AttributeError:
            module = None
        if not isinstance(module, (nn.Linear, *QUANT_LAYERS)) or f"{module_name}.weight" not in names:
            raise QShardError(f"the adapter adapts {module_name}, which is not a linear layer of the base "
                              f"{base_dir}", where=where, fix="export with the base the adapter was trained on "
                                                              "(the run's recipe.yaml model.path)")
        out_f, in_f = module.out_features, module.in_features
        want = {"A": [adapter.r, in_f], "B": [out_f, adapter.r], "m": [out_f]}
        bad = {k: list(v.shape) for k, v in t.items() if list(v.shape) != want[k]}
        if bad:
            got = ", ".join(f"{k} {s}" for k, s in bad.items())
            raise QShardError(f"the adapter's tensors for {module_name} ({got}) do not fit the base's "
                              f"[out {out_f}, in {in_f}] layer (expected A {want['A']}, B {want['B']})",
                              where=f"{where}: {module_name}",
                              fix="export with the base the adapter was trained on (recipe.yaml model.path)")


# -- the merge ---------------------------------------------------------------------------------------

def lora_delta(t: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """scaling * B @ A, in float32."""
    return scaling * (t["B"].float() @ t["A"].float())


def merged_weight(weight: torch.Tensor, t: dict[str, torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """W + delta (LoRA); with DoRA PEFT's merge: m / ||W + delta||_row * (W + delta). In float32."""
    total = weight.float() + delta
    if "m" not in t:
        return total
    norm = torch.linalg.norm(total, dim=1)
    return (t["m"].float() / norm).view(-1, 1) * total


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a|| / ||b|| (Frobenius), inf when b is zero."""
    denominator = float(torch.linalg.norm(b.float()))
    return float(torch.linalg.norm(a.float())) / denominator if denominator else math.inf


# -- NF4 output (bitsandbytes' serialization, as transformers saves a load_in_4bit model) -------------------

NF4_STATE_KEY = "quant_state.bitsandbytes__nf4"
# The JSON of a QuantState's non-tensor fields is planned before the weight is quantized, but its length
# depends on the double-quant offset's repr: plan the longest repr a float can have and pad the JSON with
# spaces (json.loads, which bitsandbytes' unpack_tensor_to_dict calls, ignores trailing whitespace).
LONGEST_FLOAT = -2.2250738585072014e-308


def nf4_modules(skeleton: nn.Module, skip_modules: tuple[str, ...]) -> list[str]:
    """The linears an NF4 export quantizes: those the run's base quantized (any quantized layer of the
    skeleton), and for a dense or checkpoint-quantized run the ones an nf4 run would (every plain linear
    but the output embedding and quantization.skip_modules, as load.quantized_linear_names decides)."""
    dense = quantized_linear_names(skeleton, QuantSpec("nf4", skip_modules=skip_modules))
    return [name for name, m in skeleton.named_modules() if isinstance(m, QUANT_LAYERS) or name in dense]


def dense_linears(skeleton: nn.Module, quantized: list[str]) -> list[str]:
    """Linear layers an NF4 export leaves dense: transformers must be told (llm_int8_skip_modules), else
    it would expect them quantized."""
    keep = set(quantized)
    return [name for name, m in skeleton.named_modules() if isinstance(m, nn.Linear) and name not in keep]


def nf4_plan(weight: str, shape: list[int], dtype: torch.dtype, double_quant: bool) -> dict:
    """{name: (dtype, shape)} of what quantize_4bit + QuantState.as_dict(packed=True) give for one weight."""
    n = math.prod(shape)
    blocks = -(-n // BLOCKSIZE)
    plan = {weight: (torch.uint8, [(n + 1) // 2, 1]),
            f"{weight}.absmax": (torch.uint8 if double_quant else torch.float32, [blocks]),
            f"{weight}.quant_map": (torch.float32, [16])}
    if double_quant:
        plan[f"{weight}.nested_absmax"] = (torch.float32, [-(-blocks // 256)])
        plan[f"{weight}.nested_quant_map"] = (torch.float32, [256])
    width = len(_state_json(shape, dtype, double_quant, LONGEST_FLOAT))
    return plan | {f"{weight}.{NF4_STATE_KEY}": (torch.uint8, [width])}


def _state_json(shape: list[int], dtype: torch.dtype, double_quant: bool, offset: float) -> bytes:
    """QuantState.as_dict's non-tensor fields as bitsandbytes' pack_dict_to_tensor encodes them."""
    fields = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "dtype": str(dtype).removeprefix("torch."),
              "shape": list(shape)}
    if double_quant:
        fields |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset}
    return json.dumps(fields).encode()


def quantize_nf4(weight: str, tensor: torch.Tensor, double_quant: bool):
    """bitsandbytes' quantize_4bit of `tensor` (in its dtype, which dequantization returns), as the
    {name: tensor} transformers saves, and the QuantState (to measure the rounding)."""
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(tensor.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                       quant_type="nf4")
    tensors = {weight: packed} | {f"{weight}.{k}": v for k, v in state.as_dict(packed=True).items()}
    planned = nf4_plan(weight, list(tensor.shape), tensor.dtype, double_quant)[f"{weight}.{NF4_STATE_KEY}"][1][0]
    raw = tensors[f"{weight}.{NF4_STATE_KEY}"]
    tensors[f"{weight}.{NF4_STATE_KEY}"] = torch.cat([raw, torch.full((planned - len(raw),), ord(" "), dtype=torch.uint8)])
    return tensors, state


def requantized_twins(model: nn.Module, modules: list[str], adapter: Adapter,
                      requantized: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """In a loaded base + adapter (the export check's reference), replace each of `modules` by a dense float32
    linear holding `requantized(base layer, merged weight)`: its merged weight (W + delta, DoRA-scaled, float32)
    quantized and dequantized as the export writes it (`nf4_round_trip`, `own_scales_round_trip`): the values
    the folder holds, computed from tensors the real loader placed."""
    for name in modules:
        layer = model.get_submodule(name)
        inner = getattr(layer, "base_layer", layer)
        dense = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None)
        dense.weight.data = requantized(inner, _merged_in_memory(layer, inner, adapter)).float()
        if inner.bias is not None:
            dense.bias.data = inner.bias.float()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, dense.requires_grad_(False))


def nf4_round_trip(dtype: torch.dtype, double_quant: bool) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """bitsandbytes' quantize_4bit + dequantize_4bit of a weight cast to `dtype` (an NF4 export's values)."""
    import bitsandbytes.functional as bnbF

    def round_trip(_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        packed, state = bnbF.quantize_4bit(weight.to(dtype), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                           quant_type="nf4")
        return bnbF.dequantize_4bit(packed, state)
    return round_trip


def own_scales_round_trip(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A PTQ layer's dequantized weight once `weight` is re-quantized onto its own scales and zero points (a
    `--format checkpoint` export's values)."""
    import copy

    twin = copy.deepcopy(layer)
    for leaf, codes in layer.requantize(weight).items():
        getattr(twin, leaf).data = codes
    return twin.dequantize(torch.float32)


def _merged_in_memory(layer: nn.Module, inner: nn.Module, adapter: Adapter) -> torch.Tensor:
    """W (as the loaded layer holds it) merged with the layer's loaded adapter tensors, in float32."""
    weight = _dense_weight(inner)
    if inner is layer:  # not adapted
        return weight
    t = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
    if adapter.use_dora:
        t["m"] = layer.lora_magnitude_vector["default"].weight
    return merged_weight(weight, t, lora_delta(t, adapter.scaling))


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a base layer multiplies by, in float32: a bitsandbytes layer's dequantized in its stored
    dtype; a GPTQ / AWQ / compressed-tensors layer's in float32, as its float32 forward and the export do."""
    if isinstance(layer, (Linear4bit, Linear8bit)):
        return exact(layer).float()
    return layer.dequantize(torch.float32) if isinstance(layer, QUANT_LAYERS) else layer.weight.float()


# -- writing safetensors as the tensors come --------------------------------------------------------

class ShardWriter:
    """Safetensors files whose headers are written from the planned names, shapes and dtypes before any
    tensor exists; each tensor is then appended as it is produced and freed. Shards are cut at
    `max_bytes` (a tensor larger than that gets a shard of its own), named as save_pretrained names them:
    model.safetensors alone, else model-0000i-of-0000n.safetensors + model.safetensors.index.json."""

    def __init__(self, out_dir: Path, plan: dict[str, tuple[torch.dtype, list[int]]], max_bytes: int):
        self.out_dir = out_dir
        groups: list[dict[str, tuple[torch.dtype, list[int]]]] = [{}]
        size = 0
        for name, (dtype, shape) in plan.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if groups[-1] and size + nbytes > max_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = (dtype, shape)
            size += nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = list(zip(names, groups))
        self.order = [(file, name) for file, group in self.shards for name in group]
        self.plan, self.total = plan, sum(math.prod(s) * d.itemsize for d, s in plan.values())
        self._next, self._file, self._handle = 0, None, None

    def files(self) -> list[str]:
        return [file for file, _ in self.shards] + ([folder.INDEX] if len(self.shards) > 1 else [])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file, expected = self.order[self._next]
        dtype, shape = self.plan[name]
        if name != expected or tensor.dtype != dtype or list(tensor.shape) != shape:  # an invariant of export
            raise RuntimeError(f"writer expected {expected} {dtype} {shape}, got {name} {tensor.dtype} "
                               f"{list(tensor.shape)}")
        if file != self._file:
            self._open(file)
        data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
        self._handle.write(memoryview(data))
        self._next += 1
        if self._next == len(self.order) or self.order[self._next][0] != file:
            self._handle.close()
            self._handle = None

    def _open(self, file: str) -> None:
        group = dict(self.shards)[file]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (dtype, shape) in group.items():
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.out_dir / file, "wb")
        self._handle.write(len(raw).to_bytes(8, "little") + raw)
        self._file = file

    def finish(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"writer got {self._next} of {len(self.order)} tensors")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: file for file, group in self.shards for name in group}}
            (self.out_dir / folder.INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def run_quant_spec(recipe) -> QuantSpec:
    """The QuantSpec the run's loader used. The compute dtype does not change stored values: fp32."""
    from qshard.precision import Precision
    from qshard.validate import quant_spec

    return quant_spec(recipe, Precision("fp32", torch.device("cpu")))
