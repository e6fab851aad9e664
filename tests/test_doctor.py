"""`qshard doctor`: each check with injected environment facts (what this CPU machine cannot have), and
the real environment of this machine."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import replace

import pytest
import torch
import yaml

from qshard.cli import main
from qshard.config import load_recipe
from qshard.tools import doctor
from qshard.tools.doctor import GPU, Environment

GOOD = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "accelerate": "1.15.0",
        "bitsandbytes": "0.50.2", "deepspeed": "0.19.8", "torchao": None}
RTX_2080_TI = GPU("NVIDIA GeForce RTX 2080 Ti", 11 * 2 ** 30, (7, 5))
RTX_4090 = GPU("NVIDIA GeForce RTX 4090", 24 * 2 ** 30, (8, 9))


def gpu_env(*gpus: GPU, **changes) -> Environment:
    env = Environment(versions=dict(GOOD), cuda_version="12.8", gpus=list(gpus), nccl=True,
                      bnb_devices={"cuda": "ok", "cpu": "ok"}, free_disk=500 * 2 ** 30)
    return replace(env, **changes)


@pytest.fixture
def recipe_file(tmp_path, micro_model, alpaca_file):
    def make(**sections):
        raw = {"model": {"path": str(micro_model)}, "data": {"path": str(alpaca_file), "max_length": 64},
               "train": {"output_dir": str(tmp_path / "out")}}
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path
    return make


def fatal(problems):
    return [p for p in problems if p.fatal]


def test_bf16_on_rtx_2080_ti_is_told_to_use_fp16(recipe_file):
    recipe = load_recipe(recipe_file(train={"precision": "bf16"}))
    problems = fatal(doctor.diagnose(gpu_env(RTX_2080_TI), recipe))
    assert len(problems) == 1
    assert "compute capability 8.0" in problems[0].what and "7.5" in problems[0].what
    assert "fp16" in problems[0].fix and problems[0].where == "train.precision"
    assert not fatal(doctor.diagnose(gpu_env(RTX_4090), recipe))


def test_versions_below_qshards_declared_minimum_are_fatal(recipe_file):
    """doctor's minimums are pyproject's own lower bounds (one list for pip and doctor)."""
    minimum = doctor.minimum_versions()
    assert minimum["torch"] == "2.6" and minimum["transformers"] == "4.56" and minimum["peft"] == "0.17"
    env = gpu_env(RTX_4090, RTX_4090, versions={**GOOD, "transformers": "4.44.2", "peft": "0.12.0"})
    found = fatal(doctor.check_versions(env, load_recipe(recipe_file(distributed={"engine": "ddp"}))))
    assert {p.where for p in found} == {"transformers", "peft"}
    assert any("transformers>=4.56" in p.fix for p in found) and any("peft>=0.17" in p.fix for p in found)


def test_missing_deepspeed_and_bitsandbytes_are_fatal_when_the_recipe_needs_them(recipe_file):
    env = gpu_env(RTX_4090, RTX_4090, versions={**GOOD, "deepspeed": None, "bitsandbytes": None})
    recipe = load_recipe(recipe_file(distributed={"engine": "deepspeed", "zero_stage": 2}))
    assert {p.where for p in fatal(doctor.diagnose(env, recipe))} == {"deepspeed", "bitsandbytes"}
    plain = load_recipe(recipe_file(quantization={"method": "none"}))
    assert not fatal(doctor.diagnose(env, plain))


def test_old_torch_is_fatal(recipe_file):
    env = gpu_env(RTX_4090, versions={**GOOD, "torch": "2.5.1+cu121"})
    assert [p.where for p in fatal(doctor.check_versions(env, None))] == ["torch"]
    assert doctor.parse_version("2.5.1+cu121") == (2, 5, 1)
    assert doctor.parse_version("0.12.1.dev0") == (0, 12, 1)


def test_broken_bitsandbytes_backend_is_reported_with_its_error(recipe_file):
    env = gpu_env(RTX_4090, bnb_devices={"cuda": "RuntimeError: CUDA Setup failed", "cpu": "ok"})
    problems = fatal(doctor.diagnose(env, load_recipe(recipe_file())))
    assert len(problems) == 1 and "CUDA Setup failed" in problems[0].what


def test_multi_gpu_engine_without_nccl_is_fatal(recipe_file):
    env = gpu_env(RTX_4090, RTX_4090, nccl=False)
    problems = fatal(doctor.diagnose(env, load_recipe(recipe_file(distributed={"engine": "fsdp2"}))))
    assert [p.where for p in problems] == ["distributed.engine"]


def test_full_disk_is_fatal(recipe_file):
    problems = fatal(doctor.diagnose(gpu_env(RTX_4090, free_disk=1000), load_recipe(recipe_file())))
    assert [p.where for p in problems] == ["train.output_dir"]


def test_predicted_out_of_memory_names_a_configuration_that_fits(tmp_path, alpaca_file):
    from tests.test_plan import LLAMA3_70B, write_model_dir

    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    raw = {"model": {"path": str(model)}, "data": {"path": str(alpaca_file), "max_length": 2048},
           "train": {"output_dir": str(tmp_path / "out"), "micro_batch_size": 1},
           "distributed": {"engine": "ddp"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    env = gpu_env(*[GPU("NVIDIA A100-SXM4-40GB", 40 * 2 ** 30, (8, 0))] * 8)
    problems = fatal(doctor.diagnose(env, load_recipe(tmp_path / "r.yaml")))
    # the folder holds only config.json: train would refuse it too, and doctor says so first
    assert "no safetensors weights" in problems[0].what
    memory = [p for p in problems if "exceeds the 40.00 GiB" in p.what]
    assert len(memory) == 1 and ("zero3" in memory[0].fix or "fsdp2" in memory[0].fix)


def test_every_problem_is_printed_at_once_and_exit_code_is_1(recipe_file, tmp_path, capsys, monkeypatch):
    path = recipe_file(train={"precision": "bf16"}, lora={"use_dora": True},
                       data={"path": str(tmp_path / "missing.jsonl")},
                       distributed={"engine": "deepspeed", "zero_stage": 3})
    monkeypatch.setattr(doctor, "gather", lambda output_dir=None: gpu_env(RTX_2080_TI, RTX_2080_TI))
    assert doctor.main(str(path)) == 1
    out = capsys.readouterr().out
    assert out.count("ERROR:") == 3, out
    for needle in ("use train.precision: fp16", "lora.use_dora cannot be used with zero3", "missing.jsonl"):
        assert needle in out


@pytest.mark.parametrize("precision,compute", [("bf16", "auto"), ("fp32", "bfloat16")])
def test_bf16_on_a_cpu_without_native_bf16_is_a_warning_naming_the_options(recipe_file, precision, compute):
    """bf16 matmuls ran 200-300x slower than fp32 on an AVX2-only CPU (torch 2.13): the recipe's
    precision or its quantized layers' compute dtype is named, with the options that avoid it."""
    recipe = load_recipe(recipe_file(train={"precision": precision}, quantization={"compute_dtype": compute}))
    slow = Environment(versions=dict(GOOD), cpu_half_slowdown={"bfloat16": 230.0, "float16": 180.0})
    found = [p for p in doctor.diagnose(slow, recipe) if "matrix products" in p.what]
    assert len(found) == 1 and not found[0].fatal and found[0].where == "train.precision"
    assert "bfloat16 matrix products run 230x slower than float32" in found[0].what
    assert "train.precision: fp32" in found[0].fix and "quantization.compute_dtype: float32" in found[0].fix
    fast = replace(slow, cpu_half_slowdown={"bfloat16": 1.6, "float16": 3.0})
    assert not [p for p in doctor.diagnose(fast, recipe) if "matrix products" in p.what]
    assert not [p for p in doctor.diagnose(gpu_env(RTX_4090), recipe) if "matrix products" in p.what]


def test_a_float32_run_never_probes_half_precision():
    from qshard.precision import cpu_half_warning

    def probe(dtype):
        raise AssertionError(f"probed {dtype}")

    assert cpu_half_warning(torch.device("cpu"), {torch.float32}, slowdown=probe) is None
    assert cpu_half_warning(torch.device("cuda", 0), {torch.bfloat16}, slowdown=probe) is None


# -- the real environment ---------------------------------------------------------------------------

def test_gather_reads_this_machine():
    env = doctor.gather()
    assert env.versions["torch"] == importlib.metadata.version("torch")
    assert env.versions["peft"] == importlib.metadata.version("peft")
    assert len(env.gpus) == torch.cuda.device_count()
    assert env.bnb_devices.get("cpu") == "ok"  # bitsandbytes' CPU backend quantizes here
    assert env.free_disk and env.free_disk > 0
    if not env.gpus:  # measured, not read from CPU flags
        assert set(env.cpu_half_slowdown) == {"bfloat16"}
        assert all(0 < f < float("inf") for f in env.cpu_half_slowdown.values())


def test_doctor_command_on_this_machine(recipe_file, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "CPU bfloat16  matrix products" in out
    assert main(["doctor", str(recipe_file())]) == 0
    assert main(["doctor", str(recipe_file(distributed={"engine": "deepspeed", "zero_stage": 3},
                                           lora={"use_dora": True}))]) == 1


def test_doctor_reports_an_invalid_recipe_as_a_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"model": {"path": "x"}, "data": {"path": "y"}, "train": {"micro_batch_size": 0}}))
    assert main(["doctor", str(bad)]) == 1
    assert "train.micro_batch_size" in capsys.readouterr().out


@pytest.mark.parametrize("fixture", ["gptq_llama_w4_g32_sym", "autoawq_llama_w4_g64_zp", "ct_llama_w4a16_g32_sym"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_doctor_finds_no_error_in_a_ptq_recipe_that_train_accepts(fixture, engine, tmp_path, alpaca_file, capsys):
    """Once a false "unknown combination engine=ddp base=none" for every PTQ recipe: doctor and train
    now run the same checks (qshard.validate.check_run), so a recipe train accepts gets 0 errors."""
    from pathlib import Path

    from qshard import validate

    model = Path(__file__).parent / "fixtures" / "ptq" / fixture
    raw = {"model": {"path": str(model)}, "quantization": {"method": "checkpoint"},
           "data": {"path": str(alpaca_file), "max_length": 64}, "train": {"output_dir": str(tmp_path / "out")},
           "distributed": {"engine": engine}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    checked = validate.check_run(load_recipe(tmp_path / "r.yaml"), validate.Launch(world_size=2), say=lambda *_: None)
    assert checked.problems == [] and checked.base in ("gptq", "awq", "compressed-tensors")
    assert main(["doctor", str(tmp_path / "r.yaml")]) == 0
    assert "0 error(s)" in capsys.readouterr().out
