"""Health checks that stop a run early instead of letting it fail silently for hours."""

from __future__ import annotations

import torch

from qshard.errors import QShardError
from qshard.runtime import Runtime, all_reduce_sum


class GradFlowCheck:
    """Every trainable tensor must get a finite, non-zero gradient: within the first `steps` steps of a
    fresh run, and, when `every` > 0, at each step that is a multiple of `every` (resumed runs too).

    LoRA's B starts at zero, so A's gradient is exactly zero on step 1 by construction: the check
    for "no gradient" over the first steps runs after step 2; a periodic check looks at its own step
    only. The engine hands over each rank's (shard of the) gradient between backward and the
    optimizer step; flags are summed over ranks, so a tensor counts as trained if any rank's shard of
    its gradient is non-zero.
    """

    def __init__(self, rt: Runtime, steps: int = 2, every: int = 0, fresh: bool = True):
        self.rt, self.steps, self.every = rt, steps if fresh else 0, every
        self.seen: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return step <= self.steps or bool(self.every and step % self.every == 0)

    def inspect(self, grads: dict[str, torch.Tensor | None], step: int) -> None:
        names = sorted(grads)
        base = [n for n in names if "lora_" not in n]
        if base:  # only adapter tensors may train; a trainable base weight is a wiring bug
            raise QShardError(f"{len(base)} base tensor(s) are trainable: {', '.join(base[:4])}",
                              where="gradient flow check", fix="the frozen base must have requires_grad=False; "
                                                               "something unfroze it after loading")
        flags = torch.zeros(2, len(names), dtype=torch.float64, device=self.rt.device)
        for i, name in enumerate(names):
            g = grads[name]
            if g is not None and g.numel():
                flags[0, i] = float(bool(g.any()))
                flags[1, i] = float(not bool(torch.isfinite(g).all()))
        flags = all_reduce_sum(flags, self.rt)
        first = step <= self.steps
        self.seen = flags[0] if self.seen is None or not first else self.seen + flags[0]
        nonfinite = [n for n, bad in zip(names, flags[1].tolist()) if bad]
        if nonfinite:
            _fail(nonfinite, f"a non-finite gradient at step {step}",
                  "lower train.learning_rate, or use precision bf16/fp32 instead of fp16")
        silent = [n for n, seen in zip(names, self.seen.tolist()) if not seen]
        # lora_A (and only lora_A) may legitimately have a zero gradient on step 1; everything else is
        # checked at once, before an engine trips over the unused parameter in its own way (DDP's
        # "Expected to have finished reduction" at the next forward)
        if step < self.steps:
            silent = [n for n in silent if ".lora_A." not in n]
        if silent and first:
            _fail(silent, f"no gradient in the first {self.steps} steps",
                  "the layer is detached from the loss (e.g. frozen, or wrapped after LoRA was attached)")
        if silent:
            _fail(silent, f"no gradient at step {step}", "the layer stopped receiving gradient during the run "
                                                         "(frozen or detached by a callback, or fp16 underflow)")


def base_fingerprint(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, float]]:
    """dtype and sum of this rank's part (ZeRO-3 partition, FSDP2 shard) of every frozen tensor: one
    reduction each, enough to see a base weight that an optimizer step or an engine cast changed."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        total = t.detach().sum(dtype=torch.float64 if t.is_floating_point() else torch.int64)
        out[name] = (t.dtype, float(total))
    return out


def check_base_unchanged(before: dict, after: dict, step: int, rt: Runtime) -> None:
    """After the optimizer step, every frozen tensor must be as it was (on every rank)."""
    changed = sorted(n for n in before if after.get(n) != before[n])
    if int(all_reduce_sum(torch.tensor([float(len(changed))], device=rt.device), rt)[0]):
        shown = ", ".join(changed[:4]) or "(on another rank)"
        raise QShardError(f"the optimizer step {step} changed frozen base tensor(s): {shown}",
                          where="gradient flow check",
                          fix="likely cause: a base tensor was given to the optimizer, or an engine cast the "
                              "frozen storage (e.g. packed NF4 bytes cast to bf16)")


def _fail(names: list[str], what: str, cause: str) -> None:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise QShardError(f"{len(names)} LoRA tensor(s) got {what}: {shown}", where="gradient flow check",
                      fix=f"likely cause: {cause}")


def sharding_report(model: torch.nn.Module, rt: Runtime) -> list[dict]:
    """Bytes this rank holds against the unsharded total, per kind of tensor, for every rank.

    kinds: `base_quantized` (integer storage of quantized layers), `base_dense` (frozen float
    tensors: embeddings, norms, head), `lora` (trainable), `buffers`. Collective: every rank calls it.
    """
    from qshard.engines.base import local_numel
    from qshard.model import vocab

    mine: dict[str, list[int]] = {k: [0, 0] for k in ("base_quantized", "base_dense", "lora", "buffers")}
    for p in model.parameters():
        kind = "lora" if p.requires_grad else ("base_dense" if p.dtype.is_floating_point else "base_quantized")
        size = p.element_size()
        mine[kind][0] += local_numel(p) * size
        mine[kind][1] += getattr(p, "ds_numel", p.numel()) * size
    split = vocab.row_buffers(model)
    for b in model.buffers():  # a vocabulary-parallel embedding's or head's rows are base weights
        kind = "base_dense" if id(b) in split else "buffers"
        mine[kind][0] += b.numel() * b.element_size()
        mine[kind][1] += split.get(id(b), b.numel()) * b.element_size()
    row = {"rank": rt.rank, **{f"{k}_local": v[0] for k, v in mine.items()},
           **{f"{k}_full": v[1] for k, v in mine.items()}}
    if not rt.distributed:
        return [row]
    rows: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, row)
    return rows


def format_sharding(rows: list[dict]) -> str:
    kinds = ("base_quantized", "base_dense", "lora", "buffers")
    head = "rank  " + "  ".join(f"{k:>22}" for k in kinds)
    lines = [head] + ["{:<4}  ".format(r["rank"]) + "  ".join(
        f"{_mb(r[k + '_local']):>9} / {_mb(r[k + '_full']):>9} MB" for k in kinds) for r in rows]
    return "held on each rank (local / unsharded):\n" + "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


IMBALANCE_CAUSES = ("a buffer or parameter the engine replicates instead of sharding (e.g. GPTQ buffers), "
                    "a quantized weight left unsharded, or work done on rank 0 only (loading, logging)")


def memory_imbalance(ranks: list[dict], threshold: float) -> str | None:
    """A warning when ranks' resident (or GPU) memory differs by more than `threshold` of the largest."""
    key = "gpu_alloc_mb" if "gpu_alloc_mb" in ranks[0] else "rss_mb"
    values = [r[key] for r in ranks]
    spread = (max(values) - min(values)) / max(max(values), 1e-9)
    if len(values) < 2 or spread <= threshold:
        return None
    heavy = values.index(max(values))
    return (f"memory differs across ranks by {spread:.0%} ({key}: " + ", ".join(f"{v:.0f}" for v in values) +
            f" MB; rank {heavy} holds the most). Usually: {IMBALANCE_CAUSES}")


def replicated_tensors(model: torch.nn.Module, rt: Runtime, min_bytes: int = 1 << 20) -> list[str]:
    """Frozen base tensors this rank holds whole although the run is sharded (only meaningful when
    the engine is expected to shard: ZeRO-3, FSDP2)."""
    from qshard.engines.base import local_numel

    if rt.world_size < 2:
        return []
    from qshard.model import vocab

    found = []
    rows = vocab.row_buffers(model)  # a rank's rows, not whole
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.requires_grad or t.numel() * t.element_size() < min_bytes or id(t) in rows:
            continue
        full = getattr(t, "ds_numel", t.numel())
        if local_numel(t) >= full:
            found.append(f"{name} ({full * t.element_size() / 2**20:.1f} MB)")
    return found
