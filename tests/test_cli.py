"""The `qshard` command as users run it: each mistake is exit code 2 with a message naming the file or
option and no traceback, before any training; and one real init-tiny -> train run end to end.

Subprocesses cost ~3-5 s of imports each, so three real-CLI error cases start together (one fixture) and
the rest call `qshard.cli.main` in-process: the same code minus the interpreter start (an uncaught
exception there fails the test, so "no traceback" holds for them too)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from qshard.cli import main
from qshard.config import load_recipe
from tests.helpers import ROWS, recipe_dict

QSHARD = [sys.executable, "-m", "qshard.cli"]


def write_recipe(folder: Path, raw: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def nothing_trained(out: Path) -> bool:
    """The run folder holds no file at all (it may exist, empty)."""
    return not out.exists() or not any(out.rglob("*"))


# -- the real command, started together --------------------------------------------------------------

def _case_data_missing(d: Path, model: Path) -> Path:
    return write_recipe(d, recipe_dict(model, d / "missing.jsonl", d / "out"))


def _case_bad_json_line(d: Path, model: Path) -> Path:
    lines = [json.dumps(ROWS[0]), '{"instruction": "Hi", "output": ', json.dumps(ROWS[1])]
    data = write_jsonl(d / "train.jsonl", lines)
    return write_recipe(d, recipe_dict(model, data, d / "out"))


def _case_output_not_empty(d: Path, model: Path) -> Path:
    (d / "out").mkdir()
    (d / "out" / "earlier-run.txt").write_text("precious")
    data = write_jsonl(d / "train.jsonl", [json.dumps(r) for r in ROWS])
    return write_recipe(d, recipe_dict(model, data, d / "out"))


CASES = {"data_missing": _case_data_missing, "bad_json_line": _case_bad_json_line,
         "output_not_empty": _case_output_not_empty}


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, micro_model) -> dict[str, tuple[int, str, Path]]:
    """case -> (exit code, stderr, case folder), all `qshard train` processes running at once."""
    started = {}
    for name, make in CASES.items():
        d = tmp_path_factory.mktemp(name)
        started[name] = (subprocess.Popen([*QSHARD, "train", str(make(d, micro_model))], cwd=d, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE), d)
    results = {}
    for name, (proc, d) in started.items():
        _, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stderr, d)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_exits_2_with_a_message_and_no_traceback(cli_errors, case):
    code, stderr, d = cli_errors[case]
    assert code == 2, stderr
    assert "qshard: error:" in stderr
    assert "Traceback" not in stderr
    assert not (d / "out" / "metrics.jsonl").exists()


def test_missing_data_file_is_named(cli_errors):
    _, stderr, d = cli_errors["data_missing"]
    assert f"qshard: error: data file not found: {d / 'missing.jsonl'}" in stderr
    assert nothing_trained(d / "out")


def test_unparsable_json_line_is_named_with_its_line_number(cli_errors):
    _, stderr, d = cli_errors["bad_json_line"]
    assert "qshard: error: invalid JSON" in stderr
    assert f"where: {d / 'train.jsonl'} line 2" in stderr


def test_non_empty_output_folder_is_refused_and_left_intact(cli_errors):
    _, stderr, d = cli_errors["output_not_empty"]
    assert f"qshard: error: output folder {d / 'out'} is not empty" in stderr
    assert "where: train.output_dir" in stderr
    assert [p.name for p in (d / "out").iterdir()] == ["earlier-run.txt"]
    assert (d / "out" / "earlier-run.txt").read_text() == "precious"


# -- the same entry point in-process ---------------------------------------------------------------

def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_lora_target_matching_no_module_names_the_option(tmp_path, capsys, micro_model, alpaca_file):
    raw = recipe_dict(micro_model, alpaca_file, tmp_path / "out")
    raw["lora"]["target_modules"] = ["nope_proj"]
    code, err = run_main(capsys, ["train", str(write_recipe(tmp_path, raw))])
    assert code == 2
    assert "qshard: error: LoRA target(s) ['nope_proj'] match no linear layer" in err
    assert "where: lora.target_modules" in err
    assert "q_proj" in err  # the fix lists the names that do exist
    assert nothing_trained(tmp_path / "out")


def test_model_folder_without_config_json_is_named(tmp_path, capsys, micro_model, alpaca_file):
    (tmp_path / "weights-only").mkdir()
    shutil.copy(micro_model / "model.safetensors", tmp_path / "weights-only")
    recipe = write_recipe(tmp_path, recipe_dict(tmp_path / "weights-only", alpaca_file, tmp_path / "out"))
    code, err = run_main(capsys, ["train", str(recipe)])
    assert code == 2
    assert f"qshard: error: {tmp_path / 'weights-only'} has no config.json" in err
    assert "where: model.path" in err
    assert nothing_trained(tmp_path / "out")


def test_row_missing_fields_names_the_line(tmp_path, capsys, micro_model):
    data = write_jsonl(tmp_path / "train.jsonl", [json.dumps(ROWS[0]), json.dumps({"instruction": "Hi", "input": ""})])
    recipe = write_recipe(tmp_path, recipe_dict(micro_model, data, tmp_path / "out"))
    code, err = run_main(capsys, ["train", str(recipe)])
    assert code == 2
    assert "qshard: error: row is missing 'output' for the alpaca format" in err
    assert f"where: {data} line 2" in err
    assert nothing_trained(tmp_path / "out")


def test_empty_data_file_is_named(tmp_path, capsys, micro_model):
    data = write_jsonl(tmp_path / "train.jsonl", [])
    recipe = write_recipe(tmp_path, recipe_dict(micro_model, data, tmp_path / "out"))
    code, err = run_main(capsys, ["train", str(recipe)])
    assert code == 2
    assert "qshard: error: the dataset has no rows" in err
    assert f"where: {data}" in err
    assert nothing_trained(tmp_path / "out")


def test_max_length_zero_names_the_option(tmp_path, capsys, alpaca_file):
    raw = recipe_dict(tmp_path / "model", alpaca_file, tmp_path / "out")
    raw["data"]["max_length"] = 0
    recipe = write_recipe(tmp_path, raw)
    code, err = run_main(capsys, ["train", str(recipe)])
    assert code == 2
    assert "data.max_length: Input should be greater than or equal to 1 (got 0)" in err
    assert f"where: {recipe}: data.max_length" in err
    assert nothing_trained(tmp_path / "out")


def test_unknown_recipe_key_suggests_the_right_one(tmp_path, capsys, alpaca_file):
    raw = recipe_dict(tmp_path / "model", alpaca_file, tmp_path / "out")
    raw["trian"] = raw.pop("train")
    code, err = run_main(capsys, ["train", str(write_recipe(tmp_path, raw))])
    assert code == 2
    assert "qshard: error: unknown recipe key 'trian'" in err
    assert "did you mean train?" in err
    assert nothing_trained(tmp_path / "out")


def test_set_override_errors_go_through_the_same_path(tmp_path, capsys, alpaca_file):
    recipe = str(write_recipe(tmp_path, recipe_dict(tmp_path / "model", alpaca_file, tmp_path / "out")))
    assert run_main(capsys, ["train", recipe, "--set", "foo"]) == (2, "qshard: error: bad override 'foo'\n"
                                                                      "  where: --set\n"
                                                                      "  fix:   write it as section.key=value\n")
    code, err = run_main(capsys, ["train", recipe, "--set", "lora.r=0"])
    assert code == 2 and f"where: {recipe}: lora.r" in err


def test_init_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    code, err = run_main(capsys, ["init-tiny", str(tmp_path / "m"), "--size", "micro"])
    assert code == 2
    assert f"qshard: error: {tmp_path / 'm'} is not empty" in err
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep.txt"]


def test_overwrite_keeps_the_old_run_when_the_recipe_fails_validation(tmp_path, capsys, micro_model):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier-run.txt").write_text("precious")
    recipe = write_recipe(tmp_path, recipe_dict(micro_model, tmp_path / "missing.jsonl", tmp_path / "out"))
    code, err = run_main(capsys, ["train", str(recipe), "--overwrite"])
    assert code == 2 and "data file not found" in err
    assert (tmp_path / "out" / "earlier-run.txt").read_text() == "precious"


# -- the happy path ------------------------------------------------------------------------------

def test_init_tiny_then_train_writes_a_complete_run_folder(tmp_path, alpaca_file):
    init = subprocess.run([*QSHARD, "init-tiny", str(tmp_path / "m"), "--size", "micro"], capture_output=True,
                          text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    assert init.stdout.splitlines()[-1] == f"wrote a random llama model (micro) and its tokenizer to {tmp_path / 'm'}"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, recipe_dict(tmp_path / "m", alpaca_file, out, max_steps=2))
    train = subprocess.run([*QSHARD, "train", str(recipe)], capture_output=True, text=True, timeout=180)
    assert train.returncode == 0, train.stderr
    assert "Traceback" not in train.stderr
    assert "trained 2 steps" in train.stdout
    assert len(load_file(str(out / "adapter" / "adapter_model.safetensors"))) == 28  # A and B, 7 linears x 2 layers
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records)
    saved = load_recipe(out / "recipe.yaml")
    assert saved.train.max_steps == 2 and saved.model.path == str(tmp_path / "m")
    assert saved == load_recipe(recipe)


@pytest.mark.parametrize("distributed", [{"engine": "deepspeed", "zero_stage": 3}, {"engine": "fsdp2"}],
                         ids=["zero3", "fsdp2"])
def test_an_engine_runs_as_one_process_without_a_launcher(distributed, tmp_path, micro_model, alpaca_file):
    """`qshard train` with an engine and no torchrun: qshard starts the one-rank group itself (DeepSpeed
    refused to start without the LOCAL_RANK a launcher sets, found on a GPU by bench/cuda_check.py)."""
    raw = recipe_dict(micro_model, alpaca_file, tmp_path / "run", max_steps=2)
    raw["distributed"] = distributed
    train = subprocess.run([*QSHARD, "train", str(write_recipe(tmp_path, raw))], capture_output=True, text=True,
                           timeout=180)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "trained 2 steps" in train.stdout


def test_deepspeed_launchers_local_rank_flag_is_accepted(tmp_path, capsys):
    """`deepspeed --module qshard.cli train ...` inserts --local_rank=N before the command."""
    from qshard.cli import main

    assert main(["--local_rank=1", "train", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
