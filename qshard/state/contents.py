"""What a checkpoint's files must hold, checked before anything is loaded from them.

checkpoint.verify proves the files are the ones the manifest lists; a tool (or a person) may have
changed a file and re-hashed the manifest, so the contents are checked too: trainer_state.json's
integers, scheduler and grad-scaler state; the adapter's tensors (LoRA/DoRA keys, the configured rank,
finite, partners present, and the shapes of the model being trained when those are given); the
optimizer's moments against the adapter's shapes; every rank's RNG state; the recipe. Whatever passes
here loads without a traceback (resume.restore turns what is left into a QShardError).
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

from qshard.state.checkpoint import CheckpointInvalid, is_int, load_state

MAX_STEP = 10**9  # no run takes a billion optimizer steps: a larger step is a damaged or forged file
# trainer_state.json's integers and their ranges (seed: numpy's; world_size: more ranks than any job has)
TRAINER_INTS = {"step": (1, MAX_STEP), "epoch": (0, MAX_STEP), "offset_in_epoch": (0, 2**62),
                "seed": (0, 2**32 - 1), "world_size": (1, 2**20), "global_batch": (1, 2**40)}
GRAD_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
MOMENTS = ("exp_avg", "exp_avg_sq", "state1", "state2")  # torch AdamW's, bitsandbytes' optimizers'


def check(ckpt: Path, step: int, expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise CheckpointInvalid unless the files of a checkpoint whose manifest verified hold what a save
    writes; `expected` pins the adapter's keys and shapes (resume.expected_adapter_shapes)."""
    state = _check_trainer_state(ckpt, step)
    shapes = _check_adapter(ckpt)
    if expected is not None:
        _check_expected(ckpt, shapes, expected)
    _check_optimizer(ckpt, shapes)
    for rank in range(state["world_size"]):
        _check_rng(ckpt, rank)
    _check_recipe(ckpt)


def _check_trainer_state(ckpt: Path, step: int) -> dict:
    state = _read_json(ckpt, "trainer_state.json")
    if not isinstance(state, dict):
        raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json is not a JSON object")
    for key, (low, high) in TRAINER_INTS.items():
        if not is_int(state.get(key)) or not low <= state[key] <= high:
            raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json has {key} {state.get(key)!r}, not an integer "
                                    f"in [{low}, {high}]")
    if state["step"] != step:
        raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json says step {state['step']}, the folder is {ckpt.name}")
    if state["global_batch"] % state["world_size"]:
        raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json has global_batch {state['global_batch']}, not a "
                                f"multiple of world_size {state['world_size']}")
    fingerprints = state.get("fingerprints")
    if not isinstance(fingerprints, dict) or not all(isinstance(v, str) for v in fingerprints.values()):
        raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json fingerprints is not a mapping of sha256 strings")
    _check_scheduler(ckpt, state.get("scheduler"), step)
    _check_grad_scaler(ckpt, state.get("grad_scaler"))
    return state


def _check_scheduler(ckpt: Path, saved: object, step: int) -> None:
    """A LambdaLR state at this step: only the keys torch's own has (load_state_dict sets each as an
    attribute), each with the type torch's has, no saved lambdas (qshard's are plain closures)."""
    fresh = _fresh_scheduler_state()
    ok = (isinstance(saved, dict) and saved.keys() <= fresh.keys() and {"base_lrs", "last_epoch", "lr_lambdas"}
          <= saved.keys() and all(_like(saved[k], fresh[k]) for k in saved))
    if ok:
        lengths = {len(saved[k]) for k in ("base_lrs", "lr_lambdas", "_last_lr") if k in saved}
        ok = len(lengths) == 1 and lengths != {0} and is_int(saved["last_epoch"]) and saved["last_epoch"] == step
    if not ok:
        raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json scheduler is not the LambdaLR state of step {step}")


@functools.cache
def _fresh_scheduler_state() -> dict:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()


def _check_grad_scaler(ckpt: Path, saved: object) -> None:
    if saved is None or saved == {}:
        return
    if (not isinstance(saved, dict) or saved.keys() != GRAD_SCALER_KEYS
            or not all(_finite(v) and v >= 0 for v in saved.values()) or not saved["scale"] > 0):
        raise CheckpointInvalid(f"{ckpt.name}: trainer_state.json grad_scaler is not a GradScaler state")


def _check_adapter(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Every adapter tensor a LoRA (or DoRA) tensor of the configured rank, finite, with its partner;
    returns the shapes by key."""
    config = _read_json(ckpt, "adapter/adapter_config.json")
    r = config.get("r") if isinstance(config, dict) else None
    if not is_int(r) or r < 1:
        raise CheckpointInvalid(f"{ckpt.name}: adapter/adapter_config.json has r {r!r}, not a positive integer")
    tensors = _read_tensors(ckpt, "adapter/adapter_model.safetensors")
    if not tensors:
        raise CheckpointInvalid(f"{ckpt.name}: adapter/adapter_model.safetensors holds no tensors")
    for key, t in tensors.items():
        problem = _adapter_tensor_problem(key, t, r)
        if problem:
            raise CheckpointInvalid(f"{ckpt.name}: adapter tensor {key} {problem}")
    layers = {key.rsplit(".lora_", 1)[0] for key in tensors}
    for layer in sorted(layers):
        for part in (".lora_A.weight", ".lora_B.weight"):
            if layer + part not in tensors:
                raise CheckpointInvalid(f"{ckpt.name}: the adapter has no {layer + part} (its partner is there)")
    return {key: tuple(t.shape) for key, t in tensors.items()}


def _adapter_tensor_problem(key: str, t: torch.Tensor, r: int) -> str | None:
    if not key.endswith(ADAPTER_SUFFIXES):
        return "is not a LoRA tensor (lora_A, lora_B or lora_magnitude_vector)"
    dims = 1 if key.endswith(".lora_magnitude_vector") else 2
    if t.dim() != dims or t.numel() == 0:
        return f"has shape {tuple(t.shape)}, expected {dims} non-empty dimension(s)"
    if (key.endswith(".lora_A.weight") and t.shape[0] != r) or (key.endswith(".lora_B.weight") and t.shape[1] != r):
        return f"has shape {tuple(t.shape)}, not of the adapter's rank r={r}"
    if not t.is_floating_point():
        return f"has dtype {t.dtype}, not a floating point type"
    if not bool(torch.isfinite(t.float()).all()):
        return "has non-finite values"
    return None


def _check_expected(ckpt: Path, shapes: dict, expected: dict) -> None:
    """The adapter has exactly the tensors the model being trained gives its LoRA layers."""
    missing, extra = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing:
        raise CheckpointInvalid(f"{ckpt.name}: the adapter has no {missing[0]} ({len(missing)} missing), which this "
                                "model's LoRA layers need")
    if extra:
        raise CheckpointInvalid(f"{ckpt.name}: the adapter has {extra[0]} ({len(extra)} extra), which this model's "
                                "LoRA layers do not")
    for key, shape in expected.items():
        if shapes[key] != tuple(shape):
            raise CheckpointInvalid(f"{ckpt.name}: adapter tensor {key} has shape {shapes[key]}, this model needs "
                                    f"{tuple(shape)}")


def _check_optimizer(ckpt: Path, shapes: dict) -> None:
    """A full optimizer state keyed by parameter name: one entry per adapter tensor, its moments of that
    tensor's shape and finite, and param groups naming exactly those parameters."""
    saved = _read_state(ckpt, "optimizer")
    per_param = saved.get("state") if isinstance(saved, dict) else None
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(per_param, dict) or not isinstance(groups, list) or not groups:
        raise CheckpointInvalid(f"{ckpt.name}: optimizer.json is not an optimizer state (state, param_groups)")
    keys = {name: _file_key(name) for name in per_param if isinstance(name, str)}
    for name, entry in per_param.items():
        if keys.get(name) not in shapes:
            raise CheckpointInvalid(f"{ckpt.name}: optimizer state for {name!r}, which is not an adapter tensor")
        problem = _moments_problem(entry, shapes[keys[name]])
        if problem:
            raise CheckpointInvalid(f"{ckpt.name}: optimizer state for {name}: {problem}")
    missing = sorted(shapes.keys() - set(keys.values()))
    if missing:
        raise CheckpointInvalid(f"{ckpt.name}: optimizer has no state for {missing[0]} ({len(missing)} missing)")
    in_groups = [p for g in groups for p in (g.get("params") if isinstance(g, dict) else None) or [None]]
    if sorted(in_groups, key=str) != sorted(per_param, key=str) or not all(_group_ok(g) for g in groups):
        raise CheckpointInvalid(f"{ckpt.name}: optimizer.json param_groups do not name each parameter once with "
                                "valid hyperparameters")


def _moments_problem(entry: object, shape: tuple) -> str | None:
    """What is wrong with one parameter's optimizer state: its moments must have the parameter's shape."""
    if not isinstance(entry, dict) or not any(m in entry for m in MOMENTS):
        return "no moments (exp_avg, exp_avg_sq)"
    step = entry.get("step")
    if isinstance(step, torch.Tensor):
        step = float(step) if step.numel() == 1 else None
    if not _finite(step) or step < 0:
        return f"step is {entry.get('step')!r}"
    for moment in (m for m in MOMENTS if m in entry):
        if not isinstance(entry[moment], torch.Tensor) or tuple(entry[moment].shape) != shape:
            return f"{moment} has shape {tuple(getattr(entry[moment], 'shape', ()))}, the adapter tensor has {shape}"
    for name, t in entry.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            return f"{name} has non-finite values"
    return None


def _group_ok(group: dict) -> bool:
    """Hyperparameters the optimizer will use as they are: flags, names, finite non-negative numbers."""
    for key, value in group.items():
        if key == "params":
            ok = isinstance(value, list) and all(isinstance(p, str) for p in value)
        elif key == "betas":
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(b) and 0 <= b < 1 for b in value)
        else:
            ok = value is None or isinstance(value, (bool, str)) or (_finite(value) and value >= 0)
        if not ok:
            return False
    return True


def _file_key(param_name: str) -> str:
    """PEFT's file key of a trainable parameter: the adapter name (`default`) dropped, DoRA's magnitude
    without `.weight` (model/lora.py::adapter_params_by_file_key asks PEFT; this is the same rule)."""
    key = re.sub(r"\.(lora_A|lora_B|lora_magnitude_vector)\.default\.weight$", r".\1.weight", param_name)
    return key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key


def _check_rng(ckpt: Path, rank: int) -> None:
    stem = f"rng-rank{rank}"
    if not (ckpt / f"{stem}.json").is_file() or not (ckpt / f"{stem}.safetensors").is_file():
        raise CheckpointInvalid(f"{ckpt.name}: {stem}.json/.safetensors are missing (the run had rank {rank})")
    state = _read_state(ckpt, stem)
    ok = (isinstance(state, dict) and state.keys() <= {"python", "numpy", "torch", "cuda"}
          and _python_rng_ok(state.get("python")) and _numpy_rng_ok(state.get("numpy"))
          and _bytes(state.get("torch"), torch.get_rng_state().numel())
          and isinstance(state.get("cuda", []), list) and all(_bytes(t) for t in state.get("cuda", [])))
    if not ok:
        raise CheckpointInvalid(f"{ckpt.name}: {stem}.json/.safetensors do not hold an RNG state")


def _python_rng_ok(value: object) -> bool:
    """random.setstate's version-3 state: 624 words and an index in [0, 624], then the cached gauss."""
    if not (isinstance(value, list) and len(value) == 3 and value[0] == 3 and isinstance(value[1], list)):
        return False
    words = value[1]
    return (len(words) == 625 and all(is_int(w) and 0 <= w < 2**32 for w in words) and words[-1] <= 624
            and (value[2] is None or _finite(value[2])))


def _numpy_rng_ok(value: object) -> bool:
    if not (isinstance(value, list) and len(value) == 5):
        return False
    name, keys, pos, has_gauss, gauss = value
    return (name == "MT19937" and isinstance(keys, torch.Tensor) and tuple(keys.shape) == (624,)
            and not keys.is_floating_point() and is_int(pos) and 0 <= pos <= 624 and has_gauss in (0, 1)
            and is_int(has_gauss) and _finite(gauss))


def _bytes(value: object, size: int | None = None) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and (size is None or value.numel() == size))


def _check_recipe(ckpt: Path) -> None:
    from qshard.config import load_recipe
    from qshard.errors import QShardError

    try:
        load_recipe(ckpt / "recipe.yaml")
    except QShardError as e:
        raise CheckpointInvalid(f"{ckpt.name}: recipe.yaml is not a valid recipe ({e.what})") from None


def _read_json(ckpt: Path, name: str) -> object:
    try:
        return json.loads((ckpt / name).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointInvalid(f"{ckpt.name}: {name} is not valid JSON ({e})") from None


def _read_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(ckpt / name))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointInvalid(f"{ckpt.name}: {name} is not a readable safetensors file ({e})") from None


def _read_state(ckpt: Path, stem: str) -> object:
    """load_state, with any way its two files can be unreadable or disagree reported as CheckpointInvalid."""
    from safetensors import SafetensorError

    try:
        return load_state(ckpt, stem)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointInvalid(f"{ckpt.name}: {stem}.json/.safetensors are not a readable state ({e!r})") from None


def _like(value: object, model: object) -> bool:
    """`value` has the JSON type of `model` (numbers finite; a list's items like the model's first)."""
    if model is None or isinstance(model, bool):
        return type(value) is type(model)
    if isinstance(model, (int, float)):
        return _finite(value)
    if isinstance(model, list):
        return isinstance(value, list) and (not model or all(_like(v, model[0]) for v in value))
    return isinstance(value, type(model))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
