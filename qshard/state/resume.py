"""Saving a training run's checkpoint and resuming from one.

`save_checkpoint` writes `checkpoint-<step>` through checkpoint.py (atomic: staging folder, manifest,
rename) and proves it: before writing, the adapter every rank gathered has the configured rank, is
finite and has the same sha256 on every rank; after the rename, the adapter read back from disk has
that sha256 too. It holds the adapter, the optimizer, the scheduler and grad-scaler state, the data
position, every rank's RNG state, the recipe, and the sha256 of the model's config.json and the data
files. `check_resume_compatible` refuses a resume that would continue a different run (recipe, global
batch or fingerprints changed; RESUMABLE_CHANGES may differ) or has no step left to run; `restore` puts
everything back. `expected_adapter_shapes` is what checkpoint.verify holds a checkpoint's adapter to.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from qshard.config import Recipe, dump_recipe
from qshard.errors import QShardError
from qshard.model.lora import save_adapter
from qshard.observe import faults
from qshard.runtime import Runtime, barrier
from qshard.state import checkpoint


def save_checkpoint(out_dir: Path, step: int, epoch: int, offset: int, global_batch: int, engine, scheduler,
                    recipe: Recipe, rt: Runtime, protect: Path | None) -> Path:
    """Write checkpoint-<step> atomically (see checkpoint.py), then prove it holds what the ranks hold."""
    adapter = engine.adapter_state_dict()
    verify_adapter(adapter, recipe.lora.r, step, rt)
    optimizer_state = engine.optimizer_state_dict()
    stage = out_dir / f".staging-{checkpoint.PREFIX}{step}"
    try:
        if rt.is_main:
            checkpoint.staging_dir(out_dir, step)
            faults.point("save:start", step, rt.rank)
        barrier(rt)
        checkpoint.save_state(stage, f"rng-rank{rt.rank}", rng_state())
        if rt.is_main:
            save_adapter(stage / "adapter", adapter, engine.peft_model)
            checkpoint.save_state(stage, "optimizer", optimizer_state)
            _fault_mid_file(stage / "optimizer.safetensors", step, rt.rank)
            checkpoint.write_json(stage / "trainer_state.json", {
                "step": step, "epoch": epoch, "offset_in_epoch": offset, "seed": recipe.train.seed,
                "world_size": rt.world_size, "global_batch": global_batch, "scheduler": scheduler.state_dict(),
                "grad_scaler": engine.scaler.state_dict() if getattr(engine, "scaler", None) else None,
                "fingerprints": fingerprints(recipe)})
            (stage / "recipe.yaml").write_text(dump_recipe(recipe))
        barrier(rt)
        if rt.is_main:
            final = checkpoint.commit(stage, out_dir, step, fault=lambda name: faults.point(name, step, rt.rank))
            on_disk = load_file_adapter(final)
            if adapter_digest(on_disk) != adapter_digest(adapter):
                raise QShardError(f"{final.name}: the adapter read back from disk differs from the one in memory",
                                  where=str(final), fix="check the disk (full, failing, or a network mount)")
            checkpoint.prune(out_dir, recipe.train.keep_checkpoints, protect=protect)
    except OSError as e:
        previous = checkpoint.find_resume(out_dir, warn=lambda *_: None)
        raise QShardError(f"saving checkpoint-{step} failed: {e}", where=str(out_dir),
                          fix=f"the previous checkpoint ({previous.name if previous else 'none'}) is intact; free "
                              "space or fix permissions, then rerun with --resume auto") from None
    barrier(rt)
    return out_dir / f"{checkpoint.PREFIX}{step}"


def expected_adapter_shapes(skeleton: torch.nn.Module, targets: list[str], r: int,
                            use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The adapter tensors a save writes for this model, by file key: lora_A (r, in) and lora_B (out, r)
    of every linear layer PEFT adapts (a target is a full module name or its dotted suffix, as in
    PEFT), and DoRA's magnitude (out,). From the skeleton alone: quantized shells carry in/out_features."""
    from qshard.model.load import QUANT_LAYERS

    shapes = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, (torch.nn.Linear, *QUANT_LAYERS)) and any(name == t or name.endswith(f".{t}")
                                                                        for t in targets):
            key = f"base_model.model.{name}"  # PeftModel -> LoraModel -> the model
            shapes[f"{key}.lora_A.weight"] = (r, module.in_features)
            shapes[f"{key}.lora_B.weight"] = (module.out_features, r)
            if use_dora:
                shapes[f"{key}.lora_magnitude_vector"] = (module.out_features,)
    from qshard.model.experts import adapter_shapes

    return shapes | adapter_shapes(skeleton, targets, r)


def verify_adapter(adapter: dict[str, torch.Tensor], r: int, step: int, rt: Runtime) -> None:
    """Every LoRA tensor present with the configured rank, finite, and the same on every rank."""
    # rank r, or r per expert for a fused expert weight (PEFT's ParamWrapper: lora_A [r*E, in], lora_B [out, r*E])
    problems = [f"{k}: shape {tuple(v.shape)}" for k, v in adapter.items()
                if (".lora_A." in k and v.shape[0] % r) or (".lora_B." in k and v.shape[-1] % r) or v.numel() == 0]
    problems += [f"{k}: non-finite values" for k, v in adapter.items() if not bool(torch.isfinite(v).all())]
    if not adapter or problems:
        raise QShardError(f"the adapter gathered at step {step} is unusable: {'; '.join(problems[:3]) or 'empty'}",
                          where=f"rank {rt.rank}", fix="this is a bug in the engine's gather; please report it")
    digests = [adapter_digest(adapter)]
    if rt.distributed:
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, adapter_digest(adapter))
    if len(set(digests)) > 1:
        raise QShardError(f"ranks hold different adapters at step {step}: " +
                          ", ".join(f"rank {i} {d[:12]}" for i, d in enumerate(digests)), where="checkpoint verify",
                          fix="a rank diverged (non-deterministic op or a bad gather); the previous checkpoint is intact")


def adapter_digest(adapter: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(adapter):
        h.update(key.encode())
        h.update(adapter[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_file_adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from qshard.model.lora import ADAPTER_WEIGHTS

    return load_file(str(ckpt / "adapter" / ADAPTER_WEIGHTS))


def _fault_mid_file(path: Path, step: int, rank: int) -> None:
    """Fault injection only: leave `path` half-written, as a process killed inside write() would."""
    if faults.armed("save:mid_file", step, rank):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        faults.point("save:mid_file", step, rank)


# Recipe keys a resume may change (logged); any other difference makes the checkpoint meaningless.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
                     "train.keep_checkpoints", "train.sample_prompt", "train.sample_tokens", "train.output_dir",
                     "train.grad_flow_every",
                     "train.micro_batch_size", "train.gradient_accumulation_steps", "model.gradient_checkpointing",
                     "distributed.")


def check_resume_compatible(ckpt: Path, recipe: Recipe, world_size: int, say) -> None:
    """Refuse a resume that would continue a different run; log the harmless differences."""
    import json

    from qshard.config import load_recipe

    saved = load_recipe(ckpt / "recipe.yaml")
    before, now = _flatten(saved.model_dump(mode="json")), _flatten(recipe.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    fatal = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    if fatal:
        raise QShardError(f"cannot resume from {ckpt}: the recipe changed in {', '.join(fatal)}",
                          where="--resume", fix="restore those values, or start a new run in another output_dir")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    max_steps = recipe.train.max_steps
    if max_steps is not None and state["step"] >= max_steps:
        raise QShardError(f"cannot resume from {ckpt}: it is at step {state['step']} and train.max_steps is "
                          f"{max_steps}, so no step is left to run", where="train.max_steps",
                          fix=f"raise train.max_steps above {state['step']} to train further, or start a new run "
                              "in another train.output_dir")
    batch = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps * world_size
    if batch != state["global_batch"]:
        raise QShardError(f"cannot resume from {ckpt}: the global batch would be {batch} sequences, the run "
                          f"used {state['global_batch']} (micro_batch x accumulation x processes)",
                          where="train.micro_batch_size / train.gradient_accumulation_steps",
                          fix=f"with {world_size} process(es), keep micro_batch_size x gradient_accumulation_steps = "
                              f"{state['global_batch'] // world_size}" if state["global_batch"] % world_size == 0
                              else "use a process count that divides the global batch")
    for name, digest in fingerprints(recipe).items():
        if state["fingerprints"].get(name) != digest:
            raise QShardError(f"cannot resume from {ckpt}: {name} changed since the checkpoint was written",
                              where=name, fix="resume with the same model and data files")
    if changed:
        say(f"resuming with changed settings: {', '.join(changed)}")


def fingerprints(recipe: Recipe) -> dict[str, str]:
    """sha256 of the base model's config.json and of each data file."""
    import hashlib

    from qshard.model.load import resolve_model_dir

    files = {"model config.json": resolve_model_dir(recipe.model.path) / "config.json",
             f"data file {recipe.data.path}": Path(recipe.data.path)}
    if recipe.data.eval_path:
        files[f"data file {recipe.data.eval_path}"] = Path(recipe.data.eval_path)
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def restore(ckpt: Path, engine, scheduler, rt: Runtime, say=print) -> int:
    """Adapter, optimizer, scheduler and this rank's RNG from a verified checkpoint; returns the step.

    checkpoint.verify has checked every file; what it cannot know (the engine's own view of the state)
    fails here as a QShardError naming the part, never as a traceback."""
    import json

    state = json.loads((ckpt / "trainer_state.json").read_text())
    with _loading(ckpt, "the adapter"):
        engine.load_adapter(load_file_adapter(ckpt))
    with _loading(ckpt, "the optimizer state"):
        engine.load_optimizer_state_dict(checkpoint.load_state(ckpt, "optimizer"))
    with _loading(ckpt, "the scheduler state"):
        scheduler.load_state_dict(state["scheduler"])
        if len(scheduler.base_lrs) != len(scheduler.optimizer.param_groups):
            raise ValueError(f"{len(scheduler.base_lrs)} learning rate(s) for "
                             f"{len(scheduler.optimizer.param_groups)} parameter group(s)")
        # the optimizer state carried the learning rate of the old schedule; set the one the (possibly
        # longer or shorter) current schedule gives for the next step
        for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
    if state.get("grad_scaler") and getattr(engine, "scaler", None):
        with _loading(ckpt, "the grad-scaler state"):
            engine.scaler.load_state_dict(state["grad_scaler"])
    if state["world_size"] != rt.world_size:
        say(f"resuming {state['world_size']} process(es) as {rt.world_size}: adapter, optimizer, schedule and data "
            f"position are kept; per-rank RNG streams cannot be (dropout masks will differ from an unbroken run)")
    rng_file = ckpt / f"rng-rank{rt.rank}.json"
    if rng_file.exists() and state["world_size"] == rt.world_size:
        with _loading(ckpt, f"rng-rank{rt.rank}"):
            set_rng_state(checkpoint.load_state(ckpt, f"rng-rank{rt.rank}"))
    else:
        set_seed((int(state["seed"]) + 7919 * (state["step"] + 1) + rt.rank) % 2**32)  # numpy takes 32 bits
    return int(state["step"])


@contextlib.contextmanager
def _loading(ckpt: Path, part: str):
    """Turn an engine's refusal of one part of a checkpoint into a QShardError naming that part."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise QShardError(f"cannot resume from {ckpt}: {part} does not fit this run ({type(e).__name__}: {e})",
                          where=str(ckpt), fix="resume from another checkpoint (--resume PATH) or start a new run "
                                               "in another train.output_dir") from None


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
