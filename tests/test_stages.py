"""`qshard stages`: a staged workflow in one YAML file, run stage by stage as real qshard commands (child
processes), continued after a kill, and every bad definition refused before the first stage starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qshard.errors import QShardError
from qshard.tools import stages
from tests.helpers import REPO, recipe_dict, write_rows

GIB = 1 << 30


@pytest.fixture
def workdir(tmp_path, micro_model, monkeypatch) -> Path:
    """A folder holding a recipe and its data, as a user's project: every relative path is read from here."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "train.jsonl")
    recipe = recipe_dict(micro_model, Path("train.jsonl"), Path("unused"), max_steps=3, save_every=1)
    del recipe["train"]["output_dir"]  # each stage's is set by the pipeline
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


STAGED = [  # LoRA on the dense base -> merged -> QLoRA on the merged model -> its NF4 export
    {"name": "dense", "train": "recipe.yaml", "set": {"quantization.method": "none"}},
    {"name": "merged", "export": "dense", "dtype": "fp32"},
    {"name": "qlora", "train": "recipe.yaml",
     "set": {"model.path": "{merged}", "quantization.method": "nf4", "train.max_steps": 40}},
    {"name": "final", "export": "qlora", "format": "nf4", "dtype": "fp32"},
]


def write_pipeline(folder: Path, stage_list: list, output_dir: str = "runs/staged") -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": output_dir, "stages": stage_list}, sort_keys=False))
    return path


def test_a_staged_workflow_runs_to_the_end_and_continues_where_it_was_killed(workdir):
    pipeline, out = write_pipeline(workdir, STAGED), workdir / "runs" / "staged"
    lines: list[str] = []
    assert stages.run(pipeline, until="merged", log=lines.append) == 0
    assert lines[-1] == "stopped after stage 2/4 'merged' (--until)"
    merged = out / "merged" / "model.safetensors"
    before = merged.stat().st_mtime_ns
    assert set(json.loads((out / stages.STATE).read_text())["done"]) == {"dense", "merged"}

    # the whole pipeline in a process of its own, killed (with its stage) once QLoRA saved its first checkpoint
    job = subprocess.Popen([sys.executable, "-m", "qshard.cli", "stages", str(pipeline)], cwd=workdir,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "qlora" / "checkpoint-1").is_dir() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "qlora" / "adapter").exists(), "the kill came after QLoRA finished: nothing to continue"

    lines.clear()
    assert stages.run(pipeline, log=lines.append) == 0
    assert lines[:2] == ["stage 1/4 'dense': finished earlier (runs/staged/dense); skipped",
                         "stage 2/4 'merged': finished earlier (runs/staged/merged); skipped"]
    assert lines[2].startswith("stage 3/4 'qlora': qshard train recipe.yaml") and lines[2].endswith("--resume=auto")
    assert merged.stat().st_mtime_ns == before  # a finished stage is not run again
    trained = [json.loads(r) for r in (out / "qlora" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in trained) == 40
    marker = json.loads((out / "final" / ".qshard-export.json").read_text())
    assert marker["check"]["passed"] and marker["source"] == str((out / "qlora").resolve())
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert set(json.loads((out / stages.STATE).read_text())["done"]) == {s["name"] for s in STAGED}


def test_plan_covers_every_training_stage_and_reads_an_exported_models_architecture_from_its_base(workdir,
                                                                                                  micro_model):
    lines: list[str] = []
    assert stages.plan(write_pipeline(workdir, STAGED), gpus=2, nodes=1, gpu_mem=24 * GIB, log=lines.append) == 0
    headers = [line for line in lines if line.startswith("== stage")]
    # the merged folder does not exist yet: it will have the architecture of the base 'dense' trained
    assert headers == [f"== stage 'dense' (model: {micro_model}) ==", f"== stage 'qlora' (model: {micro_model}) =="]
    assert not (workdir / "runs").exists()  # planning writes nothing


@pytest.mark.parametrize("change, message", [
    (lambda s: s.__setitem__(1, {**s[1], "name": "dense"}), "two stages are named 'dense'"),
    (lambda s: s.__setitem__(1, {**s[1], "export": "qlora"}), "exports 'qlora', which is not an earlier training"),
    (lambda s: s.__setitem__(3, {**s[3], "export": "merged"}), "exports 'merged', which is not an earlier training"),
    (lambda s: s[2]["set"].__setitem__("model.path", "{nope}"), "{nope} names no earlier stage"),
    (lambda s: s[0]["set"].__setitem__("train.output_dir", "elsewhere"), "stage 'dense' sets train.output_dir"),
    (lambda s: s[0]["set"].__setitem__("lora.r", -1), "lora.r"),
    (lambda s: s[0]["set"].__setitem__("lora.rank", 8), "unknown recipe key 'lora.rank'"),
    (lambda s: s[1].__setitem__("dtpye", "bf16"), "did you mean dtype?"),
    (lambda s: s[1].__setitem__("train", "recipe.yaml"), "a stage has one of `train: RECIPE`, `export: STAGE` or `quantize: STAGE`"),
    (lambda s: s[0].__setitem__("name", "../up"), "stages[0]"),
    (lambda s: s[0].__setitem__("train", "missing.yaml"), "recipe not found"),
    (lambda s: s[2]["set"].__setitem__("model.path", "runs/staged/merge"), "stage 'qlora' reads model.path"),
    (lambda s: s[2]["set"].__setitem__("data.path", "trian.jsonl"), "stage 'qlora' reads data.path 'trian.jsonl'"),
])
def test_every_bad_definition_is_refused_before_the_first_stage_runs(workdir, change, message):
    stage_list = json.loads(json.dumps(STAGED))
    change(stage_list)
    with pytest.raises(QShardError) as e:
        stages.run(write_pipeline(workdir, stage_list), log=lambda _: None)
    assert message in str(e.value)
    assert not (workdir / "runs").exists()  # nothing was created


def test_a_finished_stage_that_was_changed_is_refused_not_run_again(workdir):
    out = workdir / "runs" / "staged"
    _, resolved = stages.load_pipeline(write_pipeline(workdir, STAGED))
    stages.write_state(out, {"dense": resolved[0].argv[:-1] + ["--set=train.output_dir=somewhere-else"]})
    with pytest.raises(QShardError, match="stage 'dense' finished earlier with another definition") as e:
        stages.run(workdir / "pipeline.yaml", log=lambda _: None)
    assert "give the changed stage a new name" in e.value.fix
    assert sorted(p.name for p in out.iterdir()) == [stages.STATE]  # nothing ran


def test_a_state_file_qshard_did_not_write_is_refused_and_kept(workdir):
    out = workdir / "runs" / "staged"
    out.mkdir(parents=True)
    (out / stages.STATE).write_text("my notes")
    with pytest.raises(QShardError, match="is not a pipeline state qshard wrote"):
        stages.run(write_pipeline(workdir, STAGED), log=lambda _: None)
    assert (out / stages.STATE).read_text() == "my notes"


def test_until_must_name_a_stage(workdir):
    with pytest.raises(QShardError, match="--until 'nope' names no stage"):
        stages.run(write_pipeline(workdir, STAGED), until="nope", log=lambda _: None)
