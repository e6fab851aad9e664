"""The streaming quantize-on-load loader against transformers + bitsandbytes loading the same folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qshard.errors import QShardError
from qshard.model.load import QuantSpec, load_model, open_base
from qshard.model.lora import resolve_targets

BNB = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                              bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "none": None,
}
SPECS = {"nf4": QuantSpec("nf4", True), "fp4": QuantSpec("fp4", False), "int8": QuantSpec("int8"),
         "none": QuantSpec("none")}


@pytest.mark.parametrize("arch", ["micro_model", "micro_qwen"])
@pytest.mark.parametrize("method", ["nf4", "fp4", "int8", "none"])
def test_loader_logits_equal_transformers_bitsandbytes(method, arch, request):
    folder = request.getfixturevalue(arch)
    ours = load_model(str(folder), dtype="float32", quant=SPECS[method]).train()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=BNB[method]).train()
    # train mode on both: in eval mode bitsandbytes repacks 4-bit weights for its CPU inference kernel.
    x = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ref(x).logits)


def test_every_linear_but_the_head_is_quantized(micro_qwen):
    model = load_model(str(micro_qwen), dtype="float32", quant=QuantSpec("nf4"))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith(("proj", "lm_head"))}
    assert kinds["lm_head"] == "Linear"
    assert set(kinds.values()) - {"Linear"} == {"Linear4bit"}
    assert sum(v == "Linear4bit" for v in kinds.values()) == 7 * model.config.num_hidden_layers
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # qwen2's q/k/v biases survive


def test_folder_without_config_json_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(QShardError, match="no config.json") as e:
        open_base(str(tmp_path))
    assert e.value.where == "model.path"


def test_folder_without_safetensors_is_named(micro_model, tmp_path):
    shutil.copy(micro_model / "config.json", tmp_path / "config.json")
    with pytest.raises(QShardError, match="no safetensors weights"):
        open_base(str(tmp_path))


def test_checkpoint_missing_a_tensor_is_named(micro_model, tmp_path):
    shutil.copytree(micro_model, tmp_path / "m")
    weights = load_file(str(micro_model / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QShardError, match=r"lacks 1 tensor.*layers\.1\.mlp\.down_proj"):
        load_model(str(tmp_path / "m"), quant=QuantSpec("nf4"))


def test_lora_targets_resolve_on_the_empty_skeleton(micro_model):
    _, skeleton = open_base(str(micro_model), quant=QuantSpec("nf4"))
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # nothing was read yet
    assert resolve_targets(skeleton, "all-linear") == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(QShardError, match="match no linear layer") as e:
        resolve_targets(skeleton, ["q_proj", "qkv_proj"])
    assert e.value.where == "lora.target_modules" and "q_proj" in e.value.fix


PTQ = Path(__file__).parent / "fixtures" / "ptq"


@pytest.mark.parametrize("fixture", sorted(p.name for p in PTQ.iterdir() if (p / "config.json").exists()))
def test_ptq_checkpoint_loads_its_own_layers_with_the_librarys_logits(fixture):
    ref = load_file(str(PTQ / fixture / "reference_logits.safetensors"))
    model = load_model(str(PTQ / fixture), dtype="float32", quant=QuantSpec("checkpoint"), log=lambda *_: None)
    linears = [m for n, m in model.named_modules() if n.endswith("proj")]
    assert linears and all(type(m).__name__ in ("GPTQLinear", "AWQLinear", "PackQuantizedLinear") for m in linears)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    # the libraries ran in float16 (gptqmodel, autoawq) or float32 (compressed-tensors)
    assert (logits - ref["logits"].float()).abs().max().item() < 2e-2


def test_ptq_to_nf4_conversion_reports_the_added_error():
    said = []
    model = load_model(str(PTQ / "gptq_llama_w4_g32_sym"), dtype="float32", quant=QuantSpec("nf4"), log=said.append)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    error = float(said[0].split("relative weight error of ")[1].split()[0])
    assert 0.01 < error < 0.2  # NF4 on top of 4-bit GPTQ: ~9% RMS here


def test_unsupported_checkpoint_quantization_is_named_before_loading(micro_model, tmp_path):
    shutil.copytree(micro_model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QShardError, match="'exl2' is not supported") as e:
        load_model(str(tmp_path / "m"), quant=QuantSpec("checkpoint"))
    assert "quant_method" in e.value.where


def test_method_checkpoint_on_a_dense_model_is_refused(micro_model):
    with pytest.raises(QShardError, match="not a GPTQ/AWQ/compressed-tensors checkpoint"):
        load_model(str(micro_model), quant=QuantSpec("checkpoint"))
