"""End-to-end QLoRA on one process: it learns, the base stays frozen, the adapter is a real PEFT adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qshard.config import load_recipe, parse_recipe
from qshard.model.load import QuantSpec, load_model
from qshard.model.lora import attach_lora, resolve_targets
from qshard.train import run
from tests.helpers import recipe_dict, write_rows


@pytest.fixture(scope="module")
def qlora_run(micro_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_rows(data)
    out = tmp_path_factory.mktemp("runs") / "qlora"
    recipe = parse_recipe(recipe_dict(micro_model, data, out, max_steps=30, learning_rate=1e-2, log_every=1,
                                      save_every=10))
    return recipe, run(recipe)


def test_qlora_memorises_a_small_dataset(qlora_run):
    _, outcome = qlora_run
    assert outcome.steps == 30
    first, last = outcome.losses[0], sum(outcome.losses[-3:]) / 3
    assert last < 0.3 * first, (first, last)


def test_base_weights_are_bit_identical_after_training(qlora_run, micro_model):
    recipe, outcome = qlora_run
    fresh = load_model(str(micro_model), dtype="float32", quant=QuantSpec("nf4"))
    trained = outcome.model.get_base_model()
    base = {n.replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}
    fresh_params = dict(fresh.named_parameters())
    assert base.keys() == fresh_params.keys()
    assert all(torch.equal(base[n], fresh_params[n]) for n in base)
    assert not any(p.requires_grad for p in base.values())


def test_every_lora_tensor_trained(qlora_run, micro_model):
    """Each saved tensor differs from its seeded initial value (so it received non-zero gradients;
    the loop's gradient-flow check also asserted that during steps 1-2)."""
    recipe, outcome = qlora_run
    base = load_model(str(micro_model), dtype="float32", quant=QuantSpec("nf4"))
    initial = attach_lora(base, r=8, alpha=16, dropout=0.0, targets=resolve_targets(base, "all-linear"),
                          use_dora=False, seed=0)
    from peft import get_peft_model_state_dict

    before = get_peft_model_state_dict(initial)
    after = load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))
    assert after.keys() == before.keys() and len(after) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    unchanged = [k for k in after if torch.equal(after[k], before[k])]
    assert unchanged == []


def test_saved_adapter_reloads_in_peft_with_the_same_logits(qlora_run, micro_model):
    _, outcome = qlora_run
    base = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    reloaded = PeftModel.from_pretrained(base, str(outcome.adapter_dir)).train()  # train: see test_load
    ours = outcome.model.train()
    x = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(x).logits, reloaded(x).logits
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()  # bf16-level tolerance; fp32 here
    assert torch.allclose(a, b, atol=1e-5)


def test_final_adapter_folder_is_ready_to_share(qlora_run, micro_model, tmp_path, monkeypatch):
    """A model card, the tokenizer, a base path that resolves from anywhere, files readable like any
    other output (safetensors writes 0600); loaded from another working directory by PEFT's own loader."""
    import os
    import stat

    from peft import PeftConfig
    from transformers import AutoTokenizer

    _, outcome = qlora_run
    adapter = outcome.adapter_dir
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "train loss:" in card
    config = PeftConfig.from_pretrained(str(adapter))
    assert config.base_model_name_or_path == str(micro_model.resolve())
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((adapter / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    monkeypatch.chdir(tmp_path)  # nowhere near where training ran
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    assert tokenizer("The sky is blue.").input_ids == AutoTokenizer.from_pretrained(micro_model)("The sky is blue.").input_ids
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=torch.float32)
    assert PeftModel.from_pretrained(base, str(adapter)) is not None


def test_run_folder_holds_recipe_metrics_and_checkpoints(qlora_run):
    recipe, outcome = qlora_run
    out = outcome.output_dir
    assert load_recipe(out / "recipe.yaml") == recipe
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "rss_mb"} <= r.keys() for r in lines)
    assert [r["loss"] for r in lines] == [round(x, 6) for x in outcome.losses]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]  # keep 2
    assert (out / "latest").read_text() == "checkpoint-30"


PTQ = __import__("pathlib").Path(__file__).parent / "fixtures" / "ptq"


@pytest.mark.parametrize("fixture", ["gptq_qwen2_w4_g32_asym_actorder", "autoawq_llama_w4_g64_zp",
                                     "ct_qwen2_w4a16_g32_asym"])
def test_lora_on_a_ptq_base_lowers_the_loss_and_leaves_the_base_bit_identical(fixture, tmp_path):
    data = tmp_path / "train.jsonl"
    write_rows(data)
    r = recipe_dict(PTQ / fixture, data, tmp_path / "out", max_steps=15, learning_rate=1e-2, sample_tokens=0)
    r["quantization"]["method"] = "checkpoint"
    outcome = run(parse_recipe(r), log=lambda *_: None)
    assert sum(outcome.losses[-3:]) / 3 < 0.7 * outcome.losses[0]
    fresh = load_model(str(PTQ / fixture), dtype="float32", quant=QuantSpec("checkpoint"), log=lambda *_: None)
    trained = {n.replace(".base_layer", ""): p for n, p in outcome.model.get_base_model().named_parameters()
               if "lora_" not in n}
    assert all(torch.equal(trained[n], p) for n, p in fresh.named_parameters())


def test_resume_refuses_a_recipe_change_that_alters_the_run(micro_model, tmp_path):
    from qshard.errors import QShardError

    data = tmp_path / "train.jsonl"
    write_rows(data)
    r = recipe_dict(micro_model, data, tmp_path / "out", max_steps=2, save_every=2, sample_tokens=0)
    run(parse_recipe(r), log=lambda *_: None)
    changed = json.loads(json.dumps(r))
    changed["lora"]["r"], changed["data"]["max_length"], changed["train"]["max_steps"] = 4, 32, 3
    with pytest.raises(QShardError, match="recipe changed in data.max_length, lora.r") as e:
        run(parse_recipe(changed), resume="auto", log=lambda *_: None)
    assert e.value.where == "--resume"
    said = []
    r["train"]["max_steps"] = 3  # harmless: allowed and logged
    assert run(parse_recipe(r), resume="auto", log=said.append).steps == 3
    assert any("resuming with changed settings: train.max_steps" in line for line in said)


def test_a_steps_graph_is_gone_before_its_optimizer_step(micro_model, tmp_path, monkeypatch):
    """bitsandbytes' int8 matmul keeps its MatmulLtState, which holds the int8 weight (under ZeRO-3 a gathered
    copy), as a plain attribute of its autograd context, which backward does not free. The loop drops the loss
    once backward has run, so by the optimizer step no state a matmul of that step received is alive (before,
    they lived until the next forward returned; the 4-bit layer keeps nothing in the first place:
    tests/test_quant.py). Each layer builds a fresh state per forward, so it lives only as long as what holds it."""
    import gc
    import weakref

    import bitsandbytes as bnb

    from qshard.observe import faults

    states, alive = [], []
    matmul, point = bnb.matmul, faults.point

    def recording(A, B, *args, state, **kwargs):
        states.append(weakref.ref(state))
        return matmul(A, B, *args, state=state, **kwargs)

    def at(kind, *args):
        if kind == "step":
            gc.collect()
            alive.append(sum(r() is not None for r in states))
            states.clear()
        return point(kind, *args)

    monkeypatch.setattr(bnb, "matmul", recording)
    monkeypatch.setattr(faults, "point", at)
    recipe = recipe_dict(micro_model, write_rows(tmp_path / "train.jsonl"), tmp_path / "run", max_steps=2,
                         gradient_accumulation_steps=2, micro_batch_size=2)
    recipe["quantization"]["method"] = "int8"
    run(parse_recipe(recipe), log=lambda *_: None)
    assert len(alive) == 2 and alive == [0, 0]


def test_the_heap_is_trimmed_after_each_step_on_cpu_unless_turned_off(micro_model, tmp_path, monkeypatch):
    from qshard import train

    calls, said = [], []
    monkeypatch.setattr(train, "release_freed_memory", lambda: calls.append(1))
    data = write_rows(tmp_path / "train.jsonl")
    for trim, expected in ((True, 3), (False, 0)):
        calls.clear()
        recipe = recipe_dict(micro_model, data, tmp_path / f"run-{trim}", max_steps=3)
        recipe["train"]["trim_heap"] = trim
        run(parse_recipe(recipe), log=said.append)
        assert len(calls) == expected
        assert any("train.trim_heap" in line for line in said) is trim
        said.clear()


@pytest.mark.parametrize("factor", [50.0, 1.5])
def test_a_bf16_run_on_a_cpu_with_slow_bf16_is_warned_before_loading(micro_model, tmp_path, monkeypatch, factor):
    """The probe's figure (qshard/precision.py half_matmul_slowdown, timed for real in tests/test_doctor.py) is
    fixed here so the test does not depend on this CPU: the warning comes before the base loads, names the
    options, and a fast CPU gets none."""
    from qshard import precision, train

    probed = []

    def warning(device, dtypes):
        return precision.cpu_half_warning(device, dtypes, slowdown=lambda d: probed.append(d) or factor)

    monkeypatch.setattr(train, "cpu_half_warning", warning)
    said = []
    recipe = recipe_dict(micro_model, write_rows(tmp_path / "train.jsonl"), tmp_path / "run", max_steps=1)
    recipe["train"]["precision"] = "bf16"
    run(parse_recipe(recipe), log=said.append)
    assert probed == [torch.bfloat16]
    warned = [i for i, line in enumerate(said) if "bfloat16 matrix products run" in line]
    if factor < precision.SLOW_HALF_FACTOR:
        assert not warned
        return
    assert len(warned) == 1 and "train.precision: fp32" in said[warned[0]]
    assert warned[0] < next(i for i, line in enumerate(said) if line.startswith("LoRA:"))  # said once loaded
