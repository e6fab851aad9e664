"""Load-time sharding (ZeRO-3, FSDP2): no rank ever holds the whole base model.

The usual path (`load.load_base_model`, then `engine.wrap`) builds the whole quantized model on
every rank and only then partitions it. Here the engine's partitioning happens while the checkpoint
streams in:

- FSDP2: LoRA is attached to the empty (meta) skeleton, `fully_shard` splits it, `to_empty` gives
  each rank uninitialised storage for its shards only (whole rows of each parameter).
- ZeRO-3: every base parameter, still on meta, becomes a ZeRO-3 parameter holding only this rank's
  partition (a flat range of its elements; `DeepSpeedEngine.partition_in_place`), so that DeepSpeed
  never needs the whole tensor; LoRA is attached afterwards and partitioned by DeepSpeed as usual.

Then the checkpoint streams into those parts (`_stream_shards`): a dense tensor is read only for the
elements this rank owns; a quantized one is read one row range at a time and quantized piecewise
(`QuantLinear.quantize_pieces`): each rank keeps its part of the packed codes and of the block
statistics, identical to quantizing the whole tensor. Peak beyond the shards: one row range of one
tensor.

Design choice: every rank reads (and, for 4-bit, quantizes) every row of a quantized tensor and
keeps its own part, rather than ranks quantizing disjoint parts and exchanging statistics. The
double-quant offset is the mean of *all* block scales of a tensor, so a split needs either an
exchange of the scales (a collective per tensor) or each rank computing them all; the latter needs
no communication during load, is exact by construction, and costs N x the disk reads (served by
the page cache on one node) and N x the quantization compute, which is what today's per-rank
whole-model load costs anyway. Dense tensors are read only where owned.

Post-training-quantized checkpoints (GPTQ, AWQ, compressed-tensors, bitsandbytes 4-bit): their packed
tensors are stored transposed or grouped and some are rewritten when a layer is built (GPTQ v1 zero
points, missing g_idx, scales kept as bytes, the bitsandbytes offset read from JSON), so a rank cannot
read its part of a parameter directly. One layer at a time is
read and built whole (its packed tensors: a fraction of a dense layer), converted as the whole load
converts it when `quantization.method` is not `checkpoint` (dequantized, then quantized: one dense
layer), and each rank copies out its part. Kept as they are, the skeleton first gets each PTQ layer
built from stand-ins of the checkpoint's header (the layer `load._load_ptq` builds, moved to the meta
device). Peak beyond the shards: one layer.

Fused MoE expert weights (ExpertStacks, qshard/model/experts.py) are filled one expert at a time, and
only the experts whose part of the storage this rank holds are read and quantized (FSDP2: whole
experts; ZeRO-3: a flat range, so at most two experts are shared with a neighbour). Where the
checkpoint stores experts one tensor each, transformers' rule (qshard/model/convert.py) is applied to
that expert's sources alone (`Target.expert_reader`); a stored fused tensor is read one expert's rows
at a time. A rule that cannot be split by expert is applied whole, once per target (one layer's
expert stack), with a log line saying so. Other tensors transformers' rules combine are built whole
(one target at a time) and each rank copies out its part.

Not covered (loaded whole, then sharded, with a log line saying so): DoRA (its magnitude is computed
from the whole base weight when attached).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qshard import _compat
from qshard.engines.base import shard_span
from qshard.model import vocab
from qshard.model.experts import ExpertStack
from qshard.model.load import (
    CheckpointReader,
    QuantSpec,
    checkpoint_files,
    checkpoint_plan,
    converted_ptq,
    log_conversion_error,
    log_ignored,
    ptq_layers,
    ptq_layout,
    quantized_like,
    raise_if_missing,
    register_packed_experts,
    release_freed_memory,
    tensor_role,
)
from qshard.model.lora import init_adapter
from qshard.quant import ptq
from qshard.quant.base import QuantLinear

# A quantized weight is read at most this much (as fp32) at a time. bitsandbytes' quantize_4bit on CPU
# (0.50) peaks at ~5x its input (31 MiB for a 6.3 MiB slice): with 8 MiB slices that transient, not
# the shards, set the ZeRO-3 load's peak on the 400M benchmark model.
SLICE_BYTES = 2 * 2**20
Attach = Callable[[nn.Module], nn.Module]  # base model -> PeftModel (gradient checkpointing, LoRA)
Span = Callable[[nn.Parameter], tuple[int, int]]  # the flattened elements [start, stop) this rank owns
Local = Callable[[nn.Parameter, tuple[int, int]], torch.Tensor]  # the flat tensor that holds them here


def why_not(engine_key: str, world_size: int, use_dora: bool, enabled: bool,
            deepspeed_config: dict | None = None) -> str | None:
    """None when the base can be loaded sharded, else the reason it is loaded whole first."""
    if engine_key not in ("zero3", "zero3_offload", "fsdp2") or world_size < 2:
        return "the engine does not shard parameters" if world_size > 1 else "one process"
    if not enabled:
        return "distributed.shard_on_load is false"
    if use_dora:
        return "DoRA's magnitude is computed from the whole base weight"
    if engine_key.startswith("zero3") and deepspeed_config:
        return _compat.deepspeed_in_place_unsupported(deepspeed_config)
    return None


def load_fsdp2(skeleton: nn.Module, model_dir: Path, engine, attach: Attach, seed: int,
               rank: int, world_size: int, device: torch.device, *, quant: QuantSpec, log=print) -> nn.Module:
    dtype = skeleton.dtype  # the dense dtype a converted PTQ layer is dequantized to, as in the whole load
    model = engine.shard(attach(_prepared(skeleton, model_dir, quant)))
    # real (rotary tables, vocabulary rows): to_empty would blank them. Shared ones (a tied head's rows) stay shared.
    buffers = dict(model.named_buffers(remove_duplicate=False))
    # with fsdp_cpu_offload the shards live on the CPU: FSDP2 refuses others at its first forward
    model.to_empty(device=torch.device("cpu") if engine.cpu_offload else device)
    moved: dict[int, torch.Tensor] = {}
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        if id(buffer) not in moved:
            moved[id(buffer)] = buffer.to(device)
        model.get_submodule(owner)._buffers[leaf] = moved[id(buffer)]

    def span(param: torch.Tensor) -> tuple[int, int]:  # FSDP2 splits dim 0: whole rows
        row = math.prod(param.shape[1:])
        start, stop = shard_span(param.shape[0] if param.dim() else 1, rank, world_size)
        return start * row, stop * row

    def local(param: torch.Tensor, owned: tuple[int, int]) -> torch.Tensor:
        return param.to_local().view(-1)

    return _fill(model, model_dir, seed, world_size, span, local, device, quant, dtype, log)


def load_zero3(skeleton: nn.Module, model_dir: Path, engine, attach: Attach, seed: int, rank: int,
               world_size: int, device: torch.device, *, quant: QuantSpec, log=print) -> nn.Module:
    dtype = skeleton.dtype  # before the half cast below (see load_fsdp2)
    model = attach(_prepared(skeleton, model_dir, quant))
    half = engine.half_dtype()  # deepspeed.initialize would cast a whole model's floating parameters
    for p in model.parameters():
        if half is not None and p.is_floating_point():
            p.data = torch.empty(p.shape, dtype=half, device="meta")
    return _fill(model, model_dir, seed, world_size, lambda p: shard_span(p.numel(), rank, world_size),
                 engine.partition_in_place, device, quant, dtype, log)


def _prepared(skeleton: nn.Module, model_dir: Path, quant: QuantSpec) -> nn.Module:
    """The empty base as the whole load returns it: PTQ layers in place (when kept), tied head, frozen,
    eval mode, named after its folder."""
    fmt = ptq.detect(model_dir)
    if fmt is not None and quant.method == "checkpoint":
        reader = CheckpointReader(checkpoint_files(model_dir))
        for name, leaves in ptq_layers(skeleton, reader.keys(), fmt).items():
            layer = ptq_layout(reader, fmt, name, leaves)  # the layer load._load_ptq builds, on meta
            layer.compute_dtype = skeleton.dtype  # as load._load_ptq sets it
            parent, _, leaf = name.rpartition(".")
            setattr(skeleton.get_submodule(parent), leaf, layer)
    skeleton.tie_weights()  # a tied head is the embedding's parameter: sharded and read once
    skeleton.config.name_or_path = str(model_dir)  # PEFT writes it into adapter_config.json
    return skeleton.requires_grad_(False).eval()


def _fill(model: nn.Module, model_dir: Path, seed: int, world_size: int, span: Span, local: Local,
          device: torch.device, quant: QuantSpec, dtype: torch.dtype, log) -> nn.Module:
    """This rank's part of every parameter of a PeftModel whose parameters are not yet real: the base
    from the checkpoint, the adapters from their seeded starting values (`lora.init_adapter`)."""
    _stream_shards(model.get_base_model(), model_dir, world_size, span, local, device, quant, dtype, log)

    def write(param: nn.Parameter, full: torch.Tensor) -> None:
        owned = span(param)
        _checked(local(param, owned), owned, "an adapter").copy_(full.reshape(-1)[owned[0]:owned[1]])

    init_adapter(model, seed, write)
    return model


def _stream_shards(base: nn.Module, model_dir: Path, world_size: int, span: Span, local: Local,
                   device: torch.device, quant: QuantSpec, dtype: torch.dtype, log=print) -> None:
    """Read the checkpoint into this rank's part of every base parameter: `span(p)` is the range of
    p's flattened elements this rank owns, `local(p, span)` the (flat) tensor that holds them. A dense
    tensor is read only where owned; a quantized weight a row range at a time; a PTQ layer one layer at
    a time; a tensor transformers' rules combine from several (MoE experts) one target at a time. A
    tensor the checkpoint lacks is named before anything is read; which parameter each checkpoint tensor
    fills, and what it is to the model, is decided as in the whole load (`load.checkpoint_plan`,
    `load.tensor_role`)."""
    reader, jobs, covered = CheckpointReader(checkpoint_files(model_dir)), [], set()
    fmt = ptq.detect(model_dir)
    packed = ptq_layers(base, reader.keys(), fmt)
    register_packed_experts(base, reader, fmt, packed)
    targets, ignored = checkpoint_plan(base, reader, packed)
    log_ignored(ignored, log)
    for name, leaves in packed.items():  # a PTQ layer: built whole from all its tensors, once
        module = tensor_role(base, f"{name}.{leaves[0]}", packed)[1]
        jobs.append((name, None, [("ptq", name, module, None)]))
        covered |= {id(p) for p in module.parameters(recurse=False)}
    for target in targets:
        parts = []  # (kind, parameter name, module, leaf) of the target's names this rank still has to fill
        for name in target.names:
            kind, module, pname = tensor_role(base, name, packed)
            params = ([p for _, p in _storage(module)] if kind == "quantized" else
                      [p for _, p in module.storage()] if kind == "experts" else
                      [module._parameters[pname]] if kind == "dense" else
                      [module._buffers[pname]] if kind == "vocab" else [])
            if kind == "buffer" or (params and id(params[0]) not in covered):  # once if tied
                parts.append((kind, name, module, pname))
                covered |= {id(p) for p in params}
        if parts:
            jobs.append((None, target, parts))
    raise_if_missing(_checkpoint_keys(base, lambda p: id(p) not in covered and not p.requires_grad)
                     + _unread_vocab_rows(base, covered), model_dir)
    error = [0.0, 0.0]  # a conversion's squared error and squared weight norm (load.converted_ptq)
    with torch.no_grad():
        for layer_name, target, parts in jobs:
            if layer_name is not None:
                _fill_ptq(packed, reader, fmt, layer_name, parts[0][2], span, local, device, quant, dtype, error)
            elif parts[0][0] == "experts":
                _fill_experts(base, reader, target, parts[0], span, local, device, quant, dtype, log)
            elif target.rule is None:
                _fill_read(reader, target.sources[0], parts[0], world_size, span, local, device)
            else:
                # A rank briefly holds this one target whole (at most one layer's expert stack, as the whole
                # load holds it), built by transformers' rule from its sources, and keeps its own part.
                whole = target.build(base, lambda key: reader.rows(key, dtype=dtype).to(device))
                for part in parts:
                    _fill_from(whole[part[1]].to(dtype), part, world_size, span, local, device)
                del whole
            release_freed_memory()
    if fmt is not None:
        log_conversion_error(fmt.name, quant, error, log)


def _fill_ptq(packed: dict[str, list[str]], reader: CheckpointReader, fmt, key: str, module: nn.Module, span: Span,
              local: Local, device: torch.device, quant: QuantSpec, dtype: torch.dtype, error: list[float]) -> None:
    """One PTQ layer, built (and converted) where the whole load builds it (the device); this rank's part kept."""
    layer = fmt.build({leaf: reader.rows(f"{key}.{leaf}").to(device) for leaf in packed[key]}, fmt.config, key)
    whole = (dict(layer.named_parameters()) if quant.method == "checkpoint" else
             converted_ptq(layer, module, quant, dtype, error))
    for name, param in module.named_parameters(recurse=False):
        owned = span(param)
        _checked(local(param, owned), owned, f"{key}.{name}").copy_(whole[name].reshape(-1)[owned[0]:owned[1]])


def _fill_experts(base: nn.Module, reader: CheckpointReader, target, part, span: Span, local: Local,
                  device: torch.device, quant: QuantSpec, dtype: torch.dtype, log) -> None:
    """An ExpertStack: each expert whose storage this rank holds any of is read (alone, where the checkpoint
    allows: see the module docstring), quantized as the whole load quantizes it, and its owned part kept."""
    _, name, stack, _ = part
    count, sizes = stack.num_experts, stack.expert_numel()
    read = functools.partial(_read_to, reader, dtype=dtype, device=device)
    if target.rule is None:  # stored fused: expert e is rows e of the tensor
        expert = lambda e: reader.rows(target.sources[0], e, e + 1, dtype=dtype).to(device)[0]  # noqa: E731
    else:
        one = target.expert_reader(base, read, count)
        if one is None:
            log(f"{name}: transformers' rule cannot be applied one expert at a time; building the layer's "
                f"{count} experts whole")
            whole = target.build(base, read)[name]
            expert = lambda e: whole[e]  # noqa: E731
        else:
            expert = lambda e: one(e)[name]  # noqa: E731
    owned = {n: span(p) for n, p in stack.storage()}
    targets = {n: _checked(local(p, owned[n]), owned[n], f"{name}.{n}") for n, p in stack.storage()}
    quantize = functools.partial(quantized_like, spec=quant)
    for e in range(count):
        hits = {n: (max(o[0], e * sizes[n]), min(o[1], (e + 1) * sizes[n])) for n, o in owned.items()}
        if all(a >= b for a, b in hits.values()):
            continue  # none of expert e is here: not read
        pieces = stack.quantize_expert(expert(e), quantize)
        for n, (a, b) in hits.items():
            if a < b:
                first = e * sizes[n]
                targets[n][a - owned[n][0]:b - owned[n][0]].copy_(pieces[n].reshape(-1)[a - first:b - first])
        release_freed_memory()


def _read_to(reader: CheckpointReader, key: str, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return reader.rows(key, dtype=dtype).to(device)


def _fill_read(reader: CheckpointReader, key: str, part, world_size: int, span: Span, local: Local,
               device: torch.device) -> None:
    """A parameter stored as one checkpoint tensor `key` (maybe under another name): only what this rank owns
    is read (a quantized weight: every row, a range at a time; see the module docstring)."""
    kind, _, module, pname = part
    if kind == "quantized":
        _fill_quantized(module, lambda a, b: reader.rows(key, a, b).to(device), world_size, span, local, key)
    elif kind == "dense":
        param = module._parameters[pname]
        owned = span(param)
        reader.flat(key, *owned, out=_checked(local(param, owned), owned, key))
    elif kind == "vocab":  # this rank's rows only, into the buffer a tied head shares
        buffer = module._buffers[pname]
        if buffer.device.type == "cpu":
            reader.rows(key, *vocab.rows(module), out=buffer)
        else:
            buffer.copy_(reader.rows(key, *vocab.rows(module), dtype=buffer.dtype))
    else:
        module._buffers[pname] = reader.rows(key).to(device)


def _fill_from(whole: torch.Tensor, part, world_size: int, span: Span, local: Local, device: torch.device) -> None:
    """A parameter from a tensor built whole (by a conversion rule): this rank's part copied out."""
    kind, name, module, pname = part
    if kind == "quantized":
        _fill_quantized(module, lambda a, b: whole[a:b], world_size, span, local, name)
    elif kind == "dense":
        param = module._parameters[pname]
        owned = span(param)
        _checked(local(param, owned), owned, name).copy_(whole.reshape(-1)[owned[0]:owned[1]])
    elif kind == "vocab":
        start, stop = vocab.rows(module)
        module._buffers[pname].copy_(whole[start:stop])
    else:
        module._buffers[pname] = whole.to(device)


def _fill_quantized(module: QuantLinear, read_rows, world_size: int, span: Span, local: Local, key: str) -> None:
    owned = {n: span(p) for n, p in _storage(module)}
    targets = {n: _checked(local(p, owned[n]), owned[n], key) for n, p in _storage(module)}
    slices = max(world_size, -(-module.in_features * module.out_features * 4 // SLICE_BYTES))
    # quantized where the whole load quantizes (the device), so the pieces equal its result
    pieces = module.quantize_pieces(read_rows, owned, slices)
    for n, target in targets.items():
        target.copy_(pieces[n])


def _checked(target: torch.Tensor, owned: tuple[int, int], key: str) -> torch.Tensor:
    if target.numel() != owned[1] - owned[0]:
        raise RuntimeError(f"the engine holds {target.numel()} elements of {key} on this rank, expected "
                           f"[{owned[0]}, {owned[1]}) of the flattened tensor: its sharding layout changed")
    return target


def _checkpoint_keys(base: nn.Module, which: Callable[[nn.Parameter], bool]) -> list[str]:
    """The checkpoint names of the parameters `which` selects (a quantized layer's are `<layer>.weight`)."""
    keys: dict[str, None] = {}
    for name, module in base.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if which(p) and isinstance(module, ExpertStack):  # stored as the fused tensor it replaced
                keys[name.replace('.base_layer', '')] = None
            elif which(p):
                stored = "weight" if isinstance(module, QuantLinear) and pname != "bias" else pname
                keys[f"{name.replace('.base_layer', '')}.{stored}"] = None
    return list(keys)


def _unread_vocab_rows(base: nn.Module, covered: set[int]) -> list[str]:
    """The checkpoint names of vocabulary-parallel buffers no checkpoint tensor fills."""
    return [f"{name}.{leaf}" for name, module in base.named_modules() if vocab.rows(module)
            for leaf, buffer in module._buffers.items() if leaf in ("weight", "bias") and id(buffer) not in covered]


def _storage(layer: QuantLinear):
    return [(n, p) for n, p in layer.named_parameters(recurse=False) if n != "bias"]
