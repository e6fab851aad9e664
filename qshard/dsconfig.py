"""qshard's DeepSpeed JSON: written by `qshard plan`, filled in and handed to DeepSpeed by the engine.

Plain dicts, importing neither torch nor deepspeed, so that the planner (pure) and the DeepSpeed engine
share one definition of every value qshard chooses for DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

from qshard.errors import QShardError

DS_REDUCE_BUCKET_DEFAULT = 500_000_000  # elements (deepspeed/runtime/zero/config.py, reduce_bucket_size)
DS_MAX_LIVE_DEFAULT = 1_000_000_000     # elements (stage3_max_live_parameters)
ZERO3_GATHER_KEYS = ("stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")


def reduce_bucket_size(trainable: int) -> int:
    """The reduce_bucket_size (elements) qshard gives DeepSpeed: it sizes the gradient-reduction buffers
    by it (default 5e8 elements, ~1-2 GB per GPU), while LoRA's gradients are a few MB, so a bucket of
    the trainable parameter count (at least 1e6, at most the default) suffices."""
    return int(min(DS_REDUCE_BUCKET_DEFAULT, max(trainable, 1_000_000)))


def zero3_gather_limits(layer_elements: int) -> dict[str, int]:
    """qshard's ZeRO-3 gather limits for a model whose largest decoder layer gathers `layer_elements` elements
    (`ds_numel`: one per byte of quantized storage, plus its LoRA tensors): prefetch two layers ahead, hold at
    most four gathered (never more than DeepSpeed's default limit, 1e9 elements: 2.25 of a 70B's NF4 layers), and
    release every layer after its forward (it is gathered again for its backward).

    DeepSpeed's defaults (stage3_prefetch_bucket_size 5e7, stage3_max_live_parameters 1e9,
    stage3_max_reuse_distance 1e9; deepspeed 0.19, partitioned_param_coordinator.py) keep much more: the prefetch
    bucket is issued again at every module's fetch, so the prefetcher runs ahead until 1e9 elements are gathered,
    and a parameter it has walked past is not released after its forward. Below 1e9 elements (~2B parameters in NF4) the
    whole model stays gathered from its forward to its backward on every rank. On the 400M benchmark model
    (BENCHMARKS.md): 181 MB gathered at the end of the forward with the defaults; with these limits the peak
    fell from 0.63x to 0.55-0.57x the anchor's, at 1.35x its step time on CPU while DeepSpeed gathered each
    sub-module on its own (1,022 all-gathers a step). With every decoder layer a ZeRO-3 leaf, gathered in one
    collective (engines/deepspeed.py), it is 0.52-0.53x the peak at 0.96x the step (median of three rounds
    alternated with the anchor). One layer of prefetch (two held) was as small but 1.3x slower on CPU (before the
    leaves): a layer's gather then waits for the previous one's release. Reuse distance 0 lets the planner say
    exactly which layers stay gathered (plan.zero3_layers_kept)."""
    layer = max(int(layer_elements), 1)
    return {"stage3_prefetch_bucket_size": 2 * layer,
            "stage3_max_live_parameters": min(4 * layer, DS_MAX_LIVE_DEFAULT),  # never more than DeepSpeed holds
            "stage3_max_reuse_distance": 0}


def deepspeed_config(*, zero_stage: int, offload_optimizer: str, offload_params: str, micro_batch: int,
                     accumulation: int, world_size: int, precision: str, max_grad_norm: float | None,
                     user_config: str | None = None) -> dict:
    """qshard's DeepSpeed config, or the user's JSON with its "auto" values filled in."""
    filled = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
              "train_batch_size": micro_batch * accumulation * world_size,
              "gradient_clipping": max_grad_norm or 0.0}
    if user_config:
        return _fill_auto(read_user_config(user_config), filled, precision)
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


def read_user_config(path: str) -> dict:
    """A user's DeepSpeed JSON, which must be a JSON object (read once per process by the validator,
    again by the engine: both from this function)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QShardError(f"cannot read the DeepSpeed config: {e}", where=f"distributed.deepspeed_config ({path})",
                          fix="give the path of a valid DeepSpeed JSON file") from None
    if not isinstance(config, dict):
        raise QShardError("the DeepSpeed config is not a JSON object", where=f"distributed.deepspeed_config ({path})",
                          fix='write it as {"zero_optimization": {"stage": 3}, ...}')
    return config


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
