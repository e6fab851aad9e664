"""Issue #4's benchmark: peak resident memory per rank while the base model loads, qshard's load-time
sharding (FSDP2, ZeRO-3) against a single-process load and the anchor stack, for 1, 2 and 4 ranks.

    .venv/bin/python bench/load_memory.py [--model build/bench-400m] [--markdown FILE]
    # a GPTQ checkpoint kept as it is (bench/ptq_memory.py builds build/ptq-bench-gptq), qshard only:
    .venv/bin/python bench/load_memory.py --model build/ptq-bench-gptq --configs qshard \
        --recipe-set quantization.method=checkpoint model.dtype=bfloat16 train.precision=bf16

Every configuration runs in its own processes (gloo, CPU, DS_ACCELERATOR=cpu) on the ~400M Llama of
bench/recipe-400m.yaml (NF4 with double quant, fp32 compute, LoRA r=16 all-linear):
  - qshard single: one process, `load_base_model` + LoRA (engine none): "the single-process quantized load".
  - qshard fsdp2 / zero3, N ranks: `qshard.train.build_model` as `qshard train` calls it, i.e. loaded
    sharded (qshard/shardload.py); also once with distributed.shard_on_load=false (the whole base on every
    rank first), then `engine.wrap`.
  - anchor, N ranks: transformers `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
    quant, fp32))` + PEFT `get_peft_model`, then `deepspeed.initialize` (ZeRO-3), as bench/anchor_zero3.py.

Per rank: the baseline is the resident set after imports (every module either stack loads, see
`warm_up`), process group and engine creation; then
/proc/self/clear_refs resets the kernel's high-water mark (VmHWM), the model loads, and VmHWM minus
the baseline is the exact peak resident memory added *during load* (anonymous memory plus mapped
file pages: transformers reads safetensors through mmap, so part of its figure is the checkpoint's
pages). A 5 ms sampler of RssAnon gives the anonymous part alone (approximate). "parameter + buffer
bytes" counts the storage of the rank's own parameters and buffers once the load returns (its shard
under FSDP2 / ZeRO-3): what a GPU would hold, independent of the CPU allocator and of safetensors'
mapped pages (on the CPU a whole PTQ load leaves its packed tensors as mapped file pages that nothing
has read yet, so its RSS understates it until the engine's wrap copies them). "load + wrap" is the
peak through the engine's own initialisation (DeepSpeed/FSDP2 wrap, optimizer). Raw numbers go to
<runs>/results.json, the Markdown table to stdout (and --markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "bench" / "recipe-400m.yaml"

# name -> (kind, ranks, recipe overrides)
CONFIGS = {
    "qshard single (1 process)": ("qshard", 1, ["distributed.engine=none"]),
    "qshard fsdp2, 2 ranks": ("qshard", 2, ["distributed.engine=fsdp2"]),
    "qshard fsdp2, 4 ranks": ("qshard", 4, ["distributed.engine=fsdp2"]),
    "qshard zero3, 2 ranks": ("qshard", 2, ["distributed.engine=deepspeed", "distributed.zero_stage=3"]),
    "qshard zero3, 4 ranks": ("qshard", 4, ["distributed.engine=deepspeed", "distributed.zero_stage=3"]),
    "qshard fsdp2, 2 ranks, shard_on_load=false": ("qshard", 2, ["distributed.engine=fsdp2",
                                                                 "distributed.shard_on_load=false"]),
    "qshard zero3, 2 ranks, shard_on_load=false": ("qshard", 2, ["distributed.engine=deepspeed",
                                                                 "distributed.zero_stage=3",
                                                                 "distributed.shard_on_load=false"]),
    "anchor (transformers+bnb+peft, DeepSpeed ZeRO-3), 2 ranks": ("anchor", 2, []),
    "anchor (transformers+bnb+peft, DeepSpeed ZeRO-3), 4 ranks": ("anchor", 4, []),
}


def status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon")}


class AnonPeak:
    """Samples RssAnon every 5 ms in a thread (the kernel keeps no high-water mark for it)."""

    def __enter__(self):
        self.peak, self.running = status()["RssAnon"], True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, status()["RssAnon"])
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, status()["RssAnon"])


def reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(kind: str, model: str, overrides: list[str], out: Path) -> None:
    import gc

    import bitsandbytes  # noqa: F401  (imported by both stacks: part of the baseline)
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from qshard.runtime import init_runtime

    rt = init_runtime(need_group=kind == "anchor" or "distributed.engine=none" not in overrides)
    warm_up()
    if kind == "qshard":
        load, wrap = _qshard(model, overrides, rt)
    else:
        load, wrap = _anchor(model, rt)
    gc.collect()
    base = status()
    reset_high_water_mark()
    with AnonPeak() as anon:
        loaded = load()
    after_load = status()
    held = held_tensor_bytes(loaded)
    wrap(loaded)
    after_wrap = status()
    result = {"rank": rt.rank, "baseline_rss": base["VmRSS"], "baseline_anon": base["RssAnon"],
              "load_peak": after_load["VmHWM"] - base["VmRSS"], "load_peak_anon": anon.peak - base["RssAnon"],
              "after_load": after_load["VmRSS"] - base["VmRSS"],
              "load_wrap_peak": after_wrap["VmHWM"] - base["VmRSS"], "held_tensors": held}
    out.with_name(f"{out.stem}-rank{rt.rank}.json").write_text(json.dumps(result))
    if rt.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def held_tensor_bytes(model) -> int:
    """Bytes of this rank's own parameter and buffer storage (its shard under FSDP2 / ZeRO-3), each
    storage once: what the load leaves on the device, whatever the allocator or the page cache do."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        t = getattr(t, "ds_tensor", t)  # a ZeRO-3 partition
        t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard
        if t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def warm_up() -> None:
    """Import every module either stack imports while loading and load bitsandbytes' native library,
    so that the baseline includes them and the load figure is the model's memory alone."""
    import importlib

    import torch

    for name in ("qshard.train", "qshard.model.shardload", "torch.distributed.fsdp", "torch.distributed.tensor",
                 "torch.distributed.checkpoint.state_dict", "deepspeed.runtime.zero.partition_parameters",
                 "deepspeed.runtime.engine", "transformers.models.llama.modeling_llama",
                 "transformers.integrations.bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit",
                 "peft.tuners.lora.bnb"):
        importlib.import_module(name)
    import bitsandbytes.functional as bnbF

    bnbF.quantize_4bit(torch.ones(64), quant_type="nf4", compress_statistics=True)


def _qshard(model: str, overrides: list[str], rt):
    from qshard.compat import engine_key
    from qshard.config import load_recipe
    from qshard.model.load import open_base
    from qshard.model.lora import resolve_targets
    from qshard.precision import resolve_precision
    from qshard.train import build_model, engine_for, make_optimizer, quant_spec
    from qshard.validate import Checked

    recipe = load_recipe(str(RECIPE), [f"model.path={model}", *overrides])
    precision = resolve_precision(recipe.train.precision, rt.device)
    quant = quant_spec(recipe, precision)
    engine = engine_for(recipe, rt, precision)

    def load():
        model_dir, skeleton = open_base(recipe.model.path, dtype=recipe.model.dtype, quant=quant)
        targets = resolve_targets(skeleton, recipe.lora.target_modules)
        d = recipe.distributed
        checked = Checked(engine=engine_key(d.engine, d.zero_stage, d.offload_params, d.offload_optimizer),
                          model_dir=model_dir, skeleton=skeleton, targets=targets)
        return build_model(checked, quant, engine, recipe, rt, lambda *_: None)

    def wrap(model):
        engine.wrap(model, lambda params: make_optimizer(params, recipe))

    return load, wrap


def _anchor(model: str, rt):
    import torch

    def load():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(model, quantization_config=bnb, dtype=torch.float32)
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))

    def wrap(peft_model):
        import deepspeed

        params = [p for p in peft_model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "train_batch_size": rt.world_size, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True}
        deepspeed.initialize(model=peft_model, optimizer=torch.optim.AdamW(params, lr=1e-4), config=config)

    return load, wrap


def run_config(name: str, kind: str, ranks: int, overrides: list[str], model: str, runs: Path,
               timeout: float) -> list[dict]:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = runs / f"{slug}.json"
    for old in runs.glob(f"{slug}-rank*.json"):
        old.unlink()
    args = ["--worker", kind, "--model", model, "--out", str(out), "--set", *overrides]
    if ranks == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
               *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = runs / f"{slug}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return [json.loads(p.read_text()) for p in sorted(runs.glob(f"{slug}-rank*.json"))]


def markdown(results: dict[str, list[dict]], model: str) -> str:
    mib = lambda b: b / 2**20  # noqa: E731
    reference = lambda name: max((r["load_peak"] for r in results.get(name, [])), default=float("nan"))  # noqa: E731
    single = reference("qshard single (1 process)")
    anchor2 = reference("anchor (transformers+bnb+peft, DeepSpeed ZeRO-3), 2 ranks")
    lines = [f"Model: `{model}`; {date.today()}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
             f"Python {platform.python_version()}.", "",
             "| configuration | ranks | peak during load above baseline, max over ranks (MiB) | anonymous part (MiB) "
             "| held after load (MiB) | parameter + buffer bytes after load (MiB) | peak through load + wrap (MiB) "
             "| load peak / single process | load peak / anchor 2 ranks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, ranks in results.items():
        peak = max(r["load_peak"] for r in ranks)
        lines.append(f"| {name} | {len(ranks)} | {mib(peak):.0f} | {mib(max(r['load_peak_anon'] for r in ranks)):.0f} "
                     f"| {mib(max(r['after_load'] for r in ranks)):.0f} | "
                     f"{mib(max(r.get('held_tensors', float('nan')) for r in ranks)):.1f} | "
                     f"{mib(max(r['load_wrap_peak'] for r in ranks)):.0f} | {peak / single:.2f} | "
                     f"{f'{peak / anchor2:.2f}' if anchor2 == anchor2 else '-'} |")  # NaN: anchor not run
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="build/bench-400m")
    p.add_argument("--runs", default="runs/load-memory")
    p.add_argument("--configs", nargs="*", help="substrings of configuration names to run (default: all)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--markdown")
    p.add_argument("--recipe-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every qshard configuration (e.g. for a PTQ checkpoint)")
    p.add_argument("--worker", choices=["qshard", "anchor"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--set", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.set, Path(args.out))
        return
    if not (ROOT / args.model / "config.json").is_file():
        subprocess.run([str(Path(sys.executable).parent / "qshard"), "init-tiny", args.model, "--size", "400m"],
                       cwd=ROOT, check=True)
    runs = ROOT / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (kind, ranks, overrides) in CONFIGS.items():
        if args.configs and not any(s in name for s in args.configs):
            continue
        overrides = overrides + args.recipe_set * (kind == "qshard")
        results[name] = run_config(name, kind, ranks, overrides, args.model, runs, args.timeout)
    (runs / "results.json").write_text(json.dumps(results, indent=1))
    report = markdown(results, args.model)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")


if __name__ == "__main__":
    main()
