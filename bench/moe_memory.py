"""Issue #16's benchmark: per-rank memory of a ~0.44B Mixture-of-Experts QLoRA run under ZeRO-3 and FSDP2,
qshard against the anchor stack, in the same run.

    .venv/bin/python bench/moe_memory.py            # build the model if missing, 2 engines x 2 stacks, table
    .venv/bin/python bench/moe_memory.py --steps 6 --runs runs/moe-memory-6steps   # RSS over more steps
    .venv/bin/python bench/moe_memory.py --engines fsdp2 --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 --runs ...
    .venv/bin/python bench/moe_memory.py table [--runs DIR]                      # the table again

Model: a random Mixtral-shaped model (transformers `from_config` + `save_pretrained`, bf16): hidden 1024,
8 layers, 16 / 8 heads, 8 experts (top 2) of intermediate 1792, vocab 32000, untied head: 443M
parameters, 352M of them in the fused expert weights (`experts.gate_up_proj [8, 3584, 1024]`,
`experts.down_proj [8, 1024, 1792]`). Tokenizer: qshard's byte-level BPE (512 tokens trained; the
embedding has 32000 rows). Data: 16 text rows of shuffled words, every one cut to 256 tokens.

Both stacks, equal settings: bf16 weights and autocast, NF4 + double quant for what each quantizes, LoRA
r 8 / alpha 16 / dropout 0 on q/k/v/o and on both expert weights (PEFT `target_parameters`), batch 1 x
256 tokens per rank, 3 steps, torch AdamW lr 2e-4, clipping 1.0, gradient checkpointing (non-reentrant)
on, the router's load-balancing loss (x0.001) added. 2 ranks, gloo, CPU.
- qshard: `qshard.train.run` on each rank (what `qshard train --nproc 2` runs), recipe below
  (target_modules all-linear = q/k/v/o + the expert weights; its log line `LoRA adapters on:` says so).
- anchor: `from_pretrained(..., BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute and
  quant_storage bf16))` (quant_storage as PEFT's DeepSpeed / FSDP QLoRA guides set it), `get_peft_model`
  with `target_modules` q/k/v/o and `target_parameters` `experts.gate_up_proj`, `experts.down_proj`, then
  `deepspeed.initialize` (ZeRO-3, bf16, DeepSpeed's other defaults, as bench/anchor_zero3.py) or FSDP2
  `fully_shard` per decoder layer + root with MixedPrecisionPolicy(bf16, reduce fp32) (as qshard's FSDP2).
  Every anchor rank loads the whole model (no zero.Init), as a user of that stack gets.

Each (stack, engine) runs in its own torchrun launch (`OMP_NUM_THREADS=1`, `MALLOC_MMAP_THRESHOLD_=1048576`
so that RSS follows live memory, see the engines section of BENCHMARKS.md); each rank writes
runs/moe-memory/<stack>-<engine>-rank<r>.json: RSS / ru_maxrss at each phase, parameter and buffer bytes it
holds (local shard: `ds_tensor` under ZeRO-3, `to_local()` for FSDP2 DTensors) split into expert weights,
other frozen base, LoRA and buffers, RSS after each step, losses and the error if one. Subcommands: `build`,
`worker` (one rank), `table` (from the JSON files); no subcommand = build if missing, run, table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "build" / "moe-bench"
RUNS = ROOT / "runs" / "moe-memory"
SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 64, "intermediate_size": 1792, "num_local_experts": 8, "num_experts_per_tok": 2,
         "vocab_size": 32000, "max_position_embeddings": 512, "tie_word_embeddings": False}
SEQ, STEPS, ROWS = 256, 3, 16  # STEPS: the default of --steps
ENGINES = ("zero3", "fsdp2")
STACKS = ("anchor", "qshard")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_WEIGHTS = ["experts.gate_up_proj", "experts.down_proj"]
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": str(2**20),
       "PYTHONWARNINGS": "ignore::FutureWarning"}


def memory() -> dict[str, float]:
    """RSS now, peak RSS so far (ru_maxrss), and RSS split into anonymous memory and mapped file pages
    (a checkpoint read through a memory map counts in RSS while it is open)."""
    import psutil

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "anon_mb": round(int(status["RssAnon"].split()[0]) / 1024, 1),
            "file_mb": round(int(status["RssFile"].split()[0]) / 1024, 1)}


# ------------------------------------------------------------------------------------------ the model
def build(out: Path = MODEL) -> None:
    """Random bf16 Mixtral of SHAPE, qshard's tokenizer, and the text rows both stacks train on."""
    import torch
    import transformers

    from qshard.tools.tiny import build_tokenizer

    words = " ".join(json.loads(line)["output"] for line in
                     (ROOT / "examples/data/demo_alpaca.jsonl").read_text().splitlines()).split()
    tokenizer = build_tokenizer([" ".join(words)], vocab_size=512)
    config = transformers.MixtralConfig(**SHAPE, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rng = random.Random(0)  # shuffled words: byte-level BPE of 512 tokens gives ~1 token per 3 characters
    rows = [{"text": " ".join(rng.choice(words) for _ in range(400))} for _ in range(ROWS)]
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"built {out}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)


def model_facts() -> dict:
    from safetensors import safe_open

    total = experts = 0
    for file in sorted(MODEL.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safetensors file, not a dict)
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
                experts += n * (".experts." in key)
    return {"params": total, "expert_params": experts}


# ---------------------------------------------------------------------------------- bytes held per rank
def held(model) -> dict[str, list[int]]:
    """{kind: [bytes this rank holds, bytes unsharded]} of parameters (expert weights, other frozen base,
    LoRA) and buffers; a parameter counts its local shard (ZeRO-3 `ds_tensor`, FSDP2 `to_local()`)."""
    out = {k: [0, 0] for k in ("experts", "base_other", "lora", "buffers")}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_tensor"):
            local, full = p.ds_tensor.numel(), p.ds_numel
        elif hasattr(p, "to_local"):
            local, full = p.to_local().numel(), p.numel()
        else:
            local = full = p.numel()
        kind = "lora" if p.requires_grad else ("experts" if ".experts." in name else "base_other")
        out[kind][0] += local * p.element_size()
        out[kind][1] += full * p.element_size()
    for b in model.buffers():
        out["buffers"][0] += b.numel() * b.element_size()
        out["buffers"][1] += b.numel() * b.element_size()
    return out


def expert_storage(model) -> list[str]:
    """How the expert weights are stored on this rank: '<param leaf> <class> <dtype> <local shape>', one each."""
    seen = {}
    for name, p in model.named_parameters():
        if ".experts." in name and not p.requires_grad:
            local = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
            leaf = name.split(".experts.", 1)[1].replace("base_layer.", "")
            seen.setdefault(leaf, f"{leaf}: {type(p).__name__} {p.dtype} local {list(local.shape)}")
    return list(seen.values())


# ------------------------------------------------------------------------------------------- qshard
def qshard_recipe(engine: str, runs: Path, steps: int) -> dict:
    distributed = {"engine": "deepspeed", "zero_stage": 3} if engine == "zero3" else {"engine": "fsdp2"}
    return {
        "model": {"path": str(MODEL), "dtype": "bfloat16", "gradient_checkpointing": True},
        "quantization": {"method": "nf4", "double_quant": True},
        "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(MODEL / "data.jsonl"), "format": "text", "max_length": SEQ, "eval_fraction": 0.0},
        "train": {"output_dir": str(runs / f"qshard-{engine}"), "max_steps": steps, "micro_batch_size": 1,
                  "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "lr_scheduler": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "precision": "bf16", "seed": 42, "log_every": 1,
                  "save_every": None, "sample_tokens": 0},
        "distributed": distributed,
    }


def qshard_worker(engine: str, record: dict, runs: Path, steps: int) -> None:
    from qshard.config import parse_recipe
    from qshard.train import run

    recipe = parse_recipe(qshard_recipe(engine, runs, steps))
    record["phases"]["imported"] = memory()
    said = []

    def log(*args):
        said.append(" ".join(map(str, args)))
        print(said[-1], flush=True)

    outcome = run(recipe, overwrite=True, log=log)
    record["phases"]["trained"] = memory()
    record["losses"] = [round(x, 4) for x in outcome.losses]
    record["held_after_steps"] = held(outcome.model)
    record["expert_storage"] = expert_storage(outcome.model)
    if outcome.sharding:  # qshard's own report, taken after wrap (before step 1)
        record["qshard_sharding"] = outcome.sharding[int(os.environ["RANK"])]
    record["adapted"] = next((line for line in said if "LoRA adapters on:" in line), None)
    metrics = [json.loads(x) for x in (runs / f"qshard-{engine}" / "metrics.jsonl").read_text().splitlines() if x]
    record["step_elapsed_s"] = [m["elapsed_s"] for m in metrics if "loss" in m]
    rank = int(os.environ["RANK"])
    record["step_memory"] = [m["rank_memory"][rank] for m in metrics if "rank_memory" in m]


# ------------------------------------------------------------------------------------------- anchor
def anchor_worker(engine: str, record: dict, runs: Path, steps: int) -> None:
    """transformers + bitsandbytes NF4 + PEFT (target_parameters for the experts) + the engine."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qshard import data

    phases = record["phases"]
    if engine == "zero3":
        import deepspeed
        import deepspeed.ops

        # skip the ~40 s JIT build of an inference-only op, as bench/anchor_zero3.py and qshard do
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    phases["imported"] = memory()

    tokenizer = AutoTokenizer.from_pretrained(MODEL)  # qshard's batches: same rows, tokens and order
    rows, fmt = data.load_rows(MODEL / "data.jsonl")
    examples, _ = data.tokenize_rows(rows, fmt, tokenizer, SEQ)
    batches = data.global_batches(len(examples), world, 42, 0)
    pad_id = data.pad_token_id(tokenizer)

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=bnb, dtype=torch.bfloat16)
    record["load_s"] = round(time.perf_counter() - t, 1)
    record["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    phases["loaded"] = memory()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(42)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ATTENTION,
                      target_parameters=EXPERT_WEIGHTS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    record["adapted"] = sorted({n.split(".lora_A.")[0].split("layers.0.", 1)[1] for n, _ in model.named_parameters()
                                if ".lora_A." in n and "layers.0." in n})
    trainable = [p for p in model.parameters() if p.requires_grad]
    phases["peft"] = memory()

    if engine == "zero3":
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
                  "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                  "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        optimizer = torch.optim.AdamW(trainable, lr=2e-4)
        wrapped, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                                        optimizer=optimizer, config=config)
        backward, step = wrapped.backward, wrapped.step
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=mp)
        wrapped = fully_shard(model, mp_policy=mp)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-4)

        def backward(loss):
            loss.backward()

        def step():
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    phases["wrapped"] = memory()
    record["held_after_wrap"] = held(model)
    record["expert_storage"] = expert_storage(model)

    wrapped.train()
    start, record["losses"], record["step_elapsed_s"], record["step_memory"] = time.perf_counter(), [], [], []
    for i in range(steps):
        mine = [examples[j] for j in batches[i % len(batches)][rank::world]]
        b = data.collate(mine, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # labels: transformers' token-mean loss + router_aux_loss_coef x the router loss (as qshard adds)
            out = wrapped(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                          use_cache=False, output_router_logits=True)
        backward(out.loss)
        step()
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)
        record["losses"].append(round(float(loss) / world, 4))
        record["step_elapsed_s"].append(round(time.perf_counter() - start, 2))
        record["step_memory"].append(memory())
        if rank == 0:
            print(f"anchor {engine} step {i + 1}: loss {record['losses'][-1]} at {record['step_elapsed_s'][-1]}s",
                  flush=True)
    phases["trained"] = memory()
    record["held_after_steps"] = held(model)


def worker(stack: str, engine: str, runs: Path, steps: int) -> None:
    """One rank: run the stack, write what it measured (and the error, if any) to its own JSON file."""
    rank = int(os.environ["RANK"])
    record = {"stack": stack, "engine": engine, "rank": rank, "phases": {"start": memory()}}
    try:
        (qshard_worker if stack == "qshard" else anchor_worker)(engine, record, runs, steps)
    except BaseException as e:  # report it in the table; the launcher sees the exit code
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()[-6000:]
        raise
    finally:
        record["phases"]["end"] = memory()
        (runs / f"{stack}-{engine}-rank{rank}.json").write_text(json.dumps(record, indent=1) + "\n")
    if stack == "qshard":
        from qshard import _compat

        _compat.exit_without_teardown(0)  # as `qshard train` ends a distributed worker


# ------------------------------------------------------------------------------------------- driver
def launch(stack: str, engine: str, runs: Path, steps: int, env: dict[str, str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "worker", "--stack", stack, "--engine", engine, "--steps", str(steps), "--runs", str(runs)]
    for old in runs.glob(f"{stack}-{engine}-rank*.json"):
        old.unlink()
    log = runs / "logs" / f"{stack}-{engine}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{stack} {engine} ... ", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                             timeout=timeout)
    wall = round(time.perf_counter() - start, 1)
    print(f"rc {rc}, {wall:.0f}s", file=sys.stderr, flush=True)
    ranks = [json.loads(p.read_text()) for p in sorted(runs.glob(f"{stack}-{engine}-rank*.json"))]
    summary = {"stack": stack, "engine": engine, "rc": rc, "wall_s": wall, "log": str(log.relative_to(ROOT)),
               "command": " ".join(f"{k}={v}" for k, v in env.items()) + " " +
                          " ".join(cmd).replace(sys.executable, ".venv/bin/python").replace(str(ROOT) + "/", ""),
               "ranks": ranks}
    (runs / f"{stack}-{engine}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def held_after_wrap(rank: dict) -> int:
    """Parameter + buffer bytes a rank held after wrap: the anchor's own count; qshard's sharding report."""
    if "held_after_wrap" in rank:
        return sum(v[0] for v in rank["held_after_wrap"].values())
    return sum(v for k, v in rank["qshard_sharding"].items() if k.endswith("_local"))


def table(runs: list[dict]) -> str:
    lines = [("| engine | stack | peak RSS rank0 / rank1 (MB) | ratio qshard / anchor (max rank) | RSS after the "
              "last step rank0 / rank1 (MB) | params + buffers held per rank after wrap (MiB, rank0 / rank1) | of "
              "which expert weights (MiB, rank0 / rank1; unsharded) | losses per step | wall (s) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["stack"], r["engine"]): r for r in runs}
    for r in runs:
        ranks = sorted(r["ranks"], key=lambda x: x["rank"])
        failed = r["rc"] != 0 or any("error" in x for x in ranks) or len(ranks) < 2
        peaks = [x["phases"]["end"]["peak_rss_mb"] for x in ranks]
        peak_text = " / ".join(f"{p:,.0f}" for p in peaks)
        if failed:
            err = next((x["error"] for x in ranks if "error" in x), f"exit code {r['rc']}, see {r['log']}")
            lines.append(f"| {r['engine']} | {r['stack']} | failed (peak so far {peak_text}): `{err[:300]}` | | | | | | "
                         f"{r['wall_s']:.0f} |")
            continue
        other = by.get(("anchor", r["engine"]))
        ratio = ""
        if r["stack"] == "qshard" and other and other["rc"] == 0:
            ratio = f"{max(peaks) / max(x['phases']['end']['peak_rss_mb'] for x in other['ranks']):.2f}"
        total = [held_after_wrap(x) for x in ranks]
        # the expert split: the anchor's after wrap; qshard's after the steps (run() wraps and trains in one
        # call; training does not touch the frozen storage, and the totals agree with its own after-wrap report)
        expert = [(x.get("held_after_wrap") or x["held_after_steps"])["experts"] for x in ranks]
        last = " / ".join(f"{x['step_memory'][-1]['rss_mb']:,.0f}" if x.get("step_memory") else "?" for x in ranks)
        lines.append(f"| {r['engine']} | {r['stack']} | {peak_text} | {ratio} | {last} | {mib(total[0])} / {mib(total[1])} | "
                     f"{mib(expert[0][0])} / {mib(expert[1][0])} ({mib(expert[0][1])}) | "
                     f"{', '.join(f'{x:.4f}' for x in ranks[0]['losses'])} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def details(runs: list[dict]) -> str:
    """Per run: bytes by kind, expert storage, adapted tensors, phases."""
    out = []
    for r in runs:
        ranks = sorted(r["ranks"], key=lambda x: x["rank"])
        out.append(f"- {r['stack']} {r['engine']}: `{r['command']}`")
        for x in ranks:
            h = x.get("held_after_wrap") or x.get("held_after_steps")
            if h:
                out.append(f"  - rank {x['rank']} held (MiB local / unsharded): " + ", ".join(
                    f"{k} {mib(v[0])} / {mib(v[1])}" for k, v in h.items()))
            phases = ", ".join(f"{k} {v['rss_mb']:,.0f}/{v['peak_rss_mb']:,.0f} ({v['anon_mb']:,.0f}+{v['file_mb']:,.0f})"
                               for k, v in x["phases"].items())
            out.append(f"  - rank {x['rank']} RSS/peak by phase (MB; RSS = anonymous + file pages): {phases}")
        for x in ranks:
            if x.get("step_memory"):
                out.append(f"  - rank {x['rank']} RSS/peak after each step (MB): " + ", ".join(
                    f"{m['rss_mb']:,.0f}/{m['peak_rss_mb']:,.0f}" for m in x["step_memory"]))
        x = ranks[0] if ranks else {}
        for key in ("expert_storage", "adapted", "experts_implementation", "load_s", "step_elapsed_s", "error"):
            if x.get(key) is not None:
                out.append(f"  - {key}: {x[key]}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", nargs="?", default="all", choices=["all", "build", "worker", "table"])
    p.add_argument("--stack", choices=STACKS, help="worker: the stack this rank runs")
    p.add_argument("--engine", choices=ENGINES, help="worker: the engine")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="all: the engines to run")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="all: set (or override) an environment variable of the launches, e.g. "
                        "MALLOC_MMAP_THRESHOLD_=65536")
    p.add_argument("--runs", type=Path, default=RUNS, help="folder for results and logs")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    args = p.parse_args()
    runs = args.runs if args.runs.is_absolute() else ROOT / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    if args.step == "worker":
        return worker(args.stack, args.engine, runs, args.steps)
    if args.step in ("all", "build") and not (MODEL / "config.json").is_file():
        build()
    if args.step == "all":
        env = {**ENV, **dict(kv.split("=", 1) for kv in args.env)}
        started = time.perf_counter()
        for engine in args.engines:
            for stack in STACKS:
                launch(stack, engine, runs, args.steps, env, args.timeout)
        print(f"total {time.perf_counter() - started:.0f}s", file=sys.stderr)
    if args.step in ("all", "table"):
        found = [json.loads((runs / f"{s}-{e}.json").read_text()) for e in ENGINES for s in STACKS
                 if (runs / f"{s}-{e}.json").exists()]
        facts = model_facts()
        print(f"Model {MODEL.relative_to(ROOT)}: {facts['params']:,} parameters, {facts['expert_params']:,} in expert "
              f"weights.\n\n{table(found)}\n\n{details(found)}")


if __name__ == "__main__":
    main()
