"""Engines spread one training step over processes behind one small protocol (see `base.Engine`).

Only `engines/deepspeed.py` imports deepspeed; only `engines/fsdp2.py` calls `fully_shard`.
"""

from __future__ import annotations

import torch

from qshard.engines.base import Engine


def create_engine(engine: str, *, device: torch.device, precision: str, world_size: int, micro_batch: int,
                  accumulation: int, max_grad_norm: float | None, zero_stage: int = 2,
                  offload_optimizer: str = "none", offload_params: str = "none", deepspeed_config: str | None = None,
                  reshard_after_forward: bool = True, fsdp_cpu_offload: bool = False) -> Engine:
    """The engine named by `distributed.engine` (the compatibility table has already approved it)."""
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if engine == "none":
        from qshard.engines.single import SingleEngine

        return SingleEngine(device, scaler)
    if engine == "ddp":
        from qshard.engines.ddp import DDPEngine

        return DDPEngine(device, scaler)
    if engine == "fsdp2":
        from qshard.engines.fsdp2 import FSDP2Engine

        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        return FSDP2Engine(device, reshard_after_forward, fsdp_cpu_offload, param_dtype)
    from qshard.dsconfig import deepspeed_config as make_config
    from qshard.engines.deepspeed import DeepSpeedEngine

    config = make_config(zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                         micro_batch=micro_batch, accumulation=accumulation, world_size=world_size,
                         precision=precision, max_grad_norm=max_grad_norm, user_config=deepspeed_config)
    return DeepSpeedEngine(device, config)
