"""Every check a run needs, in one place, before any process group, folder change or weight read.

`check_run` returns the problems of a recipe on this machine, all of them, together with what the
checks built on the way (the skeleton, the tokenizer, the tokenized data) so that `train` does not
build them twice. `qshard train` raises on the problems; `qshard doctor` prints them; `qshard plan`
uses the same engine identity (`compat.engine_key`, with a user's DeepSpeed JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qshard import _compat, compat, data
from qshard.config import Recipe
from qshard.errors import QShardError
from qshard.precision import Precision, resolve_precision


@dataclass(frozen=True)
class Launch:
    """Who this process is, from the launcher's environment (torchrun / deepspeed / none), read before
    any process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    restart: int = 0          # torchrun's restart count: > 0 when this job was restarted after a failure
    job: str | None = None    # this torchrun invocation (qshard.state.rundir.torchrun_job)


def launch_from_env() -> Launch:
    from qshard.state import rundir

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return Launch(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local, device,
                  int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), rundir.torchrun_job())


@dataclass
class Datasets:
    train: list[data.Example]
    eval: list[data.Example]
    reports: list[data.DataReport]


@dataclass
class Checked:
    """What the checks found and built; a field is None where its check failed."""

    engine: str | None = None            # the compatibility table's engine key (zero3, fsdp2, ...)
    base: str | None = None              # the table's base key (nf4, gptq, ...)
    precision: Precision | None = None
    model_dir: Path | None = None
    skeleton: object = None              # the base on the meta device, quantized shells in place
    targets: list[str] | None = None     # LoRA target module names
    tokenizer: object = None
    datasets: Datasets | None = None
    total_steps: int | None = None
    resume_from: Path | None = None      # the checkpoint to continue from
    start_fresh: bool = False            # the run folder is (re)started: emptied of the earlier run, marked
    problems: list[QShardError] = field(default_factory=list)

    @contextlib.contextmanager
    def check(self):
        """Collect a QShardError instead of stopping: every problem is reported at once."""
        try:
            yield
        except QShardError as e:
            self.problems.append(e)


def check_run(recipe: Recipe, launch: Launch, *, overwrite: bool = False, resume: str | None = None,
              recipe_file: str | None = None, say=print) -> Checked:
    """Every problem of this recipe on this machine, and the inputs the checks built (`recipe_file`:
    where the recipe was read from, which the run folder must not hold either)."""
    c = Checked()
    with c.check():
        c.engine = engine_identity(recipe)
    with c.check():
        c.base = compat.base_key(recipe.quantization.method, checkpoint_format(recipe))
    with c.check():
        c.precision = resolve_precision(recipe.train.precision, launch.device)
    with c.check():
        if launch.world_size > 1 and recipe.distributed.engine == "none":
            raise QShardError(f"{launch.world_size} processes were launched but distributed.engine is none, so "
                              "each would train alone", where="distributed.engine", fix="choose ddp, deepspeed or fsdp2")
    if c.engine and c.base:
        with c.check():
            compat.check(c.engine, c.base)
    if c.engine and c.precision:
        with c.check():
            d = recipe.distributed
            asks_cpu_fp16 = c.engine.startswith("zero") and c.precision.name == "fp16" and launch.device.type == "cpu"
            compat.check_options(c.engine, use_dora=recipe.lora.use_dora, device=launch.device.type,
                                 on_nonfinite=recipe.train.on_nonfinite, precision=c.precision.name,
                                 fsdp_cpu_offload=d.fsdp_cpu_offload,
                                 cpu_fp16=_compat.deepspeed_cpu_fp16() if asks_cpu_fp16 else True)
    with c.check():
        from qshard.state import rundir

        inputs = protected_inputs(recipe)
        if recipe_file:
            inputs["the recipe"] = Path(recipe_file)
        rundir.check_location(Path(recipe.train.output_dir), inputs)
    rows = None
    with c.check():
        rows = read_rows(recipe)
    _check_model(c, recipe)
    if rows is not None and c.tokenizer is not None:
        with c.check():
            c.datasets = build_datasets(recipe, rows, c.tokenizer)
            c.total_steps = schedule(len(c.datasets.train), recipe, launch.world_size)[2]
    if not any(e.where == "train.output_dir" for e in c.problems):
        with c.check():
            _check_run_folder(c, recipe, launch, overwrite, resume, say)
    if c.skeleton is not None and c.targets is not None and launch.rank == 0:
        with c.check():
            check_disk(Path(recipe.train.output_dir), c.skeleton, c.targets, recipe)
    return c


def raise_problems(problems: list[QShardError]) -> None:
    """One problem as it is; several as one error that lists each with its place and fix."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = "\n".join(f"- {e.what}" + (f"\n    where: {e.where}" if e.where else "")
                           + (f"\n    fix:   {e.fix}" if e.fix else "") for e in problems)
        raise QShardError(f"{len(problems)} problems, nothing was started:\n{listed}",
                          where=problems[0].where, fix="fix each problem listed above")


# -- the checks -------------------------------------------------------------------------------------

def engine_identity(recipe: Recipe) -> str:
    """The compatibility table's name for what will run, with a user's DeepSpeed JSON deciding the ZeRO
    stage and offloads (derived here once; everything else reads it from here)."""
    from qshard.dsconfig import read_user_config

    d = recipe.distributed
    ds_config = read_user_config(d.deepspeed_config) if d.engine == "deepspeed" and d.deepspeed_config else None
    return compat.engine_key(d.engine, d.zero_stage, d.offload_params, d.offload_optimizer, ds_config)


def checkpoint_format(recipe: Recipe) -> str | None:
    """gptq / awq / compressed-tensors / nf4 / fp4 (bitsandbytes) when the recipe keeps a PTQ checkpoint's own
    layers (config.json only)."""
    if recipe.quantization.method != "checkpoint":
        return None
    from qshard.model.load import resolve_model_dir
    from qshard.quant import ptq

    fmt = ptq.detect(resolve_model_dir(recipe.model.path))
    if fmt is None:
        raise QShardError(f"{recipe.model.path} is not a GPTQ/AWQ/compressed-tensors checkpoint "
                          "(nor a bitsandbytes 4-bit one)",
                          where="quantization.method", fix="use nf4 (or fp4 / int8 / none) for a dense checkpoint")
    return fmt.name


def protected_inputs(recipe: Recipe) -> dict[str, Path]:
    """The run's inputs, which the run folder must never be or contain."""
    paths = {"model.path": recipe.model.path, "data.path": recipe.data.path, "data.eval_path": recipe.data.eval_path,
             "distributed.deepspeed_config": recipe.distributed.deepspeed_config}
    return {option: Path(p) for option, p in paths.items() if p and Path(p).exists()}


def _check_model(c: Checked, recipe: Recipe) -> None:
    from qshard.model.load import load_tokenizer, open_base
    from qshard.model.lora import check_expert_options, resolve_targets

    with c.check():
        dtype = recipe.model.dtype
        c.model_dir, c.skeleton = open_base(recipe.model.path, dtype=dtype,
                                            quant=quant_spec(recipe, c.precision or Precision("fp32", torch.device("cpu"))))
        c.targets = resolve_targets(c.skeleton, recipe.lora.target_modules)
        check_expert_options(c.skeleton, c.targets, recipe.lora.dropout, recipe.lora.use_dora)
    if c.model_dir is not None:
        with c.check():
            c.tokenizer = load_tokenizer(c.model_dir)


def _check_run_folder(c: Checked, recipe: Recipe, launch: Launch, overwrite: bool, resume: str | None, say) -> None:
    """Start afresh, replace an earlier run (--overwrite), or continue one (--resume): decided here,
    carried out by train.run after every check has passed."""
    from qshard.state import checkpoint, rundir

    out_dir = Path(recipe.train.output_dir)
    if launch.restart:
        # torchrun restarted this job after a failure: continue the run its first attempt started, and
        # only that one (an attempt that refused the folder made no run there to continue)
        if launch.job is None or rundir.job_of(out_dir) != launch.job:
            raise QShardError(f"torchrun restarted this job (attempt {launch.restart}), but {out_dir} is not the "
                              "run its first attempt started; nothing was changed", where="train.output_dir",
                              fix="see the first attempt's error above")
        resume, overwrite = "auto", True  # the folder is this job's own: starting it afresh loses nothing
    elif resume and overwrite:
        raise QShardError("--resume continues a run and --overwrite replaces it: pass one of them",
                          where="--resume / --overwrite")
    from qshard.state.resume import check_resume_compatible

    newest = None
    if resume == "auto":  # a changed recipe is named as such, not as checkpoints of the wrong shape
        newest = checkpoint.find_resume(out_dir, warn=lambda *_: None)
        if newest is not None:
            check_resume_compatible(newest, recipe, launch.world_size, say)
    expected = None  # the adapter shapes this model needs: a checkpoint of another shape is not resumable
    if c.skeleton is not None and c.targets is not None:
        from qshard.state.resume import expected_adapter_shapes

        expected = expected_adapter_shapes(c.skeleton, c.targets, recipe.lora.r, recipe.lora.use_dora)
    skipped: list[str] = []
    c.resume_from = (checkpoint.resolve_resume(resume, out_dir, warn=skipped.append, expected=expected)
                     if resume else None)
    for line in skipped:
        say(line)
    if c.resume_from is None:
        if resume == "auto" and not launch.restart and out_dir.exists() and any(out_dir.iterdir()):
            why = "; ".join(skipped) or "it holds no checkpoint-<step> folder"
            raise QShardError(f"--resume auto found no valid checkpoint in {out_dir} ({why}); nothing was changed",
                              where="--resume auto", fix="start a new run with another train.output_dir, or "
                                                         "replace this one with --overwrite (without --resume)")
        rundir.check_fresh_start(out_dir, overwrite)
        c.start_fresh = True
        if resume == "auto" and not launch.restart:
            say(f"--resume auto: {out_dir} holds no run yet; starting one")
        return
    rundir.check_resumable(out_dir)
    if c.resume_from != newest:  # the newest was compared above
        check_resume_compatible(c.resume_from, recipe, launch.world_size, say)
    step = json.loads((c.resume_from / "trainer_state.json").read_text())["step"]
    if c.total_steps is not None and step >= c.total_steps:
        raise QShardError(f"{c.resume_from.name} is at step {step}, and this recipe trains {c.total_steps} steps: "
                          "there is nothing left to train", where="--resume",
                          fix="raise train.max_steps (or train.epochs) to continue training, or start a new run "
                              "in another train.output_dir")


def checkpoint_disk_bytes(skeleton, targets: list[str], recipe: Recipe) -> int:
    """What the run's output folder needs at its fullest (qshard.tools.plan.checkpoint_disk_bytes)."""
    from qshard.model.lora import adapted_shapes
    from qshard.tools import plan

    lora_params = plan.lora_param_count(adapted_shapes(skeleton, targets), recipe.lora.r, recipe.lora.use_dora)
    return plan.checkpoint_disk_bytes(lora_params, recipe.train.keep_checkpoints)


def check_disk(out_dir: Path, skeleton, targets: list[str], recipe: Recipe) -> None:
    """Refuse a folder we cannot write to, or without room for the checkpoints the run keeps."""
    import shutil

    need = checkpoint_disk_bytes(skeleton, targets, recipe)
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise QShardError(f"cannot write to {existing}", where="train.output_dir",
                          fix="choose a folder you can write to")
    free = shutil.disk_usage(existing).free
    if free < need:
        raise QShardError(f"{existing} has {free / 2**20:.0f} MB free; the checkpoints need about "
                          f"{need / 2**20:.0f} MB", where="train.output_dir",
                          fix="free space, choose another disk, or lower train.keep_checkpoints")


# -- what the checks build --------------------------------------------------------------------------

def quant_spec(recipe: Recipe, precision: Precision):
    from qshard.model.load import DTYPES, QuantSpec

    q = recipe.quantization
    compute = precision.dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    return QuantSpec(method=q.method, double_quant=q.double_quant, compute_dtype=compute,
                     int8_threshold=q.int8_threshold, skip_modules=tuple(q.skip_modules))


def read_rows(recipe: Recipe) -> dict[str, tuple[list[dict], str]]:
    """Parse the data files (cheap, and where most user mistakes are) before the model is touched."""
    d = recipe.data
    rows = {d.path: data.load_rows(d.path, d.format, d.text_field)}
    if d.eval_path:
        rows[d.eval_path] = data.load_rows(d.eval_path, d.format, d.text_field)
    return rows


def build_datasets(recipe: Recipe, rows: dict[str, tuple[list[dict], str]], tokenizer) -> Datasets:
    d = recipe.data
    train_rows, fmt = rows[d.path]
    train, report = data.tokenize_rows(train_rows, fmt, tokenizer, d.max_length, d.template, source=d.path)
    reports = [report]
    if d.eval_path:
        eval_rows, eval_fmt = rows[d.eval_path]
        evals, eval_report = data.tokenize_rows(eval_rows, eval_fmt, tokenizer, d.max_length, d.template,
                                                source=d.eval_path)
        reports.append(eval_report)
    else:
        train, evals = data.split_eval(train, d.eval_fraction, recipe.train.seed)
    if d.packing:
        train = data.pack(train, d.max_length)
        report.packed_sequences = len(train)
    return Datasets(train, evals, reports)


def schedule(n_train: int, recipe: Recipe, world_size: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, total steps) of this recipe on `world_size` processes."""
    tr = recipe.train
    global_batch = tr.micro_batch_size * tr.gradient_accumulation_steps * world_size
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise QShardError(f"{n_train} training examples cannot fill one global batch of {global_batch}",
                          where="train.micro_batch_size / train.gradient_accumulation_steps",
                          fix="lower the batch size or add data")
    return global_batch, steps_per_epoch, tr.max_steps or tr.epochs * steps_per_epoch
