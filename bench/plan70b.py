"""Issue #17: `qshard plan` for the full Llama-3-70B (80 layers, hidden 8192, intermediate 28672, 64 / 8 heads,
vocabulary 128,256, untied head) on 2 x 24 GiB and on 8 x 80 GiB, FSDP2 and ZeRO-3, NF4, sequence 2,048, with the
per-component table, activation checkpointing, micro-batch 1 x 8, vocabulary-parallel embedding and head on (the default) and off.

    .venv/bin/python bench/plan70b.py > runs/plan70b.txt

Only config.json is read (written to build/llama3-70b-config); the planner is pure, so this takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
          "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672,
          "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def main() -> int:
    model = REPO / "build" / "llama3-70b-config"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(CONFIG))
    data = model / "train.jsonl"
    data.write_text(json.dumps({"instruction": "x", "input": "", "output": "y"}) + "\n")
    for engine in ("fsdp2", "zero3"):
        distributed = ({"engine": "fsdp2"} if engine == "fsdp2" else {"engine": "deepspeed", "zero_stage": 3})
        for vocab_parallel in (True, False):
            recipe = model / f"recipe-{engine}-{'vp' if vocab_parallel else 'gathered'}.yaml"
            recipe.write_text(json.dumps({  # JSON is YAML
                "model": {"path": str(model), "dtype": "bfloat16", "gradient_checkpointing": True}, "quantization": {"method": "nf4"},
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                "data": {"path": str(data), "max_length": 2048},
                "train": {"micro_batch_size": 1, "gradient_accumulation_steps": 8, "precision": "bf16"},
                "distributed": {**distributed, "vocab_parallel": vocab_parallel}}))
            for gpus, mem in ((2, "24GiB"), (8, "80GiB")):
                print(f"\n===== {engine}, vocab_parallel {vocab_parallel}, {gpus} x {mem} =====", flush=True)
                out = subprocess.run([sys.executable, "-m", "qshard.cli", "plan", str(recipe), "--gpus", str(gpus),
                                      "--gpu-mem", mem, "--out", str(model / "plan-out")], cwd=REPO,
                                     capture_output=True, text=True)
                text = out.stdout + out.stderr
                print(text[:text.find("  #  engine")].rstrip())  # the recipe as written, per component
                print(next((line for line in text.splitlines() if line.startswith("recommended:")), ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
