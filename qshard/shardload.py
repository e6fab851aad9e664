"""Load-time sharding (ZeRO-3, FSDP2): no rank ever holds the whole base model.

The usual path (`load.load_base_model`, then `engine.wrap`) builds the whole quantized model on
every rank and only then partitions it. Here the engine's partitioning happens while the checkpoint
streams in:

- FSDP2: LoRA is attached to the empty (meta) skeleton, `fully_shard` splits it, `to_empty` gives
  each rank uninitialised storage for its shards only, then every tensor of the checkpoint is read
  and written into the local shards. A dense tensor is read only for the rows this rank owns. A
  quantized one is read one row range at a time and quantized piecewise (`QuantLinear.
  quantize_pieces`): each rank keeps its part of the packed codes and of the block statistics,
  identical to quantizing the whole tensor. Peak beyond the shards: one row range of one tensor.
- ZeRO-3: DeepSpeed partitions existing tensors (`deepspeed.zero.Init(module=...)`), so the model is
  loaded one decoder layer (or top-level module) at a time and partitioned before the next one is
  read. Peak beyond the shards: one layer, whole.

Design choice: every rank reads (and, for 4-bit, quantizes) every row of a quantized tensor and
keeps its own part, rather than ranks quantizing disjoint parts and exchanging statistics. The
double-quant offset is the mean of *all* block scales of a tensor, so a split needs either an
exchange of the scales (a collective per tensor) or each rank computing them all; the latter needs
no communication during load, is exact by construction, and costs N x the disk reads (served by
the page cache on one node) and N x the quantization compute, which is what today's per-rank
whole-model load costs anyway. Dense tensors are read only where owned.

Not covered (loaded whole, then sharded, with a log line saying so): post-training-quantized
checkpoints (their packed tensors are stored transposed/grouped, not row-sliceable as the layers
store them) and DoRA (its magnitude is computed from the whole base weight when attached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qshard.load import (CheckpointReader, QuantSpec, check_materialised, place_tensors, checkpoint_files,
                         raise_if_missing, release_freed_memory)
from qshard.lora import init_adapter
from qshard.quant import ptq
from qshard.quant.base import QuantLinear

SLICE_BYTES = 8 * 2**20  # a quantized weight is read at most this much (as fp32) at a time
Attach = Callable[[nn.Module], nn.Module]  # base model -> PeftModel (gradient checkpointing, LoRA)


def why_not(engine_key: str, world_size: int, model_dir: Path, use_dora: bool, enabled: bool) -> str | None:
    """None when the base can be loaded sharded, else the reason it is loaded whole first."""
    if engine_key not in ("zero3", "zero3_offload", "fsdp2") or world_size < 2:
        return "the engine does not shard parameters" if world_size > 1 else "one process"
    if not enabled:
        return "distributed.shard_on_load is false"
    if ptq.detect(model_dir) is not None:
        return "a post-training-quantized checkpoint is loaded whole before it is sharded"
    if use_dora:
        return "DoRA's magnitude is computed from the whole base weight"
    return None


def load_fsdp2(skeleton: nn.Module, model_dir: Path, quant: QuantSpec, engine, attach: Attach, seed: int,
               rank: int, world_size: int, device: torch.device) -> nn.Module:
    skeleton.config.name_or_path = str(model_dir)  # PEFT writes it into adapter_config.json
    model = engine.shard(attach(skeleton))
    buffers = {name: b for name, b in model.named_buffers()}  # real (rotary tables): to_empty would blank them
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.to(device)

    def local(param: torch.Tensor) -> torch.Tensor:
        piece = param.to_local()
        start, stop = shard_span(param.shape[0], rank, world_size)
        if piece.shape[0] != stop - start:
            raise RuntimeError(f"FSDP2 holds {piece.shape[0]} rows of a {tuple(param.shape)} parameter on rank "
                               f"{rank}, expected rows [{start}, {stop}): its sharding layout changed")
        return piece

    base = model.get_base_model()
    reader, filled = CheckpointReader(checkpoint_files(model_dir)), set()  # ids of the parameters written
    with torch.no_grad():
        for key in reader.keys():
            module_name, _, pname = key.rpartition(".")
            try:
                module = base.get_submodule(module_name)
            except AttributeError:
                continue
            module = getattr(module, "base_layer", module)  # under a LoRA wrapper
            if isinstance(module, QuantLinear) and pname == "weight":
                owned = {n: shard_span(p.shape[0], rank, world_size) for n, p in _storage(module)}
                slices = max(world_size, -(-module.in_features * module.out_features * 4 // SLICE_BYTES))
                pieces = module.quantize_pieces(lambda a, b: reader.rows(key, a, b), owned, slices)
                for n, p in _storage(module):
                    local(p).copy_(pieces[n])
                    filled.add(id(p))
            elif pname in module._parameters:
                param = module._parameters[pname]
                reader.rows(key, *shard_span(param.shape[0], rank, world_size), out=local(param))
                filled.add(id(param))
            elif pname in module._buffers:
                module._buffers[pname] = reader.rows(key).to(device)
            release_freed_memory()
    raise_if_missing([n for n, p in base.named_parameters() if id(p) not in filled and not p.requires_grad],
                     model_dir)
    init_adapter(model, seed, lambda p, full: full[slice(*shard_span(full.shape[0], rank, world_size))])
    return model


def load_zero3(skeleton: nn.Module, model_dir: Path, quant: QuantSpec, engine, attach: Attach,
               device: torch.device) -> nn.Module:
    from qshard.engines.fsdp2 import decoder_layers

    reader = CheckpointReader(checkpoint_files(model_dir))
    units = load_units(skeleton, decoder_layers(skeleton))
    # largest first: a unit is whole while the shards of those before it are held, so the peak is
    # lowest when the embeddings and head (whole, often the largest) come before the layers' shards
    size = {name: sum(p.numel() for p in unit.parameters()) for name, unit in units}
    for name, unit in sorted(units, key=lambda u: -size[u[0]]):
        keys = [k for k in reader.keys() if k.startswith(name + ".")]
        for key in keys:
            place_tensors(skeleton, {key: reader.rows(key, dtype=skeleton.dtype).to(device)}, quant, skeleton.dtype)
        if keys:
            engine.partition(unit)
        release_freed_memory()
    skeleton.tie_weights()
    check_materialised(skeleton, model_dir)
    skeleton.requires_grad_(False)
    skeleton.config.name_or_path = str(model_dir)
    model = attach(skeleton.eval())
    engine.partition(model)  # the adapters too, cast as deepspeed.initialize casts a whole model
    return model


def load_units(model: nn.Module, layers: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The decoder layers and, outside them, every module that holds parameters itself (embeddings,
    final norm, head), in module order: the pieces loaded and partitioned one at a time."""
    layer_ids = {id(layer) for layer in layers}
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [(name, module) for name, module in model.named_modules()
            if id(module) in layer_ids or (id(module) not in inside and next(module.parameters(recurse=False), None)
                                           is not None)]


def shard_span(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that `rank` holds: torch.chunk's split, which FSDP2 uses."""
    per_rank = -(-rows // world_size)
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


def _storage(layer: QuantLinear):
    return [(n, p) for n, p in layer.named_parameters(recurse=False) if n != "bias"]
