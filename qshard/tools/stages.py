"""`qshard stages PIPELINE.yaml`: a staged workflow (train -> export -> quantize -> train on it -> ...) as one file.

    output_dir: runs/staged              # stage NAME writes <output_dir>/NAME
    stages:
      - name: bf16                       # LoRA on the bf16 base under ZeRO-3
        train: recipe.yaml               # an ordinary qshard recipe
        set: {quantization.method: none, distributed.engine: deepspeed, distributed.zero_stage: 3}
        nproc: 2
      - name: merged                     # its adapter merged into the base: a model folder
        export: bf16
        dtype: bf16
      - name: qlora                      # QLoRA on the merged model under FSDP2
        train: recipe.yaml
        set: {model.path: "{merged}", quantization.method: nf4, distributed.engine: fsdp2}
        nproc: 2
      - name: final
        export: qlora

A stage `{name: gptq, quantize: merged, calibration: data.jsonl, group_size: 128}` runs `qshard quantize` on
an earlier dense export (GPTQ with llm-compressor, `make quantizers`); train on its folder with
`quantization.method: checkpoint`.

Each stage is the qshard command one would type (printed before it runs), run as a child process from the
current folder, so relative paths mean what they mean to `qshard train`. "{NAME}" in a `set` value is the
folder of stage NAME. Everything is checked before the first stage starts: names, references, and every
training stage's recipe with its overrides.

After a crash, the same command continues: `<output_dir>/.qshard-stages.json` records each stage that exited 0
and the command it ran; recorded stages are skipped, the first unrecorded one continues (a training run that
saved a checkpoint: --resume auto; one that did not, or an export: --overwrite, which replaces only a folder
qshard made) and the rest follow. A recorded stage whose definition changed is refused, not re-run: its output
may have fed later stages. Nothing is ever deleted by this module.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, StringConstraints

from qshard.config import PathText, Section, load_recipe, parse_section, read_yaml
from qshard.errors import QShardError

STATE = ".qshard-stages.json"
StageName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class TrainStage(Section):
    name: StageName = Field(description="The stage's name; its run folder is <output_dir>/<name>.")
    train: PathText = Field(description="The recipe this stage trains with (`qshard train RECIPE`).")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides, as `--set key=value`; "
                                                                   "\"{NAME}\" is stage NAME's folder.")
    nproc: int = Field(1, ge=1, description="Processes on this machine (`--nproc`).")


class ExportStage(Section):
    name: StageName = Field(description="The stage's name; its model folder is <output_dir>/<name>.")
    export: StageName = Field(description="The earlier training stage whose run is exported.")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    format: Literal["dense", "nf4", "checkpoint"] = "dense"
    merge_into: PathText | None = None


class QuantizeStage(Section):
    name: StageName = Field(description="The stage's name; its model folder is <output_dir>/<name>.")
    quantize: StageName = Field(description="The earlier export stage (dense) whose model is quantized.")
    calibration: PathText = Field(description="Calibration rows, in any format qshard trains on.")
    method: Literal["gptq", "awq"] = "gptq"
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, ge=1)
    samples: int = Field(128, ge=1)
    max_length: int = Field(512, ge=1)


class Pipeline(Section):
    output_dir: PathText = Field(description="The folder that holds every stage's output.")
    stages: list[dict[str, Any]] = Field(min_length=1)


@dataclass
class Stage:
    """One stage, resolved: its definition, its folder and the command that runs it (without the flags that
    continue an interrupted stage)."""

    spec: TrainStage | ExportStage
    folder: Path
    argv: list[str]  # after `qshard`

    @property
    def name(self) -> str:
        return self.spec.name


# -- reading and checking ---------------------------------------------------------------------------

def load_pipeline(path: str | Path) -> tuple[Path, list[Stage]]:
    """The output folder and the stages, every check done; nothing is written."""
    path = Path(path).expanduser()
    source = str(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), source)
    except (OSError, UnicodeDecodeError) as e:
        raise QShardError(f"cannot read the pipeline: {e}", where=source, fix="give a readable YAML file") from None
    if not isinstance(raw, dict):
        raise QShardError("a pipeline is a mapping with output_dir and stages", where=source,
                          fix="see `qshard stages --help` for an example")
    pipeline = parse_section(Pipeline, raw, source)
    out = Path(pipeline.output_dir)
    stages: list[Stage] = []
    for i, item in enumerate(pipeline.stages):
        where = f"{source}: stages[{i}]"
        spec = _stage_spec(item, where)
        if spec.name in {s.name for s in stages}:
            raise QShardError(f"two stages are named {spec.name!r}", where=f"{where}.name",
                              fix="give every stage its own name: it is also its folder")
        folders = {s.name: s.folder for s in stages}
        stages.append(Stage(spec, out / spec.name, _argv(spec, out / spec.name, folders, stages, where)))
    return out, stages


KINDS = {"train": TrainStage, "export": ExportStage, "quantize": QuantizeStage}


def _stage_spec(item: Any, where: str) -> TrainStage | ExportStage | QuantizeStage:
    kinds = [key for key in KINDS if isinstance(item, dict) and key in item]
    if len(kinds) != 1:
        raise QShardError("a stage has one of `train: RECIPE`, `export: STAGE` or `quantize: STAGE`", where=where,
                          fix="e.g. {name: bf16, train: recipe.yaml}, {name: merged, export: bf16} or "
                              "{name: gptq, quantize: merged, calibration: data.jsonl}")
    return parse_section(KINDS[kinds[0]], item, where)


def _argv(spec, folder: Path, folders: dict[str, Path], earlier: list[Stage], where: str) -> list[str]:
    if isinstance(spec, QuantizeStage):
        source = next((s for s in earlier if s.name == spec.quantize), None)
        if source is None or not isinstance(source.spec, ExportStage) or source.spec.format != "dense":
            raise QShardError(f"stage {spec.name!r} quantizes {spec.quantize!r}, which is not an earlier dense export",
                              where=f"{where}.quantize", fix="name an `export:` stage (format dense) listed above")
        if not Path(spec.calibration).is_file():
            raise QShardError(f"stage {spec.name!r}: calibration file {spec.calibration!r} not found",
                              where=f"{where}.calibration", fix="give a data file qshard can train on")
        return ["quantize", str(source.folder), str(folder), f"--calibration={spec.calibration}",
                f"--method={spec.method}", f"--bits={spec.bits}", f"--group-size={spec.group_size}",
                f"--samples={spec.samples}", f"--max-length={spec.max_length}"]
    if isinstance(spec, ExportStage):
        source = next((s for s in earlier if s.name == spec.export), None)
        if source is None or not isinstance(source.spec, TrainStage):
            raise QShardError(f"stage {spec.name!r} exports {spec.export!r}, which is not an earlier training stage",
                              where=f"{where}.export", fix="name a `train:` stage listed above this one")
        argv = ["export", str(source.folder), str(folder), f"--dtype={spec.dtype}", f"--format={spec.format}"]
        return argv + ([f"--merge-into={spec.merge_into}"] if spec.merge_into else [])
    if "train.output_dir" in spec.set:
        raise QShardError(f"stage {spec.name!r} sets train.output_dir", where=f"{where}.set",
                          fix=f"leave it out: the stage's run folder is {folder}")
    overrides = [f"{key}={_yaml_value(_fill(value, folders, f'{where}.set.{key}'))}"
                 for key, value in spec.set.items()] + [f"train.output_dir={folder}"]
    recipe = load_recipe(spec.train, overrides)  # the recipe and its overrides, checked now
    check_inputs(recipe, spec.name, set(map(str, folders.values())), where)
    argv = ["train", spec.train, *[f"--set={item}" for item in overrides]]
    return argv + ([f"--nproc={spec.nproc}"] if spec.nproc > 1 else [])


def check_inputs(recipe, name: str, made_here: set[str], where: str) -> None:
    """The model and data a training stage reads exist now, unless an earlier stage makes them: a typo in the
    last stage's paths must not wait for the first stages to finish. (qshard train checks the rest.)"""
    inputs = {"model.path": recipe.model.path, "data.path": recipe.data.path, "data.eval_path": recipe.data.eval_path}
    for key, path in inputs.items():
        hub_id = key == "model.path" and not path.startswith((".", "/", "~")) and path.count("/") == 1
        if path is None or path in made_here or hub_id or Path(path).exists():
            continue
        raise QShardError(f"stage {name!r} reads {key} {path!r}, which does not exist (from {Path.cwd()}) and no "
                          "earlier stage makes", where=f"{where}: {key}",
                          fix="fix the path (relative paths are read from where `qshard stages` runs), or name an "
                              "earlier stage's folder as \"{NAME}\"")


def _fill(value: Any, folders: dict[str, Path], where: str) -> Any:
    """"{NAME}" in a string -> the folder of the earlier stage NAME."""
    if not isinstance(value, str):
        return value

    def folder(match: re.Match) -> str:
        if match.group(1) not in folders:
            raise QShardError(f"{match.group(0)} names no earlier stage", where=where,
                              fix=f"use one of: {', '.join('{' + n + '}' for n in folders) or '(none yet)'}")
        return str(folders[match.group(1)])

    return PLACEHOLDER.sub(folder, value)


def _yaml_value(value: Any) -> str:
    """The value as `--set key=VALUE` reads it back (qshard parses it as YAML)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text.removesuffix("...").strip()


# -- running ---------------------------------------------------------------------------------------

def say(line: str) -> None:
    print(line, flush=True)  # before the child process writes to the same terminal or pipe


def run(path: str | Path, until: str | None = None, log=say) -> int:
    """Run the pipeline's unfinished stages in order; the first failure stops it (its exit code)."""
    out, stages = load_pipeline(path)
    if until is not None and until not in {s.name for s in stages}:
        raise QShardError(f"--until {until!r} names no stage", where="--until",
                          fix=f"use one of: {', '.join(s.name for s in stages)}")
    done = read_state(out)
    check_unchanged(stages, done, path)
    for i, stage in enumerate(stages, 1):
        label = f"stage {i}/{len(stages)} {stage.name!r}"
        if stage.name in done and stage.folder.exists():
            log(f"{label}: finished earlier ({stage.folder}); skipped")
        else:
            argv = stage.argv + continue_flags(stage)
            log(f"{label}: qshard {shlex.join(argv)}")
            code = subprocess.call([sys.executable, "-m", "qshard.cli", *argv])
            if code != 0:
                log(f"qshard: error: {label} failed (exit {code}); fix what it says above and run the same "
                    f"`qshard stages {path}` again: finished stages are skipped, this one continues")
                return code
            done[stage.name] = stage.argv
            write_state(out, done)
        if stage.name == until:
            log(f"stopped after {label} (--until)")
            break
    return 0


def continue_flags(stage: Stage) -> list[str]:
    """How to pick up a stage whose folder an interrupted attempt left behind."""
    from qshard.state.checkpoint import list_checkpoints

    if not stage.folder.is_dir() or not any(stage.folder.iterdir()):
        return []
    if isinstance(stage.spec, TrainStage) and list_checkpoints(stage.folder):
        return ["--resume=auto"]
    return ["--overwrite"]  # qshard train / export replace only a folder qshard made for them


def check_unchanged(stages: list[Stage], done: dict[str, list[str]], path) -> None:
    for stage in stages:
        if stage.name in done and done[stage.name] != stage.argv:
            raise QShardError(f"stage {stage.name!r} finished earlier with another definition "
                              f"(qshard {shlex.join(done[stage.name])}); its output may have fed the stages after it",
                              where=f"{path}: {stage.name}",
                              fix="give the changed stage a new name (a new folder), or the pipeline a new output_dir")


def read_state(out: Path) -> dict[str, list[str]]:
    file = out / STATE
    if not file.exists():
        return {}
    try:
        state = json.loads(file.read_text())
        done = state["done"]
        if isinstance(done, dict) and all(isinstance(v, list) for v in done.values()):
            return done
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise QShardError(f"{file} is not a pipeline state qshard wrote", where=str(file),
                      fix="give the pipeline a new output_dir (this folder's stages stay as they are)")


def write_state(out: Path, done: dict[str, list[str]]) -> None:
    from qshard.state.checkpoint import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / STATE, json.dumps({"format": 1, "done": done}, indent=1) + "\n")


# -- planning --------------------------------------------------------------------------------------

EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config.json's names

def plan(path: str | Path, gpus: int, nodes: int, gpu_mem: int, log=print) -> int:
    """`qshard plan` for every training stage; a stage that trains on an earlier export is planned on the
    model that export will write (its architecture is the exported run's base), one that trains on a quantize
    stage's output on that export quantized as `qshard quantize` will (plan.quantized_by_qshard)."""
    from qshard.tools import plan as planner

    _, stages = load_pipeline(path)
    worst = 0
    for stage in stages:
        if not isinstance(stage.spec, TrainStage):
            continue
        recipe = load_recipe(stage.spec.train, [a.removeprefix("--set=") for a in stage.argv
                                                if a.startswith("--set=")])
        model, spec = planned_base(recipe.model.path, stages)
        log(f"== stage {stage.name!r} (model: {model}) ==")
        result = planner.make_plan(recipe, spec, gpus=gpus, nodes=nodes, gpu_mem=gpu_mem)
        log(planner.report(result))
        worst = worst or (1 if result.best is None else 0)
    return worst


def planned_base(model_path: str, stages: list[Stage]):
    """(what it is, the planner's ModelSpec) of a training stage's base, which may not exist yet: an export's is
    its run's base architecture; a quantize stage's is the export it quantizes, in the export's dtype, laid out
    as `qshard quantize` will write it (plan.quantized_by_qshard)."""
    from qshard.tools import plan as planner

    model = architecture_source(model_path, stages)
    quantizer = next((s for s in stages if str(s.folder) == model and isinstance(s.spec, QuantizeStage)), None)
    if quantizer is None:
        return model, planner.read_model_spec(model)
    export = next(s for s in stages if s.name == quantizer.spec.quantize)
    source = architecture_source(str(export.folder), stages)
    dense = replace(planner.read_model_spec(source), dtype=EXPORT_DTYPES[export.spec.dtype])
    return (f"{source}, {quantizer.spec.bits}-bit {quantizer.spec.method.upper()} in groups of {quantizer.spec.group_size}, as stage "
            f"{quantizer.name!r} will write it"), planner.quantized_by_qshard(dense, quantizer.spec.bits,
                                                                         quantizer.spec.group_size)


def architecture_source(model_path: str, stages: list[Stage]) -> str:
    """The folder whose config.json describes `model_path`: an export stage's folder does not exist yet,
    and has the architecture of the base its training stage started from."""
    by_folder = {str(s.folder): s for s in stages}
    while model_path in by_folder and isinstance(by_folder[model_path].spec, ExportStage):
        trained = next(s for s in stages if s.name == by_folder[model_path].spec.export)
        model_path = load_recipe(trained.spec.train, [a.removeprefix("--set=") for a in trained.argv
                                                      if a.startswith("--set=")]).model.path
    return model_path
