"""PyTorch FSDP2 (`fully_shard`): every parameter, the quantized base's uint8 storage included, is a
DTensor sharded along dim 0; each decoder layer, the input embedding and the head are all-gathered for
their forward and, where backward needs them, again for backward; the root (final norm) once per
micro-batch. At a 128k vocabulary the embedding and the head are each larger than a 70B decoder layer
in NF4: as units of their own they are never gathered together, nor kept from forward to backward. By
default they are not FSDP2's at all: vocabulary-parallel (qshard/model/vocab.py), each rank keeps its rows
and neither is gathered; the units above are what `distributed.vocab_parallel: false` gets.

bitsandbytes' own Linear4bit fails here (its QuantState lives outside the parameter, see
`fix_4bit_weight_quant_state_from_module`); qshard's layers keep every constant in uint8 parameters,
which FSDP2 gathers as bytes and never casts (mixed precision applies to floating params only).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qshard import _compat
from qshard.engines.base import (
    clip_and_step,
    decoder_layers,
    full_optimizer_state,
    load_adapter_into,
    load_full_optimizer_state,
    trainable_grads,
)


class FSDP2Engine:
    name = "fsdp2"
    notes: tuple[str, ...] = ()

    def __init__(self, device: torch.device, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 param_dtype: torch.dtype | None = None):
        self.device, self.reshard, self.cpu_offload, self.param_dtype = (device, reshard_after_forward,
                                                                          cpu_offload, param_dtype)

    def shard(self, model: nn.Module) -> nn.Module:
        """`fully_shard` each decoder layer, the embedding and the head, then the root. Works on a
        model whose parameters are still on the meta device (load-time sharding, qshard/shardload.py)."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        if isinstance(model, FSDPModule):
            return model
        _compat.fsdp2_allow_integer_parameters()
        options = {"offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()}
        if self.param_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        layers, embeddings = decoder_layers(model), embedding_units(model)
        for layer in layers + embeddings:
            fully_shard(layer, reshard_after_forward=self.reshard, **options)
        if embeddings:
            # torch's default backward prefetch (an empty list) gathers the unit that ran before in forward: for
            # the first layer that is the embedding, whose backward never runs (its weight is frozen, its input
            # is token ids), a wasted gather of the whole embedding per micro-batch. Naming the layer itself
            # prefetches nothing (it is gathered already). tests/test_commcount.py counts the gathers.
            layers[0].set_modules_to_backward_prefetch([layers[0]])
        # the root (the final norm; embeddings and head too where they are tied) stays gathered from forward to
        # backward, which uses it again at once
        fully_shard(model, **options, **_compat.fsdp2_root_options(self.reshard))
        # PeftModel.generate reaches the inner model without calling the root's forward, so the
        # root's parameters (final norm; tied embeddings) would stay sharded: hook generate like forward.
        register_fsdp_forward_method(model, "generate")
        return model

    def wrap(self, model: nn.Module, make_optimizer):
        model = self.shard(model.to(self.device))
        self.model = self.peft_model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        return self.model, self.optimizer

    @contextlib.contextmanager
    def accumulating(self):
        self.model.set_requires_gradient_sync(False)  # keep unsharded grads; reduce once, on the last micro-batch
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def local_grads(self):
        return trainable_grads(self.model)

    def step(self, max_grad_norm: float | None) -> float:
        return clip_and_step(self.params, self.optimizer, max_grad_norm)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        full = {n: p.full_tensor().detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        return get_peft_model_state_dict(self.model, state_dict=full)

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        load_adapter_into(self.model, state, lambda p, full: distribute_tensor(full, p.device_mesh, p.placements))

    def optimizer_state_dict(self) -> dict:
        return full_optimizer_state(self.model, self.optimizer)

    def close(self) -> None:
        pass  # FSDP2's device mesh holds its groups from Python (torch frees them without the GIL)

    def load_optimizer_state_dict(self, state: dict) -> None:
        load_full_optimizer_state(self.model, self.optimizer, state)


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the head as units of their own; none where they are tied (one parameter
    cannot belong to two units: both then stay in the root) or vocabulary-parallel (no parameters: each rank
    keeps its rows, qshard/model/vocab.py)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    if embed is None or head is None or not any(True for _ in (*embed.parameters(), *head.parameters())):
        return []
    tied = {id(p) for p in embed.parameters()} & {id(p) for p in head.parameters()}
    return [] if tied else [embed, head]
