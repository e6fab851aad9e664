"""Issue #6's validation for multi-rank engines: the planner's per-rank bytes against measured *allocated
tensor bytes* on each of 2 gloo ranks (CPU), per component, for DDP, DeepSpeed ZeRO-1/2/3 (+ optimizer
offload) and FSDP2.

    .venv/bin/python bench/plan_validation_dist.py            # all 18 cases (small, then 400m), ~22 min on 2 cores
    .venv/bin/python bench/plan_validation_dist.py --quick    # the small model only

Each case is one `torch.distributed.run --nproc-per-node 2` launch of this file (`--worker`), with
DS_ACCELERATOR=cpu. Every rank builds the model as `qshard train` does: the engine from
`qshard.engines.create_engine`, the base and LoRA (r=8, all-linear, dropout 0) from
`qshard.train.build_model` (under ZeRO-3 and FSDP2 each rank loads only its shards), the engine's own
`wrap` (torch AdamW); then two steps of `qshard.train.token_loss_sum` -> `engine.backward` ->
`engine.step` on its own batch. The second step is measured, as in the single-process bench
(bench/plan_validation.py, whose `LiveTensorBytes` counts the bytes).

The tracker is active from before the load to the end, so what the loader and the engine allocate (DDP
buckets, DeepSpeed's flat fp32 partitions and buckets, FSDP2's shards) is counted, and what they free
(full parameters replaced by shards) is subtracted; parameters whose storage no op returned (read from
the file) are registered after the load. Under FSDP2 parameters are DTensors: their bytes are those of
`_local_tensor`; the unsharded parameters FSDP2 all-gathers into are storages it grows and frees with
`untyped_storage().resize_()`, which on CPU bypasses the dispatcher, so the tracker wraps
`UntypedStorage.resize_` (see `LiveTensorBytes`). Under ZeRO-3 a parameter's `.data` is emptied and
its partition is `param.ds_tensor`.

Components per rank (each storage counted once, in this order):
  base        frozen parameters as this rank stores them (`ds_tensor`, a DTensor's local shard, or whole)
  lora        the module's trainable parameters (their shard under ZeRO-3 / FSDP2)
  master      tensors the torch optimizer updates when they are not the module's (DeepSpeed's fp32 partitions)
  optimizer   the torch optimizer's state tensors (AdamW's two moments)
  grads+buf   live bytes right after the second backward, minus all of the above and the model's buffers:
              gradients (or their partitions) and the engine's persistent buffers
  working     peak of the second step minus the live bytes after its backward: activations, loss
              buffers, gathered parameters (ZeRO-3 / FSDP2) and transient copies
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from plan_validation import (  # this file's folder is on sys.path when run as a script
    LiveTensorBytes,
    mib,
    pct,
)

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# label -> the recipe's distributed section
ENGINES = {
    "ddp": {"engine": "ddp"},
    "zero1": {"engine": "deepspeed", "zero_stage": 1},
    "zero2": {"engine": "deepspeed", "zero_stage": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
    "zero3+off_opt": {"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu"},
    "fsdp2": {"engine": "fsdp2"},
    # the other ZeRO-3 load path: the whole base on every rank, then deepspeed.initialize partitions it
    "zero3 whole-load": {"engine": "deepspeed", "zero_stage": 3, "shard_on_load": False},
    # DeepSpeed's own gather limits from a user's JSON (README: the faster side on CPU), instead of qshard's
    "zero3 deepspeed-limits": {"engine": "deepspeed",
                               "deepspeed_config": str(ROOT / "bench" / "zero3-deepspeed-limits.json")},
}
# (model size, engine label, precision, micro-batch per rank, sequence, activation checkpointing); NF4 base
CASES = [("small", e, "fp32", 4, 256, False) for e in ENGINES
         if e not in ("zero3 whole-load", "zero3 deepspeed-limits")] + [
    ("small", "zero3", "fp32", 4, 256, True),
    ("small", "fsdp2", "fp32", 4, 256, True),
] + [("small", e, "bf16", 4, 256, False) for e in ("ddp", "zero2", "zero3", "zero3 whole-load", "fsdp2")] + [
    ("400m", e, p, 1, 256, False) for p in ("fp32", "bf16") for e in ("zero3", "fsdp2")] + [
    ("400m", "zero3 whole-load", "bf16", 1, 256, False), ("400m", "zero3 deepspeed-limits", "fp32", 1, 256, False)]
QUICK = [c for c in CASES if c[0] != "400m"]


# -- one rank --------------------------------------------------------------------------------------

def measure_rank(model_dir: str, label: str, precision: str, micro_batch: int, seq: int, ckpt: bool) -> dict:
    from qshard import train
    from qshard.compat import deepspeed_json_identity, engine_key
    from qshard.config import parse_recipe
    from qshard.dsconfig import read_user_config
    from qshard.engines import create_engine
    from qshard.model.load import open_base
    from qshard.model.lora import resolve_targets
    from qshard.precision import resolve_precision
    from qshard.runtime import init_runtime
    from qshard.validate import Checked

    recipe = parse_recipe({
        "model": {"path": model_dir, "dtype": "float32" if precision == "fp32" else "bfloat16",
                  "gradient_checkpointing": ckpt},
        "quantization": {"method": "nf4"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": "unused.jsonl", "max_length": seq},
        "train": {"micro_batch_size": micro_batch, "precision": precision}, "distributed": ENGINES[label]})
    rt = init_runtime(need_group=True)
    prec = resolve_precision(precision, rt.device)
    quant = train.quant_spec(recipe, prec)
    model_dir, skeleton = open_base(model_dir, dtype=recipe.model.dtype, quant=quant)
    d = recipe.distributed
    stage = deepspeed_json_identity(read_user_config(d.deepspeed_config))[0] if d.deepspeed_config else d.zero_stage
    engine = create_engine(d.engine, device=rt.device, precision=prec.name, world_size=rt.world_size,
                           micro_batch=micro_batch, accumulation=1, max_grad_norm=None, zero_stage=stage,
                           offload_optimizer=d.offload_optimizer, offload_params=d.offload_params,
                           deepspeed_config=d.deepspeed_config, reshard_after_forward=d.reshard_after_forward)
    torch.manual_seed(rt.rank)  # each rank its own batch, as in training
    ids = torch.randint(2, skeleton.config.vocab_size, (micro_batch, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tracker = LiveTensorBytes()
    with tracker:  # from before the load: under ZeRO-3 / FSDP2 qshard loads each rank's shards only (#4)
        checked = Checked(engine=engine_key(d.engine, stage, d.offload_params, d.offload_optimizer),
                          model_dir=model_dir, skeleton=skeleton, targets=resolve_targets(skeleton, "all-linear"))
        model = train.build_model(checked, quant, engine, recipe, rt, say=lambda *_: None)
        for t in list(model.parameters()) + list(model.buffers()):  # storages no op returned (file reads)
            tracker.track(local_tensor(t))
        wrapped, optimizer = engine.wrap(model, lambda params: torch.optim.AdamW(params, lr=1e-4))
        wrapped.train()
        for _ in range(2):
            tracker.reset_peak()
            with prec.autocast():
                loss = train.token_loss_sum(wrapped, batch, rt.device)
            engine.backward(loss)
            del loss
            after_backward = tracker.current
            engine.step(None)
    row = {"rank": rt.rank, "peak": tracker.peak, "after_backward": after_backward, "after_step": tracker.current,
           **components(engine.peft_model, optimizer)}
    row["grads_and_buffers"] = after_backward - sum(row[k] for k in ("base", "buffers", "lora", "master", "optimizer"))
    row["working"] = tracker.peak - after_backward
    return row


def components(peft_model, optimizer) -> dict:
    """Bytes this rank stores per kind of tensor; a storage shared by two kinds counts for the first."""
    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            storage = local_tensor(t).untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = list(peft_model.parameters())
    module_trainable = {id(p) for p in params if p.requires_grad}
    # DeepSpeed ZeRO-3 puts its fp32 partitions in the param groups only during step(); the state keeps them
    updated = [p for g in optimizer.param_groups for p in g["params"]] + list(optimizer.state)
    return {"base": nbytes(p for p in params if not p.requires_grad),
            "buffers": nbytes(peft_model.buffers()),
            "lora": nbytes(p for p in params if p.requires_grad),
            "master": nbytes(p for p in updated if id(p) not in module_trainable),
            "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values()
                                if torch.is_tensor(v) and v.dim() > 0)}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this rank stores for a tensor: its ZeRO-3 partition, a DTensor's local shard, or itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return getattr(t, "_local_tensor", t)


# -- the prediction --------------------------------------------------------------------------------

def predict(model_dir: Path, label: str, precision: str, micro_batch: int, seq: int, ckpt: bool) -> dict:
    """Per-rank bytes by the same grouping as the measurement (GPU + CPU: on this machine both are RAM)."""
    from qshard.tools import plan

    spec = plan.read_model_spec(str(model_dir))
    engine, off_opt, off_params = plan.ENGINE_OPTIONS[label.split()[0]]
    s = plan.Settings(quant="nf4", dense_dtype="float32" if precision == "fp32" else "bfloat16", precision=precision,
                      lora_r=8, engine=engine, offload_optimizer=off_opt, offload_params=off_params,
                      micro_batch=micro_batch, seq_len=seq, checkpointing=ckpt, gpus=WORLD,
                      global_batch=micro_batch * WORLD)
    user_json = ENGINES[label].get("deepspeed_config")
    if user_json:
        from dataclasses import replace

        from qshard.dsconfig import read_user_config

        s = replace(s, zero3_gathering=plan.user_zero3_gathering(read_user_config(user_json)))
    e = plan.estimate(spec, s)
    both = {k: e.gpu.get(k, 0) + e.cpu.get(k, 0) for k in e.gpu.keys() | e.cpu.keys()}
    # ZeRO-1/2's reduce bucket lives only during backward: the measurement finds it in the working set
    transient = ("engine_buffers",) if engine in ("zero1", "zero2") else ()
    states = sum(both.get(k, 0) for k in ("lora_params", "lora_grads", "master_weights", "optimizer_states",
                                           "engine_buffers") if k not in transient)
    working = sum(both.get(k, 0) for k in ("activations", "logits_and_loss", "gathered_weights", "dequantized_weight",
                                          *transient))
    return {"base": both["base_weights"], "states": states, "working": working,
            "peak": both["base_weights"] + states + working, "gpu_tensor_bytes": e.tensor_bytes,
            "components": both}


# -- the driver ------------------------------------------------------------------------------------

def launch(model_dir: Path, case: tuple, out: Path) -> list[dict]:
    """One 2-rank torchrun launch of this file for one case; returns each rank's row."""
    size, label, precision, mb, seq, ckpt = case
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", __file__,
           "--worker", json.dumps([str(model_dir), label, precision, mb, seq, ckpt]), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def table(rows: list[dict]) -> str:
    """One row per case; measured values are rank 0, rank 1; errors are the worse rank's."""
    head = ("| model | engine | precision | mb x seq | ckpt | base MiB (pred / meas) "
            "| LoRA+grads+optimizer+buffers MiB (pred / meas) | working MiB (pred / meas) "
            "| peak tensors MiB (pred / meas) | peak error |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        for x in m:
            x["states"] = x["after_backward"] - x["base"] - x["buffers"]

        def cell(key: str, error: bool = True) -> str:
            worst = max((x[key] for x in m), key=lambda v: abs(p[key] - v))
            return (f"{mib(p[key])} / {', '.join(mib(x[key]) for x in m)}"
                    + (f" ({pct(p[key], worst)})" if error else ""))

        worst_peak = max((x["peak"] for x in m), key=lambda v: abs(p["peak"] - v))
        lines.append(f"| {r['size']} | {r['engine']} | {r['precision']} | {r['micro_batch']} x {r['seq']} | "
                     f"{'yes' if r['ckpt'] else 'no'} | {cell('base', False)} | {cell('states')} | "
                     f"{cell('working')} | {cell('peak', False)} | {pct(p['peak'], worst_peak)} |")
    return "\n".join(lines)


def retable(path: Path) -> int:
    from qshard.tools.tiny import init_tiny

    rows = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        models = {size: init_tiny(Path(tmp) / size, size=size) for size in {r["size"] for r in rows}}
        for r in rows:
            r["predicted"] = predict(models[r["size"]], r["engine"], r["precision"], r["micro_batch"], r["seq"],
                                     r["ckpt"])
    print(table(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated engine labels")
    parser.add_argument("--json", default=None, help="write raw numbers here")
    parser.add_argument("--retable", default=None, help="re-predict the measurements in this --json file, print")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from qshard import _compat

    _compat.quiet_known_noise()
    if args.worker:
        row = measure_rank(*json.loads(args.worker))
        Path(args.out, f"rank{row['rank']}.json").write_text(json.dumps(row))
        torch.distributed.destroy_process_group()
        return 0
    if args.retable:  # the planner changed, the measurements did not: predictions are pure functions
        return retable(Path(args.retable))
    from qshard.tools.tiny import init_tiny

    cases = [c for c in (QUICK if args.quick else CASES) if not args.only or c[1] in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for i, case in enumerate(cases):
            size = case[0]
            if size not in models:
                models[size] = init_tiny(Path(tmp) / size, size=size)
            out = Path(tmp) / f"case{i}"
            out.mkdir()
            rows.append({"size": size, "engine": case[1], "precision": case[2], "micro_batch": case[3],
                         "seq": case[4], "ckpt": case[5], "predicted": predict(models[size], *case[1:]),
                         "measured": launch(models[size], case, out)})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
