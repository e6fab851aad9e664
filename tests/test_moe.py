"""Mixture-of-Experts bases: fused expert weights quantized per expert, sharded, adapted, reloadable by PEFT.

Two tiny MoE models are saved at test time by transformers' own `save_pretrained` (so their checkpoints
store one tensor per expert, `experts.N.w1.weight` / `experts.N.gate_proj.weight`, as published ones do):
Mixtral-shaped and Qwen3-MoE-shaped, 8 experts (top 2), expert intermediate 256 > hidden 64 so that a
layer's expert stack is the largest tensor of the model. On them:
- the expert weights dequantize to bitsandbytes' own NF4 quantization of each expert, and a forward and
  backward through qshard's ExpertStack equal transformers' eager experts on the dequantized weights;
- 2-rank ZeRO-3 and FSDP2 with an NF4 base give the per-step losses (and router load-balancing losses) of
  one process with the same micro-batches, fp32 rule 1e-4 (tests/test_engines.py); each rank holds half
  of the quantized expert bytes. Mixtral also under DDP, ZeRO-1, ZeRO-2 and ZeRO-3 with offload, with int8
  and dense (method none) bases under ZeRO-3 and FSDP2, and FP4 under FSDP2 (CELLS: the MoE row of
  qshard/compat.py), and NF4 under ZeRO-3 and FSDP2 with activation checkpointing (against one process without);
- the saved adapter (PEFT target_parameters) loads with PEFT onto a transformers model whose weights are
  the base qshard trained on, and reproduces the trained, still sharded model's logits;
- the sharded load is bit-identical to the whole load, and no tensor it touches is a layer's expert
  stack (tests/shardload_worker.py's tracker).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.model.experts import ExpertStack
from qshard.model.load import QuantSpec, load_model
from qshard.model.lora import check_expert_options, resolve_targets
from qshard.observe.metrics import read_metrics
from qshard.quant.base import QuantLinear
from qshard.train import run
from tests.helpers import (
    ROWS,
    recipe_dict,
    run_cells,
    set_engine,
    shardload_results,
    write_rows,
)

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=320, max_position_embeddings=64, num_experts_per_tok=2, pad_token_id=0)
CONFIGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=256, num_local_experts=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=256, num_experts=8,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
}
ENGINES = ("zero3", "fsdp2")
# (model, engine, quantization.method) trained on 2 ranks: both models under the engines that shard the base,
# Mixtral also under the others and with the other bases
CELLS = [(kind, engine, "nf4") for kind in CONFIGS for engine in ENGINES]
CELLS += [("mixtral", engine, "nf4") for engine in ("ddp", "zero1", "zero2", "zero3_offload")]
CELLS += [("mixtral", engine, method) for engine in ENGINES for method in ("int8", "none")] + [("mixtral", "fsdp2", "fp4")]
CELLS += [("mixtral", engine, "nf4+ckpt") for engine in ENGINES]  # activation checkpointing: experts recomputed
SPLITS = ("zero3", "zero3_offload", "fsdp2")
PROBE = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]]
STEPS = 4
MOE_FIXTURES = Path(__file__).parent / "fixtures" / "moe"


def save_moe(kind: str, out: Path, **overrides) -> Path:
    import transformers

    from qshard.tools.tiny import build_tokenizer

    config_class, sizes = CONFIGS[kind]
    config = getattr(transformers, config_class)(**SIZES, **(sizes | overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    build_tokenizer([" ".join(r.values()) for r in ROWS], vocab_size=SIZES["vocab_size"]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    return {kind: save_moe(kind, root / kind) for kind in CONFIGS}


def _recipe(model: Path, data: Path, out: Path, engine: str, method: str, micro: int, accumulation: int) -> dict:
    r = recipe_dict(model, data, out, max_steps=STEPS, micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                    sample_tokens=0)
    r["lora"]["target_modules"] = "all-linear"
    method, _, variant = method.partition("+")
    r["quantization"]["method"] = method
    r["model"]["gradient_checkpointing"] = variant == "ckpt"
    return set_engine(r, engine)


@pytest.fixture(scope="module")
def trained(moe_models, tmp_path_factory):
    """Every (model, engine) on 2 ranks (micro 2: one micro-batch per rank), in one launch; each model on
    one process with micro 2 x accumulation 2: the same micro-batches, so the router loss of each is the same."""
    root = tmp_path_factory.mktemp("moe-train")
    data = write_rows(root / "train.jsonl")
    cells = [{"name": "-".join(c), "recipe": _recipe(moe_models[c[0]], data, root / "-".join(c), c[1], c[2], 2, 1)}
             for c in CELLS]
    run_cells(root, cells, PROBE)
    singles = {}
    for kind, method in sorted({(kind, method.partition("+")[0]) for kind, _, method in CELLS}):
        recipe = _recipe(moe_models[kind], data, root / f"{kind}-single-{method}", "none", method, 2, 2)
        outcome = run(parse_recipe(recipe), log=lambda *_: None)
        singles[kind, method] = {"losses": outcome.losses,
                                 "aux": [m["aux_loss"] for m in read_metrics(outcome.output_dir)]}
    sharded = {}
    for cell in cells:
        out = Path(cell["recipe"]["train"]["output_dir"])
        ranks = [json.loads((out / f"result-rank{k}.json").read_text()) for k in range(2)]
        assert "error" not in ranks[0], ranks[0]
        sharded[cell["name"]] = {"ranks": ranks, "dir": out, "aux": [m["aux_loss"] for m in read_metrics(out)]}
    return {"singles": singles, "sharded": sharded, "root": root}


@pytest.mark.parametrize("kind", CONFIGS)
def test_expert_weights_are_bitsandbytes_nf4_per_expert_and_train_like_transformers_eager(moe_models, kind):
    import bitsandbytes.functional as bnbF
    from transformers import AutoModelForCausalLM

    model = load_model(str(moe_models[kind]), dtype="float32", quant=QuantSpec(method="nf4"), log=lambda *_: None)
    reference = AutoModelForCausalLM.from_pretrained(moe_models[kind], dtype=torch.float32)
    stacks = {n: m for n, m in model.named_modules() if isinstance(m, ExpertStack)}
    assert len(stacks) == 2 * SIZES["num_hidden_layers"] and all(s.quantized for s in stacks.values())
    for name, stack in stacks.items():
        module, _, leaf = name.rpartition(".")
        dense = reference.get_submodule(module)._parameters[leaf]
        for e in (0, stack.num_experts - 1):
            packed, state = bnbF.quantize_4bit(dense[e].detach().contiguous(), blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
            assert torch.equal(stack.dequantize_expert(e), bnbF.dequantize_4bit(packed, state))
        with torch.no_grad():  # the reference on the very weights qshard applies
            dense.copy_(stack.dequantize())
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            reference.get_submodule(name).weight.data = layer.dequantize().float()
    reference.set_experts_implementation("eager")
    ids = torch.tensor(PROBE)
    x = [m.get_input_embeddings()(ids).detach().requires_grad_(True) for m in (model, reference)]
    out = [m(inputs_embeds=xi).logits for m, xi in zip((model, reference), x)]
    assert (out[0] - out[1]).abs().max() < 1e-4
    for o in out:
        o.square().mean().backward()
    assert (x[0].grad - x[1].grad).abs().max() <= 1e-4 * x[1].grad.abs().max()


@pytest.mark.parametrize("cell", CELLS, ids=["-".join(c) for c in CELLS])
def test_two_ranks_give_the_losses_of_one_process(trained, cell):
    kind, _, method = cell
    single, cell = trained["singles"][kind, method.partition("+")[0]], trained["sharded"]["-".join(cell)]
    assert len(single["losses"]) == STEPS
    for rank in cell["ranks"]:
        assert max(abs(a - b) for a, b in zip(rank["losses"], single["losses"])) < 1e-4, (rank["losses"], single)
    assert max(abs(a - b) for a, b in zip(cell["aux"], single["aux"])) < 1e-4, (cell["aux"], single["aux"])
    assert all(a > 0 for a in single["aux"])  # the router loss is there (transformers' own)


@pytest.mark.parametrize("cell", CELLS, ids=["-".join(c) for c in CELLS])
def test_each_rank_holds_half_of_the_expert_bytes_where_the_engine_splits_the_base(trained, cell):
    ranks = trained["sharded"]["-".join(cell)]["ranks"]
    for rank in ranks:
        held, full = rank["experts_held"]
        share = 0.5 if cell[1] in SPLITS else 1.0
        assert full > 0 and abs(held / full - share) < 0.02, rank["experts_held"]
    assert sum(r["experts_held"][0] for r in ranks) >= ranks[0]["experts_held"][1]


# int8 cells are left out: LLM.int8()'s matmul quantizes the activations too, so transformers' dense layers
# on the dequantized weights are not the computation qshard's int8 linears ran (measured: 5e-3 apart)
RELOADED = [c for c in CELLS if c[2] != "int8"]


@pytest.mark.parametrize("cell", RELOADED, ids=["-".join(c) for c in RELOADED])
def test_saved_adapter_reloads_with_peft_and_reproduces_the_sharded_logits(trained, moe_models, cell):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, _, method = cell
    method, cell = method.partition("+")[0], trained["sharded"]["-".join(cell)]
    adapter_dir = cell["dir"] / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(k.endswith("experts.lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    base = load_model(str(moe_models[kind]), dtype="float32", quant=QuantSpec(method=method), log=lambda *_: None)
    reference = AutoModelForCausalLM.from_pretrained(moe_models[kind], dtype=torch.float32)
    with torch.no_grad():  # transformers' model on the base qshard trained on (quantized, then dequantized)
        for name, m in base.named_modules():
            if isinstance(m, QuantLinear):
                reference.get_submodule(name).weight.copy_(m.dequantize().float())
            elif isinstance(m, ExpertStack):
                module, _, leaf = name.rpartition(".")
                reference.get_submodule(module)._parameters[leaf].copy_(m.dequantize())
    peft_model = PeftModel.from_pretrained(reference, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(PROBE)).logits
    sharded = torch.tensor(cell["ranks"][0]["logits"])
    assert (logits - sharded).abs().max() < 1e-4, (logits - sharded).abs().max()


def test_sharded_load_is_exact_and_never_holds_a_layers_expert_stack(moe_models, tmp_path):
    cases = [[engine, method, "float32", kind] for engine in ENGINES for method in ("nf4", "none") for kind in CONFIGS]
    cases += [["fsdp2", "checkpoint", "float32", "ct"], ["zero3", "nf4", "float32", "ct"]]  # packed experts, decompressed
    models = {k: str(v) for k, v in moe_models.items()} | {"ct": str(MOE_FIXTURES / "ct_qwen3_moe_w4a16_g32")}
    for case, ranks in shardload_results(tmp_path, models, cases).items():
        for rank in ranks:
            assert rank["names"] and not rank["missing"] and rank["differ"] == [], (case, rank["differ"])
            stack = rank["largest_expert_stack"]
            assert stack > 0 and rank["largest_whole_load"] >= stack, (case, rank)
            # never the layer's stack: at most this rank's own half of a dense one (method none, ZeRO-3's flat
            # partition is one tensor) and otherwise one dense expert (1/8 of the stack) at a time; the CT fixture
            # is smaller (4 experts), its largest tensor the embedding's half
            limit = 0.55 if case[1] in ("none", "checkpoint") or case[3] == "ct" else 0.15
            assert rank["largest_sharded_load"] <= limit * stack, (case, rank["largest_sharded_load"], stack)


def test_all_linear_adapts_expert_weights_and_dropout_is_refused_before_loading(moe_models):
    from qshard.model.load import open_base

    _, skeleton = open_base(str(moe_models["mixtral"]), quant=QuantSpec(method="nf4"))
    targets = resolve_targets(skeleton, "all-linear")
    assert {"gate_up_proj", "down_proj", "q_proj"} <= set(targets) and "gate" not in targets  # not the router
    assert resolve_targets(skeleton, ["experts", "q_proj"]) == ["experts", "q_proj"]
    with pytest.raises(QShardError) as e:
        check_expert_options(skeleton, targets, dropout=0.05, use_dora=False)
    assert e.value.where == "lora.dropout" and "lora.dropout: 0" in e.value.fix
    check_expert_options(skeleton, ["q_proj", "v_proj"], dropout=0.05, use_dora=False)  # no expert weights: fine


@pytest.mark.parametrize("run_name", ["mixtral-single-nf4", "qwen3_moe-fsdp2-nf4", "mixtral-zero3-none"])
def test_export_merges_expert_adapters_into_the_fused_weights(trained, tmp_path, run_name):
    """`qshard export` folds PEFT's expert update (every expert) into the fused weights, writes them under the
    model's own names (which transformers loads as they are), and its check (transformers' logits of the
    folder against qshard's base + adapter, float32) passes."""
    from safetensors import safe_open

    from qshard.tools.export import export

    run_dir = trained["root"] / run_name
    result = export(run_dir, tmp_path / "out", dtype="fp32", log=lambda *_: None)
    assert result.check["passed"], result.check
    experts = [name for name in result.layers if ".experts." in name]
    assert len(experts) == 2 * SIZES["num_hidden_layers"], sorted(result.layers)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_shape() == [8, 512, 64]


def test_compressed_tensors_moe_checkpoint_loads_its_experts_as_transformers_decompresses_them():
    """A Qwen3-MoE quantized by the real llm-compressor (tests/fixtures/moe/make_fixtures.py) stores each expert as
    a packed linear; transformers (with compressed-tensors) decompresses them into its fused expert weights, and
    so does qshard: bit for bit (reference.safetensors, made by transformers), with transformers' logits; the
    attention stays packed with `checkpoint`."""
    from qshard.quant.compressed_tensors import PackQuantizedLinear

    folder = MOE_FIXTURES / "ct_qwen3_moe_w4a16_g32"
    reference = load_file(str(folder / "reference.safetensors"))
    for method in ("none", "checkpoint"):
        model = load_model(str(folder), dtype="float32", quant=QuantSpec(method=method), log=lambda *_: None)
        assert isinstance(model.model.layers[0].self_attn.q_proj, PackQuantizedLinear) == (method == "checkpoint")
        for leaf in ("gate_up_proj", "down_proj"):
            stack = model.get_submodule(f"model.layers.0.mlp.experts.{leaf}")
            assert torch.equal(stack.dequantize(), reference[f"model.layers.0.mlp.experts.{leaf}"])
        with torch.no_grad():
            logits = model(input_ids=reference["input_ids"]).logits
        assert (logits - reference["logits"]).abs().max() <= 1e-5 * reference["logits"].abs().max()


def test_compressed_tensors_moe_checkpoint_trains_with_nf4_experts(tmp_path):
    outcome = run(parse_recipe(_recipe(MOE_FIXTURES / "ct_qwen3_moe_w4a16_g32", write_rows(tmp_path / "r.jsonl"),
                                       tmp_path / "run", "none", "nf4", 2, 1)), log=lambda *_: None)
    assert len(outcome.losses) == STEPS and all(math.isfinite(x) for x in outcome.losses)


def test_llm_compressor_moe_checkpoint_is_refused_by_name_before_loading():
    """A compressed-tensors Mixtral made by the real llm-compressor (tests/fixtures/moe/make_fixtures.py) stores
    every expert as a packed linear under per-expert names transformers 5's Mixtral rules do not stack back
    (transformers leaves those experts uninitialised): refused by name, before any weight is read."""
    from qshard.model.load import open_base

    with pytest.raises(QShardError) as e:
        open_base(str(MOE_FIXTURES / "ct_mixtral_w4a16_g32"), quant=QuantSpec(method="checkpoint"))
    assert "stores its Mixture-of-Experts experts as packed per-expert layers" in e.value.what
    assert "block_sparse_moe.experts.0.down_proj" in e.value.what and "do not stack" in e.value.what


@pytest.mark.parametrize("kind", CONFIGS)
def test_quantize_of_a_moe_model_loads_back_or_is_refused_by_name(moe_models, tmp_path, kind):
    """`qshard quantize` (llm-compressor) on a MoE model: its per-expert layers load back, decompressed, where
    transformers' rules stack their names (Qwen3-MoE); a Mixtral's do not, and the command's own load-back
    check refuses it naming them, leaving no output folder."""
    from qshard.tools.quantize import quantize

    out = tmp_path / "out"
    calibration = str(write_rows(tmp_path / "r.jsonl"))
    if kind == "mixtral":
        with pytest.raises(QShardError) as e:
            quantize(str(moe_models[kind]), str(out), calibration=calibration, group_size=32, samples=4,
                     log=lambda *_: None)
        assert "do not stack" in e.value.what and not out.exists()
        return
    quantize(str(moe_models[kind]), str(out), calibration=calibration, group_size=32, samples=4, log=lambda *_: None)
    model = load_model(str(out), dtype="float32", quant=QuantSpec(method="checkpoint"), log=lambda *_: None)
    assert not model.model.layers[0].mlp.experts.gate_up_proj.quantized  # decompressed, kept dense
