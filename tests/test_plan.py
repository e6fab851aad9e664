"""The planner: exact bytes for what qshard stores, published figures, DeepSpeed's own estimator, and the
`qshard plan` command end to end (config.json only, no weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from qshard.cli import main
from qshard.config import load_recipe
from qshard.dsconfig import reduce_bucket_size
from qshard.tools import plan
from qshard.tools.plan import GIB, Settings, estimate, model_spec

PTQ = Path(__file__).parent / "fixtures" / "ptq"

LLAMA3_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
# LLaMA-65B (the QLoRA paper's largest model): multi-head attention, 32k vocabulary, fp16 checkpoint
LLAMA_65B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "intermediate_size": 22016, "vocab_size": 32000, "torch_dtype": "float16"}


def write_model_dir(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_recipe(folder: Path, model: Path, **sections) -> Path:
    raw = {"model": {"path": str(model)}, "data": {"path": str(folder / "train.jsonl"), "max_length": 2048},
           "train": {"micro_batch_size": 1, "gradient_accumulation_steps": 8}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_spec(size: str) -> plan.ModelSpec:
    """`qshard init-tiny --size SIZE` (Llama, untied head): what bench/plan_validation_dist.py trains."""
    from qshard.tools.tiny import SIZES

    hidden, inter, layers, heads, kv = SIZES[size]
    return model_spec({"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                       "num_attention_heads": heads, "num_key_value_heads": kv,
                       "vocab_size": 32000 if size == "400m" else 512})


# -- the model spec ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("mistral", False), ("llama", True),
                                       ("qwen3", False), ("olmo2", False)])
def test_parameter_count_from_config_equals_transformers_model(arch, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert model_spec(config.to_dict()).params == real


def test_llama3_70b_has_70_6b_parameters_and_its_nf4_base_is_39_5_gb():
    spec = model_spec(LLAMA3_70B)
    assert spec.params == 70_553_706_496
    base = plan.base_bytes(spec, Settings(quant="nf4", double_quant=True, dense_dtype="bfloat16"))
    # linears at 4.127 bits, embeddings and the (skipped) head in bf16
    assert base["layers"] == pytest.approx(35.31e9, rel=1e-3)
    assert 35e9 < sum(base.values()) < 40e9
    assert sum(base.values()) == pytest.approx(39.52e9, rel=1e-3)


# -- Mixture-of-Experts --------------------------------------------------------------------------------

# tiny configs with dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step, first_k_dense_replace),
# shared experts (Qwen2-MoE's gated one, DeepSeek's n_shared_experts) and latent attention (DeepSeek-V3)
MOE_CONFIGS = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 80, "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2,
                  "mlp_only_layers": [3], "head_dim": 24},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "eos_token_id": 2, "pad_token_id": 1},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "n_shared_experts": 2, "first_k_dense_replace": 1, "q_lora_rank": 24, "kv_lora_rank": 16,
                    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12},
}
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
                "num_experts_per_tok": 2, "torch_dtype": "bfloat16"}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
                 "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "vocab_size": 151936, "torch_dtype": "bfloat16"}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
               "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "vocab_size": 129280, "torch_dtype": "bfloat16"}


def tiny_moe_config(arch: str, layers: int = 4):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, **MOE_CONFIGS[arch])


@pytest.mark.parametrize("arch, total", [("mixtral", 473_664), ("qwen2_moe", 317_440), ("qwen3_moe", 307_456),
                                         ("olmoe", 474_048), ("deepseek_v3", 294_368)])
def test_moe_parameter_count_from_config_equals_transformers_model(arch, total):
    """Every parameter of transformers' own model (built on the meta device), by component: the fused experts
    (gate_up_proj [E, 2I, H], down_proj [E, H, I]), the routers [E, H], and the layers that keep a dense MLP."""
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    named = dict(model.named_parameters())
    spec = model_spec(config.to_dict())
    c = spec.components()
    assert spec.params == sum(p.numel() for p in named.values()) == total
    assert c["experts"] == sum(p.numel() for n, p in named.items() if n.endswith(("experts.gate_up_proj",
                                                                                   "experts.down_proj")))
    assert c["routers"] == sum(p.numel() for n, p in named.items() if n.endswith("mlp.gate.weight"))
    dense = {int(n.split(".")[2]) for n in named if n.endswith("mlp.gate_proj.weight")}
    assert set(spec.dense_layers) == dense and spec.layer_kinds()[True] == spec.layers - len(dense)


@pytest.mark.parametrize("config, total, experts, active", [
    (MIXTRAL_8X7B, 46_702_792_704, 32 * 8 * 3 * 4096 * 14336, 12_879_925_248),  # layers x E x (gate, up, down) x H x I
    (QWEN3_30B_A3B, 30_532_122_624, 48 * 128 * 3 * 2048 * 768, 3_353_032_704),
    (DEEPSEEK_V3, 671_026_404_352, 58 * 256 * 3 * 7168 * 2048, 37_552_282_624),  # 3 of 61 layers dense
])
def test_active_parameters_are_the_rest_and_top_k_of_e_routed_experts(config, total, experts, active):
    """Published: Mixtral-8x7B 46.7B parameters, 12.9B active per token; Qwen3-30B-A3B 30.5B, 3.3B; DeepSeek-V3
    671B, 37B. Active = everything but the routed experts (shared experts and routers included) + k/E of them."""
    spec = model_spec(config)
    assert spec.params == total and spec.components()["experts"] == experts and spec.active_params == active
    assert active == total - experts + experts * spec.experts_per_token // spec.experts


@pytest.mark.parametrize("method, bits", [("nf4", 4.127), ("int8", 8.006), ("none", 16.0)])
def test_mixtral_experts_take_e_times_one_linears_bytes_and_fsdp2_gathers_them(method, bits):
    """Each expert's matrix is quantized as one linear of its shape, the 8 stacked: E x linear_storage_bytes;
    the routers stay bf16. FSDP2's gathered layer (current + prefetched) holds its experts and their LoRA."""
    spec = model_spec(MIXTRAL_8X7B)
    s = Settings(quant=method, dense_dtype="bfloat16", engine="fsdp2", gpus=8, global_batch=8)
    one_expert = sum(plan.linear_storage_bytes(n_in, n_out, method, True, 2) for n_in, n_out in
                     ((4096, 2 * 14336), (14336, 4096)))
    b = plan.base_bytes(spec, s)
    assert b["experts"] == 32 * (8 * one_expert + 8 * 4096 * 2)
    assert 8 * one_expert * 8 / (8 * 3 * 4096 * 14336) == pytest.approx(bits, abs=1e-3)
    layer = plan.decoder_layer_bytes(spec, s)
    assert layer == (b["layers"] + b["experts"]) // 32 + 2 * 4096 * 2
    lora_per_layer = plan.lora_params(spec, s) // 32
    assert lora_per_layer == 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 8 * (4096 + 2 * 14336 + 14336 + 4096))
    gathered = estimate(spec, s).gpu["gathered_weights"]
    assert gathered == 2 * (layer + lora_per_layer * 2) + plan.fsdp2_peak_outside(spec, s)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_lora_parameter_count_equals_peft_target_parameters(arch):
    """PEFT adapts a fused [E, out, in] tensor with lora_A [r E, in] and lora_B [out, r E] (target_parameters):
    all-linear adapts the attention, the shared expert (and its gate), dense MLPs and both expert tensors, not
    the router; naming `gate_up_proj` adapts that expert tensor alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(arch)
    spec = model_spec(config.to_dict())
    for targets in ("all-linear", ("q_proj", "gate_up_proj")):
        modules = list(spec.layer_linears(moe=True) | spec.layer_linears()) if targets == "all-linear" else ["q_proj"]
        params = ["experts.gate_up_proj", "experts.down_proj"] if targets == "all-linear" else ["experts.gate_up_proj"]
        model = AutoModelForCausalLM.from_config(config)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=modules, target_parameters=params))
        real = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        assert plan.lora_params(spec, Settings(lora_r=4, lora_targets=targets)) == real
    # r (in + out) of q_proj in every layer and of each of the 4 experts' gate_up in the MoE layers
    assert real == 4 * (spec.layers * (64 + 64) + spec.layer_kinds()[True] * 4 * (64 + 2 * spec.expert_intermediate))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_storage_from_config_equals_qshards_loaded_model(arch, tmp_path):
    """The planner's bytes for a MoE base quantized on load equal the parameters qshard's loader builds
    (qshard/model/experts.py: per-expert NF4 / int8 storage stacked, the router dense), and ZeRO-3's element
    count of a MoE layer equals theirs."""
    from transformers import AutoModelForCausalLM

    from qshard.model.load import QuantSpec, load_model

    AutoModelForCausalLM.from_config(tiny_moe_config(arch, layers=2)).save_pretrained(tmp_path)
    spec = plan.read_model_spec(str(tmp_path))
    for method in ("nf4", "int8"):
        model = load_model(str(tmp_path), dtype="float32", quant=QuantSpec(method), log=lambda *_: None)
        params = dict(model.named_parameters())
        s = Settings(quant=method, dense_dtype="float32")
        assert sum(plan.base_bytes(spec, s).values()) == sum(p.numel() * p.element_size() for p in params.values())
        assert plan.decoder_layer_elements(spec, s) == sum(p.numel() for n, p in params.items() if ".layers.0." in n)


def test_a_moe_config_without_a_valid_top_k_is_refused_naming_the_key():
    from qshard.errors import QShardError

    for top_k in (None, 9):
        with pytest.raises(QShardError, match="8 experts and num_experts_per_tok") as refused:
            model_spec({**MIXTRAL_8X7B, "num_experts_per_tok": top_k})
        assert refused.value.where == "model.path: config.json num_experts_per_tok"


def test_plan_command_reports_expert_and_active_parameters(tmp_path, capsys):
    model = write_model_dir(tmp_path / "mixtral", MIXTRAL_8X7B)
    recipe = write_recipe(tmp_path, model)
    assert main(["plan", str(recipe), "--gpus", "8", "--gpu-mem", "80GiB", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "46.70B parameters" in out
    assert "8 per MoE layer in 32 of 32 layers, 2 routed per token: 45.10B expert parameters; 12.88B active" in out


# -- exact storage of quantized layers ----------------------------------------------------------------

@pytest.mark.parametrize("method,dq", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_linear_storage_bytes_equal_qshard_layer_parameters(method, dq):
    from qshard.quant.bnb4bit import Linear4bit
    from qshard.quant.bnb8bit import Linear8bit

    n_in, n_out = 4096, 14336  # Llama-3-8B's gate_proj
    layer = (Linear8bit(n_in, n_out) if method == "int8"
             else Linear4bit(n_in, n_out, quant_type=method, double_quant=dq))
    stored = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert plan.linear_storage_bytes(n_in, n_out, method, dq, 2) == stored


def test_nf4_costs_4_127_bits_with_double_quant_and_4_5_without():
    n = 8192 * 8192
    assert plan.linear_storage_bytes(8192, 8192, "nf4", True, 2) * 8 / n == pytest.approx(4.127, abs=1e-3)
    assert plan.linear_storage_bytes(8192, 8192, "nf4", False, 2) * 8 / n == pytest.approx(4.5, abs=1e-9)


# -- sharding ------------------------------------------------------------------------------------------

def test_zero3_and_fsdp2_divide_the_base_by_the_gpu_count_ddp_does_not():
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", gpus=8, global_batch=8)
    full = sum(plan.base_bytes(spec, s).values())
    assert estimate(spec, replace(s, engine="zero3")).gpu["base_weights"] == full // 8
    assert estimate(spec, replace(s, engine="fsdp2")).gpu["base_weights"] == full // 8
    assert estimate(spec, replace(s, engine="ddp")).gpu["base_weights"] == full
    assert estimate(spec, replace(s, engine="zero2")).gpu["base_weights"] == full


def test_zero_stages_shard_optimizer_then_grads_then_params():
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", gpus=4, global_batch=4, precision="bf16")
    lora = plan.lora_params(spec, s)
    z1, z2, z3 = (estimate(spec, replace(s, engine=e)).gpu for e in ("zero1", "zero2", "zero3"))
    assert z1["optimizer_states"] == z2["optimizer_states"] == z3["optimizer_states"] == lora * 8 // 4
    # every stage keeps only its gradient partition, in bf16 (DeepSpeed 0.19's ZeRO-1 stages whole gradients
    # in the reduce bucket, counted in engine_buffers; measured in bench/plan_validation_dist.py)
    assert z1["lora_grads"] == z2["lora_grads"] == z3["lora_grads"] == lora * 2 // 4
    assert z2["lora_params"] == lora * 2 and z3["lora_params"] == lora * 2 // 4


def test_deepspeed_reduce_bucket_is_the_engines_at_least_1e6_at_most_5e8_elements():
    assert reduce_bucket_size(147_968) == 1_000_000      # the small test model's LoRA: qshard's floor
    assert reduce_bucket_size(3_809_280) == 3_809_280    # 400m, r=8
    assert reduce_bucket_size(10 ** 10) == 500_000_000   # DeepSpeed's default


def test_zero3_holds_the_head_and_at_most_four_layers_gathered():
    """qshard's ZeRO-3 limits (dsconfig.zero3_gather_limits): at most 4 layers' elements gathered, and at most
    DeepSpeed's own 1e9 (stage3_max_live_parameters), every layer released after forward (stage3_max_reuse_distance 0) unless the
    prefetcher has passed its backward use while it was gathered: the last layers that fit beside the head and
    the final norm. The engine gathers the embedding and head here (vocabulary-parallel:
    test_zero3_vocab_parallel_...); one more copy of the largest parameter is the all-gather buffer."""
    small = tiny_spec("400m")
    s = Settings(quant="nf4", dense_dtype="float32", precision="fp32", lora_r=8, engine="zero3", gpus=2,
                 vocab_parallel=False)
    lora, b = plan.lora_params(small, s), plan.base_bytes(small, s)
    layer_bytes, layer = plan.gathered_layer_sizes(small, s)[False]
    assert plan.zero3_limits(small, s) == {"stage3_prefetch_bucket_size": 2 * layer,
                                           "stage3_max_live_parameters": 4 * layer, "stage3_max_reuse_distance": 0}
    # the head alone (32,768,000 elements) is more than 4 layers (4 x 6,854,780): no layer kept, none prefetched
    # beside it, the one whose backward runs gathered
    assert small.vocab * small.hidden > 4 * layer == 4 * 6_854_780
    assert plan.zero3_layers_kept(small, s, lora) == 0
    norm = small.hidden * 4
    assert plan.zero3_gathered_bytes(small, s, lora) == 2 * b["lm_head"] + norm + layer_bytes
    big = model_spec(LLAMA3_70B)
    s = replace(s, dense_dtype="bfloat16", precision="bf16", gpus=8)
    lora, b = plan.lora_params(big, s), plan.base_bytes(big, s)
    layer_bytes, layer = plan.gathered_layer_sizes(big, s)[False]
    # the limit is capped at DeepSpeed's own 1e9 elements (4 layers would be 1.78e9); the head alone, 1,050,673,152
    # elements, is more: no layer kept, the one whose backward runs gathered beside the head
    assert plan.zero3_limits(big, s)["stage3_max_live_parameters"] == 10 ** 9 < big.vocab * big.hidden < 4 * layer
    assert plan.zero3_layers_kept(big, s, lora) == 0
    assert plan.zero3_gathered_bytes(big, s, lora) == 2 * b["lm_head"] + big.hidden * 2 + layer_bytes


DS_OWN_GATHERING = (("stage3_prefetch_bucket_size", 50_000_000), ("stage3_max_live_parameters", 10 ** 9),
                    ("stage3_max_reuse_distance", 10 ** 9))  # DeepSpeed 0.19's defaults, as a user's JSON sets them


def test_zero3_with_deepspeeds_own_limits_keeps_a_small_model_gathered_and_the_tail_of_a_70b():
    """A user's DeepSpeed JSON that sets DeepSpeed's own limits (README: the faster side on a CPU) is planned
    with them. A layer stays gathered when its backward is within stage3_max_reuse_distance (1e9) fetched
    elements, 2 x (elements after it) < 1e9, or when the prefetcher (up to 1e9 live) passed it: the whole 400M
    model (its measured 181 MB gathered at the end of the forward, BENCHMARKS.md), and of a vocabulary-parallel
    70B the last two layers (2 x 444,010,524 < 1e9 <= 2 x 888,012,856). Keys the JSON leaves out are qshard's."""
    small = tiny_spec("400m")
    s = Settings(quant="nf4", dense_dtype="float32", precision="fp32", lora_r=8, engine="zero3", gpus=2,
                 vocab_parallel=False, zero3_gathering=DS_OWN_GATHERING)
    lora, b = plan.lora_params(small, s), plan.base_bytes(small, s)
    assert plan.zero3_limits(small, s) == dict(DS_OWN_GATHERING)
    assert plan.zero3_layers_kept(small, s, lora) == small.layers
    everything_but_embedding = sum(b.values()) - b["embed_tokens"] + lora * 4
    assert plan.zero3_gathered_bytes(small, s, lora) == everything_but_embedding + b["lm_head"]  # + the buffer copy
    ours = replace(s, zero3_gathering=())
    assert plan.zero3_layers_kept(small, ours, lora) == 0
    assert plan.zero3_gathered_bytes(small, ours, lora) < plan.zero3_gathered_bytes(small, s, lora)
    reuse_only = replace(s, zero3_gathering=(("stage3_max_reuse_distance", 10 ** 9),))
    assert plan.zero3_limits(small, reuse_only)["stage3_max_live_parameters"] == plan.zero3_limits(small, ours)[
        "stage3_max_live_parameters"]
    assert plan.zero3_layers_kept(small, reuse_only, lora) == small.layers  # the reuse distance alone keeps them
    big = model_spec(LLAMA3_70B)
    on = replace(s, dense_dtype="bfloat16", precision="bf16", gpus=8, vocab_parallel=True)
    assert plan.zero3_layers_kept(big, on, plan.lora_params(big, on)) == 2
    gathers = next(t for t in plan.step_traffic(small, s) if t.op == "all_gather")
    assert "and 0 released layer(s) again for backward" in gathers.what


def test_the_plan_reads_the_users_zero3_limits_and_plans_its_own_candidates_with_qshards(tmp_path):
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_max_reuse_distance": 1e9, "stage3_max_live_parameters": "lots",
        "stage3_prefetch_bucket_size": True}}))
    recipe = load_recipe(write_recipe(tmp_path, model, distributed={"engine": "deepspeed",
                                                                    "deepspeed_config": str(tmp_path / "ds.json")}))
    result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=8, gpu_mem=80 * GIB)
    assert result.current.settings.zero3_gathering == (("stage3_max_reuse_distance", 10 ** 9),)  # numbers only
    assert all(e.settings.zero3_gathering == () for e in result.ranked)


def test_fsdp2_holds_two_layers_and_the_head_but_not_the_embedding():
    """qshard makes the embedding and the head FSDP2 units of their own: at the peak (the loss, the start of
    backward) the head and the root's final norm are gathered next to the current and the prefetched layer; the
    embedding was resharded after its forward. Tied, both stay in the root, gathered from forward to backward.
    (distributed.vocab_parallel: false; vocabulary-parallel, neither is FSDP2's: test_fsdp2_vocab_parallel_...)"""
    spec = tiny_spec("400m")
    s = Settings(quant="nf4", dense_dtype="float32", precision="fp32", lora_r=8, engine="fsdp2", gpus=2,
                 vocab_parallel=False)
    layer = plan.decoder_layer_bytes(spec, s) + plan.lora_params(spec, s) // spec.layers * 4
    assert plan.root_bytes(spec, s) == 4 * (2 * 32000 * 1024 + 1024)  # 250.0 MiB in fp32
    assert estimate(spec, s).gpu["gathered_weights"] == 2 * layer + 4 * (32000 * 1024 + 1024)
    tied = replace(spec, tied=True)
    assert estimate(tied, s).gpu["gathered_weights"] == 2 * layer + plan.root_bytes(tied, s) == 2 * layer + 4 * (
        32000 * 1024 + 1024)


def test_offload_moves_optimizer_and_params_to_cpu_but_not_vocabulary_parallel_rows():
    """Vocabulary-parallel rows are buffers on the GPU, not parameters DeepSpeed offloads: each GPU keeps half of
    the bf16 embedding and head, 2 x 128,256 x 8,192 x 2 B / 2 = 2,101,346,304 B."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", gpus=2, global_batch=2, engine="zero3", offload_optimizer=True, offload_params=True,
                 vocab_parallel=False)
    e = estimate(spec, s)
    base = sum(plan.base_bytes(spec, s).values())
    assert e.gpu["base_weights"] == 0 and "optimizer_states" not in e.gpu
    assert e.cpu["base_weights"] == base
    assert e.cpu["optimizer_states"] == plan.lora_params(spec, s) * 8 // 2
    split = estimate(spec, replace(s, vocab_parallel=True))
    assert split.gpu["base_weights"] == 2_101_346_304 == 128256 * 8192 * 2
    assert split.cpu["base_weights"] == base - 2 * 2_101_346_304


def test_zero3_per_parameter_bytes_equal_deepspeeds_estimator():
    """DeepSpeed's estimate_zero3_model_states_mem_needs (what ..._all_live calls) assumes every
    parameter trains with fp16 weights + fp32 master, grads and Adam: 18 bytes per parameter split N ways,
    plus 4 bytes x the largest layer (gathered fp16 weights + grads). Our accounting of trainable parameters
    (half weight, fp32 master, two fp32 moments) agrees except for the gradient partition: DeepSpeed keeps it
    in the half dtype (grad_accum_dtype defaults to the model's; measured under bf16) and makes the fp32 copy
    only inside step(), after the activation peak: 16 B / N. With optimizer offload the estimator counts
    the half weights on the GPU and 16 B on the CPU; stage3.py also keeps the half gradient partition on the
    GPU (grad_partitions_flat_buffer, measured)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    spec = model_spec(LLAMA3_70B)
    for n, offload in ((8, False), (8, True), (2, False)):
        s = Settings(quant="nf4", gpus=n, global_batch=n, engine="zero3", precision="fp16", offload_optimizer=offload)
        e = estimate(spec, s)
        trainable = plan.lora_params(spec, s)
        ours_gpu = sum(e.gpu.get(k, 0) for k in ("lora_params", "lora_grads", "master_weights", "optimizer_states"))
        cpu_ds, gpu_ds, largest = estimate_zero3_model_states_mem_needs(
            total_params=trainable, largest_layer_params=0, num_gpus_per_node=n, cpu_offload=offload,
            cpu_offload_params=False, zero_init=True, additional_buffer_factor=1.0)
        grads = e.gpu["lora_grads"]
        assert grads == trainable * 2 // n  # the half gradient partition
        # no offload: the estimator counts fp32 gradients (4 B), we the half partition (2 B); offload: it omits it
        assert ours_gpu == pytest.approx(gpu_ds + (grads if offload else -grads), rel=1e-6)
        if offload:  # DeepSpeed's CPU figure is per node: 16 B per parameter (our per-GPU share x GPUs)
            assert sum(e.cpu.values()) * n == pytest.approx(cpu_ds, rel=1e-6)


def test_parameter_count_equals_deepspeeds_count_on_a_dense_fp16_model():
    """estimate_zero3_model_states_mem_needs_all_live reads total and largest-layer parameters from the
    module (model_to_params); the spec from config.json alone must agree with both."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=3000, hidden_size=128, intermediate_size=344,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    total, largest = model_to_params(model)
    spec = model_spec(config.to_dict())
    assert spec.params == total
    assert largest == spec.vocab * spec.hidden  # the embedding (and head) are the largest single modules
    gpu_ds = 4 * largest + 18 * total  # DeepSpeed's ZeRO-3 formula, 1 GPU, no offload
    assert 4 * spec.vocab * spec.hidden + 18 * spec.params == gpu_ds


# -- vocabulary-parallel embedding and head (qshard/model/vocab.py) -----------------------------------

def test_vocab_parallel_applies_to_zero3_and_fsdp2_on_two_or_more_gpus(tmp_path):
    """qshard/train.py split_vocabulary's rule: an engine that shards the base, 2+ ranks, the recipe's
    distributed.vocab_parallel (on by default), and neither table adapted."""
    s = Settings(gpus=2)
    engines = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp2")
    assert [replace(s, engine=e).vocab_split for e in engines] == [False] * 4 + [True] * 2
    assert not replace(s, engine="fsdp2", gpus=1).vocab_split
    assert replace(s, engine="zero3", gpus=1, nodes=2, offload_params=True).vocab_split  # 2 ranks, zero3_offload
    assert not replace(s, engine="zero3", vocab_parallel=False).vocab_split
    assert not replace(s, engine="zero3", lora_targets=("q_proj", "lm_head")).vocab_split
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    for flag in (True, False):
        recipe = load_recipe(write_recipe(tmp_path, model, distributed={"engine": "fsdp2", "vocab_parallel": flag}))
        assert plan.settings_from_recipe(recipe, model_spec(LLAMA3_70B), gpus=2, nodes=1).vocab_split is flag


# one Llama-3-70B decoder layer as ZeRO-3 and FSDP2 gather it: its NF4 linears (n / 2 codes + n / 64 absmax codes +
# 4 B per 256 absmax + 4 B each: q, o 34,619,396 B; k, v 4,327,428; gate, up, down 121,167,876: 441,397,276 B),
# its two bf16 norms (32,768 B) and 2,588,672 LoRA parameters (r=16, all-linear) in bf16
GATHERED_70B_LAYER = 441_397_276 + 32_768 + 2 * 2_588_672
TABLE_70B = 128256 * 8192 * 2  # the bf16 embedding, or head: 2,101,346,304 B


def test_fsdp2_vocab_parallel_gathers_neither_embedding_nor_head():
    """Llama-3-70B on 8 GPUs: FSDP2's gathered weights lose the head and keep the current and the prefetched
    layer and the root's final norm (8,192 x 2 B); each GPU's share of the base is unchanged (1/8 of the rows, as
    FSDP2's shard of the tables was)."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", engine="fsdp2", gpus=8, global_batch=8, seq_len=2048)
    on, off = estimate(spec, s), estimate(spec, replace(s, vocab_parallel=False))
    assert plan.gathered_layer_sizes(spec, s)[False][0] == GATHERED_70B_LAYER == 446_607_388
    assert plan.fsdp2_peak_outside(spec, s) == 16_384
    assert on.gpu["gathered_weights"] == 2 * GATHERED_70B_LAYER + 16_384
    assert off.gpu["gathered_weights"] - on.gpu["gathered_weights"] == TABLE_70B
    assert on.gpu["base_weights"] == off.gpu["base_weights"]


def test_zero3_vocab_parallel_holds_two_70b_layers_and_gathers_no_table():
    """ZeRO-3, Llama-3-70B, 8 GPUs. A layer is 444,002,332 elements (441,397,276 NF4 bytes + 16,384 norm weights +
    2,588,672 LoRA); the limit, 4 of them, is capped at DeepSpeed's 1e9 elements. On: the last 2 layers are kept
    (888,004,664 elements) and the 111,995,336 the limit leaves are prefetched; the final norm beside them. The
    all-gather buffer's copy is then of the largest module, gate/up/down_proj in NF4: 121,167,876 B. Off: the head
    (1,050,673,152 elements) alone exceeds the limit: no layer kept, the one whose backward runs gathered beside
    the head and the head's buffer copy."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", engine="zero3", gpus=8, global_batch=8, seq_len=2048)
    off, lora = replace(s, vocab_parallel=False), plan.lora_params(spec, s)
    layer = 444_002_332
    assert plan.decoder_layer_elements(spec, s) + lora // 80 == layer
    assert plan.zero3_layers_kept(spec, off, lora) == 0 and plan.zero3_layers_kept(spec, s, lora) == 2
    assert plan.largest_layer_module_bytes(spec, s) == 121_167_876
    prefetched = (10 ** 9 - 2 * layer) * GATHERED_70B_LAYER // layer
    assert plan.zero3_gathered_bytes(spec, s, lora) == 2 * GATHERED_70B_LAYER + prefetched + 8_192 * 2 + 121_167_876
    assert plan.zero3_gathered_bytes(spec, off, lora) == 2 * TABLE_70B + 8_192 * 2 + GATHERED_70B_LAYER


def test_vocab_parallel_logits_and_loss_hold_one_ranks_rows_of_exchange_at_a_time():
    """Llama-3-70B, 2,048 bf16 tokens a GPU. Off: logits 2,048 x 128,256 x 2 = 525,336,576 B, one fp32 loss chunk
    2^23 x 4 = 33,554,432, a log-sum-exp a token 8,192: 558,899,200 B. On 8 GPUs (R = 16,384 rows of every rank's
    tokens, 16,032 vocabulary rows a GPU): as many logits, 16,384 x 16,032 x 2 = 525,336,576, 13 B a row kept for
    backward (212,992), and the head's backward at the start of backward, one owner's rows at a time: two fp32
    [2,048, 8,192] sums (the owner's being reduced and this rank's own, kept) 134,217,728, plus fp32 copies of one
    chunk of 2^23 // (2,048 + 8,192) = 819 head rows, 4 x 819 x 10,240 = 33,546,240 (more than the forward's
    broadcast buffer and padded copy, 2 x 2,048 x 8,192 x 2 = 67,108,864, and the loss chunk): 693,313,536 B.
    On 2 GPUs (R = 4,096): 525,336,576 + 53,248 + 167,763,968 = 693,153,792 B: nothing grows with the ranks but
    the 13 B a row."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(engine="fsdp2", gpus=8, seq_len=2048)
    off = plan.logits_bytes(spec, replace(s, vocab_parallel=False))
    assert off == plan.logits_bytes(spec, replace(s, gpus=1)) == 558_899_200
    assert plan.logits_bytes(spec, s) == 693_313_536
    assert plan.logits_bytes(spec, replace(s, gpus=2)) == 693_153_792


@pytest.mark.parametrize("gpus, exchange_more", [
    # 512 tokens: logits 131,334,144 as off (164,890,624 with the loss chunk), 13 R, and the backward's two fp32
    # [512, 8,192] sums plus 963 head rows of fp32 copies (2^23 // 8,704), 4 x 963 x 8,704
    (8, 131_334_144 + 13 * 4096 + 8 * 512 * 8192 + 4 * 963 * 8704 - 164_890_624),
    (2, 131_334_144 + 13 * 1024 + 8 * 512 * 8192 + 4 * 963 * 8704 - 164_890_624),
])
def test_70b_per_gpu_estimate_falls_by_the_gathered_head_less_the_exchange(gpus, exchange_more):
    """FSDP2, NF4, Llama-3-70B, activation checkpointing, 512 tokens a GPU: the allocated bytes fall by the head FSDP2
    no longer gathers less what the exchange adds to logits_and_loss (33,579,008 B on 8 GPUs, 33,539,072 on 2)."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", engine="fsdp2", gpus=gpus, global_batch=gpus, seq_len=512, checkpointing=True)
    on, off = estimate(spec, s), estimate(spec, replace(s, vocab_parallel=False))
    assert exchange_more == {8: 33_579_008, 2: 33_539_072}[gpus]
    assert off.tensor_bytes - on.tensor_bytes == TABLE_70B - exchange_more


def _per_op(traffic) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in traffic:
        out[t.op] = out.get(t.op, 0) + t.bytes_per_step
    return out


def test_vocab_parallel_traffic_exchanges_activations_instead_of_the_tables():
    """Llama-3-70B, 8 GPUs, 2,048 tokens, one micro-batch a step. FSDP2 no longer gathers the head twice and the
    embedding once (3 tables), not even with checkpointing (off, the embedding's backward gathers it again);
    ZeRO-3 neither table once and 2 fewer layers again for backward (2 kept within its limit instead of none beside
    the head: test_zero3_vocab_parallel_holds_two_70b_layers_and_gathers_no_table). Both add, with R = 16,384 rows:
    all_gather 16 R + 4 x 8 = 262,176 (int64 ids and targets, fp32 loss gradients); broadcast 2 x 8,192 x R =
    268,435,456 (bf16 hidden states, one rank's at a time); reduce (2 + 4) x 8,192 x R = 805,306,368 (bf16
    lookups, fp32 hidden-state gradients, to their owner); all_reduce 16 + 12 R = 196,624 (row counts, log-sum-exp
    maximum, exp-sums and target logits)."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", gpus=8, global_batch=8, seq_len=2048)
    for engine, fewer in (("fsdp2", 3 * TABLE_70B), ("zero3", 2 * TABLE_70B + 2 * GATHERED_70B_LAYER)):
        on = _per_op(plan.step_traffic(spec, replace(s, engine=engine)))
        off = _per_op(plan.step_traffic(spec, replace(s, engine=engine, vocab_parallel=False)))
        assert on == {"all_gather": off["all_gather"] - fewer + 262_176, "reduce_scatter": off["reduce_scatter"],
                      "broadcast": 268_435_456, "reduce": 805_306_368, "all_reduce": 196_624}, engine
    fsdp2 = replace(s, engine="fsdp2")
    assert _per_op(plan.step_traffic(spec, replace(fsdp2, checkpointing=True))) == _per_op(
        plan.step_traffic(spec, fsdp2))


def test_plan_command_says_where_the_embedding_and_head_are(tmp_path, capsys):
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    for flag, line in ((True, "embedding and head: vocabulary-parallel, 1/8 of their rows kept per GPU"),
                       (False, "embedding and head: gathered whole by the engine like a layer "
                               "(distributed.vocab_parallel: false; in gathered_weights)")):
        recipe = write_recipe(tmp_path, model, distributed={"engine": "fsdp2", "vocab_parallel": flag})
        assert main(["plan", str(recipe), "--gpus", "8", "--out", str(tmp_path / f"out-{flag}")]) == 0
        assert line in capsys.readouterr().out


# -- measured on 2 ranks ------------------------------------------------------------------------------

# Rank 0's allocated tensor bytes at the second optimizer step on 2 gloo ranks, NF4 base, LoRA r=8 all-linear,
# AdamW (bench/plan_validation_dist.py, BENCHMARKS.md; measured again 2026-12-04 with the chunked loss): base (frozen
# shards), states (live after backward minus base: LoRA, grads, master, Adam, persistent engine buffers; the
# smaller of the two ranks, see FSDP2_IN_FLIGHT), peak.
MEASURED = [  # model, engine, precision, micro-batch x sequence, activation checkpointing, base, states, peak
    ("small", "ddp", "fp32", (4, 256), False, 2553920, 2969968, 86158968),
    ("small", "zero1", "fp32", (4, 256), False, 2553920, 1786008, 89270948),
    ("small", "zero2", "fp32", (4, 256), False, 2553920, 1786008, 89240740),
    ("small", "zero3", "fp32", (4, 256), False, 1276960, 5490077, 91215057),
    ("small", "zero3", "fp32", (4, 256), True, 1276960, 5490077, 38115657),
    ("small", "fsdp2", "fp32", (4, 256), False, 1276960, 1194408, 84451504),
    ("small", "fsdp2", "fp32", (4, 256), True, 1276960, 1194408, 32004464),
    ("small", "ddp", "bf16", (4, 256), False, 2025024, 2969968, 62009968),
    ("small", "zero2", "bf16", (4, 256), False, 2025024, 1342104, 50533796),
    ("small", "fsdp2", "bf16", (4, 256), False, 1012512, 1194408, 49675168),
    ("400m", "fsdp2", "fp32", (1, 256), False, 211500496, 31114920, 1023020728),
    ("400m", "fsdp2", "bf16", (1, 256), False, 145914320, 30480040, 588497592),
]

# ZeRO-3 with qshard's gather limits (dsconfig.zero3_gather_limits), each decoder layer a ZeRO-3 leaf, and the
# embedding and head vocabulary-parallel, as the engine runs by default (bench/plan_validation_dist.py --only zero3,
# 2026-12-05, session 12, 9e61c50): the larger rank's peak allocated tensor bytes. (The measurement's "base" column
# leaves out the vocabulary shards, which are buffers, so only the peak is compared.) The rows above were taken at
# DeepSpeed's own limits, before vocabulary parallelism and the leaves.
MEASURED_ZERO3 = [  # model, precision, micro-batch x sequence, peak, the user's gather limits (none: qshard's)
    ("400m", "fp32", (1, 256), 862911705, ()),  # planned +0.5%
    ("400m", "bf16", (1, 256), 545476197, ()),  # -0.3%
    # bench/plan_validation_dist.py --only "zero3 deepspeed-limits" (bench/zero3-deepspeed-limits.json), same run:
    # the whole model gathered from forward to backward, planned at +2.5%
    ("400m", "fp32", (1, 256), 988979725, DS_OWN_GATHERING),
]


@pytest.mark.parametrize("size,precision,tokens,peak,gathering", MEASURED_ZERO3)
def test_zero3_prediction_with_its_gather_limits_is_within_10_percent_of_measured_bytes(size, precision, tokens, peak,
                                                                                        gathering):
    s = Settings(quant="nf4", dense_dtype="float32" if precision == "fp32" else "bfloat16", precision=precision,
                 lora_r=8, engine="zero3", micro_batch=tokens[0], seq_len=tokens[1], gpus=2, global_batch=2 * tokens[0],
                 zero3_gathering=gathering)
    assert estimate(tiny_spec(size), s).tensor_bytes == pytest.approx(peak, rel=0.10)


# Right after backward FSDP2 can still hold one decoder layer's unsharded fp32 LoRA gradients of the small model (its
# reduce-scatter in flight): seen on one or both ranks, run to run, never at the peak.
FSDP2_IN_FLIGHT = 147968


@pytest.mark.parametrize("size,engine,precision,tokens,ckpt,base,states,peak", MEASURED)
def test_per_rank_prediction_is_within_10_percent_of_measured_bytes(size, engine, precision, tokens, ckpt, base,
                                                                    states, peak):
    # measured before vocabulary parallelism existed: the engines gathered the embedding and head
    s = Settings(quant="nf4", dense_dtype="float32" if precision == "fp32" else "bfloat16", precision=precision,
                 lora_r=8, engine=engine, micro_batch=tokens[0], seq_len=tokens[1], checkpointing=ckpt, gpus=2,
                 global_batch=2 * tokens[0], vocab_parallel=False)
    e = estimate(tiny_spec(size), s)
    transient = ("engine_buffers",) if engine in ("zero1", "zero2") else ()  # ZeRO-1/2's bucket: backward only
    predicted_states = sum(e.gpu.get(k, 0) for k in ("lora_params", "lora_grads", "master_weights",
                                                     "optimizer_states", "engine_buffers") if k not in transient)
    assert e.gpu["base_weights"] == base
    in_flight = FSDP2_IN_FLIGHT if engine == "fsdp2" else 0
    assert (predicted_states == pytest.approx(states, rel=0.10)
            or predicted_states + in_flight == pytest.approx(states, rel=0.10))
    assert e.tensor_bytes == pytest.approx(peak, rel=0.10)


# -- activations, published figures ----------------------------------------------------------------

def test_activation_checkpointing_keeps_one_input_per_layer():
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", micro_batch=1, seq_len=4096, precision="bf16")
    full, ckpt = plan.activation_bytes(spec, s, 0), plan.activation_bytes(spec, replace(s, checkpointing=True), 0)
    per_layer = full // spec.layers
    assert ckpt == spec.layers * 4096 * spec.hidden * 2 + per_layer
    assert full / ckpt == pytest.approx(19.8, abs=0.1)  # 1.76 GB per layer at 4k tokens vs 64 MB inputs


def test_qlora_65b_fits_one_48gb_gpu_only_with_checkpointing():
    """QLoRA (Dettmers et al. 2023) fine-tuned LLaMA-65B on one 48 GB GPU: NF4 + double quant, LoRA r=64 on
    all linears, paged optimizer, batch 1, sequence 512, gradient checkpointing. qshard keeps adapters in
    fp32 (the paper used bf16), so the 8-bit paged AdamW is what fits here."""
    spec = model_spec(LLAMA_65B)
    s = Settings(quant="nf4", dense_dtype="float16", lora_r=64, optimizer="paged_adamw_8bit", micro_batch=1,
                 seq_len=512, checkpointing=True)
    gpu_48 = 48 * GIB
    assert estimate(spec, s).peak < gpu_48
    assert estimate(spec, replace(s, checkpointing=False)).peak > gpu_48
    # fp32 AdamW moments for 0.8B adapter parameters cost 4.5 GiB more: 47.9 GiB, at the limit
    assert estimate(spec, replace(s, optimizer="adamw")).peak - estimate(spec, s).peak > 4 * GIB
    assert 31 * GIB < estimate(spec, s).gpu["base_weights"] < 33 * GIB


def test_logits_cost_their_own_bf16_copy_and_one_fp32_loss_chunk():
    spec = model_spec(LLAMA3_70B)
    chunk, lse = 4 * 2**23, 4 * 2 * 4096
    assert plan.logits_bytes(spec, Settings(micro_batch=2, seq_len=4096)) == 2 * 2 * 4096 * 128256 + chunk + lse


# -- search and recommendation ---------------------------------------------------------------------

def test_70b_on_eight_24gb_gpus_recommends_a_sharded_engine(tmp_path):
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    recipe = load_recipe(write_recipe(tmp_path, model))
    result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=8, gpu_mem=24 * GIB)
    assert result.current.peak > 24 * GIB  # engine none: the whole 39.5 GB base on every GPU
    assert result.best is not None and result.best.peak <= 24 * GIB
    assert result.best.settings.engine in ("zero3", "fsdp2") and result.best.settings.quant == "nf4"
    fits = [e.peak <= 24 * GIB for e in result.ranked]
    assert fits == sorted(fits, reverse=True)  # everything that fits comes first


def test_recommendation_is_a_loadable_recipe_and_deepspeed_config(tmp_path):
    from qshard import compat
    from qshard.dsconfig import deepspeed_config

    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    recipe = load_recipe(write_recipe(tmp_path, model))
    result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=8, gpu_mem=24 * GIB, quants=("nf4",))
    zero3 = next(e for e in result.ranked if e.settings.engine == "zero3" and e.peak <= 24 * GIB
                 and not e.settings.offload_optimizer and not e.settings.offload_params)
    result.best = zero3
    written = plan.write_recommendation(result, recipe, tmp_path / "plan")
    again = load_recipe(written[0])
    assert again.distributed.engine == "deepspeed"  # the stage is the JSON's (the recipe may not repeat it)
    ds_json = json.loads(Path(again.distributed.deepspeed_config).read_text())
    assert compat.engine_key("deepspeed", ds_config=ds_json) == "zero3"
    assert plan.engine_settings(again.distributed) == ("zero3", False, False)
    s = zero3.settings
    assert again.train.micro_batch_size * again.train.gradient_accumulation_steps * 8 >= 8
    filled = deepspeed_config(zero_stage=3, offload_optimizer="none", offload_params="none", micro_batch=s.micro_batch,
                              accumulation=s.accumulation, world_size=8, precision="bf16", max_grad_norm=1.0,
                              user_config=again.distributed.deepspeed_config)
    assert filled["train_batch_size"] == s.micro_batch * s.accumulation * 8
    assert filled["zero_optimization"]["reduce_bucket_size"] == plan.lora_params(result.spec, s)


def test_recommendation_switching_engines_is_still_a_loadable_recipe(tmp_path):
    """A recipe on FSDP2 (reshard_after_forward off) recommended DDP, and one on a user's DeepSpeed JSON
    (whose stage 3 the planner reads, as the run does) recommended FSDP2: the other engine's keys go."""
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for distributed, choice in (({"engine": "fsdp2", "reshard_after_forward": False}, "ddp"),
                                ({"engine": "deepspeed", "deepspeed_config": str(tmp_path / "ds.json")}, "fsdp2")):
        recipe = load_recipe(write_recipe(tmp_path, model, distributed=distributed))
        result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=8, gpu_mem=80 * GIB)
        assert result.current.settings.engine == ("fsdp2" if choice == "ddp" else "zero3")
        result.best = next(e for e in result.ranked if e.settings.engine == choice)
        again = load_recipe(plan.write_recommendation(result, recipe, tmp_path / choice)[0])
        assert again.distributed.engine == choice and again.distributed.deepspeed_config is None
        assert again.distributed.reshard_after_forward is True


def test_planner_searches_the_tables_vocabulary_parallel_and_gathered_and_writes_the_choice(tmp_path):
    """Under ZeRO-3 / FSDP2 on 2+ GPUs each configuration is planned with the embedding and head vocabulary-parallel
    and gathered (`vocab:gathered` in the table); elsewhere the option does not apply and is not varied. For 70B on
    2 x 24 GiB the vocabulary-parallel one is recommended (the gathered tables cost 0.54 GiB more per GPU at the same
    speed), and whichever is chosen is written to the recipe as distributed.vocab_parallel, a recipe that loads."""
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    for gpus, varied in ((2, True), (1, False)):
        recipe = load_recipe(write_recipe(tmp_path, model))
        result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=gpus, gpu_mem=24 * GIB)
        pairs = {}
        for e in result.ranked:
            s = e.settings
            pairs.setdefault(replace(s, vocab_parallel=True), set()).add(s.vocab_parallel)
        sharded = [v for s, v in pairs.items() if s.engine in ("zero3", "fsdp2")]
        assert sharded and all(v == ({True, False} if varied else {True}) for v in sharded)
        assert all(v == {True} for s, v in pairs.items() if s.engine not in ("zero3", "fsdp2"))
    recipe = load_recipe(write_recipe(tmp_path, model))
    result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=2, gpu_mem=24 * GIB)
    best = result.best
    assert best.settings.engine == "zero3" and best.settings.vocab_parallel and best.settings.vocab_split
    twin = next(e for e in result.ranked if e.settings == replace(best.settings, vocab_parallel=False))
    assert twin.peak > best.peak and "vocab:gathered" in plan.format_table(result, limit=len(result.ranked))
    for choice, flag in ((twin, False), (best, True)):
        result.best = choice
        again = load_recipe(plan.write_recommendation(result, recipe, tmp_path / f"vp-{flag}")[0])
        assert again.distributed.vocab_parallel is flag


def test_parse_size_reads_binary_and_decimal_units():
    assert plan.parse_size("24GiB") == 24 * 2 ** 30
    assert plan.parse_size("80GB") == 80 * 10 ** 9
    assert plan.parse_size("1.5 MiB") == int(1.5 * 2 ** 20)


# -- the command -----------------------------------------------------------------------------------

def test_plan_command_prints_the_table_and_writes_the_recipe(tmp_path, capsys):
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    recipe = write_recipe(tmp_path, model)
    code = main(["plan", str(recipe), "--gpus", "4", "--nodes", "2", "--gpu-mem", "40GiB",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "70.55B parameters" in out and "rel. step" in out and "recommended:" in out
    assert (tmp_path / "out" / "recipe.yaml").is_file()


def test_plan_command_exits_1_when_nothing_fits(tmp_path, capsys):
    model = write_model_dir(tmp_path / "llama3-70b", LLAMA3_70B)
    recipe = write_recipe(tmp_path, model, data={"max_length": 32768})
    code = main(["plan", str(recipe), "--gpus", "1", "--gpu-mem", "8GiB", "--cpu-mem", "16GiB"])
    assert code == 1
    assert "nothing fits" in capsys.readouterr().out


def test_plan_command_names_a_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    recipe = write_recipe(tmp_path, tmp_path / "empty")
    assert main(["plan", str(recipe)]) == 2
    assert "has no config.json" in capsys.readouterr().err


# -- the planner is pure ---------------------------------------------------------------------------

def test_the_planner_imports_no_engine_nor_torch():
    """Its DeepSpeed rules come from qshard/dsconfig.py, which the engine imports too."""
    code = ("import sys, qshard.tools.plan; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'deepspeed') or m.startswith('qshard.engines')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# -- PTQ checkpoints kept as they are (quantization.method: checkpoint) ------------------------------

LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16",
             "tie_word_embeddings": False}
FIXTURES = sorted(p.name for p in PTQ.iterdir() if (p / "config.json").is_file())


def _quantization_config(fixture: str, **changes) -> dict:
    return json.loads((PTQ / fixture / "config.json").read_text())["quantization_config"] | changes


@pytest.mark.parametrize("fixture", FIXTURES)
def test_ptq_storage_from_config_equals_the_loaded_checkpoints_parameters(fixture):
    """From config.json alone, the planner's bytes for a PTQ checkpoint kept as it is equal those of the
    parameters qshard's loader builds from the real files (GPTQ v1/v2, act-order, per-channel, 8-bit; AWQ with
    and without zero points; compressed-tensors group/channel, sym/asym, 8-bit), and ZeRO-3's element count
    of a decoder layer (int32 words count once) equals theirs."""
    from qshard.model.load import QuantSpec, load_model

    spec = plan.read_model_spec(str(PTQ / fixture))
    model = load_model(str(PTQ / fixture), dtype="float32", quant=QuantSpec("checkpoint"), log=lambda *_: None)
    params = dict(model.named_parameters())
    s = Settings(quant="checkpoint", dense_dtype="float32")
    assert spec.checkpoint_format in ("gptq", "awq", "compressed-tensors") and len(spec.packed) == 7
    assert sum(plan.base_bytes(spec, s).values()) == sum(p.numel() * p.element_size() for p in params.values())
    assert plan.decoder_layer_elements(spec, s) == sum(p.numel() for n, p in params.items() if ".layers.0." in n)


@pytest.mark.parametrize("fixture, fmt, bits", [
    ("gptq_llama_w4_g32_sym", "gptq", 4 + (4 + 16) / 32),         # codes + 4-bit zero + fp16 scale per 32
    ("autoawq_llama_w4_g64_zp", "awq", 4 + (4 + 16) / 64),        # the same per 64
    ("ct_llama_w4a16_g32_sym", "compressed-tensors", 4 + 16 / 32),  # symmetric: no zero points
])
def test_plan_command_sizes_a_ptq_checkpoint_from_its_config(tmp_path, capsys, fixture, fmt, bits):
    """`qshard plan` on Llama-3-8B's shapes with each fixture's quantization_config: the layer linears
    (6.98e9 weights) at 4.625 (GPTQ g32: 4.035 GB, + an int32 g_idx per input row: 5.0 MB), 4.3125 (AWQ g64:
    3.76 GB) and 4.5 bits (compressed-tensors g32 symmetric: 3.93 GB), against NF4's 3.60 GB (4.127 bits);
    it recommends keeping the checkpoint."""
    model = write_model_dir(tmp_path / "model", {**LLAMA3_8B, "quantization_config": _quantization_config(fixture)})
    recipe = write_recipe(tmp_path, model, quantization={"method": "checkpoint"})
    assert main(["plan", str(recipe), "--gpus", "2", "--out", str(tmp_path / "out")]) == 0
    assert f"a {fmt} checkpoint" in capsys.readouterr().out
    assert load_recipe(tmp_path / "out" / "recipe.yaml").quantization.method == "checkpoint"
    spec = plan.read_model_spec(str(model))
    s = plan.settings_from_recipe(load_recipe(recipe), spec, gpus=2, nodes=1)
    weights = spec.components()["layer_linears"]
    g_idx = spec.layers * sum(n_in for n_in, _ in spec.layer_linears().values()) * 4 if fmt == "gptq" else 0
    assert weights == 6_979_321_856
    assert plan.base_bytes(spec, s)["layers"] == weights * bits / 8 + g_idx
    assert estimate(spec, replace(s, engine="fsdp2")).gpu["base_weights"] == sum(plan.base_bytes(spec, s).values()) // 2


@pytest.mark.parametrize("method, bits", [("nf4", 4.127), ("fp4", 4.127), ("int8", 8.006), ("none", 16.0)])
def test_plan_command_sizes_every_on_load_quantization(tmp_path, capsys, method, bits):
    """The same Llama-3-8B quantized on load: bits per layer-linear weight as stored (NF4/FP4 with double
    quant 4.127; int8 8 + an fp32 scale per output row; none: bf16)."""
    model = write_model_dir(tmp_path / "model", LLAMA3_8B)
    recipe = write_recipe(tmp_path, model, quantization={"method": method})
    assert main(["plan", str(recipe), "--gpus", "2", "--out", str(tmp_path / "out")]) == 0
    assert "recommended:" in capsys.readouterr().out
    spec = plan.read_model_spec(str(model))
    s = plan.settings_from_recipe(load_recipe(recipe), spec, gpus=2, nodes=1)
    assert plan.base_bytes(spec, s)["layers"] * 8 / spec.components()["layer_linears"] == pytest.approx(bits, abs=1e-3)


def test_gptq_4bit_base_is_the_nf4_base_within_the_formats_overheads(tmp_path):
    """Llama-3-8B's layer linears: NF4 with double quant 3.601 GB (4.127 bits a weight); GPTQ 4-bit in groups
    of 128 3.631 GB (4 + (4-bit zero + fp16 scale) / 128 = 4.156 bits, + 5.0 MB of g_idx): 0.8% more. The
    embeddings and the head stay bf16 (1.05 GB each) in both, so whole bases differ by 0.5%."""
    qc = _quantization_config("gptq_llama_w4_g32_sym", group_size=128)
    gptq = plan.read_model_spec(str(write_model_dir(tmp_path / "gptq", {**LLAMA3_8B, "quantization_config": qc})))
    g = plan.base_bytes(gptq, Settings(quant="checkpoint"))
    n = plan.base_bytes(model_spec(LLAMA3_8B), Settings(quant="nf4"))
    assert n["layers"] == pytest.approx(3.601e9, rel=1e-3) and g["layers"] == pytest.approx(3.631e9, rel=1e-3)
    assert g["layers"] / n["layers"] == pytest.approx(1.0084, abs=1e-3)
    assert (g["embed_tokens"], g["lm_head"]) == (n["embed_tokens"], n["lm_head"]) == (128256 * 4096 * 2,) * 2
    assert sum(g.values()) / sum(n.values()) == pytest.approx(1.0052, abs=1e-3)


def test_a_ptq_checkpoint_is_searched_as_it_is_and_converted(tmp_path):
    """Kept as it is, or converted on load (the loader dequantizes it): both are candidates, and the recipe's
    choice wins when it fits; a dense model is never planned as a checkpoint."""
    qc = _quantization_config("autoawq_llama_w4_g64_zp")
    model = write_model_dir(tmp_path / "awq", {**LLAMA3_8B, "quantization_config": qc})
    recipe = load_recipe(write_recipe(tmp_path, model, quantization={"method": "checkpoint"}))
    result = plan.make_plan(recipe, plan.read_model_spec(str(model)), gpus=2, gpu_mem=80 * GIB)
    assert {e.settings.quant for e in result.ranked} == {"checkpoint", "nf4", "int8", "none"}
    assert result.best.settings.quant == "checkpoint" and result.current.settings.quant == "checkpoint"
    dense = write_model_dir(tmp_path / "dense", LLAMA3_8B)
    from qshard.errors import QShardError

    with pytest.raises(QShardError, match="not a GPTQ/AWQ/compressed-tensors checkpoint"):
        plan.make_plan(load_recipe(write_recipe(tmp_path, dense, quantization={"method": "checkpoint"})),
                       plan.read_model_spec(str(dense)), gpus=2, gpu_mem=80 * GIB)


def test_ptq_layers_keep_no_dequantized_weight_for_backward_as_planned():
    """qshard's PTQ layers dequantize again in backward (qshard.quant.base.redequantizing_linear), like
    bitsandbytes' 4-bit matmul: the planner counts the same activations for a checkpoint base as for NF4.
    Measured on the GPTQ fixture with LoRA on every linear (fp32): no layer linear's weight is saved."""
    from qshard.model.load import QuantSpec, load_model
    from qshard.model.lora import attach_lora

    fixture = str(PTQ / "gptq_llama_w4_g32_sym")
    spec = plan.read_model_spec(fixture)
    model = load_model(fixture, dtype="float32", quant=QuantSpec("checkpoint"), log=lambda *_: None)
    peft = attach_lora(model, r=4, alpha=8, dropout=0.0, targets=list(spec.layer_linears()), use_dora=False, seed=0)
    shapes = set(spec.layer_linears().values())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        peft(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    weights = sum(t.numel() * 4 for t in saved if t.dim() == 2 and tuple(t.shape) in shapes)
    assert weights == 0
    settings = {q: Settings(quant=q, precision="fp32") for q in ("checkpoint", "nf4")}
    assert plan.activation_bytes(spec, settings["checkpoint"], 0) == plan.activation_bytes(spec, settings["nf4"], 0)


# -- LoRA parameters and the disk they take ----------------------------------------------------------

@pytest.mark.parametrize("arch, targets, dora", [("llama", "all-linear", False), ("qwen2", ["q_proj", "v_proj", "down_proj"],
                                                                                False), ("mistral", "all-linear", True)])
def test_lora_parameter_count_equals_peft(arch, targets, dora):
    """One count (plan.lora_param_count over shapes) from config.json and from the model equals PEFT's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qshard.model.lora import adapted_shapes, resolve_targets
    from qshard.tools.tiny import tiny_config

    config = tiny_config(arch, "micro", vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    names = resolve_targets(model, targets)
    shapes = adapted_shapes(model, names)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=names, use_dora=dora, task_type="CAUSAL_LM"))
    real = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    s = Settings(lora_r=8, lora_targets=targets if targets == "all-linear" else tuple(targets), use_dora=dora)
    assert plan.lora_param_count(shapes, 8, dora) == plan.lora_params(model_spec(config.to_dict()), s) == real
    assert real == {"llama": 16384, "qwen2": 2 * 8 * (64 + 64 + 64 + 32 + 128 + 64), "mistral": 16384 + 2 * 512}[arch]


def test_lora_parameter_count_of_qshard_quantized_layers_equals_peft(micro_model):
    """The same through qshard's loader and attach_lora: NF4 layers are adapted like nn.Linear."""
    from qshard.model.load import QuantSpec, load_model
    from qshard.model.lora import adapted_shapes, attach_lora, resolve_targets

    model = load_model(str(micro_model), dtype="float32", quant=QuantSpec("nf4"), log=lambda *_: None)
    names = resolve_targets(model, "all-linear")
    shapes = adapted_shapes(model, names)
    peft = attach_lora(model, r=8, alpha=16, dropout=0.0, targets=names, use_dora=False, seed=0)
    assert plan.lora_param_count(shapes, 8) == sum(p.numel() for p in peft.parameters() if p.requires_grad) == 16384


def _safetensors_data_bytes(path: Path) -> int:
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header


def test_checkpoint_disk_bytes_cover_a_real_run_at_its_fullest(micro_model, tmp_path):
    """A 3-step run saving every step, keeping 1 checkpoint, of the 16,384-parameter adapter: a checkpoint's
    tensors are 12 B per parameter (adapter + AdamW's two moments, + a 4 B step counter per LoRA tensor), its
    other files 58 KB; at its fullest the folder holds 2 checkpoints, the final adapter and the run's files."""
    from qshard.config import parse_recipe
    from qshard.train import run
    from tests.helpers import recipe_dict, write_rows

    data = write_rows(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    run(parse_recipe(recipe_dict(micro_model, data, out, max_steps=3, save_every=1, keep_checkpoints=1,
                                 sample_tokens=0)), log=lambda *_: None)
    lora, keep = 16384, 1
    (checkpoint,) = out.glob("checkpoint-*")
    size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())  # noqa: E731
    tensors = sum(_safetensors_data_bytes(p) for p in checkpoint.rglob("*.safetensors") if "rng" not in p.name)
    assert 12 * lora <= tensors <= 12 * lora + 4 * 28  # 28 LoRA tensors
    assert size(checkpoint) - tensors < plan.CHECKPOINT_FILES_BYTES / 16
    fullest = (keep + 1) * size(checkpoint) + size(out) - size(checkpoint)
    need = plan.checkpoint_disk_bytes(lora, keep)
    assert fullest <= need <= fullest + (keep + 1) * plan.CHECKPOINT_FILES_BYTES + plan.DISK_MARGIN


def test_a_quantized_base_counts_its_largest_linear_dequantized_for_the_matmul():
    """Llama-3-70B NF4 in bf16: gate_proj's 8,192 x 28,672 weight made dense for its matmul, 469,762,048 B (448 MiB);
    in fp32 twice that; a dense base dequantizes nothing; a MoE stack one expert's gate_up_proj at a time
    (Mixtral-8x7B: 4,096 x 2 x 14,336 in bf16 = 234,881,024 B, more than its attention's 4,096 x 4,096)."""
    spec = model_spec(LLAMA3_70B)
    s = Settings(quant="nf4", engine="fsdp2", gpus=8, seq_len=2048)
    assert plan.dequantized_weight_bytes(spec, s) == 8192 * 28672 * 2 == 469_762_048
    assert plan.dequantized_weight_bytes(spec, replace(s, precision="fp32")) == 939_524_096
    assert estimate(spec, s).gpu["dequantized_weight"] == 469_762_048
    assert "dequantized_weight" not in estimate(spec, replace(s, quant="none")).gpu
    mixtral = model_spec({"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                          "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert plan.dequantized_weight_bytes(mixtral, s) == 4096 * 2 * 14336 * 2 == 234_881_024


def test_deepspeed_engine_fills_qshards_gather_limits_and_keeps_the_users():
    """The DeepSpeed engine sizes ZeRO-3's limits by the largest decoder layer as loaded (here whole: no ds_numel),
    fills only the keys the config leaves unset, and says which values hold and how to change them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qshard.dsconfig import zero3_gather_limits
    from qshard.engines.deepspeed import _limit_zero3_gathers

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    zero = {"stage": 3}
    (note,) = _limit_zero3_gathers(zero, model)
    assert {k: zero[k] for k in zero3_gather_limits(layer)} == zero3_gather_limits(layer) == {
        "stage3_prefetch_bucket_size": 2 * layer, "stage3_max_live_parameters": 4 * layer,
        "stage3_max_reuse_distance": 0}
    assert "distributed.deepspeed_config" in note and "stage3_max_live_parameters" in note
    users = {"stage": 3, "stage3_max_live_parameters": 10 ** 9}
    (note,) = _limit_zero3_gathers(users, model)
    assert users["stage3_max_live_parameters"] == 10 ** 9 and users["stage3_prefetch_bucket_size"] == 2 * layer
    assert "partly from the DeepSpeed config" in note
