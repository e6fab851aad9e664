"""Vocabulary-parallel embedding, head and loss on N gloo ranks against the whole model in each rank.

    torchrun --nproc-per-node=N tests/vocab_worker.py OUT.json

Every rank builds the same tiny model from a config (same seed), feeds it its own batch (the ranks' batches
differ in length), and compares with a copy that keeps the whole embedding and head: the loss sum, the
gradients of the decoder's parameters (this rank's loss only: no gradient sync) and the full logits of
the no-gradient forward. Writes {case: {"loss", "grad", "logits"}: largest differences} per rank.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import transformers

from qshard import _compat
from qshard.errors import QShardError
from qshard.loss import next_token_loss_sum
from qshard.model import vocab

VOCAB = 67  # divides by neither 2 nor 3: the last rank holds fewer rows
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
CASES = {
    "llama-fp32": ("LlamaConfig", "LlamaForCausalLM", torch.float32, {"tie_word_embeddings": False}),
    "llama-tied-fp32": ("LlamaConfig", "LlamaForCausalLM", torch.float32, {"tie_word_embeddings": True}),
    "llama-bf16": ("LlamaConfig", "LlamaForCausalLM", torch.bfloat16, {"tie_word_embeddings": False}),
    # a scaled embedding class, a tied head and soft-capped logits
    "gemma2-fp32": ("Gemma2Config", "Gemma2ForCausalLM", torch.float32, {"final_logit_softcapping": 5.0}),
}


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (2, 5 + 2 * rank), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt
    return ids, labels


def run_case(config_cls: str, model_cls: str, dtype: torch.dtype, extra: dict, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    whole = getattr(transformers, model_cls)(config).to(dtype).train()
    for p in (*whole.get_input_embeddings().parameters(), *whole.get_output_embeddings().parameters()):
        p.requires_grad_(False)
    split = copy.deepcopy(whole)
    assert vocab.why_not(split) is None, vocab.why_not(split)
    vocab.shard(split, rank, world, torch.device("cpu"))
    ids, labels = batch(rank)

    reference = next_token_loss_sum(whole(input_ids=ids, use_cache=False).logits, labels)
    reference.backward()
    head = vocab.head_of(split)
    with vocab.logits_for_loss(head):
        loss = head.loss_sum(split(input_ids=ids, use_cache=False).logits, labels)
    loss.backward()
    mine = dict(split.named_parameters())
    grads = [(mine[n].grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)
             for n, b in whole.named_parameters() if b.grad is not None]
    with torch.no_grad():
        logits = split(input_ids=ids, use_cache=False).logits
        expected = whole(input_ids=ids, use_cache=False).logits
    held = split.get_input_embeddings().weight.shape[0]
    with vocab.logits_for_loss(head):  # a model that never ran its head: refused, not a wrong loss
        try:
            head.loss_sum(torch.zeros(1, 4, 3), labels)
            refused = ""
        except QShardError as e:
            refused = e.fix
    return {"loss": abs(float(loss) - float(reference)), "loss_value": float(reference),
            "grad": float(max(grads)), "grads": len(grads),
            "logits": float((logits.float() - expected.float()).abs().max()),
            "logits_shape": list(logits.shape), "rows_held": held,
            "tied_shared": split.get_input_embeddings().weight is split.get_output_embeddings().weight,
            "refused": refused}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {name: run_case(*case, rank, world) for name, case in CASES.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    _compat.exit_without_teardown(0)  # as `qshard train` ends a distributed worker
