"""Training on a pre-quantized bitsandbytes 4-bit checkpoint (as transformers saves a `load_in_4bit` model,
and as `qshard export --format nf4` writes one), kept as it is with quantization.method `checkpoint`.

The reference is transformers itself: the same folder loaded by AutoModelForCausalLM (bitsandbytes'
Linear4bit on the CPU, computing in float32 off its AVX512-bf16 kernel, dense parts cast to float32).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.model.load import QuantSpec, load_model, open_base
from qshard.quant.bnb4bit import Linear4bit
from qshard.train import run
from tests.helpers import recipe_dict, run_cells, write_rows

QUIET = dict(log=lambda *_: None)
PROBE = [[1, 5, 7, 9, 11, 13, 40, 200], [3, 30, 300, 17, 2, 8, 64, 128]]
STATE = "weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def bnb_folder(micro_model, tmp_path_factory) -> Path:
    """The bf16 micro Llama loaded by transformers with BitsAndBytesConfig(nf4, double quant) and saved:
    14 Linear4bit layers, the embeddings, norms and lm_head in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("bnb") / "micro-nf4"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(micro_model, quantization_config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(out)
    return out


def transformers_reference(folder: Path):
    """The folder as transformers loads it, every float in float32 (bf16 -> fp32 is exact) and the 4-bit
    linears computing in float32 on bitsandbytes' plain CPU path (see tools/exportcheck.load_exported)."""
    from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    from bitsandbytes.nn import Params4bit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for module in model.modules():
        if isinstance(module, BnbLinear4bit):
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
            module.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        # transformers keeps a quantized model's dense parts in the checkpoint's dtype (bf16 here)
        if p.is_floating_point() and not isinstance(p, Params4bit):
            p.data = p.data.float()
    return model


def max_logit_diff(ours, reference) -> tuple[float, float]:
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
    return float((a - b).abs().max()), float(b.abs().max())


def stored_bytes_equal(model, folder: Path) -> int:
    """How many 4-bit layers hold the folder's tensors bit for bit (asserting every one does)."""
    stored = {}
    for file in folder.glob("*.safetensors"):
        stored |= load_file(str(file))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, layer in layers:
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        state = json.loads(bytes(stored[f"{name}.{STATE}"].tolist()))
        want = {"packed": stored[f"{name}.weight"], "absmax": stored[f"{name}.weight.absmax"],
                "nested_absmax": stored[f"{name}.weight.nested_absmax"],
                "offset": torch.tensor([state["nested_offset"]], dtype=torch.float32)}
        for pname, tensor in want.items():
            want = tensor.contiguous().view(torch.uint8).reshape(-1)
            assert torch.equal(getattr(layer, pname).detach().cpu(), want), (name, pname)
    return len(layers)


def _recipe(model: Path, root: Path, name: str, **train) -> dict:
    recipe = recipe_dict(model, write_rows(root / "train.jsonl"), root / name, **{"max_steps": 2, **train})
    recipe["quantization"]["method"] = "checkpoint"
    return recipe


def test_transformers_saved_nf4_folder_loads_bit_for_bit_and_matches_transformers(bnb_folder, tmp_path):
    """Every 4-bit parameter is the stored tensor's bytes; float32 logits equal transformers' (measured: 0)."""
    model = load_model(str(bnb_folder), dtype="float32", quant=QuantSpec("checkpoint"), **QUIET)
    assert stored_bytes_equal(model, bnb_folder) == 14
    worst, scale = max_logit_diff(model, transformers_reference(bnb_folder))
    print(f"max |logit - transformers| {worst:.2e} of max |logit| {scale:.2f}")
    assert worst <= 1e-5 * scale


def test_fp4_without_double_quant_in_bf16_storage_loads_bit_for_bit(micro_model, tmp_path):
    """The other variants transformers writes: fp4 codes, float32 block scales, the packed codes stored as
    bfloat16 words (bnb_4bit_quant_storage, as FSDP-QLoRA recipes set it): read as bytes, logits as transformers'."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    folder = tmp_path / "fp4"
    AutoModelForCausalLM.from_pretrained(micro_model, quantization_config=config).save_pretrained(folder)
    stored = load_file(str(folder / "model.safetensors"))
    model = load_model(str(folder), dtype="float32", quant=QuantSpec("checkpoint"), **QUIET)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14 and {(m.quant_type, m.double_quant) for m in layers.values()} == {("fp4", False)}
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    for name, layer in layers.items():
        assert torch.equal(layer.packed, stored[f"{name}.weight"].view(torch.uint8).reshape(-1))
        assert torch.equal(layer.absmax, stored[f"{name}.weight.absmax"].view(torch.uint8))
    worst, scale = max_logit_diff(model, transformers_reference(folder))
    print(f"fp4: max |logit - transformers| {worst:.2e} of max |logit| {scale:.2f}")
    assert worst <= 1e-5 * scale, worst


def test_training_on_a_transformers_saved_nf4_folder(bnb_folder, tmp_path):
    """Two steps on the stored layers: finite losses, the adapter trained, the base untouched bit for bit; the
    run exports dense in float32 within its check's 1e-4 of the largest logit. The stored QuantState says
    bf16, but bitsandbytes' matmul applies the unrounded float32 products, which the export must merge into
    (Linear4bit.dequantize(float32); rounded to bf16 first the check misses by 0.03 = 0.8% of the largest logit)."""
    from qshard.tools.export import export

    outcome = run(parse_recipe(_recipe(bnb_folder, tmp_path, "run")), **QUIET)
    assert len(outcome.losses) == 2 and all(math.isfinite(x) for x in outcome.losses)
    assert stored_bytes_equal(outcome.model, bnb_folder) == 14
    adapter = load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)
    check = export(tmp_path / "run", tmp_path / "dense", dtype="fp32", **QUIET).check
    print(f"dense export of a run on the transformers-saved folder: max |logit difference| {check['max_abs_diff']:.2e}")
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 * check["max_abs_logit"]


def test_fsdp2_and_zero3_sharded_load_match_one_process(bnb_folder, tmp_path):
    """2 ranks, the base loaded sharded (each rank reads only its part of every stored tensor), micro-batch 2
    each: the losses equal one process's at micro-batch 4 within 1e-4 (the nf4 tolerance of test_engines)."""
    single = run(parse_recipe(_recipe(bnb_folder, tmp_path, "single", micro_batch_size=4)), **QUIET).losses
    cells = []
    for engine, distributed in (("fsdp2", {"engine": "fsdp2"}), ("zero3", {"engine": "deepspeed", "zero_stage": 3})):
        recipe = _recipe(bnb_folder, tmp_path, engine, micro_batch_size=2)
        recipe["distributed"] = distributed | {"shard_on_load": True}
        cells.append({"name": engine, "recipe": recipe})
    run_cells(tmp_path, cells, PROBE)
    for cell in cells:
        ranks = [json.loads((tmp_path / cell["name"] / f"result-rank{k}.json").read_text()) for k in range(2)]
        assert all("error" not in r for r in ranks), ranks
        assert ranks[0]["load"].startswith("loading the base sharded"), ranks[0]["load"]
        diffs = [abs(a - b) for a, b in zip(ranks[0]["losses"], single)]
        print(f"{cell['name']}: losses {ranks[0]['losses']} vs one process {single}: max diff {max(diffs):.2e}")
        assert len(diffs) == 2 and max(diffs) <= 1e-4, diffs


def test_export_nf4_then_train_again_on_the_export(micro_model, tmp_path):
    """The staged workflow: train on the dense micro model (nf4 on load), export --format nf4, train on the
    export kept as it is, export that run again. Its layers are the exported bytes, its logits transformers'
    on the folder, and the second export's own check (float32: 1e-4 of the largest logit) passes."""
    from qshard.tools.export import export

    first = _recipe(micro_model, tmp_path, "stage1")
    first["quantization"]["method"] = "nf4"
    run(parse_recipe(first), **QUIET)
    folder = tmp_path / "stage1-nf4"
    export(tmp_path / "stage1", folder, dtype="fp32", format="nf4", **QUIET)
    second = run(parse_recipe(_recipe(folder, tmp_path, "stage2")), **QUIET)
    assert all(math.isfinite(x) for x in second.losses)
    base = load_model(str(folder), dtype="float32", quant=QuantSpec("checkpoint"), **QUIET)
    assert stored_bytes_equal(base, folder) == 14
    worst, scale = max_logit_diff(base, transformers_reference(folder))
    print(f"export: max |logit - transformers| {worst:.2e} of max |logit| {scale:.2f}; losses {second.losses}")
    assert worst <= 1e-5 * scale, worst
    check = export(tmp_path / "stage2", tmp_path / "stage2-dense", dtype="fp32", **QUIET).check
    print(f"dense export of the second run: max |logit difference| {check['max_abs_diff']:.2e}")
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 * check["max_abs_logit"]


def test_nf4_method_on_a_bnb_folder_is_refused_naming_checkpoint(bnb_folder):
    with pytest.raises(QShardError, match="already quantized by bitsandbytes") as e:
        open_base(str(bnb_folder), quant=QuantSpec("nf4"))
    assert "quantization.method: checkpoint" in e.value.fix


def _copy_with(folder: Path, dest: Path, change) -> Path:
    shutil.copytree(folder, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_bnb_8bit_folder_is_refused_naming_the_option(bnb_folder, tmp_path):
    dest = tmp_path / "int8"
    shutil.copytree(bnb_folder, dest)
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] |= {"load_in_8bit": True, "load_in_4bit": False, "_load_in_8bit": True,
                                      "_load_in_4bit": False}
    (dest / "config.json").write_text(json.dumps(config))
    with pytest.raises(QShardError, match="8-bit checkpoints") as e:
        open_base(str(dest), quant=QuantSpec("checkpoint"))
    assert "quantization_config.load_in_8bit" in e.value.where and "int8" in e.value.fix


@pytest.mark.parametrize("damage", ["corrupt", "missing", "wrong-shape"])
def test_damaged_quant_state_is_named_before_any_weight_is_read(bnb_folder, tmp_path, monkeypatch, damage):
    """A QuantState JSON that is not JSON, absent, or describing another shape: a QShardError naming the
    tensor and the file, raised while the skeleton is checked (open_base reads no weight)."""
    from qshard.model import load

    key = f"model.layers.1.mlp.up_proj.{STATE}"

    def change(tensors):
        if damage == "corrupt":
            tensors[key] = torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 6'), dtype=torch.uint8)
        elif damage == "missing":
            del tensors[key]
        else:
            state = json.loads(bytes(tensors[key].tolist()))
            tensors[key] = torch.tensor(list(json.dumps(state | {"shape": [64, 64]}).encode()), dtype=torch.uint8)

    dest = _copy_with(bnb_folder, tmp_path / damage, change)
    read = []
    rows = load.CheckpointReader.rows
    monkeypatch.setattr(load.CheckpointReader, "rows",
                        lambda self, k, *a, **kw: read.append(k) or rows(self, k, *a, **kw))
    with pytest.raises(QShardError) as e:
        open_base(str(dest), quant=QuantSpec("checkpoint"))
    message = str(e.value)
    print(message)
    assert "model.layers.1.mlp.up_proj" in message and "model.safetensors" in e.value.where
    assert {"corrupt": "not a bitsandbytes QuantState JSON", "missing": "has no",
            "wrong-shape": "bytes"}[damage] in message
    assert e.value.fix
    # only code books, JSON and tiny tensors were read (load.stand_in), no packed weight or block scales
    assert read and not [k for k in read if k.endswith((".weight", ".weight.absmax"))], read
