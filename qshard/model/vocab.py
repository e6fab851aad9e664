"""Vocabulary-parallel input embedding and head (ZeRO-3, FSDP2): no rank ever holds a whole one.

At a 128k vocabulary the embedding and the head are each larger than a 70B decoder layer in NF4; an
engine that all-gathers them for their forward (as it does a layer) puts 2 x 2.1 GB of bf16 on every
rank at Llama-3-70B's width. Here each rank keeps rows [start, stop) of both (torch.chunk's split, as
FSDP2 splits dim 0) as a frozen, non-persistent buffer the engines leave alone, and the ranks exchange
activations instead of weights:

- embedding: the ranks' token ids are all-gathered (a few KB), each rank looks up the ids it holds rows
  for (zeros elsewhere), and each rank's partial lookups are summed into the tokens' owner (a reduce);
- head: each rank's hidden states are broadcast in turn (tokens x hidden), each rank computes the logits of
  its vocabulary slice for every rank's tokens (together as many as one rank's full logits), and the loss
  combines per-token log-sum-exps across ranks (`loss_sum`). In backward the hidden-state gradient of each
  rank's tokens is summed over the slices into its owner (a reduce, in fp32).
One rank's rows are exchanged at a time, so the working memory is one rank's [tokens, hidden] whatever the
number of ranks (an all-gather would hold every rank's at once); the bytes sent are an all-gather's.

The model's own forward runs unchanged: elementwise post-processing of the logits (soft-capping, logit
scaling) applies to the local slice as it would to the whole. Outside the loss (`logits_for_loss` not
active: `generate`, inference) the head returns each rank's full logits, gathered (no gradient).

Invariants: every rank runs the same forwards in the same order (the collectives pair up, as the engines'
own gathers already require); embedding and head are frozen (LoRA on them, or a quantized head, leaves
them to the engine: `why_not`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qshard.data import IGNORE
from qshard.engines.base import shard_span
from qshard.errors import QShardError
from qshard.loss import CHUNK_ELEMENTS, _logsumexp_fp32


def why_not(model: nn.Module) -> str | None:
    """None when `model`'s (a PeftModel's or a base's) input embedding and head can be vocabulary-parallel,
    else the reason they are left to the engine."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    if not isinstance(embed, nn.Embedding):
        return f"the input embedding is a {type(embed).__name__}, not an embedding lookup"
    if head is None or type(head) is not nn.Linear:
        return f"the head is a {type(head).__name__}, not a plain frozen linear layer (LoRA or quantized?)"
    if any(p.requires_grad for p in (*embed.parameters(), *head.parameters())):
        return "the embedding or the head is trained"
    if embed.max_norm is not None:
        return "the embedding renormalises rows (max_norm)"
    return None


def shard(model: nn.Module, rank: int, world_size: int, device: torch.device) -> None:
    """Keep rows [start, stop) of the embedding and the head of `model` (a PeftModel or a base) as buffers
    on `device`; the whole tensors are dropped. Works on a loaded model (the rows are copied out) and on a
    skeleton still on the meta device (the buffers are empty, for the sharded load to fill: `rows`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    shards: dict[int, torch.Tensor] = {}  # a tied head keeps the embedding's buffer
    for module, kind in ((embed, VocabParallelEmbedding), (head, VocabParallelHead)):
        size = module.weight.shape[0]
        start, stop = shard_span(size, rank, world_size)  # FSDP2's split of dim 0
        for leaf in ("weight", "bias"):
            whole = module._parameters.get(leaf)
            if whole is None:
                continue
            if id(whole) not in shards:
                part = torch.empty((stop - start, *whole.shape[1:]), dtype=whole.dtype, device=device)
                if whole.device.type != "meta":
                    part.copy_(whole.detach()[start:stop])
                shards[id(whole)] = part
            del module._parameters[leaf]
            module.register_buffer(leaf, shards[id(whole)], persistent=False)
        module.vocab_rows, module.vocab_size, module.world_size, module.rank = (start, stop), size, world_size, rank
        module.__class__ = type(kind.__name__, (kind, type(module)), {})
    embed.padding_idx = None  # a row index of the whole table; it only affects gradients, and this one is frozen


def row_buffers(model: nn.Module) -> dict[int, int]:
    """id -> unsharded elements of every buffer holding a rank's vocabulary rows in `model` (a tied head's once)."""
    return {id(b): m.vocab_size * b[0].numel() for m in model.modules() if rows(m) for b in m.buffers()}


def rows(module: nn.Module) -> tuple[int, int] | None:
    """The vocabulary rows a vocabulary-parallel module keeps, None for any other module (the loaders read
    only these rows of its checkpoint tensor)."""
    return module.vocab_rows if isinstance(module, (VocabParallelEmbedding, VocabParallelHead)) else None


class VocabParallelEmbedding:
    """Mixed into the model's own embedding class (its forward, e.g. a scale, still runs on the lookup)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        count, most = _row_counts(input_ids.numel(), input_ids.device)
        ids = _gather_rows(_pad_rows(input_ids.reshape(-1), most, 0))  # every rank's ids: [N * most]
        local = ids - self.vocab_rows[0]
        here = (local >= 0) & (local < self.weight.shape[0])
        mine = None
        for owner in range(self.world_size):  # one rank's tokens at a time: [most, H] alive, whatever N is
            rows = slice(owner * most, (owner + 1) * most)
            # The model's own lookup (a subclass may scale it) of that rank's ids, ids held elsewhere read as
            # row 0 and zeroed: each token's row is non-zero on exactly one rank, so the sum is that row.
            found = super().forward(local[rows].clamp(0, max(self.weight.shape[0] - 1, 0)))
            found = found.masked_fill_(~here[rows, None], 0).contiguous()
            dist.reduce(found, dst=owner)
            mine = found if owner == self.rank else mine
        return mine[:count].reshape(*input_ids.shape, mine.shape[-1])


class VocabParallelHead:
    """Mixed into the model's head (an nn.Linear). In `logits_for_loss` it returns this rank's vocabulary
    slice of every rank's logits, [1, N x rows, stop - start]; otherwise this rank's full logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        count, most = _row_counts(hidden.shape[:-1].numel(), hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])
        local = _VocabSliceLogits.apply(flat, self.weight, self.bias, count, most)
        if getattr(self, "layout", None) is not None:
            self.layout = (count, most)
            return local
        if torch.is_grad_enabled() and flat.requires_grad:
            raise RuntimeError("a vocabulary-parallel head's full logits carry no gradient: compute the loss "
                               "inside vocab.logits_for_loss")
        return self._full_logits(local.detach()[0], count, most).reshape(*hidden.shape[:-1], -1)

    def _full_logits(self, local: torch.Tensor, count: int, most: int) -> torch.Tensor:
        per_rank = -(-self.vocab_size // self.world_size)
        padded = F.pad(local, (0, per_rank - local.shape[1]))
        every = _gather_rows(padded).view(self.world_size, *padded.shape)  # [N, N x most, per_rank]
        mine = every[:, self.rank * most:self.rank * most + count]  # [N, count, per_rank]
        return mine.permute(1, 0, 2).reshape(count, -1)[:, :self.vocab_size]

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's next-token loss sum (qshard.loss.next_token_loss_sum's value), from the slices."""
        if not self.layout or tuple(logits.shape) != (1, self.world_size * self.layout[1], self.weight.shape[0]):
            # checked before any collective, so every rank raises it at the same point
            raise QShardError("the model computed its logits without its head module's forward (or changed their "
                              "shape after it): the vocabulary-parallel loss cannot read them",
                              where=f"{type(self).__name__} in distributed.vocab_parallel",
                              fix="set distributed.vocab_parallel: false for this model")
        count, most = self.layout
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1).reshape(-1)
        every = _gather_rows(_pad_rows(targets, most, IGNORE))
        return _VocabParallelCrossEntropySum.apply(logits.reshape(-1, logits.shape[-1]), every,
                                                   self.vocab_rows[0], self.rank, most)


def head_of(model: nn.Module) -> VocabParallelHead | None:
    return next((m for m in model.modules() if isinstance(m, VocabParallelHead)), None)


@contextlib.contextmanager
def logits_for_loss(head: VocabParallelHead | None):
    """Within: the head returns vocabulary slices for `head.loss_sum` (a no-op without a parallel head)."""
    if head is None:
        yield
        return
    head.layout = ()  # set by the forward, read by loss_sum
    try:
        yield
    finally:
        head.layout = None


def _row_counts(count: int, device: torch.device) -> tuple[int, int]:
    """(this rank's rows, the most any rank has): the ranks' micro-batches may differ in length."""
    counts = torch.tensor([count], device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return count, int(counts)


def _pad_rows(x: torch.Tensor, rows_: int, value) -> torch.Tensor:
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows_ - x.shape[0]), value=value)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    every = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(every, x.contiguous())
    return every


class _VocabSliceLogits(torch.autograd.Function):
    """Every rank's hidden states times this rank's head rows: [1, N x most, rows]. One rank's hidden states
    are broadcast at a time (and in backward one rank's gradient reduced to it at a time), so the working
    memory is one rank's [most, H] whatever the number of ranks; the bytes sent equal an all-gather's."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, count, most):
        ctx.save_for_backward(weight)
        ctx.count, ctx.most, ctx.dtype = count, most, hidden.dtype
        rank, world = dist.get_rank(), dist.get_world_size()
        # a tensor of its own, not a view (FSDP2 hooks the root's outputs for backward)
        out = torch.empty((1, world * most, weight.shape[0]), dtype=weight.dtype, device=hidden.device)
        for owner in range(world):
            rows = (_pad_rows(hidden, most, 0) if owner == rank else
                    torch.empty((most, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)).contiguous()
            dist.broadcast(rows, src=owner)
            torch.matmul(rows.to(weight.dtype), weight.t(), out=out[0, owner * most:(owner + 1) * most])
        return out if bias is None else out.add_(bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad, most, rank = grad[0], ctx.most, dist.get_rank()
        # accumulated in fp32 over vocabulary chunks and rounded once, after the sum over ranks, as one
        # process's matmul over the whole vocabulary rounds once (bf16 partial sums drift over a run)
        step = max(1, CHUNK_ELEMENTS // (most + weight.shape[1]))
        mine = None
        for owner in range(dist.get_world_size()):
            rows = grad[owner * most:(owner + 1) * most]
            total = torch.zeros((most, weight.shape[1]), dtype=torch.float32, device=grad.device)
            for a in range(0, weight.shape[0], step):
                total.addmm_(rows[:, a:a + step].float(), weight[a:a + step].float())
            dist.reduce(total, dst=owner)
            mine = total if owner == rank else mine
        return mine[:ctx.count].to(ctx.dtype), None, None, None, None


class _VocabParallelCrossEntropySum(torch.autograd.Function):
    """qshard.loss's chunked cross-entropy over vocabulary slices: per row, the slices' log-sum-exps and the
    target's logit (on the rank holding it) are combined across ranks. Returns this rank's rows' sum; in
    backward every rank writes the gradient of *every* rank's loss over its slice (the owners' upstream
    gradients are all-gathered), in place, as qshard.loss does."""

    @staticmethod
    def forward(ctx, logits, targets, start, rank, most):
        lse_part = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.zeros_like(lse_part)
        local = targets - start
        here = (local >= 0) & (local < logits.shape[1]) & (targets != IGNORE)
        step = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1]))
        for a in range(0, logits.shape[0], step):
            chunk = logits[a:a + step]
            lse_part[a:a + step] = _logsumexp_fp32(chunk) if chunk.shape[1] else float("-inf")
            got = chunk.gather(1, local[a:a + step].clamp(0, max(chunk.shape[1] - 1, 0))[:, None]).squeeze(1)
            picked[a:a + step] = torch.where(here[a:a + step], got.float(), 0.0)
        peak = lse_part.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        sums = torch.stack([(lse_part - peak).exp(), picked])
        dist.all_reduce(sums)
        lse = peak + sums[0].log()
        loss = torch.where(targets != IGNORE, lse - sums[1], 0.0)
        ctx.save_for_backward(logits, local, lse, targets != IGNORE)
        ctx.most = most
        return loss[rank * most:(rank + 1) * most].sum()

    @staticmethod
    def backward(ctx, grad_total):
        logits, local, lse, labelled = ctx.saved_tensors
        owners = torch.empty(dist.get_world_size(), dtype=torch.float32, device=logits.device)
        dist.all_gather_into_tensor(owners, grad_total.float().reshape(1))
        scale = owners.repeat_interleave(ctx.most) * labelled
        step = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1]))
        for a in range(0, logits.shape[0], step):
            x = logits[a:a + step].to(torch.float32, copy=True)
            x.sub_(lse[a:a + step, None]).exp_()
            t = local[a:a + step]
            here = (t >= 0) & (t < x.shape[1])
            x.scatter_add_(1, t.clamp(0, max(x.shape[1] - 1, 0))[:, None], -here.float()[:, None])
            logits[a:a + step].copy_(x.mul_(scale[a:a + step, None]))
        return logits, None, None, None, None
