"""Next-token cross-entropy summed over labelled tokens, without full-vocabulary fp32 copies of the logits.

`F.cross_entropy(logits.float(), ...)` keeps an fp32 copy of the logits, saves an fp32 log-softmax for
backward and builds fp32 gradients of both: at 128k vocabulary and 2,048 tokens that is several GB on
top of the 0.5 GB bf16 logits. Here the logits are read in chunks of rows: forward keeps one fp32 number
per row (its log-sum-exp), and backward writes each row's gradient over the logits themselves, so the
loss needs one fp32 chunk of working memory however long the sequence is (bench/loss_memory.py).
"""

from __future__ import annotations

import torch

from qshard.data import IGNORE

# Elements of one fp32 chunk (32 MiB): 65 rows at a 128k vocabulary. Small enough that the working set is
# 1/16 of a 2,048-token bf16 logits tensor (measured 0.064, bench/loss_memory.py), large enough that the
# per-chunk kernel launches cost little.
CHUNK_ELEMENTS = 1 << 23


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 cross-entropy of logits[:, t] against labels[:, t + 1], skipping IGNORE labels.

    After backward `logits` holds its own gradient: nothing may read the logits after backward."""
    # Shift the labels, not the logits: slicing logits[:, :-1] would make autograd build a second
    # logits-sized gradient to pad the slice back. The last position gets IGNORE, so a zero gradient.
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    return _ChunkedCrossEntropySum.apply(logits.contiguous(), targets.reshape(-1))


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Invariant: backward overwrites the saved logits with their gradient. A second backward through the
    same graph (retain_graph) therefore raises autograd's 'modified by an inplace operation' error, as does
    any other node that saved these logits, instead of reading wrong values."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = logits.view(-1, logits.size(-1))
        lse = torch.empty(rows.size(0), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for chunk, t, out in _chunks(rows, targets, lse):
            out.copy_(_logsumexp_fp32(chunk))
            picked = chunk.gather(1, t.clamp_min(0)[:, None]).squeeze(1).float()
            total += torch.where(t != IGNORE, out - picked, 0.0).sum()
        ctx.save_for_backward(logits, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        rows = logits.view(-1, logits.size(-1))
        for chunk, t, chunk_lse in _chunks(rows, targets, lse):
            chunk.copy_(_softmax_minus_onehot_fp32(chunk, t, chunk_lse, grad_total))
        return logits, None


def _chunks(rows: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor):
    """(rows, targets, lse) slices of at most CHUNK_ELEMENTS logits each, as views (no copies)."""
    step = max(1, CHUNK_ELEMENTS // rows.size(1))
    return zip(rows.split(step), targets.split(step), lse.split(step))


def _logsumexp_fp32(chunk: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp in fp32 using one fp32 copy of the chunk (torch.logsumexp would make three)."""
    x = chunk.to(torch.float32, copy=True)
    peak = x.amax(dim=1)
    return x.sub_(peak[:, None]).exp_().sum(dim=1).log_().add_(peak)


def _softmax_minus_onehot_fp32(chunk, targets, lse, grad_total) -> torch.Tensor:
    """d(loss sum)/d(logits) for one chunk: (softmax - onehot(target)) * grad, zero on IGNORE rows."""
    x = chunk.to(torch.float32, copy=True)
    x.sub_(lse[:, None]).exp_()
    x.scatter_add_(1, targets.clamp_min(0)[:, None], torch.full_like(x[:, :1], -1.0))
    return x.mul_((grad_total * (targets != IGNORE))[:, None])
