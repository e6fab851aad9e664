"""`qshard plan`: predicted memory per GPU for every configuration, from config.json alone.

Everything here is a pure function of (model spec, hardware, settings): no device is touched and no
weight is read, so a 70B run can be planned on a laptop. Every prediction carries its bytes per
component, and every constant below says where it comes from.

Activation memory follows the method of Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models" (arXiv:2205.05198, section 4.1): count the tensors each op saves for
backward. Their GPT layer in fp16 saves sbh(34 + 5as/h) bytes. A LoRA layer on a frozen Llama-style
base saves different tensors (no dropout masks; a fused attention kernel keeps no s^2 scores; SwiGLU
instead of GeLU; frozen linears keep no inputs, LoRA's A matrices do), counted in `layer_activation_bytes`
and checked against measured bytes (bench/plan_validation.py, BENCHMARKS.md). What the engines add per rank
(DDP's buckets, DeepSpeed's partitions, reduce bucket and gathered parameters, FSDP2's unsharded layers and
root) follows their source, cited where it is used, and is checked on 2 ranks (bench/plan_validation_dist.py).
The vocabulary-parallel embedding and head (qshard/model/vocab.py) follow its code; their traffic is counted on 2
ranks (tests/test_commcount.py), their memory is not measured yet.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from qshard import compat
from qshard.dsconfig import (
    ZERO3_GATHER_KEYS,
    deepspeed_config,
    read_user_config,
    reduce_bucket_size,
    zero3_gather_limits,
)
from qshard.errors import QShardError

GIB = 1024 ** 3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes (qshard/quant/bnb4bit.py)

# Outside allocated tensor bytes: the CUDA context (kernels, cuBLAS workspace; 0.3-0.9 GiB by driver and
# card), NCCL's communicator buffers, and the caching allocator's fragmentation on top of live tensors.
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
NCCL_BYTES = int(0.25 * GIB)
FRAGMENTATION = 0.05

# Step-time assumptions (H100-class node): dense bf16 at 40% of 989 TFLOP/s; dequantizing costs extra
# (bitsandbytes 4-bit ~1.2x, LLM.int8 with outliers ~1.6x); NVLink 150 GB/s and 200 Gb/s InfiniBand
# (25 GB/s) per GPU as effective collective bandwidth; PCIe 20 GB/s for offload; CPU Adam 1e9 params/s.
# A PTQ checkpoint's layers (method `checkpoint`) dequantize each weight in torch in forward and again in
# backward (as bitsandbytes' 4-bit does): assumed to cost as much as bitsandbytes' 4-bit, not measured on
# a GPU (bench/ptq_train_memory.py on CPU, 1 thread, TinyLlama shapes, 512 tokens: GPTQ 1.19x NF4's step).
GPU_FLOPS = 0.4 * 989e12
# qshard/loss.py CHUNK_ELEMENTS (kept torch-free here; tests/test_loss.py checks the two agree)
LOSS_CHUNK_ELEMENTS = 1 << 23
DEQUANT_SLOWDOWN = {"none": 1.0, "nf4": 1.2, "fp4": 1.2, "int8": 1.6, "checkpoint": 1.2}
INTRA_NODE_BW, INTER_NODE_BW, PCIE_BW, CPU_ADAM_PARAMS_PER_S = 150e9, 25e9, 20e9, 1e9
DDP_BUCKET = 25 * 2 ** 20  # torch DDP's default bucket_cap_mb: the size of one gradient all-reduce

# Disk: what a checkpoint folder holds besides 12 B per LoRA parameter (qshard/state/checkpoint.py: the
# optimizer's JSON, safetensors headers, RNG states, recipe, manifest): 58 KB measured on the 2-layer test model
# (tests/test_plan.py: 28 LoRA tensors, one rank), ~1.1 KB per LoRA tensor and ~24 KB per rank, so a 70B's
# 1,120 LoRA tensors on 64 ranks take ~2.8 MB. The margin is for metrics.jsonl (~250 B a step) and the run's files.
CHECKPOINT_FILES_BYTES = 4 << 20
DISK_MARGIN = 16 << 20


# -- the model, from config.json -------------------------------------------------------------------

# transformers' module path of each layer linear (how a checkpoint's quantization_config names them)
LAYER_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "q_a_proj": "self_attn", "q_b_proj": "self_attn", "kv_a_proj_with_mqa": "self_attn",
                 "kv_b_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class PackedLayout:
    """How qshard stores one linear of a GPTQ / AWQ / compressed-tensors checkpoint: as the checkpoint has it,
    every tensor a frozen parameter (qshard/quant/gptq.py, awq.py, compressed_tensors.py): the codes packed
    32 / bits to an int32, int32-packed zero points per group and output, the float scales per group and
    output kept as raw uint8 bytes, and GPTQ's int32 group index per input row."""

    format: str        # gptq | awq | compressed-tensors
    bits: int
    group_size: int    # -1: one group per output channel
    zero_points: bool  # GPTQ and AWQ always store them; compressed-tensors only when asymmetric
    scale_bytes: int   # GPTQ's scales are fp16; AWQ's and compressed-tensors' the checkpoint's dtype

    def tensors(self, n_in: int, n_out: int) -> list[tuple[int, int]]:
        """(elements, bytes per element) of each stored tensor of an [n_out, n_in] linear."""
        groups = 1 if self.group_size == -1 else -(-n_in // self.group_size)
        words = lambda n: n * self.bits // 32  # noqa: E731 (int32 words holding n codes)
        stored = [(words(n_in * n_out), 4), (groups * n_out * self.scale_bytes, 1)]
        if self.zero_points:
            stored.append((groups * words(n_out), 4))
        if self.format == "gptq":
            stored.append((n_in, 4))  # g_idx
        return stored


# q/k norms inside attention, which config.json does not record: over the head dimension (Qwen3) or the
# projections' whole width (OLMo 2, OLMoE)
QK_NORMS = {"qwen3": "head", "qwen3_moe": "head", "olmo2": "width", "olmoe": "width"}
# config.json's shapes of multi-head latent attention (DeepSeek-V2/V3), in ModelSpec.mla's order
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# config.json's count of routed experts, by the names transformers' MoE configs give it
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a Llama / Qwen2 / Mistral-style decoder (the fields of its config.json), and of its
    Mixture-of-Experts blocks where it has them (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3-style)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    dtype: str = "bfloat16"
    # a GPTQ / AWQ / compressed-tensors checkpoint (config.json's quantization_config): its format and the layer
    # linears it quantized (read for the first layer), with their layout; the others are dense
    checkpoint_format: str | None = None
    packed: tuple[tuple[str, PackedLayout], ...] = ()
    qk_norm: int = 0  # elements of one layer's norms inside attention (QK_NORMS; MLA's q_a and kv_a norms)
    # multi-head latent attention (DeepSeek-V2/V3): q_lora_rank (0: one q_proj), kv_lora_rank, qk_nope_head_dim,
    # qk_rope_head_dim, v_head_dim; () for Llama-style attention
    mla: tuple[int, ...] = ()
    # Mixture-of-Experts (0 experts: a dense model). A MoE layer holds `experts` routed experts of width
    # expert_intermediate, experts_per_token of them run per token; shared experts (run for every token) of
    # total width shared_intermediate, behind a sigmoid gate where shared_expert_gate (Qwen2-MoE). The layers
    # in dense_layers keep a dense MLP of width `intermediate`.
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    shared_expert_gate: bool = False
    dense_layers: tuple[int, ...] = ()

    def layer_is_moe(self) -> list[bool]:
        """For each decoder layer in order: whether it holds a MoE block (else a dense MLP)."""
        return [self.experts > 0 and i not in self.dense_layers for i in range(self.layers)]

    def layer_kinds(self) -> dict[bool, int]:
        """How many decoder layers have a dense MLP (False) and how many a MoE block (True); absent kinds left out."""
        moe = sum(self.layer_is_moe())
        return {kind: n for kind, n in ((False, self.layers - moe), (True, moe)) if n}

    def layer_linears(self, moe: bool = False) -> dict[str, tuple[int, int]]:
        """Linear layers of one decoder layer: name -> (in_features, out_features). A MoE layer's are the
        attention's and its shared experts' (named as transformers names them); its experts are `expert_tensors`."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        linears = self.latent_attention_linears() if self.mla else {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        i = self.shared_intermediate if moe else self.intermediate
        if i:
            linears |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if moe and self.shared_expert_gate:
            linears["shared_expert_gate"] = (h, 1)
        return linears

    def latent_attention_linears(self) -> dict[str, tuple[int, int]]:
        """Multi-head latent attention's linears (transformers' DeepseekV3Attention)."""
        (q_rank, kv_rank, nope, rope, v), h, n = self.mla, self.hidden, self.heads
        q = {"q_a_proj": (h, q_rank), "q_b_proj": (q_rank, n * (nope + rope))} if q_rank else {
            "q_proj": (h, n * (nope + rope))}
        return q | {"kv_a_proj_with_mqa": (h, kv_rank + rope), "kv_b_proj": (kv_rank, n * (nope + v)),
                    "o_proj": (n * v, h)}

    def expert_tensors(self) -> dict[str, tuple[int, int]]:
        """A MoE layer's fused expert tensors, each as one expert's matrix (in_features, out_features):
        `experts.gate_up_proj` [E, 2 I, H] and `experts.down_proj` [E, H, I]. The router is [E, H]."""
        h, i = self.hidden, self.expert_intermediate
        return {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}

    def components(self) -> dict[str, int]:
        """Parameter count per component (biases counted with the layer's linears)."""
        kinds = self.layer_kinds()
        linears = sum(n * sum(i * o for i, o in self.layer_linears(moe).values()) for moe, n in kinds.items())
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        moe = kinds.get(True, 0)
        return {"embed_tokens": self.vocab * self.hidden, "layer_linears": linears + bias,
                "experts": moe * self.experts * sum(i * o for i, o in self.expert_tensors().values()),
                "routers": moe * self.experts * self.hidden,
                "norms": (2 * self.layers + 1) * self.hidden + self.layers * self.qk_norm,
                "lm_head": 0 if self.tied else self.vocab * self.hidden}

    @property
    def params(self) -> int:
        return sum(self.components().values())

    @property
    def active_params(self) -> int:
        """Parameters one token computes with: all but the routed experts, and experts_per_token of those."""
        experts = self.components()["experts"]
        return self.params - experts + (experts // self.experts * self.experts_per_token if self.experts else 0)


def model_spec(config: dict) -> ModelSpec:
    """Read the fields the planner needs from a config.json dict; a missing one is a QShardError."""
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if k not in config]
    if missing:
        raise QShardError(f"config.json lacks {', '.join(missing)}", where="model.path",
                          fix="the planner understands Llama / Qwen2 / Mistral-style decoder configs")
    _check_whole_numbers(config, need + ("num_key_value_heads", "head_dim", "num_experts_per_tok",
                                         "moe_intermediate_size", "decoder_sparse_step"), minimum=1)
    _check_whole_numbers(config, EXPERT_COUNTS + MLA_KEYS + ("shared_expert_intermediate_size", "n_shared_experts",
                                                             "first_k_dense_replace"), minimum=0)
    heads = config["num_attention_heads"]
    model_type = config.get("model_type", "llama")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    norm = QK_NORMS.get(model_type)
    spec = ModelSpec(model_type=model_type, hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                     heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                     tied=bool(config.get("tie_word_embeddings", False)),
                     qkv_bias=model_type == "qwen2" or bool(config.get("qkv_bias") or config.get("attention_bias")),
                     dtype=str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"),
                     qk_norm={"head": 2 * head_dim, "width": (heads + kv_heads) * head_dim}.get(norm, 0))
    if config.get("kv_lora_rank"):  # multi-head latent attention, with a norm on each low-rank projection
        mla = tuple(config.get(k) or 0 for k in MLA_KEYS)
        spec = replace(spec, mla=mla, qk_norm=mla[0] + mla[1])
    return replace(spec, **moe_fields(config))


def moe_fields(config: dict) -> dict:
    """ModelSpec's Mixture-of-Experts fields from config.json ({} for a dense model). The experts' width is
    moe_intermediate_size where given (Qwen-MoE, DeepSeek), else intermediate_size (Mixtral, OLMoE); shared
    experts are one MLP of shared_expert_intermediate_size (with its gate) or n_shared_experts x the experts'
    width; a layer keeps a dense MLP when listed in mlp_only_layers, off the decoder_sparse_step, or among the
    first_k_dense_replace (as transformers' decoder layers decide)."""
    experts = next((config[k] for k in EXPERT_COUNTS if config.get(k)), 0)
    if not experts:
        return {}
    top_k = config.get("num_experts_per_tok")
    if not top_k or top_k > experts:
        raise QShardError(f"config.json has {experts} experts and num_experts_per_tok={top_k!r}",
                          where="model.path: config.json num_experts_per_tok",
                          fix="restore config.json as save_pretrained writes it (1 to the number of experts)")
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    gated = bool(config.get("shared_expert_intermediate_size"))
    shared = config.get("shared_expert_intermediate_size") or (config.get("n_shared_experts") or 0) * width
    step, first = config.get("decoder_sparse_step") or 1, config.get("first_k_dense_replace") or 0
    only = set(config.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(config["num_hidden_layers"]) if i in only or i < first or (i + 1) % step)
    return {"experts": experts, "experts_per_token": top_k, "expert_intermediate": width,
            "shared_intermediate": shared, "shared_expert_gate": gated, "dense_layers": dense}


def _check_whole_numbers(config: dict, keys: tuple[str, ...], minimum: int) -> None:
    bad = [k for k in keys if config.get(k) is not None
           and (isinstance(config[k], bool) or not isinstance(config[k], int) or config[k] < minimum)]
    if bad:
        kind = "positive" if minimum else "non-negative"
        raise QShardError(f"config.json: {', '.join(f'{k}={config[k]!r}' for k in bad)} must be {kind} whole "
                          "numbers", where=f"model.path: config.json {bad[0]}",
                          fix="restore config.json as save_pretrained writes it")


def read_model_spec(path: str) -> ModelSpec:
    """config.json of a local model folder (or a hub id: only config.json is fetched)."""
    local = Path(path).expanduser()
    if local.exists():
        file = local / "config.json"
        if not file.is_file():
            raise QShardError(f"{local} has no config.json", where="model.path",
                              fix="point model.path at the folder that holds config.json")
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(path, "config.json"))
        except Exception as e:  # any hub failure means "cannot find the model"
            raise QShardError(f"model {path!r} is not a local folder and its config.json could not be fetched "
                              f"({type(e).__name__})", where="model.path", fix="give a local model folder") from None
    from qshard.model.folder import read_json  # bounded, and any problem names the file

    config = read_json(file)
    spec = model_spec(config)
    if not config.get("quantization_config"):
        return spec
    from qshard.quant import (
        ptq,  # the loader's own reading of quantization_config: what it refuses, this refuses
    )

    fmt = ptq.detect(file.parent)
    return replace(spec, checkpoint_format=fmt.name, packed=packed_layouts(spec, fmt.name, fmt.config))


def packed_layouts(spec: ModelSpec, fmt: str, config) -> tuple[tuple[str, PackedLayout], ...]:
    """The layer linears a PTQ checkpoint quantized, and how, from its parsed quantization_config
    (qshard/quant/gptq.py GPTQConfig, awq.py AWQConfig, compressed_tensors.py CompressedTensorsConfig)."""
    scale_bytes = DTYPE_BYTES.get(spec.dtype, 2)
    layouts = []
    for name in spec.layer_linears():
        module = f"model.layers.0.{LAYER_MODULES[name]}.{name}"
        if fmt == "gptq":  # every linear of the decoder layers (qshard refuses per-module `dynamic` overrides)
            layout = PackedLayout(fmt, config.bits, config.group_size, True, 2)
        elif fmt == "awq":  # 4-bit gemm only; modules_to_not_convert matched as transformers matches them
            dense = any(key in module for key in config.modules_to_not_convert)
            layout = None if dense else PackedLayout(fmt, 4, config.group_size, True, scale_bytes)
        else:
            scheme = config.scheme_for(module)
            layout = scheme and PackedLayout(fmt, scheme.bits, scheme.group_size, not scheme.symmetric, scale_bytes)
        if layout is not None:
            layouts.append((name, layout))
    return tuple(layouts)


def quantized_by_qshard(spec: ModelSpec, bits: int, group_size: int) -> ModelSpec:
    """The model `qshard quantize` will write from a dense model of `spec`, before it exists (a `qshard stages`
    training stage on a quantize stage's output): llm-compressor's GPTQ saved as compressed-tensors
    pack-quantized, symmetric, `bits`, groups of `group_size`, every linear but the head (qshard/tools/quantize.py)."""
    from qshard.quant.compressed_tensors import CompressedTensorsConfig, WeightScheme

    config = CompressedTensorsConfig(groups=((("Linear",), WeightScheme(bits, group_size, True)),), ignore=("lm_head",))
    return replace(spec, checkpoint_format="compressed-tensors",
                   packed=packed_layouts(spec, "compressed-tensors", config))


# -- bytes of each component -------------------------------------------------------------------------

def linear_tensors(n_in: int, n_out: int, method: str, double_quant: bool, dense_bytes: int) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each tensor qshard stores for one frozen base linear's weight when it
    quantizes on load (qshard/quant/bnb4bit.py, bnb8bit.py): exact, not an estimate.

    NF4/FP4: two 4-bit codes per byte, plus one absmax per 64 weights: an fp32 (4 B) without double
    quant; with double quant (QLoRA's DQ) a uint8 code plus one fp32 per 256 absmax blocks and an fp32
    offset, i.e. 0.5 + 4/64 B = 4.5 bits/param without DQ and 0.5 + 1/64 + 4/(64*256) B = 4.127 bits with.
    int8: one byte per weight plus an fp32 scale per output row. Every quantized tensor is uint8 / int8."""
    n = n_in * n_out
    if method in ("nf4", "fp4"):
        blocks = -(-n // NF4_BLOCK)
        scales = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 if double_quant else 4 * blocks
        return [((n + 1) // 2 + scales, 1)]
    if method == "int8":
        return [(n + 4 * n_out, 1)]
    return [(n, dense_bytes)]


def linear_storage_bytes(n_in: int, n_out: int, method: str, double_quant: bool, dense_bytes: int) -> int:
    """Bytes of `linear_tensors`."""
    return _nbytes(linear_tensors(n_in, n_out, method, double_quant, dense_bytes))


def _nbytes(tensors: list[tuple[int, int]]) -> int:
    return sum(k * size for k, size in tensors)


@dataclass(frozen=True)
class Settings:
    """One candidate configuration: what the recipe fixes plus what the search varies."""

    quant: str = "nf4"
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ("lm_head",)
    dense_dtype: str = "bfloat16"    # embeddings, norms, skipped linears
    precision: str = "bf16"          # bf16 | fp16 | fp32: the forward's activations
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = "all-linear"
    use_dora: bool = False
    optimizer: str = "adamw"
    engine: str = "none"             # none | ddp | zero1 | zero2 | zero3 | fsdp2
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True  # FSDP2
    vocab_parallel: bool = True      # distributed.vocab_parallel; where it applies: `vocab_split`
    zero3_gathering: tuple[tuple[str, int], ...] = ()  # ZeRO-3 gather limits the user's DeepSpeed JSON sets
    micro_batch: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    gpus: int = 1
    nodes: int = 1
    global_batch: int = 1            # sequences per optimizer step, over all GPUs

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def accumulation(self) -> int:
        return max(1, math.ceil(self.global_batch / (self.micro_batch * self.world)))

    @property
    def vocab_split(self) -> bool:
        """Embedding and head vocabulary-parallel (qshard/train.py split_vocabulary): each rank keeps 1/N of their
        rows as buffers the engine never gathers. ZeRO-3 and FSDP2 on 2+ GPUs, unless the recipe turns it off or
        names either as a LoRA target (a trained table is left to the engine: qshard/model/vocab.py why_not;
        qshard/model/lora.py resolve_targets refuses those targets today, so no run reaches that case yet)."""
        targets = () if self.lora_targets == "all-linear" else self.lora_targets
        return (self.vocab_parallel and self.engine in ("zero3", "fsdp2") and self.world >= 2
                and not {"lm_head", "embed_tokens"} & set(targets))

    @property
    def label(self) -> str:
        off = "+off_opt" if self.offload_optimizer else ""
        off += "+off_params" if self.offload_params else ""
        gathered = not self.vocab_split and self.engine in ("zero3", "fsdp2") and self.world >= 2
        return f"{self.engine}{off}{' vocab:gathered' if gathered else ''}"


def stored_linear(spec: ModelSpec, s: Settings, name: str, moe: bool = False) -> list[tuple[int, int]]:
    """(elements, bytes per element) of what qshard stores for a layer linear (of a MoE layer where `moe`) or
    the head: the checkpoint's packed tensors (method `checkpoint`), the on-load quantization, or the dense weight."""
    n_in, n_out = (spec.hidden, spec.vocab) if name == "lm_head" else spec.layer_linears(moe)[name]
    dense = DTYPE_BYTES[s.dense_dtype]
    if s.quant == "checkpoint":
        layout = dict(spec.packed).get(name)
        return layout.tensors(n_in, n_out) if layout else [(n_in * n_out, dense)]
    method = "none" if name in s.skip_modules else s.quant
    return linear_tensors(n_in, n_out, method, s.double_quant, dense)


def qkv_bias(spec: ModelSpec, s: Settings) -> tuple[int, int]:
    """(elements, bytes per element) of one layer's q/k/v biases. A PTQ layer keeps its bias in the checkpoint's
    dtype, the one its scales have (GPTQ fp16; AWQ and compressed-tensors the checkpoint's)."""
    if not spec.qkv_bias:
        return 0, 0
    layout = dict(spec.packed).get("q_proj") if s.quant == "checkpoint" else None
    elements = (spec.heads + 2 * spec.kv_heads) * spec.head_dim
    return elements, layout.scale_bytes if layout else DTYPE_BYTES[s.dense_dtype]


def stored_experts(spec: ModelSpec, s: Settings) -> list[tuple[int, int]]:
    """(elements, bytes per element) of one MoE layer's fused expert tensors and its router. Each expert's
    matrix is stored as qshard stores a linear layer's weight of that shape, the E of them stacked along a
    leading dimension (qshard/model/experts.py ExpertStack): E x `linear_tensors`. The router stays dense, as do
    the experts with method `none`, and `checkpoint` (planned dense: a PTQ checkpoint's experts are not read
    packed)."""
    dense = DTYPE_BYTES[s.dense_dtype]
    method = "none" if s.quant == "checkpoint" else s.quant
    stacks = [(spec.experts * k, size) for n_in, n_out in spec.expert_tensors().values()
              for k, size in linear_tensors(n_in, n_out, method, s.double_quant, dense)]
    return stacks + [(spec.experts * spec.hidden, dense)]


def stored_layer_linears(spec: ModelSpec, s: Settings, moe: bool) -> list[tuple[int, int]]:
    """(elements, bytes per element) of one decoder layer's stored linears and q/k/v biases."""
    return [t for name in spec.layer_linears(moe) for t in stored_linear(spec, s, name, moe)] + [qkv_bias(spec, s)]


def layer_tensors(spec: ModelSpec, s: Settings, moe: bool) -> list[tuple[int, int]]:
    """The same, and in a MoE layer its experts and router: all a decoder layer stores but its norms."""
    return stored_layer_linears(spec, s, moe) + (stored_experts(spec, s) if moe else [])


def base_bytes(spec: ModelSpec, s: Settings) -> dict[str, int]:
    """Frozen base weights by component, as stored (quantized linears and experts, dense embeddings, routers
    and norms); `layers` holds the layers' linears, `experts` the MoE layers' experts and routers."""
    dense = DTYPE_BYTES[s.dense_dtype]
    kinds = spec.layer_kinds()
    layers = sum(n * _nbytes(stored_layer_linears(spec, s, moe)) for moe, n in kinds.items())
    experts = kinds.get(True, 0) * _nbytes(stored_experts(spec, s)) if spec.experts else 0
    head = 0 if spec.tied else _nbytes(stored_linear(spec, s, "lm_head"))
    return {"embed_tokens": spec.vocab * spec.hidden * dense, "layers": layers, "experts": experts,
            "norms": spec.components()["norms"] * dense, "lm_head": head}


def layer_norm_elements(spec: ModelSpec) -> int:
    """One decoder layer's norms: the two around attention and the MLP, and its q/k norms."""
    return 2 * spec.hidden + spec.qk_norm


def decoder_layer_bytes(spec: ModelSpec, s: Settings, moe: bool | None = None) -> int:
    """One decoder layer's frozen storage: the unit FSDP2 / ZeRO-3 all-gather at a time. By default the
    largest kind: a MoE layer (its experts included) where the model has one."""
    moe = True in spec.layer_kinds() if moe is None else moe
    return _nbytes(layer_tensors(spec, s, moe)) + layer_norm_elements(spec) * DTYPE_BYTES[s.dense_dtype]


def root_bytes(spec: ModelSpec, s: Settings) -> int:
    """The frozen storage outside the decoder layers (embeddings, final norm, head)."""
    b = base_bytes(spec, s)
    return b["embed_tokens"] + spec.hidden * DTYPE_BYTES[s.dense_dtype] + b["lm_head"]


def vocab_parallel_bytes(spec: ModelSpec, s: Settings) -> int:
    """The embedding and the (untied) head where they are vocabulary-parallel (`Settings.vocab_split`), else 0:
    buffers each rank keeps 1/N of (as the engine would keep its shard), which the engine never gathers."""
    b = base_bytes(spec, s)
    return b["embed_tokens"] + b["lm_head"] if s.vocab_split else 0


def fsdp2_peak_outside(spec: ModelSpec, s: Settings) -> int:
    """What FSDP2 holds gathered outside the decoder layers at the peak: all of it where the head is tied to
    the embedding (both in the root), else the head and the final norm (the embedding is resharded); the final
    norm alone where they are vocabulary-parallel (no parameters of FSDP2's: the root holds only the norm)."""
    if s.vocab_split:
        return spec.hidden * DTYPE_BYTES[s.dense_dtype]
    return root_bytes(spec, s) - (0 if spec.tied else base_bytes(spec, s)["embed_tokens"])


def decoder_layer_elements(spec: ModelSpec, s: Settings, moe: bool | None = None) -> int:
    """Elements of one decoder layer's frozen parameters as ZeRO-3 counts them (`ds_numel`): one per byte of
    on-load quantized storage (uint8 parameters, experts included), one per int32 word of a PTQ checkpoint's
    codes, one per dense weight. By default the largest kind, as `decoder_layer_bytes`."""
    moe = True in spec.layer_kinds() if moe is None else moe
    return sum(k for k, _ in layer_tensors(spec, s, moe)) + layer_norm_elements(spec)


def gathered_layer_sizes(spec: ModelSpec, s: Settings) -> dict[bool, tuple[int, int]]:
    """(bytes, elements) of each kind of decoder layer (MoE or not) as ZeRO-3 and FSDP2 gather it: its frozen
    storage and its LoRA tensors whole, in the compute dtype (DeepSpeed casts them to it, FSDP2's param_dtype
    gathers them so)."""
    half = 4 if s.precision == "fp32" else 2
    return {moe: (decoder_layer_bytes(spec, s, moe) + layer_lora_params(spec, s, moe) * half,
                  decoder_layer_elements(spec, s, moe) + layer_lora_params(spec, s, moe))
            for moe in spec.layer_kinds()}


def zero3_limits(spec: ModelSpec, s: Settings) -> dict[str, int]:
    """The ZeRO-3 gather limits of the run: the keys the user's DeepSpeed JSON sets (`s.zero3_gathering`), the
    others as the engine fills them (dsconfig.zero3_gather_limits, from the largest decoder layer's gathered
    elements)."""
    own = zero3_gather_limits(max(elements for _, elements in gathered_layer_sizes(spec, s).values()))
    return {**own, **dict(s.zero3_gathering)}


def user_zero3_gathering(ds_config: dict) -> tuple[tuple[str, int], ...]:
    """The ZeRO-3 gather limits a user's DeepSpeed JSON sets (numbers only; DeepSpeed refuses anything else)."""
    zero = ds_config.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    return tuple((key, int(zero[key])) for key in ZERO3_GATHER_KEYS
                 if isinstance(zero.get(key), (int, float)) and not isinstance(zero.get(key), bool))


def zero3_layers_kept(spec: ModelSpec, s: Settings, lora: int) -> int:
    """Decoder layers (the last ones) that ZeRO-3 keeps gathered from their forward to their backward, with the
    run's limits (`zero3_limits`). Every decoder layer is a ZeRO-3 leaf module (qshard/engines/deepspeed.py):
    DeepSpeed gathers and releases it whole.

    DeepSpeed (deepspeed/runtime/zero/partitioned_param_coordinator.py) keeps a module's parameters after its
    forward in two cases. (1) They are used again within stage3_max_reuse_distance elements of fetched parameters
    (`__params_to_release`): a decoder layer is used again in its own backward, after every later layer and the
    head have been fetched twice (forward, then backward), so it stays when 2 x (elements after it) is below the
    distance. qshard sets 0, so never; at DeepSpeed's default (1e9, a user's JSON) every layer of a model below
    ~5e8 elements stays (+2.7% on the 400M model's peak, tests/test_plan.py MEASURED_ZERO3). (2) The prefetcher
    has already walked past their next use in its trace, which it does for free while they are gathered. At a
    layer's fetch the prefetcher walks on only while fewer than stage3_max_live_parameters elements are gathered
    with what it has prefetched: it passes the layer's backward use when that layer, every later one, the final
    norm and the head are all gathered below that limit. The last layers for which that holds are kept (3 of the
    400M benchmark model's 24 layers, with qshard's limit of four layers' elements; both layers of the test
    models; 3 of 8 measured to the byte in tests/test_commcount.py). At DeepSpeed's defaults (1e9 elements) that
    is every layer of a model below ~1e9 elements. A vocabulary-parallel head is a buffer, no ZeRO parameter:
    nothing is held beside the layers then. Each layer counts its own elements and LoRA (`gathered_layer_sizes`;
    `lora`, the adapter's total, is not needed for that)."""
    sizes, limits = gathered_layer_sizes(spec, s), zero3_limits(spec, s)
    reuse, live = limits["stage3_max_reuse_distance"], limits["stage3_max_live_parameters"]
    held, kept = zero3_head_elements(spec, s) + spec.hidden, 0  # the head, the final norm and the later layers
    after = held  # fetched after a layer's forward
    for moe in reversed(spec.layer_is_moe()):
        if 2 * after >= reuse and held + sizes[moe][1] >= live:
            break
        after, held, kept = after + sizes[moe][1], held + sizes[moe][1], kept + 1
    return kept


def zero3_head_elements(spec: ModelSpec, s: Settings) -> int:
    """The head's elements as a ZeRO-3 parameter: none where it is vocabulary-parallel (a buffer)."""
    return 0 if s.vocab_split else spec.vocab * spec.hidden


def zero3_gathered_bytes(spec: ModelSpec, s: Settings, lora: int) -> int:
    """Parameters ZeRO-3 holds gathered at the start of backward (the peak): the head (unless vocabulary-parallel),
    the final norm, the layers kept for their backward (`zero3_layers_kept`) and the layers prefetched ahead, up
    to stage3_max_live_parameters elements in all (four layers with qshard's limits, `zero3_limits`: the
    prefetcher issues its bucket at every module's fetch until that many are gathered), and, where no layer is kept,
    the one whose backward runs.

    Each gathered layer brings its LoRA tensors whole, in the half dtype DeepSpeed casts them to. One more
    copy of the largest parameter (embedding or head) is alive as the all-gather's buffer: DeepSpeed's own
    estimator budgets two copies of the largest layer (`largest_layer_memory` in stage3.py's
    estimate_zero3_model_states_mem_needs). Measured with bench/plan_validation_dist.py (BENCHMARKS.md).
    Vocabulary-parallel, that copy is of the largest module left (`largest_layer_module_bytes`): not measured."""
    b = base_bytes(spec, s)
    sizes, order = gathered_layer_sizes(spec, s), spec.layer_is_moe()
    head_bytes = 0 if s.vocab_split else b["lm_head"] or b["embed_tokens"]  # a tied head is the embedding
    released = spec.layers - zero3_layers_kept(spec, s, lora)
    gathered = head_bytes + spec.hidden * DTYPE_BYTES[s.dense_dtype] + sum(sizes[m][0] for m in order[released:])
    held = zero3_head_elements(spec, s) + sum(sizes[m][1] for m in order[released:])
    rest = sum(sizes[m][1] for m in order[:released])
    layer_bytes, layer_elements = sizes[True in sizes]  # prefetched at the largest layer's bytes per element
    live = zero3_limits(spec, s)["stage3_max_live_parameters"]
    in_use = min(rest, layer_elements) if released == spec.layers else 0  # the layer whose backward runs
    prefetched = max(in_use, min(rest, live - held)) * layer_bytes // layer_elements
    largest = largest_layer_module_bytes(spec, s) if s.vocab_split else max(b["embed_tokens"], b["lm_head"])
    return gathered + prefetched + largest


def largest_layer_module_bytes(spec: ModelSpec, s: Settings) -> int:
    """The largest module's own frozen storage in the decoder layers: one linear (a PTQ linear's tensors together)
    or one fused expert stack. DeepSpeed's "largest layer" is the largest module's parameters, not recursing
    (stage3.py model_to_params), so with the embedding and head out of ZeRO's hands it is one of these, not a
    whole decoder layer (which `gathered_layer_sizes` counts as the unit gathered)."""
    sizes = [_nbytes(stored_linear(spec, s, name, moe))
             for moe in spec.layer_kinds() for name in spec.layer_linears(moe)]
    if spec.experts:
        sizes += [k * size for k, size in stored_experts(spec, s)]
    return max(sizes)


def lora_param_count(shapes, r: int, use_dora: bool = False) -> int:
    """LoRA's trainable parameters for adapted linears of (in_features, out_features) `shapes`: r * (in + out)
    each (A is r x in, B out x r), + out for DoRA's magnitude vector. The one count: the planner passes the
    shapes from config.json (`lora_params`), the run those of the loaded model (qshard/model/lora.py
    adapted_shapes); tests/test_plan.py checks it against PEFT's own count."""
    return sum(r * (n_in + n_out) + (n_out if use_dora else 0) for n_in, n_out in shapes)


def layer_lora_params(spec: ModelSpec, s: Settings, moe: bool) -> int:
    """Trainable parameters of the recipe's targets in one decoder layer (a MoE layer where `moe`). A fused
    expert tensor [E, out, in] is adapted as PEFT's `target_parameters` adapts it (lora_A [r E, in], lora_B
    [out, r E]: E x one linear's LoRA; PEFT allows no DoRA there) under all-linear, or when its name or `experts`
    is a target (qshard/model/experts.py parameter_targets). The router is not adapted."""
    linears, every = spec.layer_linears(moe), s.lora_targets == "all-linear"
    names = list(linears) if every else [t for t in s.lora_targets if t in linears]
    count = lora_param_count([linears[n] for n in names], s.lora_r, s.use_dora)
    if moe:
        adapted = [shape for name, shape in spec.expert_tensors().items()
                   if every or name in s.lora_targets or "experts" in s.lora_targets]
        count += spec.experts * lora_param_count(adapted, s.lora_r)
    return count


def lora_params(spec: ModelSpec, s: Settings) -> int:
    """Trainable parameters of the recipe's targets over all decoder layers."""
    return sum(n * layer_lora_params(spec, s, moe) for moe, n in spec.layer_kinds().items())


def checkpoint_disk_bytes(lora_params: int, keep: int) -> int:
    """Disk a run's output folder needs at its fullest. A checkpoint holds the fp32 adapter and AdamW's two
    fp32 moments (12 B per LoRA parameter) and a few small files; `keep` of them are kept and one more exists
    while the newest is written (it is committed before the oldest is pruned, qshard/state/checkpoint.py);
    the final adapter (fp32, 4 B per parameter) is extra; then a margin for metrics and logs."""
    return (keep + 1) * (12 * lora_params + CHECKPOINT_FILES_BYTES) + 4 * lora_params + DISK_MARGIN


def optimizer_bytes_per_param(optimizer: str) -> float:
    """AdamW keeps two fp32 moments (8 B); bitsandbytes' 8-bit AdamW keeps two uint8 moments plus an
    fp32 absmax per 256-value block (2 + 8/256 B). Paged variants are counted on the GPU (their worst case)."""
    return 2 + 8 / 256 if optimizer.endswith("8bit") else 8.0


def layer_activation_bytes(spec: ModelSpec, tokens: int, precision: str, fp32_adapters: bool = True,
                           moe: bool = False) -> int:
    """Bytes one LoRA'd decoder layer saves for backward (all-linear targets, LoRA dropout 0, SDPA).

    Counted op by op in transformers' Llama/Qwen2/Mistral layer (per token; p = activation bytes,
    kv = kv_heads * head_dim, I = intermediate):
      RMSNorm x2   its fp32 copy of the input and rsqrt                  2 (4h + 4)
      attention    q, k, v after rotary, the output; SDPA's logsumexp    p (2h + 2kv) + 4 heads
      SwiGLU       gate out, silu out, up out                            3 I p
      LoRA A       inputs of the A matrices (frozen base linears keep none: bitsandbytes saves only
                   the weight). fp32: the two norm outputs and the SwiGLU product, shared by the adapters
                   on the same input: (2h + I) p. Under autocast with fp32 adapters (one process, DDP) PEFT
                   casts each adapter's input to fp32 and autocast back to p, so every adapter keeps its own
                   copy: (q,k,v,o,gate,up) 6h + I. Adapters already in p (DeepSpeed casts them; FSDP2's
                   param_dtype gathers them so) share their inputs as in fp32: (2h + I) p.
    fp32 total: 4 (6h + 2kv + 4I) + small; bf16: 8h + 2 (8h + 2kv + 4I) + small. Korthikanti et al.'s
    GPT layer (34 sbh) counts dropout masks, s^2 attention scores and GeLU inputs that this layer lacks.

    A MoE layer (`moe`): its shared experts count as the MLP above with their width (I = shared_intermediate,
    none without them). Its routed experts run transformers' eager loop, which qshard/model/experts.py keeps
    from saving any dequantized expert; per token, for each of the k chosen experts: the gathered input and
    the weighted output (2h p), gate_up's output, the silu and the product, down_proj's input (4 I_e p), plus
    the router's fp32 probabilities (4 E). Counted from the code, not measured. Latent attention (DeepSeek)
    is counted as the attention above: an approximation."""
    h, kv = spec.hidden, spec.kv_heads * spec.head_dim
    i = spec.shared_intermediate if moe else spec.intermediate
    p = 4 if precision == "fp32" else 2
    norms = 2 * (4 * h + 4)
    attention = p * (2 * h + 2 * kv) + 4 * spec.heads
    mlp = 3 * i * p
    own_copies = 4 * h + (2 * h + i if i else 0)  # q, k, v, o and the MLP's gate, up, down adapters
    lora_inputs = own_copies * p if precision != "fp32" and fp32_adapters else (2 * h + i) * p
    experts = spec.experts_per_token * (2 * h + 4 * spec.expert_intermediate) * p + 4 * spec.experts if moe else 0
    return tokens * (norms + attention + mlp + lora_inputs + experts)


def activation_bytes(spec: ModelSpec, s: Settings, lora: int) -> int:
    """All layers' saved activations. With activation checkpointing each layer keeps only its input
    (p h per token) and one layer at a time (the largest) is recomputed in backward."""
    tokens = s.micro_batch * s.seq_len
    p = 4 if s.precision == "fp32" else 2
    fp32_adapters = s.engine in ("none", "ddp")  # DeepSpeed and FSDP2 compute with half-precision adapters
    # plus A's outputs, kept by B, of each adapted linear (an expert's LoRA update is added to its weight instead)
    layer = {moe: layer_activation_bytes(spec, tokens, s.precision, fp32_adapters, moe)
             + tokens * len(spec.layer_linears(moe)) * s.lora_r * p for moe in spec.layer_kinds()}
    if s.checkpointing:
        return spec.layers * tokens * spec.hidden * p + max(layer.values())
    return sum(n * layer[moe] for moe, n in spec.layer_kinds().items())


def dequantized_weight_bytes(spec: ModelSpec, s: Settings) -> int:
    """A quantized linear's weight made dense in the compute dtype for its matmul: bitsandbytes' 4-bit and int8
    layers and qshard's PTQ layers dequantize the whole weight in forward and again in backward (a MoE stack one
    expert at a time), one layer at a time, so the largest one is alive at the peak with everything else. At
    Llama-3-70B's width that is gate_proj, 28,672 x 8,192 in bf16: 448 MiB. 0 for a dense base."""
    if s.quant == "none":
        return 0
    shapes = [shape for moe in spec.layer_kinds() for shape in spec.layer_linears(moe).values()]
    shapes += list(spec.expert_tensors().values()) if spec.experts else []
    return max(n_in * n_out for n_in, n_out in shapes) * (4 if s.precision == "fp32" else 2)


def logits_bytes(spec: ModelSpec, s: Settings) -> int:
    """The logits in the forward's precision, which the chunked loss (qshard/loss.py) overwrites with their own
    gradient in backward, plus its working set: one fp32 chunk and one fp32 log-sum-exp per token.
    Vocabulary-parallel: `vocab_parallel_logits_bytes`."""
    if s.vocab_split:
        return vocab_parallel_logits_bytes(spec, s)
    tokens = s.micro_batch * s.seq_len
    logits = tokens * spec.vocab
    return logits * (4 if s.precision == "fp32" else 2) + 4 * min(LOSS_CHUNK_ELEMENTS, logits) + 4 * tokens


def vocab_parallel_logits_bytes(spec: ModelSpec, s: Settings) -> int:
    """A vocabulary-parallel head's logits and what is alive with them (qshard/model/vocab.py). With R = N x t rows
    (every rank's tokens, the micro-batches at full length), H hidden, d the model's dtype, p the forward's:

      logits     this rank's slice of every rank's, [R, V/N] in p: as many as one rank's full logits
      per row    the loss's fp32 log-sum-exp, int64 target and bool mask, kept for backward: 13 R
    and the largest of three moments that follow one another, each with the logits and the saved activations:
      forward    one rank's hidden states at a time, broadcast [t, H] (and this rank's padded copy), in d
      loss       one fp32 chunk (qshard/loss.py), in forward and again in backward
      backward   the start of backward, the peak: the head's backward sums one rank's hidden-state gradient at a
                 time in fp32, [t, H], reduced to its owner, while this rank's own sum [t, H] is kept, with fp32
                 copies of one vocabulary chunk (CHUNK_ELEMENTS over gradient and head rows; none of what is fp32
                 already); the logits are their own gradient by then
    None of it grows with N but the per-row state. The embedding's forward holds one rank's lookups [t, H] in d
    twice but comes before any activation or the logits exist: it is never the peak, and is left out."""
    n, h, t = s.world, spec.hidden, s.micro_batch * s.seq_len
    rows, per_rank = n * t, -(-spec.vocab // n)
    p, d = 4 if s.precision == "fp32" else 2, DTYPE_BYTES[s.dense_dtype]
    step = min(max(1, LOSS_CHUNK_ELEMENTS // (t + h)), per_rank)  # head rows per chunk of the backward
    copies = 4 * step * ((t if p != 4 else 0) + (h if d != 4 else 0))
    forward = 2 * t * h * d
    loss = 4 * min(LOSS_CHUNK_ELEMENTS, rows * per_rank)
    backward = 2 * 4 * t * h + copies
    return rows * per_rank * p + 13 * rows + max(forward, loss, backward)


@dataclass
class Estimate:
    """Predicted bytes per GPU (and per node's CPU) by component, with the step-time estimate."""

    settings: Settings
    gpu: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    step_seconds: float = 0.0

    @property
    def tensor_bytes(self) -> int:
        """Allocated tensor bytes (what torch.cuda.max_memory_allocated would report)."""
        return sum(v for k, v in self.gpu.items() if k not in ("cuda_context", "nccl", "fragmentation"))

    @property
    def peak(self) -> int:
        return sum(self.gpu.values())


def estimate(spec: ModelSpec, s: Settings) -> Estimate:
    """Per-GPU memory of one configuration, each component divided where the engine shards it."""
    n, e = s.world, s.engine
    base = sum(base_bytes(spec, s).values())
    lora = lora_params(spec, s)
    opt_b = optimizer_bytes_per_param(s.optimizer)
    deepspeed = e.startswith("zero")
    stage = int(e[4]) if deepspeed else 0
    half = 4 if s.precision == "fp32" else 2
    shard = lambda on: n if on else 1  # noqa: E731
    gpu, cpu = {}, {}
    gpu["base_weights"] = base // shard(stage == 3 or e == "fsdp2")
    if deepspeed:
        # DeepSpeed casts trainable params to the half dtype, keeps fp32 master copies and this rank's
        # partition of the gradients, in the half dtype too (grad_accum_dtype defaults to the model's,
        # deepspeed/runtime/engine.py get_data_types; the fp32 copy the optimizer reads exists only during
        # step, after the activations are freed). Stage 1 included: stage_1_and_2.py copies each gradient into
        # the reduce bucket as backward produces it and keeps only its partition. The bucket holds
        # reduce_bucket_size elements in the half dtype: during backward under stages 1-2, always under stage 3.
        gpu["lora_params"] = lora * half // shard(stage == 3)
        gpu["lora_grads"] = lora * half // n
        gpu["master_weights"] = lora * 4 // n
        gpu["optimizer_states"] = int(lora * opt_b) // n
        gpu["engine_buffers"] = reduce_bucket_size(lora) * half
    else:
        sharded = e == "fsdp2"
        gpu["lora_params"] = lora * 4 // shard(sharded)   # qshard keeps adapters in fp32
        gpu["lora_grads"] = lora * 4 // shard(sharded)
        gpu["optimizer_states"] = int(lora * opt_b) // shard(sharded)
        gpu["engine_buffers"] = lora * 4 if e == "ddp" else 0  # DDP's gradient buckets copy the grads
    if stage == 3:
        gpu["gathered_weights"] = zero3_gathered_bytes(spec, s, lora)
    if e == "fsdp2":
        # current layer + the next one, prefetched (LoRA gathered with them in the compute dtype), and what is
        # gathered outside the layers at the peak (the loss, or the start of backward): the head and the root's
        # final norm; the embedding is a unit of its own, resharded after its forward, unless tied to the head
        # (then both stay in the root, gathered from forward to backward; qshard/engines/fsdp2.py). Measured,
        # bench/plan_validation_dist.py: 400m peaks -2.0% (bf16) and -7.5% (fp32: the embedding out of the root
        # lowered the measured peak by 30 MiB, not by its 125 MiB; not traced), BENCHMARKS.md.
        # Vocabulary-parallel, neither embedding nor head is gathered: the root is the final norm alone.
        # Without reshard_after_forward every layer stays gathered from its forward to its backward.
        sizes = gathered_layer_sizes(spec, s)
        layers = 2 * sizes[True in sizes][0] if s.reshard_after_forward else sum(
            n * sizes[moe][0] for moe, n in spec.layer_kinds().items())
        gpu["gathered_weights"] = layers + fsdp2_peak_outside(spec, s)
    if s.offload_optimizer:
        for key in ("master_weights", "optimizer_states"):
            cpu[key] = gpu.pop(key, 0)
        cpu["lora_grads"] = lora * 4 // n  # the fp32 gradients the CPU optimizer reads
        if stage != 3:  # stage 3 also keeps its half partition on the device (stage3.py grad_partitions_flat_buffer)
            gpu.pop("lora_grads", None)
    if s.offload_params:  # vocabulary-parallel rows are buffers on the GPU, not parameters DeepSpeed offloads
        vocab = vocab_parallel_bytes(spec, s)
        cpu["base_weights"] = base - vocab
        gpu["base_weights"] = vocab // n
    gpu["activations"] = activation_bytes(spec, s, lora)
    if s.quant != "none":
        gpu["dequantized_weight"] = dequantized_weight_bytes(spec, s)
    gpu["logits_and_loss"] = logits_bytes(spec, s)
    tensors = sum(gpu.values())
    gpu["fragmentation"] = int(FRAGMENTATION * tensors)
    gpu["cuda_context"] = CUDA_CONTEXT_BYTES
    if n > 1:
        gpu["nccl"] = NCCL_BYTES
    result = Estimate(s, gpu, cpu)
    result.step_seconds = step_seconds(spec, s, base, lora)
    return result


def step_seconds(spec: ModelSpec, s: Settings, base: int, lora: int) -> float:
    """Seconds per optimizer step: compute, communication and offload traffic, assumed not to overlap."""
    return compute_seconds(spec, s, lora) + comm_seconds(spec, s) + offload_seconds(s, base, lora)


def compute_seconds(spec: ModelSpec, s: Settings, lora: int, flops: float = GPU_FLOPS) -> float:
    """One rank's compute per optimizer step at `flops` per second. Full training costs 6 N FLOPs per token
    (forward 2N, backward 4N: Kaplan et al. 2020); with a frozen base the weight-gradient half of backward is
    skipped: 4 N, + 2 N with recomputation, + 6 per LoRA parameter; dequantizing slows the base's matmuls.
    N counts the parameters a token computes with (a MoE model's chosen experts only: `active_params`)."""
    tokens = s.micro_batch * s.seq_len * s.accumulation
    flop = tokens * ((6 if s.checkpointing else 4) * spec.active_params + 6 * lora)
    return flop / flops * DEQUANT_SLOWDOWN[s.quant]


def comm_seconds(spec: ModelSpec, s: Settings) -> float:
    """The step's collectives (`step_traffic`) at the node's link speed, as bus bandwidth (nccl-tests)."""
    bw = INTER_NODE_BW if s.nodes > 1 else INTRA_NODE_BW
    return sum(t.bytes_per_step * bus_factor(t.op, s.world) for t in step_traffic(spec, s)) / bw


def offload_seconds(s: Settings, base: int, lora: int) -> float:
    """PCIe traffic of CPU offload (the base's shard in and out each micro-batch; gradients out, parameters
    back each step) and the CPU's AdamW."""
    n, seconds = s.world, 0.0
    if s.offload_params:
        seconds += s.accumulation * 2 * base / n / PCIE_BW
    if s.offload_optimizer:
        seconds += 2 * lora * 4 / n / PCIE_BW + lora / n / CPU_ADAM_PARAMS_PER_S
    return seconds


# -- communication: the one model of what a step moves -----------------------------------------------

def bus_factor(op: str, n: int) -> float:
    """nccl-tests' correction from algorithm to bus bandwidth (doc/PERFORMANCE.md, "Summary"): the share of
    a collective's size S each rank's link carries (broadcast and reduce: all of it, pipelined). 0 for one rank."""
    if op in ("broadcast", "reduce"):
        return 1.0 if n > 1 else 0.0
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


@dataclass(frozen=True)
class Traffic:
    """One kind of collective in an optimizer step, per rank."""

    op: str
    bytes_per_step: int   # sum of S over the step's operations (nccl-tests' size: qshard/tools/commbench.py)
    message_bytes: int    # S of one operation (a decoder layer's gather, a gradient bucket)
    what: str


def step_traffic(spec: ModelSpec, s: Settings) -> list[Traffic]:
    """The collectives of one optimizer step under s.engine, per rank. The one communication model: the
    planner's step time (`comm_seconds`), `qshard bench-comm`'s estimate and each run's comm_planned_bytes
    (qshard/observe/commcount.py) read it; tests/test_commcount.py compares it with the bytes counted on 2 ranks.

    The quantized base counts at its stored size (`base_bytes`): the engines move its packed storage.
    DeepSpeed keeps trainable params and their gradients in the half dtype; qshard's DDP and FSDP2 reduce
    fp32 gradients (FSDP2's reduce_dtype), FSDP2 gathers LoRA params in the compute dtype. The gathers with
    activation checkpointing were counted on 2 ranks (tests/test_commcount.py): FSDP2 adds none (it does not
    reshard during backward, so the recomputed forward and the backward share one gather); ZeRO-3 adds some.
    Vocabulary-parallel, the engines gather neither embedding nor head and the ranks exchange activations
    instead (`vocab_parallel_traffic`)."""
    engine, micro = s.engine, s.accumulation
    n_lora, base = lora_params(spec, s), sum(base_bytes(spec, s).values())
    half = 4 if s.precision == "fp32" else 2
    if engine == "ddp":  # no_sync on all but the last micro-batch: one all-reduce of the grads per step
        return [Traffic("all_reduce", n_lora * 4, min(n_lora * 4, DDP_BUCKET), "LoRA gradients (fp32), once a step")]
    if engine in ("zero1", "zero2"):  # stage 2 partitions gradients, so it reduces them every micro-batch
        reductions = micro if engine == "zero2" else 1
        return [Traffic("reduce_scatter", reductions * n_lora * half, n_lora * half,
                        f"LoRA gradients, {reductions} time(s) a step"),
                Traffic("all_gather", n_lora * half, n_lora * half, "updated LoRA params, once a step")]
    sizes, order = gathered_layer_sizes(spec, s), spec.layer_is_moe()
    layer = sizes[True in sizes][0]  # the largest layer's gather
    b, vocab = base_bytes(spec, s), vocab_parallel_bytes(spec, s)  # vocabulary-parallel tables: never gathered
    exchange = vocab_parallel_traffic(spec, s) if s.vocab_split else []
    if engine == "zero3":
        # every parameter for forward; the layers DeepSpeed released after it (zero3_layers_kept) again for backward,
        # whole (each layer is a ZeRO-3 leaf): its recomputed forward under checkpointing runs inside that gather.
        # With checkpointing the embedding, released after forward (stage3_max_reuse_distance 0; the prefetcher is
        # far from its backward then), comes back for the backward checkpointing gives it (the first layer's input
        # needs a gradient).
        released = spec.layers - zero3_layers_kept(spec, s, n_lora)
        again = sum(sizes[moe][0] for moe in order[:released])
        if s.checkpointing:
            again += 0 if s.vocab_split else b["embed_tokens"]
        return [Traffic("all_gather", micro * (base - vocab + n_lora * half + again), layer,
                        f"packed base + LoRA params a layer at a time, {micro} time(s) a step, and {released} "
                        "released layer(s) again for backward"),
                Traffic("reduce_scatter", micro * n_lora * half, n_lora * half,
                        f"LoRA gradients, {micro} time(s) a step")] + exchange
    if engine == "fsdp2":
        # each layer and the (untied) head for forward and, resharded after it, again for backward; the embedding
        # (a unit whose backward does not run without checkpointing) and the root (final norm; embeddings and
        # head where tied) once a micro-batch (qshard/engines/fsdp2.py)
        # With activation checkpointing transformers makes the embedding's output require a gradient
        # (enable_input_require_grads), so its backward runs and gathers it again. Vocabulary-parallel, the root
        # is the final norm alone and nothing is gathered twice but the layers.
        gathers = micro * (2 if s.reshard_after_forward else 1)
        root, outside = root_bytes(spec, s) - vocab, not spec.tied and not s.vocab_split
        twice = (b["lm_head"] + (b["embed_tokens"] if s.checkpointing else 0)) if outside else 0
        once = "the final norm" if s.vocab_split else "the embedding and final norm"
        return [Traffic("all_gather", gathers * (base - vocab - root + twice + n_lora * half) + micro * (root - twice),
                        layer, f"packed base + LoRA params, the layers{'' if s.vocab_split else ' and the head'} "
                        f"{gathers} times a step, {once} {micro}"),
                Traffic("reduce_scatter", n_lora * 4, n_lora * 4, "LoRA gradients (fp32), once a step")] + exchange
    return []


def vocab_parallel_traffic(spec: ModelSpec, s: Settings) -> list[Traffic]:
    """What vocabulary-parallel ranks exchange instead of the embedding and head (qshard/model/vocab.py), per
    micro-batch, as qshard/observe/commcount.py counts it. With R = N x t rows (every rank's tokens, the
    micro-batches at full length: each rank pads its rows to the longest rank's), H hidden, d the model's dtype:
      all_gather  token ids (int64, 8 R), targets (8 R), each rank's loss gradient (4 N)
      broadcast   hidden states, one rank's [t, H] at a time (d H R)
      reduce      embedding lookups (d H R) and, in backward, hidden-state gradients (fp32, 4 H R), one owner's
                  [t, H] at a time
      all_reduce  rows per rank (int64, for the embedding and the head: 16), the per-row log-sum-exp
                  maximum (4 R), and the per-row exp-sums and target logits (8 R)"""
    n, h, d, micro = s.world, spec.hidden, DTYPE_BYTES[s.dense_dtype], s.accumulation
    t = s.micro_batch * s.seq_len
    rows = n * t
    return [Traffic("all_gather", micro * (16 * rows + 4 * n), 8 * rows,
                    f"vocabulary-parallel: token ids and targets of every rank, {micro} time(s) a step"),
            Traffic("broadcast", micro * d * h * rows, d * h * t,
                    f"vocabulary-parallel: every rank's hidden states, {micro} time(s) a step"),
            Traffic("reduce", micro * (d + 4) * h * rows, 4 * h * t,
                    f"vocabulary-parallel: embedding lookups and hidden-state gradients, {micro} time(s) a step"),
            Traffic("all_reduce", micro * (16 + 12 * rows), 8 * rows,
                    f"vocabulary-parallel: the loss's per-row log-sum-exp, {micro} time(s) a step")]


# -- the search ------------------------------------------------------------------------------------

ENGINE_OPTIONS = {  # label -> (engine, offload_optimizer, offload_params)
    "none": ("none", False, False), "ddp": ("ddp", False, False), "zero1": ("zero1", False, False),
    "zero2": ("zero2", False, False), "zero3": ("zero3", False, False),
    "zero3+off_opt": ("zero3", True, False), "zero3+off_opt+off_params": ("zero3", True, True),
    "fsdp2": ("fsdp2", False, False),
}


def candidates(base: Settings, quants: tuple[str, ...], micro_batches: tuple[int, ...],
               checkpoint_format: str | None = None) -> list[Settings]:
    """Every engine x offload x quantization x micro-batch x checkpointing the compatibility table allows
    (`checkpoint_format`: the base's format when it is a PTQ checkpoint, for method `checkpoint`), and under
    ZeRO-3 / FSDP2 on 2+ GPUs the embedding and head vocabulary-parallel or gathered (distributed.vocab_parallel:
    exchanging hidden states costs time, gathering the tables costs memory; which wins depends on the vocabulary,
    the width and the tokens per step)."""
    out = []
    for label in _engine_labels(base.world):
        engine, off_opt, off_params = ENGINE_OPTIONS[label]
        stage = int(engine[4]) if engine.startswith("zero") else 2
        key = compat.engine_key("deepspeed" if engine.startswith("zero") else engine, stage,
                                "cpu" if off_params else "none", "cpu" if off_opt else "none")
        for quant in quants:
            cell = compat.SUPPORT.get((key, compat.base_key(quant, checkpoint_format)))
            if cell is None or not cell.supported or _option_refused(key, base):
                continue
            splits = (True, False) if engine in ("zero3", "fsdp2") and base.world >= 2 else (base.vocab_parallel,)
            for mb in micro_batches:
                for ckpt in (False, True):
                    for split in splits:
                        # each candidate is planned with qshard's own DeepSpeed config (the one the plan writes)
                        out.append(replace(base, engine=engine, offload_optimizer=off_opt, offload_params=off_params,
                                           quant=quant, micro_batch=mb, checkpointing=ckpt, vocab_parallel=split,
                                           zero3_gathering=()))
    return out


def _engine_labels(world: int) -> list[str]:
    """One GPU: no engine, or ZeRO-3 for its CPU offload; several: every distributed engine."""
    if world == 1:
        return ["none", "zero3+off_opt", "zero3+off_opt+off_params"]
    return [label for label in ENGINE_OPTIONS if label != "none"]


def _option_refused(engine_key: str, s: Settings) -> bool:
    return any(engine_key in engines and option == "lora.use_dora" and s.use_dora
               for engines, option, _why, _instead in compat.OPTION_RULES)


def rank(estimates: list[Estimate], gpu_mem: int) -> list[Estimate]:
    """Configurations that fit first, fastest first; then the rest, smallest first."""
    fits = sorted((e for e in estimates if e.peak <= gpu_mem), key=lambda e: (e.step_seconds, e.peak))
    rest = sorted((e for e in estimates if e.peak > gpu_mem), key=lambda e: e.peak)
    return fits + rest


def recommend(ranked: list[Estimate], gpu_mem: int, quant: str) -> Estimate | None:
    """The fastest configuration that fits, keeping the recipe's quantization when any such one fits
    (changing the base's format changes the model being tuned)."""
    fitting = [e for e in ranked if e.peak <= gpu_mem]
    same = [e for e in fitting if e.settings.quant == quant]
    return (same or fitting or [None])[0]


# -- from a recipe, to a recipe --------------------------------------------------------------------

def parse_size(text: str, option: str = "--gpu-mem / --cpu-mem") -> int:
    """'24GiB', '80GB', '512MiB' or a plain number of bytes; positive and finite ("inf", "-5GiB" and
    "0" are refused naming `option`)."""
    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
             "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "b": 1, "": 1}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    try:
        value = int(float(number) * units[raw[len(number):]])
    except (ValueError, KeyError, OverflowError):  # OverflowError: int(inf)
        value = 0
    if value <= 0:
        raise QShardError(f"{option} {text!r} is not a positive memory size", where=option,
                          fix="write it like 24GiB, 80GB or 512MiB")
    return value


def settings_from_recipe(recipe, spec: ModelSpec, gpus: int, nodes: int) -> Settings:
    """The recipe's own configuration; precision auto is planned as bf16 (a GPU of compute capability >= 8)."""
    q, lo, tr, d = recipe.quantization, recipe.lora, recipe.train, recipe.distributed
    engine, offload_optimizer, offload_params = engine_settings(d)
    gathering = user_zero3_gathering(read_user_config(d.deepspeed_config)) if d.deepspeed_config else ()
    return Settings(quant=q.method, double_quant=q.double_quant, skip_modules=tuple(q.skip_modules),
                    dense_dtype=spec.dtype if recipe.model.dtype == "auto" else recipe.model.dtype,
                    precision="bf16" if tr.precision == "auto" else tr.precision, lora_r=lo.r,
                    lora_targets=lo.target_modules if lo.target_modules == "all-linear" else tuple(lo.target_modules),
                    use_dora=lo.use_dora, optimizer=tr.optimizer, engine=engine,
                    offload_optimizer=offload_optimizer, offload_params=offload_params,
                    reshard_after_forward=d.reshard_after_forward, vocab_parallel=d.vocab_parallel,
                    zero3_gathering=gathering, micro_batch=tr.micro_batch_size,
                    seq_len=recipe.data.max_length, checkpointing=recipe.model.gradient_checkpointing,
                    gpus=gpus, nodes=nodes,
                    global_batch=tr.micro_batch_size * tr.gradient_accumulation_steps * gpus * nodes)


def engine_settings(d) -> tuple[str, bool, bool]:
    """(engine label, offload optimizer, offload params) of a recipe's `distributed` section; with the user's
    DeepSpeed JSON, its zero_optimization decides, as for the run (qshard/compat.py engine_key)."""
    if d.engine != "deepspeed":
        return d.engine, False, False
    stage, offload_params, offload_optimizer = d.zero_stage, d.offload_params, d.offload_optimizer
    if d.deepspeed_config:
        stage, offload_params, offload_optimizer = compat.deepspeed_json_identity(read_user_config(d.deepspeed_config))
    return f"zero{stage}", offload_optimizer == "cpu", offload_params == "cpu"


@dataclass
class Plan:
    spec: ModelSpec
    ranked: list[Estimate]
    best: Estimate | None
    current: Estimate
    gpu_mem: int
    cpu_mem: int | None


def make_plan(recipe, spec: ModelSpec, *, gpus: int, nodes: int = 1, gpu_mem: int, cpu_mem: int | None = None,
              quants: tuple[str, ...] | None = None) -> Plan:
    """Estimate the recipe as written, search the alternatives, rank them and pick one (pure).

    A PTQ checkpoint can be kept as it is (method `checkpoint`) or converted on load (nf4 / int8 / none),
    so both are searched for it; a dense model is never planned as a checkpoint."""
    current = settings_from_recipe(recipe, spec, gpus, nodes)
    if current.quant == "checkpoint" and spec.checkpoint_format is None:
        raise QShardError(f"{recipe.model.path} is not a GPTQ/AWQ/compressed-tensors checkpoint (its config.json has "
                          "no quantization_config)", where="quantization.method",
                          fix="use nf4 (or fp4 / int8 / none) for a dense checkpoint")
    kept_as_is = ("checkpoint",) if spec.checkpoint_format else ()
    quants = quants or tuple(dict.fromkeys((current.quant, *kept_as_is, "nf4", "int8", "none")))
    per_gpu = max(1, current.global_batch // current.world)
    micro = tuple(m for m in (1, 2, 4, 8, 16, 32) if m <= per_gpu) or (1,)
    estimates = [estimate(spec, s) for s in candidates(current, quants, micro, spec.checkpoint_format)]
    if cpu_mem is not None:  # offloaded bytes of all GPUs of a node share its CPU memory
        estimates = [e for e in estimates if sum(e.cpu.values()) * gpus <= cpu_mem]
    ranked = rank(estimates, gpu_mem)
    return Plan(spec, ranked, recommend(ranked, gpu_mem, current.quant), estimate(spec, current), gpu_mem, cpu_mem)


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_breakdown(est: Estimate) -> str:
    rows = [f"  {k:<18} {gib(v):>9} GiB" for k, v in est.gpu.items() if v]
    rows += [f"  {'(cpu) ' + k:<18} {gib(v):>9} GiB" for k, v in est.cpu.items() if v]
    return "\n".join(rows + [f"  {'peak per GPU':<18} {gib(est.peak):>9} GiB"] + vocab_lines(est.settings))


def vocab_lines(s: Settings) -> list[str]:
    """Where the embedding and head are, under an engine that shards the base on 2+ GPUs (none otherwise)."""
    if s.engine not in ("zero3", "fsdp2") or s.world < 2:
        return []
    if s.vocab_split:
        return [f"  embedding and head: vocabulary-parallel, 1/{s.world} of their rows kept per GPU (in base_weights)",
                "    and never gathered; the ranks exchange hidden states instead (in logits_and_loss)"]
    why = "LoRA on them" if s.vocab_parallel else "distributed.vocab_parallel: false"
    return [f"  embedding and head: gathered whole by the engine like a layer ({why}; in gathered_weights)"]


def format_table(plan: Plan, limit: int = 20) -> str:
    fastest = min((e.step_seconds for e in plan.ranked), default=1.0)
    head = (f"{'#':>3}  {'engine':<40}{'quant':<6}{'mb':>3}{'acc':>5}  {'ckpt':<5}{'GiB/GPU':>9}  {'fits':<5}"
            f"{'rel. step':>9}")
    lines = [head, "-" * len(head)]
    for i, e in enumerate(plan.ranked[:limit], 1):
        s = e.settings
        lines.append(f"{i:>3}  {s.label:<40}{s.quant:<6}{s.micro_batch:>3}{s.accumulation:>5}  "
                     f"{'yes' if s.checkpointing else 'no':<5}{gib(e.peak):>9}  "
                     f"{'yes' if e.peak <= plan.gpu_mem else 'NO':<5}{e.step_seconds / fastest:>9.2f}")
    if len(plan.ranked) > limit:
        lines.append(f"     ... {len(plan.ranked) - limit} more")
    return "\n".join(lines)


# distributed keys that only some engines read (qshard/config.py refuses them set for another)
DEEPSPEED_KEYS = ("zero_stage", "offload_optimizer", "offload_params", "deepspeed_config")
OTHER_ENGINE_KEYS = ("reshard_after_forward", "fsdp_cpu_offload", "shard_on_load", "vocab_parallel")


def recommended_recipe(recipe, est: Estimate, ds_config_path: str | None) -> dict:
    """The recipe with the chosen configuration filled in (a plain dict, ready for YAML). Engine keys the
    chosen engine does not read take their defaults; with qshard's DeepSpeed JSON, it holds stage and offloads."""
    s = est.settings
    raw = recipe.model_dump(mode="json")
    raw["quantization"]["method"] = s.quant
    raw["model"]["gradient_checkpointing"] = s.checkpointing
    raw["train"]["micro_batch_size"] = s.micro_batch
    raw["train"]["gradient_accumulation_steps"] = s.accumulation
    d = raw["distributed"]
    # DeepSpeed's keys are the choice's (below); the other engines' keep the recipe's values for the same engine
    same_engine = engine_settings(recipe.distributed)[0] == s.engine
    for key in DEEPSPEED_KEYS + (() if same_engine else OTHER_ENGINE_KEYS):
        d.pop(key)
    d["engine"] = "deepspeed" if s.engine.startswith("zero") else s.engine
    if s.engine in ("zero3", "fsdp2"):
        d["vocab_parallel"] = s.vocab_parallel
    if s.engine.startswith("zero") and ds_config_path:
        d["deepspeed_config"] = ds_config_path
    elif s.engine.startswith("zero"):
        d["zero_stage"] = int(s.engine[4])
        d["offload_optimizer"] = "cpu" if s.offload_optimizer else "none"
        d["offload_params"] = "cpu" if s.offload_params else "none"
    return raw


def recommended_deepspeed_config(est: Estimate, spec: ModelSpec, max_grad_norm: float | None) -> dict | None:
    """qshard's own DeepSpeed config for the choice, with reduce_bucket_size fitted to the adapters
    (DeepSpeed's default bucket, 5e8 elements, would take 1-2 GB per GPU for a few MB of LoRA gradients)
    and the batch keys left "auto" so the recipe stays the one place they are set."""
    s = est.settings
    if not s.engine.startswith("zero"):
        return None
    config = deepspeed_config(zero_stage=int(s.engine[4]), offload_optimizer="cpu" if s.offload_optimizer else "none",
                              offload_params="cpu" if s.offload_params else "none", micro_batch=s.micro_batch,
                              accumulation=s.accumulation, world_size=s.world, precision=s.precision,
                              max_grad_norm=max_grad_norm)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        config[key] = "auto"
    config["bf16"]["enabled"] = config["fp16"]["enabled"] = "auto"
    config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_size(lora_params(spec, s))
    return config


PLAN_NOTE = "# written by `qshard plan`"


def _refuse_foreign_files(out_dir: Path) -> None:
    """`--out` may hold an earlier recommendation (its recipe.yaml starts with PLAN_NOTE), never a recipe
    or DeepSpeed JSON of the user's, which writing would replace (e.g. `--out .` beside the recipe)."""
    recipe, ds = out_dir / "recipe.yaml", out_dir / "deepspeed.json"
    ours = recipe.is_file() and not recipe.is_symlink() and recipe.read_text(errors="replace").startswith(PLAN_NOTE)
    for path in (recipe, ds):
        if (path.exists() or path.is_symlink()) and (not ours or path.is_symlink()):
            raise QShardError(f"{path} exists and was not written by qshard plan; it is left as it is",
                              where="--out", fix="choose another --out folder (the default is ./plan)")


def write_recommendation(plan: Plan, recipe, out_dir: Path) -> list[Path]:
    """recipe.yaml (and deepspeed.json where relevant) for the recommended configuration."""
    import yaml

    _refuse_foreign_files(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ds = recommended_deepspeed_config(plan.best, plan.spec, recipe.train.max_grad_norm)
    ds_path = None
    if ds is not None:
        ds_path = out_dir / "deepspeed.json"
        ds_path.write_text(json.dumps(ds, indent=2) + "\n")
        written.append(ds_path)
    raw = recommended_recipe(recipe, plan.best, str(ds_path) if ds_path else None)
    path = out_dir / "recipe.yaml"
    note = (f"{PLAN_NOTE}: predicted peak {gib(plan.best.peak)} GiB per GPU of "
            f"{gib(plan.gpu_mem)} GiB\n")
    path.write_text(note + yaml.safe_dump(raw, sort_keys=False))
    return [path] + written


def report(plan: Plan) -> str:
    """What `qshard plan` prints."""
    s = plan.spec
    lines = [f"model: {s.model_type}, {s.params / 1e9:.2f}B parameters ({s.layers} layers, hidden {s.hidden}, "
             f"{s.heads} heads / {s.kv_heads} kv, vocab {s.vocab})" + experts_line(s) + checkpoint_line(s),
             f"hardware: {plan.current.settings.world} GPU(s) of {gib(plan.gpu_mem)} GiB"
             + (f", {gib(plan.cpu_mem)} GiB CPU per node" if plan.cpu_mem else ""),
             f"sequence length {plan.current.settings.seq_len} (data.max_length), global batch "
             f"{plan.current.settings.global_batch}", "",
             f"the recipe as written ({plan.current.settings.label}, {plan.current.settings.quant}, "
             f"micro-batch {plan.current.settings.micro_batch}):", format_breakdown(plan.current),
             f"  -> {'fits' if plan.current.peak <= plan.gpu_mem else 'does NOT fit'}", "",
             format_table(plan), ""]
    if plan.best is None:
        lines.append("nothing fits: use more GPUs, a shorter data.max_length, or a GPU with more memory")
    else:
        b = plan.best.settings
        lines += [f"recommended: {b.label}, {b.quant}, micro-batch {b.micro_batch} x {b.accumulation} accumulation, "
                  f"activation checkpointing {'on' if b.checkpointing else 'off'}", format_breakdown(plan.best)]
    lines.append("\nstep times are relative estimates (assumptions in qshard/tools/plan.py); memory includes "
                 f"{gib(CUDA_CONTEXT_BYTES)} GiB CUDA context and {FRAGMENTATION:.0%} allocator fragmentation")
    return "\n".join(lines)


def experts_line(spec: ModelSpec) -> str:
    """A MoE model's experts and its parameters per token, for the report ('' for a dense model)."""
    if not spec.experts:
        return ""
    shared = f", shared experts of width {spec.shared_intermediate}" if spec.shared_intermediate else ""
    return (f"\nexperts: {spec.experts} per MoE layer in {spec.layer_kinds().get(True, 0)} of {spec.layers} layers, "
            f"{spec.experts_per_token} routed per token{shared}: {spec.components()['experts'] / 1e9:.2f}B expert "
            f"parameters; {spec.active_params / 1e9:.2f}B active per token")


def checkpoint_line(spec: ModelSpec) -> str:
    """How a PTQ checkpoint stores its layers, for the report ('' for a dense model)."""
    if spec.checkpoint_format is None:
        return ""
    kinds = sorted({(p.bits, p.group_size) for _, p in spec.packed})
    what = ", ".join(f"{bits}-bit, " + ("per channel" if g == -1 else f"groups of {g}") for bits, g in kinds)
    return f"\nbase: a {spec.checkpoint_format} checkpoint ({what or 'no quantized layer linears'}), kept as it is " \
           "with quantization.method checkpoint"
