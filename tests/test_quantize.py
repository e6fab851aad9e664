"""`qshard quantize`: GPTQ by the real llm-compressor (its own virtualenv, `make quantizers`), read back by qshard's
loader to the values compressed-tensors itself decompresses, trained on under 2-rank FSDP2 as a pipeline stage,
and every bad input refused before the quantizer starts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.tools import plan, quantize, stages
from qshard.train import run
from tests.helpers import assert_transformers_reads_as_qshard, recipe_dict, write_rows

IDS = [[1, 5, 9, 200, 33, 41, 7, 300, 12], [1, 77, 78, 79, 80]]


@pytest.fixture(scope="module")
def gptq_model(micro_model, tmp_path_factory) -> tuple[Path, Path]:
    """The micro Llama (hidden 64) quantized by llm-compressor: 4-bit GPTQ, groups of 32, on the test rows."""
    root = tmp_path_factory.mktemp("quantize")
    data = write_rows(root / "train.jsonl")
    out = root / "gptq"
    result = quantize.quantize(str(micro_model), str(out), calibration=str(data), group_size=32, log=print)
    assert result.gap["relative"] < 0.5  # 4-bit on a random 2-layer model: a visible but bounded change
    return out, data


def test_the_output_is_compressed_tensors_and_qshard_reads_the_values_compressed_tensors_decompresses(gptq_model):
    out, _ = gptq_model
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32 and config["ignore"] == ["lm_head"]
    marker = json.loads((out / quantize.MARKER).read_text())
    assert marker["method"] == "gptq" and set(marker["files"]) == {p.name for p in out.iterdir()} - {quantize.MARKER}

    assert_transformers_reads_as_qshard(out, IDS)  # compressed-tensors' own decompression


def test_awq_on_a_machine_without_an_accelerator_writes_compressed_tensors_that_qshard_trains_on(micro_model,
                                                                                                tmp_path):
    """llm-compressor's AWQ (activation-aware scales folded into the preceding norms, then round to nearest),
    asymmetric 4-bit in groups of 32, on CPU through the worker's pinning workaround: transformers +
    compressed-tensors read the folder as qshard does, and LoRA trains on it kept as it is."""
    data = write_rows(tmp_path / "train.jsonl")
    out = tmp_path / "awq"
    result = quantize.quantize(str(micro_model), str(out), calibration=str(data), method="awq", group_size=32,
                               symmetric=False, log=print)
    assert result.gap["relative"] < 0.5
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and weights["group_size"] == 32 and weights["symmetric"] is False
    assert json.loads((out / quantize.MARKER).read_text())["method"] == "awq"
    assert_transformers_reads_as_qshard(out, IDS)
    recipe = recipe_dict(out, data, tmp_path / "run", max_steps=2)
    recipe["quantization"]["method"] = "checkpoint"
    outcome = run(parse_recipe(recipe), log=lambda *_: None)
    assert len(outcome.losses) == 2 and all(math.isfinite(x) for x in outcome.losses)


def test_train_export_quantize_and_lora_on_the_gptq_model_under_two_rank_fsdp2_as_one_pipeline(gptq_model,
                                                                                                micro_model,
                                                                                                tmp_path, monkeypatch):
    """The issue's staged workflow, stopped between stages and continued: LoRA on the dense base -> merged ->
    GPTQ -> LoRA on the GPTQ checkpoint (kept as it is) under FSDP2 on 2 processes -> merged again."""
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "train.jsonl")
    recipe = recipe_dict(micro_model, Path("train.jsonl"), Path("unused"), max_steps=2)
    del recipe["train"]["output_dir"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": "runs", "stages": [
        {"name": "dense", "train": "recipe.yaml", "set": {"quantization.method": "none"}},
        {"name": "merged", "export": "dense", "dtype": "fp32"},
        {"name": "gptq", "quantize": "merged", "calibration": "train.jsonl", "group_size": 32},
        {"name": "qlora", "train": "recipe.yaml", "nproc": 2,
         "set": {"model.path": "{gptq}", "quantization.method": "checkpoint", "distributed.engine": "fsdp2"}},
        {"name": "final", "export": "qlora", "dtype": "fp32"}]}, sort_keys=False))
    lines: list[str] = []
    assert stages.plan(pipeline, gpus=2, nodes=1, gpu_mem=24 * 2**30, log=lines.append) == 0
    assert f"== stage 'qlora' (model: {micro_model}, 4-bit GPTQ in groups of 32, as stage 'gptq' will write it) ==" \
        in lines
    _, resolved = stages.load_pipeline(pipeline)
    planned = stages.planned_base(str(next(s.folder for s in resolved if s.name == "gptq")), resolved)[1]
    lines.clear()
    assert stages.run(pipeline, until="gptq", log=lines.append) == 0
    assert json.loads((tmp_path / "runs" / "gptq" / "config.json").read_text())["quantization_config"]
    # what the planner expected llm-compressor to write is what it wrote
    written = plan.read_model_spec(str(tmp_path / "runs" / "gptq"))
    assert (planned.checkpoint_format, planned.packed) == (written.checkpoint_format, written.packed)
    assert planned.packed and all(layout.bits == 4 and layout.group_size == 32 for _, layout in planned.packed)
    lines.clear()
    assert stages.run(pipeline, log=lines.append) == 0
    assert [line.endswith("skipped") for line in lines[:3]] == [True] * 3
    assert lines[3].startswith("stage 4/5 'qlora': qshard train recipe.yaml") and "--nproc=2" in lines[3]
    records = [json.loads(r) for r in (tmp_path / "runs" / "qlora" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert json.loads((tmp_path / "runs" / "final" / ".qshard-export.json").read_text())["check"]["passed"]


@pytest.fixture
def dense(micro_model, tmp_path) -> tuple[Path, Path]:
    return micro_model, write_rows(tmp_path / "rows.jsonl")


def test_a_missing_quantizer_environment_names_make_quantizers(dense, tmp_path, monkeypatch):
    monkeypatch.setenv("QSHARD_QUANT_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(QShardError, match="quantizer's environment is not installed") as e:
        quantize.quantize(str(dense[0]), str(tmp_path / "out"), calibration=str(dense[1]), group_size=32)
    assert "make quantizers" in e.value.fix


@pytest.mark.parametrize("case, message", [
    ("group", "model.layers.0.self_attn.q_proj has 64 input features, not a multiple of --group-size 48"),
    ("quantized", "is already quantized (compressed-tensors)"),
    ("inside", "is, lies inside or contains the model folder"),
    ("not-empty", "OUT_DIR"),
    ("calibration", "no-rows.jsonl"),
])
def test_bad_input_is_refused_before_the_quantizer_starts_and_nothing_is_touched(dense, gptq_model, tmp_path, case,
                                                                                  message):
    model, rows = dense
    out, group, calibration = tmp_path / "out", 32, str(rows)
    if case == "group":
        group = 48
    elif case == "quantized":
        model = gptq_model[0]
    elif case == "inside":
        out = model / "quantized"
    elif case == "not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "calibration":
        calibration = str(tmp_path / "no-rows.jsonl")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QShardError) as e:
        quantize.quantize(str(model), str(out), calibration=calibration, group_size=group)
    assert message in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (model / "quantized").exists()
    if case == "not-empty":
        assert (out / "notes.txt").read_text() == "mine"
    assert os.listdir(model)  # the model folder is as it was


def test_the_working_directory_is_never_an_output_folder(dense, tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", ".."):
        with pytest.raises(QShardError, match="working directory"):
            quantize.quantize(str(dense[0]), out, calibration=str(dense[1]), group_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "rows.jsonl"] and not any(work.iterdir())
