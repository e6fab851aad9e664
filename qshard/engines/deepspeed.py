"""DeepSpeed ZeRO stages 1/2/3 (optionally offloading to CPU). The only module that imports deepspeed.

We hand DeepSpeed a torch AdamW (no JIT-compiled fused Adam) and keep our own loss normalisation:
the loop's loss is already the global token mean, so DeepSpeed must not divide it again by the
accumulation steps (`scale_wrt_gas=False`).

ZeRO-3 partitions every parameter, the quantized base's uint8 storage included. The persistence
threshold is 0 so that no small parameter (a block-scale tensor, a LoRA matrix) silently stays
gathered on every rank after the first forward; the base is then really split N ways.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qshard.engines.base import nullcontext
from qshard.errors import QShardError


def deepspeed_config(*, zero_stage: int, offload_optimizer: str, offload_params: str, micro_batch: int,
                     accumulation: int, world_size: int, precision: str, max_grad_norm: float | None,
                     user_config: str | None = None) -> dict:
    """qshard's DeepSpeed config, or the user's JSON with its "auto" values filled in."""
    filled = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
              "train_batch_size": micro_batch * accumulation * world_size,
              "gradient_clipping": max_grad_norm or 0.0}
    if user_config:
        return _fill_auto(_read_user_config(user_config), filled, precision)
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    return {**filled, "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
            "zero_allow_untested_optimizer": True,  # our torch AdamW
            "zero_force_ds_cpu_optimizer": False,   # ...also when offloading
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def _read_user_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise QShardError(f"cannot read the DeepSpeed config: {e}", where="distributed.deepspeed_config",
                          fix="give the path of a valid DeepSpeed JSON file") from None


def _fill_auto(config: dict, filled: dict, precision: str) -> dict:
    """Replace "auto" with qshard's values; any other "auto" is an error that names its key."""
    config = json.loads(json.dumps(config))
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for section, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if isinstance(config.get(section), dict) and config[section].get("enabled") == "auto":
            config[section]["enabled"] = on
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    left = _auto_keys(config)
    if left:
        raise QShardError(f"qshard cannot fill \"auto\" for {', '.join(left)}", where="distributed.deepspeed_config",
                          fix="give these keys explicit values")
    return config


def _auto_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def reduce_bucket_size(trainable: int) -> int:
    """The reduce_bucket_size (elements) qshard gives DeepSpeed: it sizes the gradient-reduction buffers
    by it (default 5e8 elements, ~1-2 GB per GPU), while LoRA's gradients are a few MB, so a bucket of
    the trainable parameter count (at least 1e6, at most the default) suffices."""
    return int(min(5e8, max(trainable, 1_000_000)))


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, device: torch.device, config: dict):
        self.device, self.config = device, config
        self._zero_init = None  # a deepspeed.zero.Init, for partition_in_place

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

    def load_optimizer_state_dict(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        from qshard import _compat

        names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]
        _compat.deepspeed_prepare_optimizer_state(self.model.optimizer, self.optimizer)
        for n, p in zip(names, self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state["state"][n][key].to(self.device, torch.float32), key)
        _set_adam_step(self.optimizer, int(next(iter(state["state"].values()))["step"]))


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    for s in optimizer.state.values():
        if "step" in s:
            return int(s["step"])
    return 0


def _set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for s in optimizer.state.values():
        if "step" in s:
            s["step"] = torch.tensor(float(step)) if torch.is_tensor(s["step"]) else step
