"""What keeping no dequantized expert for backward saves (qshard/model/experts.py's saved-tensor hooks).

One training step (forward + backward, LoRA all-linear incl. expert weights, NF4 base, fp32) of a Mixtral-shaped
model, single process, peak bytes of live tensors (bench/plan_validation.py's LiveTensorBytes) with the hooks
and with them turned off (autograd then saves every dequantized expert weight a forward used until backward):

    .venv/bin/python bench/moe_backward_memory.py [--hidden 512 --expert-intermediate 1024 --experts 8
                                                   --layers 4 --tokens 512]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from plan_validation import (
    LiveTensorBytes,  # this file's folder is on sys.path when run as a script
)


def build(args, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.expert_intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=2, num_hidden_layers=args.layers,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def step_peak(model_dir: Path, tokens: int, hooks: bool) -> tuple[int, int]:
    from qshard.model import experts
    from qshard.model.load import QuantSpec, load_model
    from qshard.model.lora import attach_lora, resolve_targets

    model = load_model(str(model_dir), dtype="float32", quant=QuantSpec("nf4"), log=lambda *_: None)
    peft = attach_lora(model, r=8, alpha=16, dropout=0.0, targets=resolve_targets(model, "all-linear"),
                       use_dora=False, seed=0).train()
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
    pack = experts._pack
    if not hooks:
        experts._pack = lambda t: t  # autograd keeps what it saves
    try:
        with LiveTensorBytes() as live:
            start = live.current
            peft(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
    finally:
        experts._pack = pack
    return live.peak - start, sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-intermediate", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(args, Path(tmp) / "model")
        dense_experts = 3 * args.hidden * args.expert_intermediate * args.experts * args.layers * 4
        print(f"Mixtral-shaped: hidden {args.hidden}, expert intermediate {args.expert_intermediate}, "
              f"{args.experts} experts (top 2), {args.layers} layers, {args.tokens} tokens; the experts dense in "
              f"fp32 would be {dense_experts / 2**20:.1f} MiB")
        print("| hooks | step peak above the loaded model (MiB) | model parameters (MiB) |\n|---|---|---|")
        for hooks in (True, False):
            peak, params = step_peak(folder, args.tokens, hooks)
            print(f"| {'on (qshard)' if hooks else 'off'} | {peak / 2**20:.1f} | {params / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
