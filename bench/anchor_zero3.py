"""The ANCHOR stack of issue #3: transformers + bitsandbytes NF4 + PEFT LoRA + DeepSpeed ZeRO-3.

What a user of the popular stack writes today, on CPU, fp32:

    AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0, target_modules="all-linear"))
    deepspeed.initialize(model=..., optimizer=torch.optim.AdamW(...), config={zero stage 3, fp32,
                         "zero_allow_untested_optimizer": true})

Run under torchrun (one process per rank), DS_ACCELERATOR=cpu:

    DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc-per-node=2 bench/anchor_zero3.py \
        --model build/bench-400m --steps 4 --out runs/bench-400m/anchor.json

On one GPU (bench/cuda_check.py) it runs as one process without DeepSpeed (`--engine none`, what a
single-GPU QLoRA user writes: the same model and adapter, a plain AdamW loop) and with `--precision bf16`
(bf16 dense weights and bnb_4bit_compute_dtype=bf16).

The batches are exactly qshard's (same rows, same tokenizer rendering, same seed order, batch 1 per
rank), produced with `qshard.data` so both stacks see the same tokens. Per rank it records resident
memory (psutil RSS) and peak resident memory (getrusage ru_maxrss) at each phase, and the wall time
of each optimizer step; rank 0 writes them all to --out as JSON.

The DeepSpeed config is DeepSpeed's defaults plus only what the anchor recipe names (no
HfDeepSpeedConfig, so from_pretrained does not use zero.Init: every rank loads the whole model and
deepspeed.initialize partitions it afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def memory() -> dict[str, float]:
    import psutil

    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="build/bench-400m")
    p.add_argument("--data", default="examples/data/demo_alpaca.jsonl")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--engine", choices=("deepspeed", "none"), default="deepspeed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", default=None, help="JSON file written by rank 0")
    args = p.parse_args()

    phases: dict[str, dict] = {"start": memory()}
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import bitsandbytes
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")  # one GPU per rank under torchrun
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.engine == "deepspeed":
        import deepspeed
        import deepspeed.ops

        # deepspeed_shm_comm only serves inference all-reduce; skipping it avoids a ~40 s JIT build (qshard
        # does the same, see qshard/_compat.py). Must happen before the first init_distributed / initialize.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    phases["imported"] = memory()

    # -- data: exactly qshard's examples and global batches ----------------------------------------
    from qshard import data

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows, fmt = data.load_rows(args.data)
    examples, _ = data.tokenize_rows(rows, fmt, tokenizer, args.max_length)
    pad_id = data.pad_token_id(tokenizer)
    batches = data.global_batches(len(examples), world * args.micro_batch, args.seed, 0)

    # -- model --------------------------------------------------------------------------------------
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": device})
    load_s = time.perf_counter() - t0
    phases["loaded"] = memory()
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    phases["peft"] = memory()

    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if args.engine == "deepspeed":
        config = {
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": world * args.micro_batch,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": args.precision == "bf16"},
            "fp16": {"enabled": False},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                                       optimizer=optimizer, config=config)
    else:
        engine = _PlainLoop(model, optimizer, trainable)
    phases["initialized"] = memory()

    # -- loop ---------------------------------------------------------------------------------------
    engine.train()
    losses, elapsed = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        mine = [examples[i] for i in batch[rank::world]]
        b = {k: v.to(device) for k, v in data.collate(mine, pad_id).items()}
        out = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     use_cache=False)
        engine.backward(out.loss)
        engine.step()
        # a global loss, as any training loop logs (and a sync point, like qshard's per-step all-reduce)
        loss = out.loss.detach().float().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(float(loss) / world)
        elapsed.append(round(time.perf_counter() - start, 3))
        if rank == 0:
            print(f"anchor step {step + 1}: loss {losses[-1]:.4f} elapsed {elapsed[-1]:.2f}s", flush=True)
    phases["trained"] = memory()

    if device.type == "cuda":
        phases["trained"]["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    mine = {"phases": phases}
    ranks: list = [mine]
    if torch.distributed.is_initialized():
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
    if rank == 0:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                    "bitsandbytes": bitsandbytes.__version__}
        if args.engine == "deepspeed":
            versions["deepspeed"] = deepspeed.__version__
        record = {
            "stack": "transformers + bitsandbytes NF4 + peft" + " + deepspeed ZeRO-3" * (args.engine == "deepspeed"),
            "versions": versions, "device": str(device), "precision": args.precision,
            "world_size": world, "steps": args.steps,  # ZeRO-3 leaves a partitioned parameter's numel() empty
            "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
            "load_s": round(load_s, 2), "losses": losses, "elapsed_s": elapsed,
            "rank_memory": [r["phases"] for r in ranks],
        }
        text = json.dumps(record, indent=1)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        else:
            print(text)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class _PlainLoop:
    """The single-process loop a user writes: forward, backward, clip, step (the engine's interface)."""

    def __init__(self, model, optimizer, trainable):
        self.model, self.optimizer, self.trainable = model, optimizer, trainable

    def __call__(self, **batch):
        return self.model(**batch)

    def train(self):
        self.model.train()

    def backward(self, loss):
        loss.backward()

    def step(self):
        import torch

        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
