"""Issue #5 benchmark: bytes of a GPTQ base held per rank under ZeRO-3 / FSDP2, qshard vs the anchor.

qshard reads GPTQ checkpoints (`quantization.method: checkpoint`) into layers whose packed int32
qweight/qzeros, g_idx and scales are frozen *parameters*, so ZeRO-3 and FSDP2 partition them. The
anchor is gptqmodel's own trainable torch backend (`BACKEND.GPTQ_TORCH`, QuantLinear `TorchLinear`)
+ PEFT LoRA, wrapped by the same engine: there the packed tensors are *buffers*, which neither engine
partitions, so every rank keeps the whole packed base.

Steps (each is a subcommand; `all` runs them in order, skipping what already exists):

    # 1. random bf16 Llama base, "ptq-bench" shape (hidden 1024, 12 layers, 16/8 heads, intermediate 2816)
    .venv/bin/python bench/ptq_memory.py base
    # 2. GPTQ 4-bit, group 128, sym, no act-order, with gptqmodel in its own venv (DESIGN.md install notes)
    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptqmodel/bin/python bench/ptq_memory.py quantize
    # 3. qshard: `qshard train bench/recipe-ptq.yaml --nproc 2` under ddp, deepspeed zero 3 and fsdp2
    .venv/bin/python bench/ptq_memory.py qshard
    # 4. anchor: gptqmodel + PEFT + the same engines, under torchrun (gloo, DS_ACCELERATOR=cpu)
    .venv/bin/python bench/ptq_memory.py anchor            # starts torchrun with /tmp/venv-gptqmodel
    # 5. the markdown table from the JSON results under runs/ptq-memory/
    .venv/bin/python bench/ptq_memory.py table

or simply `.venv/bin/python bench/ptq_memory.py all`.

What is counted ("packed base bytes held" on a rank): qweight + qzeros + scales + g_idx of every
quantized linear (plus its bias, none here). qshard: `base_quantized_local` of `sharding.json` (qshard's
own per-rank count of the local shards of its quantized-layer parameters). Anchor: over the
gptqmodel QuantLinear modules, `numel * element_size` of every buffer (never partitioned) plus,
for any parameter, the local shard (`p.ds_tensor.numel()` under ZeRO-3, `p.to_local().numel()`
for FSDP2 DTensors, the full tensor otherwise). Peak RSS is `ru_maxrss` of each rank (whole process
life: import, load, wrap, steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "build" / "ptq-bench-base"
GPTQ = ROOT / "build" / "ptq-bench-gptq"
RUNS = ROOT / "runs" / "ptq-memory"
GPTQ_PY = Path(os.environ.get("GPTQMODEL_PYTHON", "/tmp/venv-gptqmodel/bin/python"))
QSHARD_PY = ROOT / ".venv" / "bin" / "python"
SIZE = ("ptq-bench", (1024, 2816, 12, 16, 8))  # hidden, intermediate, layers, heads, kv heads
QUANT = dict(bits=4, group_size=128, sym=True, desc_act=False)
CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in fewer bits, sharding splits them across devices.",
    "Question: what is two plus two? Answer: four.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Fine-tuning adapts a pretrained model to a new task with a few examples.",
    "A low-rank adapter adds two small matrices beside each frozen linear layer.",
    "The river flows to the sea; the rain falls on the hills and feeds the river.",
    "def add(a, b):\n    return a + b\n",
]
ENGINES = {  # name -> qshard --set overrides
    "ddp": ["distributed.engine=ddp"],
    "zero3": ["distributed.engine=deepspeed", "distributed.zero_stage=3"],
    "fsdp2": ["distributed.engine=fsdp2"],
}
STEPS = 3
# ANCHOR_DS_BF16=1: DeepSpeed's bf16 mode (as qshard's precision bf16 sets it) instead of its fp32 default
DS_BF16 = os.environ.get("ANCHOR_DS_BF16", "0") == "1"
SUFFIX = "-dsbf16" if DS_BF16 else ""
PACKED = ("qweight", "qzeros", "scales", "g_idx", "bias")  # the checkpoint's tensors of a quantized linear
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def memory() -> dict[str, float]:
    import psutil

    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# ------------------------------------------------------------------------------------------- 1. base
def make_base() -> None:
    """qshard venv: a random bf16 Llama of the SIZE shape (vocab 512, qshard's byte-level tokenizer)."""
    from qshard.tools import tiny

    tiny.SIZES.setdefault(SIZE[0], SIZE[1])
    tiny.init_tiny(BASE, arch="llama", size=SIZE[0], seed=0)
    print(f"base: {BASE}", flush=True)


# --------------------------------------------------------------------------------------- 2. quantize
def quantize() -> None:
    """gptqmodel venv: GPTQ 4-bit g128 sym of the base, tiny calibration."""
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    t = time.time()
    torch.manual_seed(0)
    model = GPTQModel.load(str(BASE), QuantizeConfig(offload_to_disk=False, **QUANT), device="cpu")
    model.quantize(CALIBRATION, batch_size=1)
    model.save(str(GPTQ))
    (GPTQ / "bench.json").write_text(json.dumps({"tool": f"gptqmodel {gptqmodel.__version__}",
                                                 "torch": torch.__version__, "quantize_config": QUANT,
                                                 "shape": SIZE, "seconds": round(time.time() - t, 1)}) + "\n")
    print(f"quantized in {time.time() - t:.0f}s -> {GPTQ}", flush=True)


def packed_full_bytes() -> int:
    """Bytes of qweight/qzeros/scales/g_idx (+ biases of quantized layers) in the checkpoint."""
    from safetensors import safe_open

    total = 0
    for f in sorted(GPTQ.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            prefixes = {k.rsplit(".", 1)[0] for k in st.keys() if k.endswith(".qweight")}
            for k in st.keys():
                mod, leaf = k.rsplit(".", 1)
                if mod in prefixes and leaf in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    t = st.get_slice(k)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}[t.get_dtype()]
    return total



# ----------------------------------------------------------------------------------------- 3. qshard
def run_qshard(engines: list[str]) -> None:
    """qshard venv: `qshard train bench/recipe-ptq.yaml --nproc 2` per engine; summary JSON per engine."""
    full = packed_full_bytes()
    for engine in engines:
        out = RUNS / f"qshard-{engine}"
        cmd = [str(ROOT / ".venv" / "bin" / "qshard"), "train", "bench/recipe-ptq.yaml", "--nproc", "2",
               "--overwrite", "--set", f"train.output_dir={out.relative_to(ROOT)}", "--set", f"train.max_steps={STEPS}",
               *[x for kv in ENGINES[engine] for x in ("--set", kv)]]
        print("$", " ".join(cmd), flush=True)
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        record = {"stack": "qshard", "engine": engine, "command": " ".join(cmd).replace(str(ROOT) + "/", ""),
                  "rc": proc.returncode, "wall_s": round(time.time() - t, 1), "packed_full_bytes": full}
        if proc.returncode != 0:
            record["error"] = (proc.stdout + proc.stderr)[-3000:]
            print(record["error"], flush=True)
        else:
            sharding = json.loads((out / "sharding.json").read_text())
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            last = [s for s in steps if "rank_memory" in s][-1]
            record["ranks"] = [{"packed_bytes": r["base_quantized_local"], "packed_full": r["base_quantized_full"],
                                "dense_bytes": r["base_dense_local"], "dense_full": r["base_dense_full"],
                                "lora_bytes": r["lora_local"], "peak_rss_mb": m["peak_rss_mb"], "rss_mb": m["rss_mb"]}
                               for r, m in zip(sharding, last["rank_memory"])]
            record["losses"] = [s.get("loss") for s in steps if "loss" in s]
        (RUNS / f"qshard-{engine}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "error"}), flush=True)


# ----------------------------------------------------------------------------------------- 4. anchor
def run_anchor(engines: list[str]) -> None:
    """Start the anchor worker under torchrun with the gptqmodel venv, one run per engine."""
    torchrun = GPTQ_PY.parent / "torchrun"
    for engine in engines:
        cmd = [str(torchrun), "--standalone", "--nproc-per-node=2", "bench/ptq_memory.py", "anchor-worker",
               "--engine", engine]
        env = dict(os.environ, DS_ACCELERATOR="cpu", GPTQMODEL_CPU_WORKERS="1", OMP_NUM_THREADS="1")
        print("$ DS_ACCELERATOR=cpu", " ".join(cmd), flush=True)
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        path = RUNS / f"anchor-{engine}{SUFFIX}.json"
        if proc.returncode != 0 or not path.exists():
            record = {"stack": "anchor", "engine": engine, "rc": proc.returncode,
                      "command": "DS_ACCELERATOR=cpu " + " ".join(cmd[1:]),
                      "error": (proc.stdout + proc.stderr)[-4000:], "packed_full_bytes": packed_full_bytes()}
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(record["error"], flush=True)
        else:
            record = json.loads(path.read_text())
            record["wall_s"] = round(time.time() - t, 1)
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k not in ("layers",)}), flush=True)


def anchor_worker(engine: str) -> None:
    """gptqmodel venv, one process per rank: gptqmodel torch backend + PEFT LoRA + the engine."""
    phases = {"start": memory()}
    import gptqmodel
    import peft
    import torch
    import torch.distributed as dist
    import transformers
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    ds = None
    if engine == "zero3":
        import deepspeed
        import deepspeed.ops

        ds = deepspeed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as bench/anchor_zero3.py
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    phases["imported"] = memory()

    # every rank loads the whole checkpoint (no zero.Init: gptqmodel builds its own model)
    loaded = GPTQModel.load(str(GPTQ), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.bfloat16)
    model = loaded.model
    model.train()
    phases["loaded"] = memory()
    torch.manual_seed(42)
    # PEFT's "all-linear" matches only torch.nn.Linear / Conv1D, so on a gptqmodel model it finds nothing
    # (NoMatchingPeftModuleError); name the seven projections, the set qshard's all-linear selects.
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}
    lora_wrapped = sum(1 for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    phases["peft"] = memory()

    if engine == "zero3":
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
                  "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "bf16": {"enabled": DS_BF16},
                  "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        optimizer = torch.optim.AdamW(trainable, lr=2e-4)
        engine_obj, optimizer, _, _ = ds.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                    config=config)
        forward, backward, step = engine_obj, engine_obj.backward, engine_obj.step
    else:
        if engine == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
        else:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(trainable, lr=2e-4)
        forward, backward = model, (lambda loss: loss.backward())

        def step():
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    phases["wrapped"] = memory()

    def held() -> dict:
        """Bytes of the quantized layers' tensors this rank holds: buffers whole, parameters' local shard."""
        out = {"buffer_bytes": 0, "param_bytes": 0, "param_full_bytes": 0, "buffers": 0, "params": 0,
               "other_buffer_bytes": 0}
        for m in quant.values():
            for name, b in m.named_buffers(recurse=False):
                if name not in PACKED:  # gptqmodel's wf_unsqueeze_* shift tables: not checkpoint data
                    out["other_buffer_bytes"] += b.numel() * b.element_size()
                    continue
                out["buffer_bytes"] += b.numel() * b.element_size()
                out["buffers"] += 1
            for name, p in m.named_parameters(recurse=False):
                if name not in PACKED:
                    continue
                if hasattr(p, "ds_tensor"):
                    local, full = p.ds_tensor.numel(), p.ds_numel
                elif hasattr(p, "to_local"):
                    local, full = p.to_local().numel(), p.numel()
                else:
                    local = full = p.numel()
                out["param_bytes"] += local * p.element_size()
                out["param_full_bytes"] += full * p.element_size()
                out["params"] += 1
        out["packed_bytes"] = out["buffer_bytes"] + out["param_bytes"]
        return out

    held_wrapped = held()
    tokenizer = AutoTokenizer.from_pretrained(str(GPTQ))
    rows = [json.loads(line) for line in (ROOT / "examples/data/demo_alpaca.jsonl").read_text().splitlines()[:8]]
    texts = [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows]
    losses = []
    for i in range(STEPS):
        enc = tokenizer(texts[(i * world + rank) % len(texts)], return_tensors="pt", truncation=True, max_length=128)
        out = forward(input_ids=enc.input_ids, labels=enc.input_ids, use_cache=False)
        backward(out.loss)
        step()
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)
        losses.append(round(float(loss) / world, 4))
        if rank == 0:
            print(f"anchor {engine} step {i + 1}: loss {losses[-1]}", flush=True)
    phases["trained"] = memory()
    mine = {"held_after_wrap": held_wrapped, "held_after_steps": held(), "phases": phases,
            "peak_rss_mb": phases["trained"]["peak_rss_mb"], "rss_mb": phases["trained"]["rss_mb"]}
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        one = next(iter(quant.values()))
        record = {"stack": "anchor", "engine": engine, "rc": 0,
                  "command": f"DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node=2 bench/ptq_memory.py "
                             f"anchor-worker --engine {engine}",
                  "versions": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "peft": peft.__version__,
                               **({"deepspeed": ds.__version__} if ds else {})},
                  "quant_linear": type(one).__name__, "quant_layers": len(quant), "lora_wrapped": lora_wrapped,
                  "quant_tensor_kinds": {"buffers": sorted(n for n, _ in one.named_buffers(recurse=False)),
                                         "parameters": sorted(n for n, _ in one.named_parameters(recurse=False))},
                  "packed_full_bytes": packed_full_bytes(), "losses": losses,
                  "ranks": [{"packed_bytes": r["held_after_steps"]["packed_bytes"], **r} for r in ranks]}
        RUNS.mkdir(parents=True, exist_ok=True)
        record["ds_bf16"] = DS_BF16
        (RUNS / f"anchor-{engine}{SUFFIX}.json").write_text(json.dumps(record, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ 5. table
def table() -> str:
    rows = ["| stack | engine | packed base bytes held per rank (rank0 / rank1) | share of the full packed size "
            "(rank0 / rank1) | peak RSS per rank, MiB (rank0 / rank1) |", "|---|---|---|---|---|"]
    names = {"qshard": "qshard (GPTQ layers: frozen parameters)", "anchor": "anchor: gptqmodel TorchLinear (gptq_torch) + PEFT"}
    for stack in ("qshard", "anchor"):
        for engine in ENGINES:
            path = RUNS / f"{stack}-{engine}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            full = r["packed_full_bytes"]
            if r.get("rc") != 0:
                err = [line for line in r["error"].splitlines() if "Error" in line or "error" in line]
                rows.append(f"| {names[stack]} | {engine} | failed: `{(err[-1] if err else 'rc ' + str(r['rc']))[:200]}` | | |")
                continue
            b = [x["packed_bytes"] for x in r["ranks"]]
            rows.append(f"| {names[stack]} | {engine} | {b[0] / 2**20:.2f} / {b[1] / 2**20:.2f} MiB | "
                        f"{b[0] / full:.3f} / {b[1] / full:.3f} | "
                        f"{r['ranks'][0]['peak_rss_mb']:.0f} / {r['ranks'][1]['peak_rss_mb']:.0f} |")
    text = "\n".join(rows)
    print(text)
    return text


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["base", "quantize", "qshard", "anchor", "anchor-worker", "table", "all"])
    p.add_argument("--engine", choices=list(ENGINES), help="anchor-worker / qshard: one engine only")
    args = p.parse_args()
    engines = [args.engine] if args.engine else list(ENGINES)
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.step in ("base", "all") and not BASE.exists():
        make_base()
    if args.step == "quantize":
        quantize()
    if args.step == "all" and not GPTQ.exists():
        subprocess.run([str(GPTQ_PY), __file__, "quantize"], check=True,
                       env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"))
    if args.step in ("qshard", "all"):
        run_qshard(engines)
    if args.step in ("anchor", "all"):
        run_anchor(engines)
    if args.step == "anchor-worker":
        anchor_worker(args.engine)
    if args.step in ("table", "all"):
        table()


if __name__ == "__main__":
    main()
