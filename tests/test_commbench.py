"""`qshard bench-comm`: nccl-tests' bandwidth definitions, a real 2-process gloo run through the CLI's
own torchrun launch, and the per-step traffic estimate of a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.observe.commcount import planned_step_bytes
from qshard.tools import commbench, plan
from qshard.tools.commbench import Row, estimate, make_row, parse_sizes
from qshard.tools.plan import (
    ModelSpec,
    Settings,
    base_bytes,
    bus_factor,
    lora_params,
    read_model_spec,
    step_traffic,
)
from tests.helpers import recipe_dict

LLAMA_7B = ModelSpec(model_type="llama", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
                     intermediate=11008, vocab=32000)


def test_bus_bandwidth_uses_the_nccl_tests_factors():
    assert [bus_factor("all_reduce", n) for n in (2, 4, 8)] == [1.0, 1.5, 1.75]
    assert [bus_factor(op, 4) for op in ("all_gather", "reduce_scatter")] == [0.75, 0.75]
    row = make_row("all_reduce", 8_000_000, 0.004, 8)
    assert row.algbw == 2e9 and row.busbw == 2e9 * 1.75


def test_sizes_parse_like_the_planner_and_bad_ones_are_refused():
    assert parse_sizes("1KB, 64KiB,1MB") == [1000, 65536, 1_000_000]
    for bad in ("", "1XB", "0B", "inf", "-1MB"):
        with pytest.raises(QShardError, match="--sizes"):
            parse_sizes(bad)


def test_zero3_moves_more_bytes_per_step_than_ddp_and_counts_the_base_packed():
    # 2 micro-batches; the engines gather embedding and head (vocabulary-parallel traffic: tests/test_plan.py)
    s = Settings(quant="nf4", lora_r=16, micro_batch=1, seq_len=1024, gpus=8, global_batch=16, vocab_parallel=False)
    traffic = {e: step_traffic(LLAMA_7B, replace(s, engine=e)) for e in ("ddp", "zero2", "zero3", "fsdp2")}
    total = {e: sum(t.bytes_per_step for t in ts) for e, ts in traffic.items()}
    n_lora, packed = lora_params(LLAMA_7B, s), sum(base_bytes(LLAMA_7B, s).values())
    assert total["ddp"] == 4 * n_lora  # one fp32 all-reduce of the LoRA gradients
    assert total["zero3"] > 50 * total["ddp"] and total["fsdp2"] > 50 * total["ddp"]  # 15 GB vs 160 MB
    # ZeRO-3 keeps the last 2 layers gathered for their backward (the head, 131M elements, and 2 layers fit in
    # qshard's 4-layer limit, 3 do not: plan.zero3_layers_kept) and gathers the other 30 again; each micro-batch
    # gathers everything once for forward
    zero3 = replace(s, engine="zero3")
    assert plan.zero3_layers_kept(LLAMA_7B, zero3, n_lora) == 2
    layer = plan.decoder_layer_bytes(LLAMA_7B, zero3) + n_lora // 32 * 2
    gather = next(t for t in traffic["zero3"] if t.op == "all_gather")
    assert gather.bytes_per_step == 2 * (packed + 2 * n_lora + 30 * layer)
    assert packed < 0.3 * 2 * LLAMA_7B.params  # NF4 + double quant: ~4.1 bits per base linear weight, not 16
    assert sum(t.bytes_per_step for t in step_traffic(LLAMA_7B, s)) == 0  # engine none


@pytest.mark.parametrize("engine, ckpt, reshard", [("ddp", False, True), ("zero1", False, True), ("zero2", True, True),
                                                   ("zero3", False, True), ("zero3", True, True), ("fsdp2", False, True),
                                                   ("fsdp2", True, True), ("fsdp2", True, False)])
def test_planner_bench_comm_and_the_run_read_one_traffic_model(tmp_path, engine, ckpt, reshard):
    """The planner's step time, `qshard bench-comm`'s estimate and a run's comm_planned_bytes all come from
    plan.step_traffic: same bytes per kind, the same seconds at the same bandwidth (LLaMA-7B, 8 GPUs, NF4,
    4 micro-batches). Activation checkpointing moves no more bytes except under ZeRO-3 (measured in
    tests/test_commcount.py); vocabulary-parallel (the default), FSDP2 has no embedding to gather for backward."""
    (tmp_path / "llama7b").mkdir()
    (tmp_path / "llama7b" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "intermediate_size": 11008, "vocab_size": 32000}))
    distributed = ({"engine": "deepspeed", "zero_stage": int(engine[4])} if engine.startswith("zero")
                   else {"engine": engine, **({"reshard_after_forward": reshard} if engine == "fsdp2" else {})})
    recipe = parse_recipe({"model": {"path": str(tmp_path / "llama7b"), "gradient_checkpointing": ckpt},
                           "data": {"path": "unused", "max_length": 1024},
                           "train": {"micro_batch_size": 1, "gradient_accumulation_steps": 4},
                           "distributed": distributed})
    spec = read_model_spec(recipe.model.path)
    run = planned_step_bytes(recipe, world_size=8, precision="bf16")
    rows = [Row(op, 2 ** 20, 1.0, 0.0, plan.INTRA_NODE_BW) for op in commbench.COLLECTIVES]
    bench = estimate(recipe, spec, rows, world=8, flops=plan.GPU_FLOPS)
    per_op: dict[str, int] = {}  # an op may carry several kinds of traffic (the vocabulary-parallel exchange)
    for t in bench["traffic"]:
        per_op[t["op"]] = per_op.get(t["op"], 0) + t["bytes_per_step"]
    assert per_op == run and sum(run.values()) > 0
    s = plan.settings_from_recipe(recipe, spec, gpus=8, nodes=1)
    assert bench["comm_s"] == pytest.approx(plan.comm_seconds(spec, s), rel=1e-12)
    lora = lora_params(spec, s)
    assert bench["compute_s"] == pytest.approx(plan.compute_seconds(spec, s, lora), rel=1e-12)
    base = sum(base_bytes(spec, s).values())
    assert plan.step_seconds(spec, s, base, lora) == pytest.approx(bench["comm_s"] + bench["compute_s"], rel=1e-12)
    if ckpt and engine != "zero3":
        plain = planned_step_bytes(recipe.model_copy(update={"model": recipe.model.model_copy(
            update={"gradient_checkpointing": False})}), 8, "bf16")
        assert plain == run


def test_communication_bound_when_the_link_is_slow():
    rows = [Row(op, 2 ** 20, 1.0, 0.0, 1e6) for op in commbench.COLLECTIVES]  # 1 MB/s bus bandwidth
    recipe = parse_recipe({"model": {"path": "unused"}, "data": {"path": "unused"},
                           "distributed": {"engine": "fsdp2"}})
    slow = estimate(recipe, LLAMA_7B, rows, world=2, flops=1e15)
    assert slow["bound"] == "communication" and slow["comm_s"] > slow["compute_s"] > 0
    fast = estimate(recipe, LLAMA_7B, [replace(r, busbw=1e15) for r in rows], world=2, flops=1e12)
    assert fast["bound"] == "compute"


@pytest.fixture
def zero3_recipe(micro_model, alpaca_file, tmp_path):
    raw = recipe_dict(micro_model, alpaca_file, tmp_path / "unused-run", gradient_accumulation_steps=2)
    raw["distributed"] = {"engine": "deepspeed", "zero_stage": 3}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_bench_comm_on_two_gloo_processes(zero3_recipe, tmp_path, micro_model):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "qshard.cli", "bench-comm", "--nproc", "2", "--sizes", "4KB,256KB",
                           "--iters", "3", "--json", str(out), str(zero3_recipe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == "gloo" and result["world_size"] == 2
    rows = [Row(**r) for r in result["rows"]]
    assert [(r.op, r.bytes) for r in rows] == [(op, size) for op in commbench.COLLECTIVES for size in (4000, 256000)]
    for r in rows:
        assert r.seconds > 0 and r.algbw > 0 and r.busbw > 0
        assert r.algbw == r.bytes / r.seconds
        assert r.busbw == r.algbw * bus_factor(r.op, 2)
    assert "busbw (GB/s)" in proc.stdout and "reduce_scatter" in proc.stdout

    # the recipe's estimate, at the bandwidths just measured: ZeRO-3 moves more than DDP would
    est = result["estimate"]
    assert est["engine"] == "zero3" and est["bound"] in ("communication", "compute") and est["comm_s"] > 0
    raw = yaml.safe_load(zero3_recipe.read_text())
    raw["distributed"] = {"engine": "ddp"}
    ddp = estimate(parse_recipe(raw), read_model_spec(str(micro_model)), rows, world=2, flops=1e12)
    assert sum(t["bytes_per_step"] for t in est["traffic"]) > sum(t["bytes_per_step"] for t in ddp["traffic"]) > 0
    assert f"{est['bound']}-bound" in proc.stdout


def test_bench_comm_refuses_a_bad_recipe_before_starting_processes(tmp_path, capsys):
    from qshard import cli

    assert cli.main(["bench-comm", "--nproc", "2", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
