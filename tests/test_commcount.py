"""Collectives counted per step (qshard/commcount.py) on 2 gloo ranks, against what each engine must move.

One torchrun launch runs ddp, zero2, zero3 and fsdp2 on the NF4 micro model, 2 micro-batches of 1 per
rank and step (accumulation shows which traffic is per micro-batch and which per step). With
L = the LoRA tensors' bytes (fp32) and M = every parameter's bytes (packed NF4 + dense + LoRA), both
read from the run's sharding.json, the analytic figures per optimizer step are:
- ddp: one all-reduce of the LoRA gradients, L (no_sync skips the first micro-batch); DDP also
  broadcasts the model's buffers (rotary inv_freq, 64 B) before a forward.
- zero2: the gradients reduced at every micro-batch, 2 L in all (DeepSpeed 0.19 all-reduces its
  bucket on gloo), and the updated fp32 LoRA partitions all-gathered once, L.
- zero3: each parameter all-gathered once per micro-batch, 2 M: the micro model's two layers, head and norm
  fit in qshard's stage3_max_live_parameters (four layers), so DeepSpeed's prefetcher passes their backward
  uses while they are gathered and releases none of them between forward and backward; LoRA gradients
  reduce-scattered per micro-batch, 2 L.
- fsdp2: each decoder layer and the head (H) all-gathered for forward and again for backward
  (reshard_after_forward), the embedding (E) once (its backward never runs) and the root (the final norm)
  once, kept from forward to backward (torch's default for a root); R = E + H + final norm, read from the
  model's safetensors header: 2 (2 (M - R) + 2 H + E + norm) (no padding: every dim 0 is even);
  LoRA gradients reduce-scattered once, L; clipping all-reduces the norm (a few bytes). With activation
  checkpointing the embedding is gathered for backward too (its output then requires a gradient).
- zero3 with activation checkpointing: the embedding again, released after its forward (each decoder layer is a
  ZeRO-3 leaf, gathered whole: its recomputed forward runs inside the gather for its backward);
  with layers released after forward (a DeepSpeed JSON), 2 gathers of each layer and the embedding again.
- train.count_comm: false: no comm keys at all.
The zero3 and fsdp2 figures above are the engines' own gathers of embedding and head (distributed.vocab_parallel:
false). Vocabulary-parallel (the default; qshard/model/vocab.py), neither table is gathered (zero3: M - E - H,
fsdp2: 2 (M - R) + norm per micro-batch) and the ranks exchange activations instead; on rows cut to exactly
max_length tokens (T = 16, so R = 2 T = 32 rows of every rank's tokens, hidden 64, fp32) that is, per micro-batch:
all_gather 8 R ids + 8 R targets + 2 x 4 loss gradients = 520 B; broadcast 4 x 64 R hidden states (one rank's
at a time) = 8,192 B; reduce 4 x 64 R lookups + 4 x 64 R hidden-state gradients = 16,384 B; all_reduce 2 x 8 row counts + 4 R log-sum-exp
maxima + 8 R exp-sums and target logits = 400 B.
The loop's own all-reduce (loss, flags) and the gradient-flow check's gathers are left out: DDP's
count equals L to the byte. Step 2 is compared (ZeRO-3 traces the module order in step 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from qshard.observe.commcount import (
    StepTraffic,
    _union_seconds,
    comm_record,
    format_comm,
)
from tests.helpers import ROWS, recipe_dict, run_cells, write_rows

# zero3 and fsdp2 gathering the embedding and head themselves (the vocabulary-parallel cells are VOCAB)
ENGINES = {"ddp": {"engine": "ddp"}, "zero2": {"engine": "deepspeed", "zero_stage": 2},
           "zero3": {"engine": "deepspeed", "zero_stage": 3, "vocab_parallel": False},
           "fsdp2": {"engine": "fsdp2", "vocab_parallel": False}}
MICRO = 2  # micro-batches per rank and step
# vocabulary-parallel cells (the default): text rows all cut to max_length, so every micro-batch has T tokens
VOCAB = {"zero3-vocab": ({"engine": "deepspeed", "zero_stage": 3}, {}), "fsdp2-vocab": ({"engine": "fsdp2"}, {}),
         "fsdp2-vocab-ckpt": ({"engine": "fsdp2"}, {"gradient_checkpointing": True})}
T = 16
EXCHANGE = {"all_gather": 520, "broadcast": 8192, "reduce": 16384, "all_reduce": 400}  # per micro-batch, see docstring


# a layer's forward is more than 1,000 fetched elements before its backward (the head alone has 32,768), its
# recomputation (activation checkpointing) none: DeepSpeed releases every layer after forward, not after recompute
RELEASE_LAYERS = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_reuse_distance": 1000, "stage3_prefetch_bucket_size": 0}}


@pytest.fixture(scope="module")
def runs(micro_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("comm")
    data = root / "train.jsonl"
    write_rows(data)
    (root / "release.json").write_text(json.dumps(RELEASE_LAYERS))
    variants = {name: (dist, {}, {}) for name, dist in ENGINES.items()}
    variants |= {"fsdp2-ckpt": (ENGINES["fsdp2"], {"gradient_checkpointing": True}, {}),
                 "zero3-ckpt": (ENGINES["zero3"], {"gradient_checkpointing": True}, {}),
                 "zero3-release-ckpt": ({"engine": "deepspeed", "deepspeed_config": str(root / "release.json"),
                                         "vocab_parallel": False}, {"gradient_checkpointing": True}, {}),
                 "ddp-uncounted": (ENGINES["ddp"], {}, {"count_comm": False})}
    cells = []
    for name, (dist, model, train) in variants.items():
        r = recipe_dict(micro_model, data, root / name, max_steps=2, micro_batch_size=1,
                        gradient_accumulation_steps=MICRO, sample_tokens=0, **train)
        r["model"].update(model)
        r["distributed"] = dist
        cells.append({"name": name, "recipe": r})
    texts = root / "texts.jsonl"  # each row far longer than T tokens
    texts.write_text("".join(json.dumps({"text": " ".join([*row.values()] * 3)}) + "\n" for row in ROWS))
    for name, (dist, model) in VOCAB.items():
        r = recipe_dict(micro_model, texts, root / name, max_steps=2, micro_batch_size=1,
                        gradient_accumulation_steps=MICRO, sample_tokens=0)
        r["data"].update(format="text", max_length=T)
        r["model"].update(model)
        r["distributed"] = dist
        cells.append({"name": name, "recipe": r})
    deep = _deeper(micro_model, root / "deep-llama", layers=8)
    r = recipe_dict(deep, texts, root / "zero3-deep", max_steps=2, micro_batch_size=1,
                    gradient_accumulation_steps=MICRO, sample_tokens=0)
    r["data"].update(format="text", max_length=T)
    r["distributed"] = {"engine": "deepspeed", "zero_stage": 3}
    cells.append({"name": "zero3-deep", "recipe": r})
    run_cells(root, cells, [[1, 2, 3]])
    return root


def _deeper(model: Path, out: Path, layers: int) -> Path:
    """The micro model's config and tokenizer with more decoder layers (random weights, saved by transformers)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in model.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def _step(runs: Path, engine: str, step: int = 2) -> dict:
    records = [json.loads(line) for line in (runs / engine / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["step"] == step)


def _sizes(runs: Path, engine: str) -> tuple[int, int]:
    """(L, M): LoRA bytes and all parameters' bytes, unsharded, from the run's own sharding.json."""
    row = json.loads((runs / engine / "sharding.json").read_text())[0]
    lora = row["lora_full"]
    return lora, row["base_quantized_full"] + row["base_dense_full"] + lora


def _root_bytes(model: Path) -> int:
    """R: the bytes of every tensor outside the decoder layers (embeddings, final norm, head), loaded as the
    recipe's float32, from the model's own safetensors header."""
    with safe_open(model / "model.safetensors", "pt") as f:
        return 4 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".layers." not in k)


def test_ddp_all_reduces_exactly_the_lora_gradients_once_a_step(runs):
    record, (lora, _) = _step(runs, "ddp"), _sizes(runs, "ddp")
    measured = record["comm_bytes"]
    assert lora == 65536  # 16,384 fp32 LoRA parameters
    assert measured["all_reduce"] == lora and record["comm_calls"]["all_reduce"] == 1
    assert set(measured) <= {"all_reduce", "broadcast"} and measured.get("broadcast", 0) <= 1024
    assert record["comm_planned_bytes"] == {"all_reduce": lora}


def test_zero2_reduces_gradients_every_micro_batch_and_gathers_parameters_once(runs):
    record, (lora, _) = _step(runs, "zero2"), _sizes(runs, "zero2")
    measured = record["comm_bytes"]
    reduced = sum(measured.get(k, 0) for k in ("all_reduce", "reduce_scatter", "reduce"))
    assert MICRO * lora <= reduced <= MICRO * lora + 64  # + DeepSpeed's overflow / norm scalars
    assert measured["all_gather"] == lora
    planned = record["comm_planned_bytes"]
    assert planned == {"reduce_scatter": MICRO * lora, "all_gather": lora}
    assert abs(sum(measured.values()) - sum(planned.values())) <= 64


def test_zero3_gathers_every_parameter_once_per_micro_batch(runs):
    record, (lora, model) = _step(runs, "zero3"), _sizes(runs, "zero3")
    measured = record["comm_bytes"]
    assert measured["all_gather"] == MICRO * model
    assert measured["reduce_scatter"] == MICRO * lora
    assert measured.get("all_reduce", 0) <= 64 and set(measured) <= {"all_gather", "reduce_scatter", "all_reduce"}
    # the planner knows DeepSpeed keeps the last layers gathered for backward (plan.zero3_layers_kept)
    assert record["comm_planned_bytes"] == {"all_gather": MICRO * model, "reduce_scatter": MICRO * lora}


def test_fsdp2_gathers_layers_and_head_twice_the_embedding_and_norm_once_and_reduce_scatters_lora_once(runs,
                                                                                                       micro_model):
    """The embedding and the head are units of their own (never gathered together, nor kept from forward to
    backward); the embedding's backward never runs, so it is gathered once, for forward only."""
    record, (lora, model), root = _step(runs, "fsdp2"), _sizes(runs, "fsdp2"), _root_bytes(micro_model)
    measured = record["comm_bytes"]
    embedding = head = 4 * 512 * 64  # vocabulary 512 x hidden 64, fp32, untied
    assert root == embedding + head + 4 * 64  # + the final norm
    once = MICRO * (2 * (model - root) + 2 * head + embedding + 4 * 64)
    assert measured["all_gather"] == once
    assert record["comm_calls"]["all_gather"] == MICRO * (2 * 2 + 2 + 1 + 1)  # layers and head twice, embedding, root
    assert measured["reduce_scatter"] == lora
    assert 0 < measured.get("all_reduce", 0) <= 1024  # the clipped gradient norm
    assert record["comm_planned_bytes"] == {"all_gather": once, "reduce_scatter": lora}


def test_fsdp2_activation_checkpointing_gathers_only_the_embedding_again_and_the_plan_knows(runs):
    """The forward recomputed in backward uses the weights gathered for that backward: FSDP2 does not reshard
    during backward (2 gathers per layer and micro-batch, not 3). The embedding is gathered for backward too:
    under checkpointing transformers makes its output require a gradient (enable_input_require_grads)."""
    plain, ckpt = _step(runs, "fsdp2"), _step(runs, "fsdp2-ckpt")
    embedding = 4 * 512 * 64
    assert ckpt["comm_bytes"]["all_gather"] == plain["comm_bytes"]["all_gather"] + MICRO * embedding
    assert ckpt["comm_calls"]["all_gather"] == plain["comm_calls"]["all_gather"] + MICRO
    assert ckpt["comm_planned_bytes"] == {k: ckpt["comm_bytes"][k] for k in ("all_gather", "reduce_scatter")}


def test_zero3_activation_checkpointing_gathers_only_the_embedding_again(runs, micro_model):
    """Both layers kept gathered (they fit in stage3_max_live_parameters: see plan.zero3_layers_kept), the
    recomputed forward runs on them as they are: each decoder layer is a ZeRO-3 leaf, released whole after its
    backward (DeepSpeed's per-sub-module gathering fetched each layer's frozen storage once more). The embedding
    (E), released after its forward (qshard's stage3_max_reuse_distance is 0), comes back for the backward
    checkpointing gives it. The plan counts it to the byte."""
    record, (_, model) = _step(runs, "zero3-ckpt"), _sizes(runs, "zero3")
    embedding = 4 * 512 * 64
    assert record["comm_bytes"]["all_gather"] == MICRO * (model + embedding)
    assert record["comm_planned_bytes"]["all_gather"] == record["comm_bytes"]["all_gather"]


def test_zero3_gathers_a_released_layer_twice_with_checkpointing(runs, micro_model):
    """With layers released after forward (a DeepSpeed JSON with stage3_max_reuse_distance 1,000 elements, what
    a model of more than ~5e8 elements sees at the default), each layer is gathered for forward and once more,
    whole, for its backward, inside which the recomputed forward runs; the embedding once more for its backward
    (checkpointing makes its output require a gradient) and the final norm (the head's two gathers, 2 x 32,768
    elements, lie between its forward and its backward)."""
    record, (_, model), root = _step(runs, "zero3-release-ckpt"), _sizes(runs, "zero3"), _root_bytes(micro_model)
    layers, embedding, norm = model - root, 4 * 512 * 64, 4 * 64
    assert record["comm_bytes"]["all_gather"] == MICRO * (model + layers + embedding + norm)


def test_zero3_vocab_parallel_gathers_no_table_and_exchanges_activations_as_planned(runs, micro_model):
    """Every parameter gathered once a micro-batch but the embedding and head (E + H = R - norm), plus the exchange;
    the plan counts both to the byte (DeepSpeed's own few-byte all-reduces aside)."""
    record, (lora, model), root = _step(runs, "zero3-vocab"), _sizes(runs, "zero3-vocab"), _root_bytes(micro_model)
    tables, measured = root - 4 * 64, record["comm_bytes"]
    assert tables == 2 * 4 * 512 * 64
    assert measured["all_gather"] == MICRO * (model - tables + EXCHANGE["all_gather"])
    assert measured["reduce_scatter"] == MICRO * lora
    assert measured["reduce"] == MICRO * EXCHANGE["reduce"]
    for op in ("all_reduce", "broadcast"):  # DeepSpeed's own scalars beside the exchange
        assert MICRO * EXCHANGE[op] <= measured[op] <= MICRO * EXCHANGE[op] + 64, op
    assert record["comm_planned_bytes"] == {"all_gather": measured["all_gather"],
                                            "reduce_scatter": measured["reduce_scatter"],
                                            **{op: MICRO * EXCHANGE[op] for op in ("all_reduce", "broadcast", "reduce")}}


def test_zero3_releases_the_layers_beyond_its_live_limit_and_gathers_them_again_as_planned(runs, micro_model):
    """8 layers, vocabulary-parallel: qshard's limit (4 layers' elements gathered, dsconfig.zero3_gather_limits)
    keeps the last 3 from forward to backward (DeepSpeed's prefetcher passes their backward uses while they and
    the final norm are gathered below the limit) and releases 5, which are gathered again, whole, for backward:
    the plan (plan.zero3_layers_kept) to the byte. Each layer is one ZeRO-3 leaf, so a gather of it is one
    collective, not one per sub-module (414 all-gathers a step before, 7 sub-modules with parameters per layer)."""
    from qshard.tools import plan

    record, (_, model) = _step(runs, "zero3-deep"), _sizes(runs, "zero3-deep")
    tables = 2 * 4 * 512 * 64  # vocabulary-parallel buffers, never gathered
    layer = (model - tables - 4 * 64) // 8  # every layer alike; the final norm is the only other parameter
    measured = record["comm_bytes"]["all_gather"]
    once = MICRO * (model - tables + EXCHANGE["all_gather"])
    assert measured == once + MICRO * 5 * layer
    spec = plan.read_model_spec(str(runs / "deep-llama"))
    s = plan.Settings(quant="nf4", dense_dtype="float32", precision="fp32", lora_r=8, engine="zero3", gpus=2)
    assert plan.zero3_layers_kept(spec, s, plan.lora_params(spec, s)) == 3
    assert record["comm_planned_bytes"]["all_gather"] == measured
    # per micro-batch: 3 for the exchange, and fewer than 2 per layer gathered (13) and the final norm
    assert record["comm_calls"]["all_gather"] <= MICRO * (3 + 2 * (8 + 5 + 1))


def test_fsdp2_vocab_parallel_gathers_layers_twice_and_the_norm_once_as_planned(runs, micro_model):
    """The root holds the final norm alone and no table is a unit: layers twice, the norm once, plus the exchange
    (3 all-gathers a micro-batch: ids, targets, loss gradients; hidden states are broadcast, one rank's at a time,
    and lookups and gradients reduced to their owner); with activation checkpointing
    nothing more (off, the embedding was gathered again for its backward)."""
    record, (lora, model), root = _step(runs, "fsdp2-vocab"), _sizes(runs, "fsdp2-vocab"), _root_bytes(micro_model)
    measured, norm = record["comm_bytes"], 4 * 64
    gathered = MICRO * (2 * (model - root) + norm + EXCHANGE["all_gather"])
    assert measured["all_gather"] == gathered
    assert record["comm_calls"]["all_gather"] == MICRO * (2 * 2 + 1 + 3)
    assert measured["reduce_scatter"] == lora
    assert measured["broadcast"] == MICRO * EXCHANGE["broadcast"] and measured["reduce"] == MICRO * EXCHANGE["reduce"]
    assert MICRO * EXCHANGE["all_reduce"] < measured["all_reduce"] <= MICRO * EXCHANGE["all_reduce"] + 1024  # + norm
    planned = {"all_gather": gathered, "reduce_scatter": measured["reduce_scatter"],
               **{op: MICRO * EXCHANGE[op] for op in ("all_reduce", "broadcast", "reduce")}}
    assert record["comm_planned_bytes"] == planned
    ckpt = _step(runs, "fsdp2-vocab-ckpt")
    assert ckpt["comm_bytes"]["all_gather"] == gathered and ckpt["comm_planned_bytes"] == planned


def test_count_comm_false_counts_nothing(runs):
    record = _step(runs, "ddp-uncounted")
    assert not {"comm_bytes", "comm_calls", "comm_planned_bytes"} & record.keys()
    assert record["loss"] == _step(runs, "ddp")["loss"]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_step_records_traffic_and_time_in_flight(runs, engine):
    for step in (1, 2):
        record = _step(runs, engine, step)
        assert sum(record["comm_bytes"].values()) > 0 and all(n > 0 for n in record["comm_calls"].values())
        assert 0 < record["comm_s"] <= record["step_s"]  # gloo: completion times are observed
        assert record.get("comm_untimed", []) == (["reduce_scatter"] if "reduce_scatter" in record["comm_bytes"]
                                                  else [])


def test_a_disabled_counter_installs_nothing_and_takes_a_leftover_off():
    """train.count_comm: false (or one process): no Python kernel sits in front of any collective, not even
    one a previous run in this process left installed."""
    import torch

    from qshard.observe import commcount

    def installed() -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key("c10d::allreduce_", "BackendSelect")

    assert not installed()
    commcount.CommCounter(enabled=True)  # a run that ended without close()
    assert installed()
    off = commcount.CommCounter(enabled=False)
    assert not installed() and commcount._installed is None
    off.start()
    assert off.stop() is None and off.close() == {}
    commcount.CommCounter(enabled=True).close()
    assert not installed()


def test_union_of_intervals_counts_overlap_once():
    assert _union_seconds([[0.0, 2.0], [1.0, 3.0], [5.0, 6.0]], now=10.0) == pytest.approx(4.0)
    assert _union_seconds([[1.0, float("nan")]], now=4.0) == pytest.approx(3.0)  # still in flight
    assert _union_seconds([], now=1.0) == 0.0


def test_record_and_summary_show_measured_next_to_planned():
    traffic = StepTraffic({"all_gather": 3_000_000, "all_reduce": 8}, {"all_gather": 6, "all_reduce": 1}, 0.02, 0.1,
                          ["reduce_scatter"])
    record = comm_record(traffic, {"all_gather": 6_000_000})
    assert record == {"comm_bytes": traffic.bytes, "comm_calls": traffic.calls, "step_s": 0.1, "comm_s": 0.02,
                      "comm_untimed": ["reduce_scatter"], "comm_planned_bytes": {"all_gather": 6_000_000}}
    assert comm_record(None, {"all_gather": 1}) == {}  # one process: no keys
    text = format_comm({"steps": 5, "bytes": traffic.bytes, "comm_s": 0.02, "step_s": 0.1, "untimed": [],
                        "planned": {"all_gather": 6_000_000}})
    assert "all_gather" in text and "3.000 MB measured" in text and "6.000 MB planned (0.50x)" in text
    assert "20.0 ms of a 100.0 ms step (20%)" in text and "mean of 4 step(s)" in text
