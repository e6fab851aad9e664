"""Adversarial suite, part 1: recipes, command lines and run folders, as a careless or hostile user
would give them. Every case asserts the exit code (2), a message naming the option / file, no
traceback, and that not one of the user's files changed (model, data, recipe, earlier runs, the
working directory).

The rules under test (README "Your files"): qshard/validate.py (every problem before anything
happens), qshard/state/rundir.py (what a run may replace), qshard/config.py (strict recipe values)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qshard.state import rundir
from tests.helpers import recipe_dict, write_rows
from tests.hostile import assert_refused, changed, run_cli, snapshot


@pytest.fixture
def ws(tmp_path, micro_model):
    """A user's working directory: a model, data, a recipe, and a precious file of their own."""
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    data = write_rows(tmp_path / "data" / "train.jsonl") if (tmp_path / "data").mkdir() is None else None
    (tmp_path / "notes.txt").write_text("my own notes")
    return tmp_path, model, data


def recipe(ws, name="recipe.yaml", **changes) -> Path:
    """A recipe in the workspace; `changes` maps dotted keys to values (None deletes the key)."""
    root, model, data = ws
    raw = recipe_dict(model, data, root / "runs" / "r", max_steps=1)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        raw.setdefault(section, {})[key] = value
    path = root / name
    path.write_text(yaml.safe_dump(raw))
    return path


def refused(ws, argv: list[str], *fragments: str, code: int = 2, extra_roots=()) -> None:
    """Run `qshard ARGV` in the workspace; refused with `fragments`, and nothing of the user's changed."""
    root = ws[0]
    before = snapshot(root, *extra_roots)
    result = run_cli(*argv, cwd=root)
    assert_refused(result, *fragments, code=code)
    assert changed(before, snapshot(root, *extra_roots)) == []


def earlier_run(ws, folder: Path, *, with_checkpoint=True) -> Path:
    """What an earlier qshard run leaves behind (its layout, without training one)."""
    folder.mkdir(parents=True)
    shutil.copy(recipe(ws, name="old.yaml"), folder / "recipe.yaml")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    if with_checkpoint:
        (folder / "checkpoint-1").mkdir()
        (folder / "checkpoint-1" / "manifest.json").write_text("{not json")
    (folder / rundir.MARKER).write_text(json.dumps({"format": 1, "job": None}))
    return folder


# -- 1. nothing the user has is ever deleted -------------------------------------------------------

@pytest.mark.parametrize("output_dir, fragment", [
    (".", "working directory"),
    ("./", "working directory"),
    ("..", "contains the working directory"),
    ("model", "is model.path"),
    ("data", "contains data.path"),
    ("data/train.jsonl", "is data.path"),
    ("./model/../model", "is model.path"),
])
def test_overwrite_never_replaces_the_working_directory_or_an_input(ws, output_dir, fragment):
    path = recipe(ws, train__output_dir=output_dir)
    refused(ws, ["train", str(path), "--overwrite"], "train.output_dir", fragment)


def test_output_dir_holding_the_recipe_is_refused(ws, tmp_path):
    root = ws[0]
    (root / "cfg").mkdir()
    path = recipe(ws, name="cfg/recipe.yaml", train__output_dir=str(root / "cfg"))
    # the recipe is not an input the validator knows by option, but its folder holds the user's files
    refused(ws, ["train", str(path), "--overwrite"], "train.output_dir", "contains the recipe")


def test_output_dir_holding_the_deepspeed_config_is_refused(ws):
    root = ws[0]
    (root / "ds").mkdir()
    (root / "ds" / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    path = recipe(ws, distributed__engine="deepspeed", distributed__deepspeed_config=str(root / "ds" / "ds.json"),
                  train__output_dir=str(root / "ds"))
    refused(ws, ["train", str(path), "--overwrite"], "contains distributed.deepspeed_config")


def test_output_dir_holding_the_eval_data_is_refused(ws):
    root = ws[0]
    write_rows(root / "evals.jsonl")
    (root / "ev").mkdir()
    shutil.move(root / "evals.jsonl", root / "ev" / "evals.jsonl")
    path = recipe(ws, data__eval_path=str(root / "ev" / "evals.jsonl"), train__output_dir=str(root / "ev"))
    refused(ws, ["train", str(path), "--overwrite"], "contains data.eval_path")


def test_output_dir_that_is_home_is_refused(ws, monkeypatch):
    root = ws[0]
    home = root / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    path = recipe(ws, train__output_dir="~")
    refused(ws, ["train", str(path), "--overwrite"], "home folder")


def test_root_and_cwd_ancestors_are_never_run_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from qshard.errors import QShardError

    for target in (Path("/"), tmp_path.parent, tmp_path):
        with pytest.raises(QShardError, match="train.output_dir"):
            rundir.check_location(target, {})


@pytest.mark.parametrize("output_dir", ["", "   "])
def test_empty_output_dir_is_an_invalid_recipe(ws, output_dir):
    path = recipe(ws, train__output_dir=output_dir)
    refused(ws, ["train", str(path), "--overwrite"], "train.output_dir")


def test_overwrite_refuses_a_folder_qshard_did_not_make(ws):
    root = ws[0]
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    path = recipe(ws, train__output_dir=str(root / "mine"))
    refused(ws, ["train", str(path), "--overwrite"], "did not write", "thesis.tex")


def test_overwrite_refuses_a_run_folder_holding_a_user_file(ws):
    root = ws[0]
    run = earlier_run(ws, root / "runs" / "r")
    (run / "my-analysis.ipynb").write_text("{}")
    refused(ws, ["train", str(recipe(ws)), "--overwrite"], "did not write", "my-analysis.ipynb")


def test_overwrite_refuses_a_run_folder_holding_a_symlink(ws):
    root = ws[0]
    run = earlier_run(ws, root / "runs" / "r", with_checkpoint=False)
    (run / "checkpoint-9").symlink_to(root / "model")
    refused(ws, ["train", str(recipe(ws)), "--overwrite"], "symbolic link", "checkpoint-9")


def test_output_dir_that_is_a_file_is_refused(ws):
    root = ws[0]
    (root / "runs").mkdir()
    (root / "runs" / "r").write_text("a file")
    refused(ws, ["train", str(recipe(ws))], "is not a folder")


def test_output_dir_that_is_a_symlink_to_the_users_folder_is_refused(ws):
    root = ws[0]
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "keep.txt").write_text("keep")
    (root / "runs").mkdir()
    (root / "runs" / "r").symlink_to(root / "elsewhere")
    refused(ws, ["train", str(recipe(ws)), "--overwrite"], "train.output_dir")


@pytest.mark.parametrize("bad", [
    {"train__seed": -1},
    {"distributed__engine": "deepspeed", "distributed__deepspeed_config": "missing.json"},
    {"data__path": "missing.jsonl"},
    {"model__path": "no-such-model"},
    {"lora__target_modules": ["no_such_proj"]},
])
def test_overwrite_keeps_the_old_run_when_any_check_fails(ws, bad):
    """The old run is removed only after every check has passed."""
    earlier_run(ws, ws[0] / "runs" / "r")
    refused(ws, ["train", str(recipe(ws, **bad)), "--overwrite"])


def test_unreadable_deepspeed_json_keeps_the_old_run(ws):
    root = ws[0]
    earlier_run(ws, root / "runs" / "r")
    (root / "ds.json").write_text("{broken")
    path = recipe(ws, distributed__engine="deepspeed", distributed__deepspeed_config=str(root / "ds.json"))
    refused(ws, ["train", str(path), "--overwrite"], "cannot read the DeepSpeed config", "ds.json")


def test_resume_auto_without_a_valid_checkpoint_refuses_and_keeps_the_run(ws):
    earlier_run(ws, ws[0] / "runs" / "r")  # its only checkpoint has a broken manifest
    refused(ws, ["train", str(recipe(ws)), "--resume", "auto"], "no valid checkpoint", "nothing was changed")


def test_resume_auto_on_a_finished_run_whose_checkpoints_are_gone_refuses(ws):
    earlier_run(ws, ws[0] / "runs" / "r", with_checkpoint=False)
    refused(ws, ["train", str(recipe(ws)), "--resume", "auto"], "no valid checkpoint", "--overwrite")


def test_resume_and_overwrite_together_are_refused(ws):
    earlier_run(ws, ws[0] / "runs" / "r")
    refused(ws, ["train", str(recipe(ws)), "--resume", "auto", "--overwrite"], "pass one of them")


def test_explicit_resume_path_that_is_not_a_checkpoint_is_refused(ws):
    earlier_run(ws, ws[0] / "runs" / "r")
    refused(ws, ["train", str(recipe(ws)), "--resume", str(ws[0] / "model")], "--resume")


@pytest.mark.parametrize("marker_job", [None, "another-job@host:1"])
def test_torchrun_restart_continues_only_the_run_its_first_attempt_started(ws, monkeypatch, marker_job):
    """Seen: attempt 0 refused a non-empty folder, the restart deleted it and trained, exit 0."""
    run = earlier_run(ws, ws[0] / "runs" / "r", with_checkpoint=False)
    if marker_job is None:
        (run / rundir.MARKER).unlink()
    else:
        (run / rundir.MARKER).write_text(json.dumps({"format": 1, "job": marker_job}))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "this-job")
    refused(ws, ["train", str(recipe(ws))], "torchrun restarted this job", "not the run its first attempt started")


def test_torchrun_job_id_names_the_invocation_not_only_the_rendezvous(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "fixed-by-hand")
    job = rundir.torchrun_job()
    assert job.startswith("fixed-by-hand@") and job.endswith(f":{__import__('os').getppid()}")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert rundir.torchrun_job() is None


def test_overwrite_replaces_only_qshards_own_entries(ws):
    """Positive control: an earlier run is replaced, the user's files beside it stay (1 step)."""
    root = ws[0]
    run = earlier_run(ws, root / "runs" / "r")
    (root / "runs" / "sibling.txt").write_text("beside the run")
    others = snapshot(root / "model", root / "data", root / "notes.txt", root / "runs" / "sibling.txt")
    result = run_cli("train", str(recipe(ws)), "--overwrite", cwd=root)
    assert result.code == 0, result.err[-2000:]
    assert changed(others, snapshot(root / "model", root / "data", root / "notes.txt",
                                    root / "runs" / "sibling.txt")) == []
    assert not (run / "checkpoint-1" / "manifest.json").read_text().startswith("{not json")
    assert json.loads((run / rundir.MARKER).read_text())["format"] == 1


def test_resume_auto_in_a_missing_folder_starts_the_run(ws):
    root = ws[0]
    result = run_cli("train", str(recipe(ws)), "--resume", "auto", cwd=root)
    assert result.code == 0, result.err[-2000:]
    assert "holds no run yet" in result.out and (root / "runs" / "r" / "adapter").is_dir()


# -- 3. recipe values: refused, named, before anything ---------------------------------------------

@pytest.mark.parametrize("key, value, fragment", [
    ("lora__r", True, "lora.r"),
    ("lora__r", 0, "lora.r"),
    ("lora__r", "8", "lora.r"),
    ("lora__r", 2.5, "lora.r"),
    ("lora__alpha", True, "lora.alpha"),
    ("lora__dropout", 1.0, "lora.dropout"),
    ("lora__target_modules", [], "lora.target_modules"),
    ("lora__target_modules", [""], "lora.target_modules"),
    ("lora__target_modules", 5, "lora.target_modules"),
    ("lora__use_dora", "yes", "lora.use_dora"),
    ("train__seed", -1, "train.seed"),
    ("train__seed", 2 ** 40, "train.seed"),
    ("train__seed", True, "train.seed"),
    ("train__max_steps", 0, "train.max_steps"),
    ("train__max_steps", True, "train.max_steps"),
    ("train__learning_rate", 0, "train.learning_rate"),
    ("train__learning_rate", "1e-4", "train.learning_rate"),
    ("train__micro_batch_size", 0, "train.micro_batch_size"),
    ("train__gradient_accumulation_steps", -1, "train.gradient_accumulation_steps"),
    ("train__keep_checkpoints", 0, "train.keep_checkpoints"),
    ("train__watchdog_s", -5, "train.watchdog_s"),
    ("train__precision", "fp8", "train.precision"),
    ("data__max_length", 0, "data.max_length"),
    ("data__packing", 1, "data.packing"),
    ("data__path", "", "data.path"),
    ("data__text_field", "", "data.text_field"),
    ("model__path", "", "model.path"),
    ("model__dtype", "int4", "model.dtype"),
    ("quantization__method", "gguf", "quantization.method"),
    ("distributed__engine", "horovod", "distributed.engine"),
    ("distributed__zero_stage", 0, "distributed.zero_stage"),
])
def test_invalid_recipe_values_are_named(ws, key, value, fragment):
    refused(ws, ["train", str(recipe(ws, **{key: value}))], fragment)


@pytest.mark.parametrize("changes, fragment", [
    ({"distributed__engine": "fsdp2", "distributed__zero_stage": 3}, "distributed.zero_stage applies to engine deepspeed"),
    ({"distributed__engine": "ddp", "distributed__offload_optimizer": "cpu"}, "offload_optimizer applies to engine deepspeed"),
    ({"distributed__engine": "none", "distributed__offload_params": "cpu"}, "offload_params applies to engine deepspeed"),
    ({"distributed__engine": "deepspeed", "distributed__reshard_after_forward": False}, "reshard_after_forward applies to engine fsdp2"),
    ({"distributed__engine": "ddp", "distributed__fsdp_cpu_offload": True}, "fsdp_cpu_offload applies to engine fsdp2"),
    ({"distributed__engine": "fsdp2", "distributed__deepspeed_config": "ds.json"}, "deepspeed_config applies to engine deepspeed"),
    ({"distributed__engine": "ddp", "distributed__shard_on_load": False}, "shard_on_load applies to ZeRO-3 and FSDP2"),
    ({"distributed__engine": "deepspeed", "distributed__zero_stage": 2, "distributed__offload_params": "cpu"}, "zero_stage: 3"),
    ({"train__eval_every": 2}, "train.eval_every needs evaluation data"),
    ({"data__eval_fraction": 0.1, "data__eval_path": "x.jsonl"}, "data.eval_fraction is ignored"),
    ({"train__epochs": 3}, "train.epochs is ignored when train.max_steps is set"),
    ({"train__warmup_steps": 5}, "warmup_steps (5) exceeds train.max_steps (1)"),
    ({"train__sample_prompt": "Hi", "train__sample_tokens": 0}, "sample_tokens is 0"),
    ({"quantization__method": "int8", "quantization__double_quant": False}, "double_quant applies to nf4/fp4"),
    ({"quantization__int8_threshold": 4.0}, "int8_threshold applies to int8"),
    ({"quantization__method": "none", "quantization__compute_dtype": "bfloat16"}, "compute_dtype applies to nf4/fp4"),
    ({"quantization__method": "none", "quantization__skip_modules": ["q_proj"]}, "skip_modules has no effect"),
    ({"distributed__engine": "fsdp2", "train__precision": "fp16"}, "fp16 cannot be used with fsdp2"),
    ({"distributed__engine": "deepspeed", "distributed__zero_stage": 3, "lora__use_dora": True}, "use_dora cannot be used with zero3"),
    ({"distributed__engine": "deepspeed", "distributed__zero_stage": 2, "train__on_nonfinite": "skip"}, "on_nonfinite: skip cannot be used with zero2"),
    ({"distributed__engine": "fsdp2", "distributed__fsdp_cpu_offload": True}, "already on the CPU"),
    ({"quantization__method": "checkpoint"}, "not a GPTQ/AWQ/compressed-tensors checkpoint"),
])
def test_options_that_conflict_or_do_nothing_are_refused(ws, changes, fragment):
    refused(ws, ["train", str(recipe(ws, **changes))], fragment)


@pytest.mark.parametrize("ds_json, changes, fragment", [
    ({"zero_optimization": {"stage": 3}}, {"lora__use_dora": True}, "use_dora cannot be used with zero3"),
    ({"zero_optimization": {"stage": 3}}, {"distributed__zero_stage": 1}, "zero_stage is decided by distributed.deepspeed_config"),
    ({"zero_optimization": {"stage": 2}}, {"train__on_nonfinite": "skip"}, "on_nonfinite: skip cannot be used with zero2"),
    ({"zero_optimization": {"stage": 0}}, {}, "zero_optimization.stage is 0"),
    ({"zero_optimization": {"stage": "3"}}, {}, "zero_optimization.stage is '3'"),
    ({"zero_optimization": []}, {}, "zero_optimization must be a JSON object"),
    ({}, {}, "zero_optimization.stage"),
    ([1, 2], {}, "not a JSON object"),
])
def test_a_users_deepspeed_json_decides_the_engine_and_its_rules(ws, ds_json, changes, fragment):
    root = ws[0]
    (root / "ds.json").write_text(json.dumps(ds_json))
    path = recipe(ws, distributed__engine="deepspeed", distributed__deepspeed_config=str(root / "ds.json"), **changes)
    refused(ws, ["train", str(path)], fragment)


def test_engine_none_with_several_processes_is_refused_before_any_group(ws, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(ws, ["train", str(recipe(ws))], "distributed.engine is none")


def test_every_problem_is_reported_at_once(ws):
    path = recipe(ws, data__path="missing.jsonl", model__path="no-model", train__output_dir=".")
    result = run_cli("train", str(path), cwd=ws[0])
    assert_refused(result, "3 problems", "missing.jsonl", "no-model", "working directory")


# -- recipe files and overrides --------------------------------------------------------------------

def billion_laughs(levels: int = 8) -> str:
    """A flow-style YAML list whose aliases expand to 10**levels strings (a few hundred bytes)."""
    anchors = ["&l0 [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]"]
    anchors += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(anchors) + "]"


def test_yaml_alias_bomb_under_a_valid_key_is_refused_before_it_expands(ws):
    root = ws[0]
    raw = recipe_dict(ws[1], ws[2], root / "runs" / "r")
    del raw["lora"]
    (root / "bomb.yaml").write_text(yaml.safe_dump(raw) + f"lora:\n  target_modules: {billion_laughs()}\n")
    refused(ws, ["train", str(root / "bomb.yaml")], "aliases", "bomb.yaml")


def test_alias_bomb_through_set_is_refused(ws):
    refused(ws, ["train", str(recipe(ws)), "--set", f"lora.target_modules={billion_laughs()}"], "--set", "aliases")


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe not utf-8 \x00", "cannot read the recipe"),
    (b"- just\n- a list\n", "mapping of sections"),
    (b"model: {path: m}\ndata: {path: d.jsonl\n", "not valid YAML"),
    (b"model:\n  path: m\n\tdata: x\n", "not valid YAML"),
    (b"model: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    (b"[" * 5000, "recipe"),
])
def test_malformed_recipe_files_are_named(ws, content, fragment):
    (ws[0] / "bad.yaml").write_bytes(content)
    refused(ws, ["train", str(ws[0] / "bad.yaml")], fragment)
    assert not (ws[0] / "pwned").exists()


def test_huge_recipe_file_is_refused_unread(ws):
    (ws[0] / "huge.yaml").write_text("# " + "x" * (2 << 20))
    refused(ws, ["train", str(ws[0] / "huge.yaml")], "at most")


def test_recipe_that_is_a_folder_is_refused(ws):
    (ws[0] / "folder.yaml").mkdir()
    refused(ws, ["train", str(ws[0] / "folder.yaml")], "recipe not found")


@pytest.mark.parametrize("override, fragment", [
    ("lora.r", "bad override"),
    ("=5", "bad override"),
    ("lora.r.x=5", "not a section"),
    ("lora.rr=5", "did you mean lora.r"),
    ("lora.target_modules=[q_proj", "cannot parse"),
    ("nosuch.key=1", "unknown recipe key"),
])
def test_bad_overrides_are_named(ws, override, fragment):
    refused(ws, ["train", str(recipe(ws)), "--set", override], fragment)


def test_tilde_in_paths_is_expanded(ws, monkeypatch):
    from qshard.config import load_recipe

    monkeypatch.setenv("HOME", str(ws[0]))
    loaded = load_recipe(recipe(ws, train__output_dir="~/runs/x", data__path="~/data/train.jsonl"))
    assert loaded.train.output_dir == str(ws[0] / "runs" / "x")
    assert loaded.data.path == str(ws[0] / "data" / "train.jsonl")


# -- command-line values -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["train", "RECIPE", "--nproc", "0"], "--nproc"),
    (["train", "RECIPE", "--nproc", "-2"], "--nproc"),
    (["train", "RECIPE", "--nproc", "two"], "--nproc"),
    (["train", "RECIPE", "--max-restarts", "-1"], "--max-restarts"),
    (["plan", "RECIPE", "--gpus", "0"], "--gpus"),
    (["plan", "RECIPE", "--nodes", "0"], "--nodes"),
    (["plan", "RECIPE", "--gpu-mem", "-5GiB"], "--gpu-mem"),
    (["plan", "RECIPE", "--gpu-mem", "0"], "--gpu-mem"),
    (["plan", "RECIPE", "--gpu-mem", "inf"], "--gpu-mem"),
    (["plan", "RECIPE", "--gpu-mem", "lots"], "--gpu-mem"),
    (["plan", "RECIPE", "--cpu-mem", "-1TB"], "--cpu-mem"),
    (["init-tiny", "NEWDIR", "--vocab-size", "0"], "--vocab-size"),
    (["init-tiny", "NEWDIR", "--seed", "-1"], "--seed"),
    (["bench-comm", "--iters", "0"], "--iters"),
    (["bench-comm", "--tflops", "-3"], "--tflops"),
    (["bench-comm", "--nproc", "0"], "--nproc"),
    (["train", "missing.yaml"], "recipe not found"),
    (["doctor", "missing.yaml", "--set", "x"], "recipe not found"),
])
def test_bad_command_line_values_are_named(ws, argv, fragment):
    argv = [str(recipe(ws)) if a == "RECIPE" else str(ws[0] / "newdir") if a == "NEWDIR" else a for a in argv]
    code = 1 if argv[0] == "doctor" else 2
    refused(ws, argv, fragment, code=code)


def test_init_tiny_on_a_file_is_refused(ws):
    refused(ws, ["init-tiny", str(ws[0] / "notes.txt")], "not a folder")


def test_init_tiny_never_writes_into_a_users_folder(ws):
    refused(ws, ["init-tiny", str(ws[0] / "data")], "is not empty")


@pytest.mark.parametrize("out", [".", "data"])
def test_plan_never_replaces_a_users_recipe_or_deepspeed_json(ws, out):
    """`qshard plan recipe.yaml --out .` once overwrote the user's own recipe.yaml with its recommendation."""
    root = ws[0]
    path = recipe(ws)
    if out == "data":
        (root / "data" / "deepspeed.json").write_text('{"zero_optimization": {"stage": 2}}')
    refused(ws, ["plan", str(path), "--gpus", "2", "--out", str(root / out)], "was not written by qshard plan")


def test_plan_replaces_its_own_earlier_recommendation(ws):
    root = ws[0]
    assert run_cli("plan", str(recipe(ws)), "--gpus", "2", "--out", str(root / "plan"), cwd=root).code == 0
    first = (root / "plan" / "recipe.yaml").read_text()
    assert run_cli("plan", str(recipe(ws)), "--gpus", "2", "--gpu-mem", "24GiB", "--out", str(root / "plan"),
                   cwd=root).code == 0
    again = (root / "plan" / "recipe.yaml").read_text()
    assert again != first and "of 24.00 GiB" in again.splitlines()[0]
