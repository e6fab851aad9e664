"""DeepSpeed ZeRO stages 1/2/3 (optionally offloading to CPU). The only module that imports deepspeed.

We hand DeepSpeed a torch AdamW (no JIT-compiled fused Adam) and keep our own loss normalisation:
the loop's loss is already the global token mean, so DeepSpeed must not divide it again by the
accumulation steps (`scale_wrt_gas=False`).

ZeRO-3 partitions every parameter, the quantized base's uint8 storage included. qshard's config
(qshard/dsconfig.py) sets the persistence threshold to 0 so that no small parameter (a block-scale
tensor, a LoRA matrix) silently stays gathered on every rank after the first forward; the base is
then really split N ways.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from qshard.dsconfig import reduce_bucket_size, zero3_gather_limits
from qshard.engines.base import decoder_layers, nullcontext
from qshard.errors import QShardError


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, device: torch.device, config: dict):
        self.device, self.config = device, config
        self._zero_init = None  # a deepspeed.zero.Init, for partition_in_place
        self.notes: tuple[str, ...] = ()

    def _deepspeed(self):
        from qshard import _compat

        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "MASTER_ADDR" not in os.environ:  # one process, no launcher: DeepSpeed reads the LOCAL_RANK one sets
            os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0))
        _compat.skip_deepspeed_shm_build()
        import deepspeed

        return deepspeed

    def partition_in_place(self, param: nn.Parameter, span: tuple[int, int]) -> torch.Tensor:
        """ZeRO-3 load-time sharding: turn a parameter that is still on the meta device into a ZeRO-3
        parameter holding only this rank's (zeroed) partition, and return the view of it that holds
        elements `span` of the flattened parameter for the loader to fill; the whole tensor never exists."""
        from qshard import _compat

        if self._zero_init is None:
            deepspeed = self._deepspeed()
            deepspeed.init_distributed()  # adopts torch's process group (else the config sees a world of 1)
            self._zero_init = deepspeed.zero.Init(config_dict_or_path=self.config)
        return _compat.deepspeed_partition_in_place(self._zero_init, param, span)

    def half_dtype(self) -> torch.dtype | None:
        for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if (self.config.get(key) or {}).get("enabled"):
                return dtype
        return None

    def wrap(self, model: nn.Module, make_optimizer):
        deepspeed = self._deepspeed()
        self.peft_model = model
        params = [p for p in model.parameters() if p.requires_grad]
        zero = self.config.setdefault("zero_optimization", {})
        zero.setdefault("reduce_bucket_size", reduce_bucket_size(sum(p.numel() for p in params)))
        if zero.get("stage") == 3:
            self.notes = _limit_zero3_gathers(zero, model) + _gather_layers_whole(model)
        self.optimizer = make_optimizer(params)
        self.model, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=self.optimizer,
                                                   config=self.config)
        self.params = params
        return self.model, self.optimizer

    def accumulating(self):
        return nullcontext()  # DeepSpeed tracks accumulation boundaries itself

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # only advances DeepSpeed's micro-step counter

    def skip_step(self) -> None:
        raise QShardError("train.on_nonfinite: skip is not available with DeepSpeed, whose step() must run to "
                          "keep its accumulation counters", where="train.on_nonfinite", fix="use stop")

    def local_grads(self):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p) for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def step(self, max_grad_norm: float | None) -> float:
        self.model.step()  # clipping is DeepSpeed's own (gradient_clipping in the config)
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed
        from peft import get_peft_model_state_dict

        # Under ZeRO-3 a parameter's .data is empty outside a gather: saving it directly writes
        # zero-size tensors (the classic "empty adapter" failure).
        with deepspeed.zero.GatheredParameters(self.params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from qshard.model.lora import adapter_params_by_file_key

        params = adapter_params_by_file_key(self.peft_model)
        # Two copies to set: the module's parameter (what forward uses; under ZeRO-3 partitioned, so
        # gathered, written and re-partitioned) and the optimizer's fp32 master (what the next step
        # updates and copies back into the module).
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            with torch.no_grad():
                for key, param in params.items():
                    param.data.copy_(state[key].to(param.device, param.dtype))
        for key, param in params.items():
            safe_set_full_fp32_param(param, state[key].to(self.device, torch.float32))

    def optimizer_state_dict(self) -> dict:
        """Full AdamW state keyed by parameter name: the same format torch's engines write (DCP's full
        optimizer state dict), so a checkpoint moves between engines and world sizes."""
        from deepspeed.utils import safe_get_full_optimizer_state

        names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]
        step = torch.tensor(float(_adam_step(self.optimizer)))
        state = {n: {"step": step.clone(), **{key: safe_get_full_optimizer_state(p, key).cpu()
                                              for key in ("exp_avg", "exp_avg_sq")}}
                 for n, p in zip(names, self.params)}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": names}
                  for g in self.optimizer.param_groups[:1]]
        return {"state": state, "param_groups": groups}

    def close(self) -> None:
        pass  # DeepSpeed's groups are held from Python (torch frees them without the GIL)

    def load_optimizer_state_dict(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        from qshard import _compat

        names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]
        _compat.deepspeed_prepare_optimizer_state(self.model.optimizer, self.optimizer)
        for n, p in zip(names, self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state["state"][n][key].to(self.device, torch.float32), key)
        _set_adam_step(self.optimizer, int(next(iter(state["state"].values()))["step"]))


def _limit_zero3_gathers(zero: dict, model: nn.Module) -> tuple[str, ...]:
    """Fill in qshard's ZeRO-3 gather limits (dsconfig.zero3_gather_limits) from the largest decoder layer as
    loaded, where the config does not set them; say which values hold."""
    layer = max(sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for m in decoder_layers(model))
    ours = zero3_gather_limits(layer)
    preset = [key for key in ours if key in zero]
    for key, value in ours.items():
        zero.setdefault(key, value)
    values = ", ".join(f"{key} {zero[key]:.3g}" for key in ours)
    if len(preset) == len(ours):
        return (f"ZeRO-3 gathers as the DeepSpeed config sets them: {values}",)
    return (f"ZeRO-3 prefetches two decoder layers ahead, holds at most four gathered ({layer:.3g} elements "
            f"each; 1e9 at most) and gathers each layer again for its backward: {values}"
            f"{' (partly from the DeepSpeed config)' if preset else ''}. DeepSpeed's defaults keep up to 1e9 elements "
            "gathered from forward to backward (less traffic, more memory): set these keys in "
            "distributed.deepspeed_config to change them",)


def _gather_layers_whole(model: nn.Module) -> tuple[str, ...]:
    """Make every decoder layer a ZeRO-3 leaf module (DeepSpeed's `set_z3_leaf_modules` flag): DeepSpeed then
    gathers all of a layer's parameters in one collective around its forward and its backward, instead of one
    per sub-module (a LoRA-wrapped NF4 linear holds 4 packed tensors and 2 LoRA matrices beside it). It also
    gathers MoE expert stacks, which are read by index rather than through a child's forward. On the 400M
    benchmark model that is 89 all-gathers a step instead of 1,022 (BENCHMARKS.md). Gathered memory barely moves:
    the prefetcher already held whole layers (`_limit_zero3_gathers`); one layer fewer stays gathered from forward
    to backward (plan.zero3_layers_kept), and the 400M model's peak tensors rose 1% while its peak RSS fell
    (0.55-0.57x to 0.52-0.53x the anchor's)."""
    from qshard import _compat

    layers = decoder_layers(model)
    for layer in layers:
        layer._z3_leaf = True
        layer.register_forward_pre_hook(_compat.deepspeed_leaf_inputs_require_grad)
    return (f"ZeRO-3 gathers each of the {len(layers)} decoder layers in one collective (a ZeRO-3 leaf module), "
            "not one per sub-module",)


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    for s in optimizer.state.values():
        if "step" in s:
            return int(s["step"])
    return 0


def _set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for s in optimizer.state.values():
        if "step" in s:
            s["step"] = torch.tensor(float(step)) if torch.is_tensor(s["step"]) else step
