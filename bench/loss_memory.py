"""Extra memory and time of the training loss alone, at a 128k vocabulary and 2,048 tokens (issue #17).

    .venv/bin/python bench/loss_memory.py [--tokens 2048] [--vocab 128256] [--reps 3]

Each variant runs in a fresh subprocess on CPU. The logits are made the way a model's head makes them:
a fresh bf16 tensor that no autograd node saves (random values plus a zero bias that receives the
gradient), so each variant can free them or keep them as the real loss would. Figures per variant:
  extra peak   ru_maxrss during forward + backward minus the RSS just before the loss (logits alive,
               peak reset through /proc/self/clear_refs); it includes the logits' gradient wherever that
               is a new tensor rather than the logits' own memory
  saved        bytes autograd keeps for backward in tensors other than the logits
  seconds      one forward + backward, best of --reps after one warm-up
Variants: `unchunked` (the code before issue #17), `checkpoint` (fp32 chunks under
torch.utils.checkpoint, the first design tried), `chunked` (qshard/loss.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qshard import loss as qloss
from qshard.data import IGNORE


def unchunked(logits, labels):
    """qshard/train.py::token_loss_sum before issue #17."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def checkpointed(logits, labels):
    """fp32 cross-entropy per chunk of rows, recomputed in backward; chunks as in qshard/loss.py."""
    rows, targets = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
    step = max(1, qloss.CHUNK_ELEMENTS // rows.size(1))

    def chunk_loss(x, t):
        return F.cross_entropy(x.float(), t, ignore_index=IGNORE, reduction="sum")

    return sum(checkpoint(chunk_loss, x, t, use_reentrant=False)
               for x, t in zip(rows.split(step), targets.split(step)))


VARIANTS = {"unchunked": unchunked, "checkpoint": checkpointed, "chunked": qloss.next_token_loss_sum}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(tokens: int, vocab: int, seed: int = 0):
    """bf16 logits as a head would return them, the bias that collects their gradient, and labels with
    the first quarter IGNORE (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.zeros(vocab, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(1, tokens, vocab, generator=g, dtype=torch.bfloat16).mul_(4)
    logits.add_(bias)  # in place: no second logits-sized tensor; add saves nothing for backward
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    labels[:, : tokens // 4] = IGNORE
    return bias, [logits], labels


def forward_backward(fn, holder: list, labels, saved: list):
    """The loss takes the only reference to the logits, as token_loss_sum does with the model's output."""
    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(holder.pop(), labels)
    loss.backward()
    return loss


def peak_reset() -> int:
    """Reset the process's peak RSS (ru_maxrss, VmHWM) to the current RSS and return that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def measure_memory(fn, tokens: int, vocab: int) -> dict:
    _, holder, labels = make_inputs(8, 1000)
    forward_backward(fn, holder, labels, [])  # warm-up: first-call allocations are not the loss's
    _, holder, labels = make_inputs(tokens, vocab)
    logits_storage = holder[0].untyped_storage().data_ptr()
    saved: list = []
    before = peak_reset()
    loss = forward_backward(fn, holder, labels, saved)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    storages.pop(logits_storage, None)  # the logits exist before the loss; only new tensors count
    return {"loss": float(loss), "extra_peak": peak - before, "saved": sum(storages.values())}


def measure_seconds(fn, tokens: int, vocab: int, reps: int) -> dict:
    seconds = []
    for _ in range(reps + 1):  # the first is a warm-up
        _, holder, labels = make_inputs(tokens, vocab)
        start = time.perf_counter()
        forward_backward(fn, holder, labels, [])
        seconds.append(time.perf_counter() - start)
    return {"seconds": min(seconds[1:])}


def child(name: str, what: str, a) -> dict:
    """Run one variant in a fresh process. For memory, glibc's mmap threshold is fixed at 1 MiB so every
    large tensor is unmapped when freed and RSS follows the live tensors (with its default dynamic
    threshold a freed 32 MiB chunk stays in the heap and shows up again as RSS). Timing runs without it."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20)) if what == "memory" else dict(os.environ)
    cmd = [sys.executable, __file__, "--variant", name, "--what", what, "--tokens", str(a.tokens),
           "--vocab", str(a.vocab), "--reps", str(a.reps)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variant", choices=list(VARIANTS))
    p.add_argument("--what", choices=["memory", "seconds"])
    a = p.parse_args()
    if a.variant:
        fn = VARIANTS[a.variant]
        out = measure_memory(fn, a.tokens, a.vocab) if a.what == "memory" else \
            measure_seconds(fn, a.tokens, a.vocab, a.reps)
        print(json.dumps(out))
        return
    logits_bytes = a.tokens * a.vocab * 2
    print(f"bf16 logits [1, {a.tokens}, {a.vocab}]: {logits_bytes / 2**20:.0f} MiB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, chunk {qloss.CHUNK_ELEMENTS} elements")
    print("| variant | extra peak MiB | / bf16 logits | saved for backward MiB | s per fwd+bwd | loss sum |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in VARIANTS:
        r = child(name, "memory", a) | child(name, "seconds", a)
        print(f"| {name} | {r['extra_peak'] / 2**20:.0f} | {r['extra_peak'] / logits_bytes:.3f} | "
              f"{r['saved'] / 2**20:.1f} | {r['seconds']:.2f} | {r['loss']:.3f} |")


if __name__ == "__main__":
    main()
