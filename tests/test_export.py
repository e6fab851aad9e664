"""`qshard export`: a run's adapter merged into the base it was trained on, written as a HF model folder.

Every export here runs its own check (the folder loaded by transformers in float32 against qshard's base
+ adapter on three prompts); the tests assert its figure, and independently compare the streamed output
with PEFT's whole-model merge_and_unload on a dense base.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qshard.config import parse_recipe
from qshard.tools.export import MARKER, export
from qshard.tools.tiny import init_tiny
from qshard.train import run
from tests.helpers import REPO, recipe_dict, write_rows
from tests.hostile import assert_refused, changed, run_cli, snapshot

GPTQ = REPO / "tests" / "fixtures" / "ptq" / "gptq_llama_w4_g32_sym"
QUIET = dict(log=lambda *_: None)


def _train(model: Path, root: Path, name: str, method: str, dtype: str = "float32", dora: bool = False,
           rslora: bool = False) -> Path:
    data = write_rows(root / "train.jsonl")
    recipe = recipe_dict(model, data, root / name, max_steps=4, sample_tokens=0)
    recipe["quantization"]["method"] = method
    recipe["model"]["dtype"] = dtype
    recipe["lora"]["use_dora"] = dora
    recipe["lora"]["use_rslora"] = rslora
    run(parse_recipe(recipe), **QUIET)
    return root / name


@pytest.fixture(scope="module")
def runs(micro_model, tmp_path_factory) -> dict[str, Path]:
    """Finished runs on the micro Llama: nf4 (fp32 dense parts), int8, DoRA on a dense fp32 base and on nf4, rsLoRA
    on a dense fp32 base."""
    root = tmp_path_factory.mktemp("export-runs")
    return {"nf4": _train(micro_model, root, "nf4", "nf4"), "int8": _train(micro_model, root, "int8", "int8"),
            "dora": _train(micro_model, root, "dora", "none", dora=True),
            "nf4-dora": _train(micro_model, root, "nf4-dora", "nf4", dora=True),
            "nf4-bf16": _train(micro_model, root, "nf4-bf16", "nf4", dtype="bfloat16"),
            "rslora": _train(micro_model, root, "rslora", "none", rslora=True)}


def _loads_in_transformers(out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("method, dtype", [("nf4", "fp32"), ("nf4", "bf16"), ("int8", "fp16"), ("dora", "fp32"),
                                           ("nf4-dora", "fp32"), ("nf4-bf16", "fp32")])
def test_export_reproduces_the_runs_base_plus_adapter(runs, method, dtype, tmp_path):
    """fp32: within 1e-4 of the largest logit (measured ~1e-6); bf16/fp16 within the rounding bound
    export.tolerance derives (8 u sqrt(layers + 1): 0.054 bf16, 0.0068 fp16 for 2 layers). nf4-bf16: an NF4 run
    over a bf16 model, exported in float32: its 4-bit layers' float32 forward applied the unrounded code x scale
    products, and so must the export's base (merge.exact; rounded to bf16 first, the check missed: 0.031 vs a
    tolerance of 3.9e-4)."""
    result = export(runs[method], tmp_path / "out", dtype=dtype, **QUIET)
    check = result.check
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    if dtype == "fp32":
        assert check["max_abs_diff"] <= 1e-4 * check["max_abs_logit"]
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == {"fp32": "float32", "bf16": "bfloat16",
                                                                         "fp16": "float16"}[dtype]
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", MARKER} <= set(os.listdir(out))
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(result.layers) == 14 and all(0 < f["delta_rel"] < 1 for f in result.layers.values())
    _loads_in_transformers(out, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


@pytest.mark.parametrize("method", ["dora", "rslora"])
def test_streamed_merge_equals_peft_merge_and_unload_on_a_dense_base(runs, micro_model, method, tmp_path):
    """DoRA, and rsLoRA (scaled by alpha / sqrt(r), as its adapter_config.json says), on a dense fp32 base: every
    tensor of the export equals PEFT's whole-model merge to fp32 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "rslora":
        assert json.loads((runs[method] / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    export(runs[method], tmp_path / "out", dtype="fp32", check=False, **QUIET)
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(runs[method] / "adapter")).merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    worst = max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in ours)
    assert worst < 1e-6, worst


def test_shards_are_cut_at_max_shard_size_and_load(runs, tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", str(runs["nf4"]), str(out), "--dtype", "fp32", "--max-shard-size", "40KB",
                     "--no-check")
    assert result.code == 0, result.err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:  # at most 40 KB of tensors, or one tensor larger than that alone (the 131 KB embedding)
        tensors = [k for k, f in index["weight_map"].items() if f == file]
        assert len(tensors) == 1 or (out / file).stat().st_size < 40_000 + 4_000, (file, tensors)
    _loads_in_transformers(out, torch.float32)


def test_merge_into_the_original_reports_the_quantization_gap(runs, micro_model, tmp_path):
    result = run_cli("export", str(runs["nf4"]), str(tmp_path / "out"), "--dtype", "fp32",
                     "--merge-into", str(micro_model))
    assert result.code == 0, result.err
    assert "||W_original - W_dequantized|| / ||LoRA delta||" in result.out and "check passed" in result.out
    layers = json.loads((tmp_path / "out" / MARKER).read_text())["layers"]
    # NF4 of a random weight errs by ~10% of it; a 4-step adapter is ~10% of the weight: the gap is order 1
    assert all(0.1 < f["quant_gap_rel"] < 10 for f in layers.values())


def test_unfinished_run_is_refused_naming_its_checkpoint_which_exports(runs, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(runs["nf4"], partial)
    shutil.rmtree(partial / "adapter")
    before = snapshot(partial)
    result = run_cli("export", str(partial), str(tmp_path / "out"))
    assert_refused(result, "no finished adapter", f"qshard export {partial / 'checkpoint-4'}")
    assert changed(before, snapshot(partial)) == [] and not (tmp_path / "out").exists()
    assert run_cli("export", str(partial / "checkpoint-4"), str(tmp_path / "out"), "--dtype", "fp32").code == 0
    weights = partial / "checkpoint-4" / "adapter" / "adapter_model.safetensors"
    changed_bytes = bytearray(weights.read_bytes())
    changed_bytes[-1] ^= 0xFF  # a changed adapter: its sha256 no longer fits the manifest
    weights.write_bytes(bytes(changed_bytes))
    assert_refused(run_cli("export", str(partial / "checkpoint-4"), str(tmp_path / "out2")),
                   "not an intact checkpoint", "adapter_model.safetensors")


def test_adapter_that_does_not_fit_the_base_is_refused_naming_module_and_shapes(runs, tmp_path):
    wider = init_tiny(tmp_path / "tiny", size="tiny")
    moved = tmp_path / "run"
    shutil.copytree(runs["nf4"], moved)
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["model"]["path"] = str(wider)
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = snapshot(moved, wider)
    result = run_cli("export", str(moved), str(tmp_path / "out"))
    assert_refused(result, "model.layers.0.mlp.down_proj", "[out 128, in 256]", "adapter_model.safetensors")
    assert changed(before, snapshot(moved, wider)) == [] and not (tmp_path / "out").exists()


def test_merge_into_another_architecture_is_refused(runs, tmp_path):
    wider = init_tiny(tmp_path / "tiny", size="tiny")
    result = run_cli("export", str(runs["nf4"]), str(tmp_path / "out"), "--merge-into", str(wider))
    assert_refused(result, "--merge-into", "lm_head.weight", "[512, 64]", "[512, 128]")
    assert not (tmp_path / "out").exists()


def test_out_dir_rules_protect_user_files(runs, micro_model, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    inputs = snapshot(runs["nf4"], micro_model, user)
    assert_refused(run_cli("export", str(runs["nf4"]), str(user)), "not empty", "--overwrite")
    assert_refused(run_cli("export", str(runs["nf4"]), str(user), "--overwrite"), "notes.txt")
    assert_refused(run_cli("export", str(runs["nf4"]), str(runs["nf4"] / "adapter" / "merged")), "adapter folder")
    assert_refused(run_cli("export", str(runs["nf4"]), str(micro_model)), "is the base model folder")
    assert_refused(run_cli("export", str(runs["nf4"]), str(runs["nf4"])), "run folder")
    assert changed(inputs, snapshot(runs["nf4"], micro_model, user)) == []


def test_overwrite_replaces_only_an_earlier_export(runs, tmp_path):
    out = tmp_path / "out"
    assert run_cli("export", str(runs["nf4"]), str(out), "--no-check").code == 0
    first = snapshot(out)
    assert_refused(run_cli("export", str(runs["nf4"]), str(out), "--no-check"), "not empty")
    assert changed(first, snapshot(out)) == []
    assert run_cli("export", str(runs["nf4"]), str(out), "--no-check", "--dtype", "fp32", "--overwrite").code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    (out / "extra.txt").write_text("mine")  # now the folder holds a file export did not write
    assert_refused(run_cli("export", str(runs["nf4"]), str(out), "--overwrite"), "extra.txt")
    assert (out / "extra.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("method", ["checkpoint", "nf4"])
def test_gptq_checkpoint_run_exports_its_dequantized_merge(method, tmp_path):
    """A run on a GPTQ checkpoint kept as it is (method checkpoint: merged into its dequantized weights) or
    converted to NF4 by the loader (merged into those NF4 weights, dequantized)."""
    run_dir = _train(GPTQ, tmp_path, "gptq", method)
    result = export(run_dir, tmp_path / "out", dtype="fp32", **QUIET)
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-4 * result.check["max_abs_logit"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and len(result.layers) == 14


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_two_rank_sharded_run_exports_like_any_other(micro_model, engine, tmp_path):
    """The adapter is gathered whole before it is saved (engine.adapter_state_dict), so a sharded run's
    folder is the same format: FSDP2 and ZeRO-3 runs on 2 ranks export and pass the check."""
    data = write_rows(tmp_path / "train.jsonl")
    recipe = recipe_dict(micro_model, data, tmp_path / engine, max_steps=2, micro_batch_size=2, sample_tokens=0)
    recipe["distributed"] = {"engine": "fsdp2"} if engine == "fsdp2" else {"engine": "deepspeed", "zero_stage": 3}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "qshard.cli", "train", str(tmp_path / "r.yaml"), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = export(tmp_path / engine, tmp_path / "out", dtype="fp32", **QUIET)
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-4 * result.check["max_abs_logit"]


def test_relative_model_path_resolves_through_the_adapters_record(runs, micro_model, tmp_path):
    """recipe.yaml keeps model.path as written (relative to where training ran); the finished adapter
    records it absolute, so export works from any folder."""
    moved = tmp_path / "run"
    shutil.copytree(runs["nf4"], moved)
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["model"]["path"] = os.path.relpath(micro_model, REPO)
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("export", str(moved), str(tmp_path / "out"), "--no-check", cwd=tmp_path)
    assert result.code == 0, result.err


# -- --format nf4 ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nf4_export(runs, tmp_path_factory) -> tuple[Path, object]:
    """The nf4 run exported as NF4 with float32 dense parts (as the run trained), and its Result."""
    out = tmp_path_factory.mktemp("nf4-export") / "out"
    return out, export(runs["nf4"], out, dtype="fp32", format="nf4", **QUIET)


def test_nf4_export_loads_as_bnb_4bit_and_matches_the_requantized_merge_exactly(nf4_export):
    """The check's reference holds bitsandbytes' quantize + dequantize of the merged weights, so the float32
    export must match it to float32 rounding (measured: 0); the gap to the unquantized merge is NF4's
    rounding (measured ~0.44 of the largest logit on this random micro model), reported, not judged."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out, result = nf4_export
    check = result.check
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 * check["max_abs_logit"]
    assert 0 < check["unquantized_max_abs_diff"] and check["unquantized_relative_diff"] < 1
    marker = json.loads((out / MARKER).read_text())
    assert marker["weights"] == "nf4" and marker["check"]["unquantized_max_abs_diff"] == check["unquantized_max_abs_diff"]
    # NF4 rounding of W + delta is about as large as a 4-step adapter's delta (measured 0.93-1.06)
    assert len(result.layers) == 14 and all(0.1 < f["requant_rel"] < 10 for f in result.layers.values())
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["dtype"] == "float32" and qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["bnb_4bit_compute_dtype"],
            qc["bnb_4bit_quant_storage"], qc["llm_int8_skip_modules"]) == ("nf4", True, "float32", "uint8", ["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert kinds.count(bnb.nn.Linear4bit) == 14 and type(model.lm_head) is torch.nn.Linear


def test_nf4_tensors_are_bitsandbytes_quantize_4bit_of_the_merged_weights(runs, nf4_export, tmp_path):
    """Every NF4 weight's tensors equal quantize_4bit(W + delta) of the dense export (itself checked against
    PEFT's merge above), bit for bit; the QuantState JSON is bitsandbytes' own, padded with spaces."""
    import bitsandbytes.functional as bnbF
    from bitsandbytes.utils import unpack_tensor_to_dict

    export(runs["nf4"], tmp_path / "dense", dtype="fp32", check=False, **QUIET)
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    ours = load_file(str(nf4_export[0] / "model.safetensors"))
    quantized = sorted(k.removesuffix(".absmax") for k in ours if k.endswith(".absmax"))
    assert len(quantized) == 14
    for name in quantized:
        packed, state = bnbF.quantize_4bit(dense[name], blocksize=64, compress_statistics=True, quant_type="nf4")
        want = {name: packed} | {f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}
        json_key = f"{name}.quant_state.bitsandbytes__nf4"
        assert unpack_tensor_to_dict(ours.pop(json_key)) == unpack_tensor_to_dict(want.pop(json_key))
        assert all(torch.equal(ours.pop(k), v) for k, v in want.items()), name
    assert all(torch.equal(ours[k], dense[k]) for k in ours)  # embeddings, norms, lm_head: as a dense export


@pytest.mark.parametrize("double_quant", [True, False])
def test_zero_adapter_nf4_export_gives_back_the_bases_nf4_codes(runs, micro_model, double_quant, tmp_path):
    """NF4 of an NF4-dequantized weight: every block's largest value is its scale times code 1.0, so the scales
    and 4-bit codes come back unchanged. Without double quant that is every tensor, bit for bit; with it the
    codes only: the block scales are double-quantized again around a new offset (the mean of the dequantized
    scales), which moves the dequantized weight by up to 1.9e-3 of its largest value here (measured; float32)."""
    import bitsandbytes.functional as bnbF
    from safetensors.torch import save_file

    moved = tmp_path / "run"
    shutil.copytree(runs["nf4"], moved)
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["quantization"]["double_quant"] = double_quant
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    weights = moved / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in load_file(str(weights)).items()},
              str(weights))
    export(moved, tmp_path / "out", dtype="fp32", format="nf4", check=False, **QUIET)
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(micro_model / "model.safetensors"))
    names, worst = [k.removesuffix(".absmax") for k in ours if k.endswith(".absmax")], 0.0
    for name in names:
        packed, state = bnbF.quantize_4bit(base[name].float(), blocksize=64, compress_statistics=double_quant,
                                           quant_type="nf4")
        assert torch.equal(ours[name], packed), name
        theirs = state.as_dict(packed=True)
        mine = {k: ours[f"{name}.{k}"] for k in theirs}
        if not double_quant:
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
            continue
        mine = bnbF.QuantState.from_dict(mine, device=torch.device("cpu"))
        gap = bnbF.dequantize_4bit(packed, mine) - bnbF.dequantize_4bit(packed, state)
        worst = max(worst, float(gap.abs().max() / base[name].abs().max()))
    assert len(names) == 14 and worst < 5e-3, worst


@pytest.mark.parametrize("method", ["nf4-dora", "int8", "dora", "rslora"])
def test_nf4_export_of_dora_int8_and_dense_runs_matches_the_requantized_merge(runs, method, tmp_path):
    """DoRA's magnitude, an int8 base (its linears become NF4) and a dense base (the linears an nf4 run
    would quantize): each within float32 rounding of the quantize-dequantized merge (measured: 0)."""
    result = export(runs[method], tmp_path / "out", dtype="fp32", format="nf4", **QUIET)
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-4 * result.check["max_abs_logit"]
    assert sum(k.endswith(".absmax") for k in load_file(str(tmp_path / "out" / "model.safetensors"))) == 14


def test_nf4_export_cut_into_shards_splitting_a_weight_from_its_state_loads(runs, tmp_path):
    result = run_cli("export", str(runs["nf4"]), str(tmp_path / "out"), "--dtype", "fp32", "--format", "nf4",
                     "--max-shard-size", "3KB")
    assert result.code == 0, result.err
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    apart = [k for k in weight_map if k.endswith(".absmax") and weight_map[k] != weight_map[k.removesuffix(".absmax")]]
    assert len(set(weight_map.values())) > 10 and apart and "check passed: max |logit difference| 0 " in result.out


def test_bf16_nf4_export_on_the_cli_prints_the_requantization_error_per_layer(runs, tmp_path):
    result = run_cli("export", str(runs["nf4"]), str(tmp_path / "out"), "--format", "nf4")
    assert result.code == 0, result.err
    assert "check passed" in result.out and "re-quantization: max |logit difference|" in result.out
    assert result.out.count("    model.layers.") == 14  # ||Q(W + delta) - (W + delta)|| / ||LoRA delta|| per layer
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"


def test_qshard_reads_its_nf4_export_as_it_is_and_refuses_to_requantize_it(nf4_export):
    """With quantization.method checkpoint qshard keeps the export's NF4 layers (their parameters are the
    stored bytes; tests/test_prequantized_bnb.py trains on such folders); nf4 would dequantize and quantize
    them again, so it is refused, naming checkpoint."""
    from qshard.errors import QShardError
    from qshard.model.load import QuantSpec, load_model, open_base
    from qshard.quant.bnb4bit import Linear4bit

    stored = load_file(str(nf4_export[0] / "model.safetensors"))
    model = load_model(str(nf4_export[0]), quant=QuantSpec("checkpoint"), **QUIET)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14 and all(torch.equal(m.packed, stored[f"{n}.weight"].view(-1)) and
                                     torch.equal(m.absmax, stored[f"{n}.weight.absmax"]) for n, m in layers.items())
    with pytest.raises(QShardError, match="already quantized by bitsandbytes"):
        open_base(str(nf4_export[0]))


def test_unknown_export_format_is_refused_naming_the_supported_ones(runs, tmp_path):
    from qshard.errors import QShardError

    assert_refused(run_cli("export", str(runs["nf4"]), str(tmp_path / "out"), "--format", "gptq"), "dense", "nf4")
    with pytest.raises(QShardError, match="dense, nf4"):
        export(runs["nf4"], tmp_path / "out", format="gptq", **QUIET)
    assert not (tmp_path / "out").exists()
