"""`qshard bench-comm`: all-reduce, all-gather and reduce-scatter over this machine's backend (gloo on CPU,
NCCL on GPU), and, given a recipe, whether communication or compute bounds its optimizer steps.

Figures follow nccl-tests (github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md):
- time: the mean over `iters` timed iterations, averaged over ranks (nccl-tests' default `-a 1`);
- size S, the "bytes" of a row: for all-reduce the buffer every rank holds; for all-gather the whole
  gathered output (each rank sends S/n); for reduce-scatter the whole input each rank reduces (each rank
  receives S/n). That is nccl-tests' `count*sizeof(type)*n` with its per-rank count;
- algorithm bandwidth algbw = S / time;
- bus bandwidth busbw = algbw * 2(n-1)/n for all-reduce and algbw * (n-1)/n for all-gather and
  reduce-scatter: the per-rank link speed the collective reached, comparable across rank counts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qshard.errors import QShardError
from qshard.tools.plan import (
    GPU_FLOPS,
    Traffic,
    bus_factor,
    compute_seconds,
    lora_params,
    parse_size,
    read_model_spec,
    settings_from_recipe,
    step_traffic,
)

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce")
WARMUP = 2


@dataclass(frozen=True)
class Row:
    op: str
    bytes: int        # S, in nccl-tests' convention (see the module docstring)
    seconds: float    # per operation
    algbw: float      # bytes / s
    busbw: float      # bytes / s


def make_row(op: str, nbytes: int, seconds: float, world: int) -> Row:
    algbw = nbytes / seconds
    return Row(op, nbytes, seconds, algbw, algbw * bus_factor(op, world))


def parse_sizes(text: str) -> list[int]:
    """'1KB,1MB,64MiB' -> bytes (qshard.tools.plan.parse_size: KB = 1000, KiB = 1024)."""
    try:
        sizes = [parse_size(item, "--sizes") for item in text.split(",") if item.strip()]
    except QShardError:
        sizes = []
    if not sizes:
        raise QShardError(f"cannot read the message sizes {text!r}", where="--sizes",
                          fix="give positive sizes separated by commas, e.g. 1KB,64KB,1MB,16MB")
    return sizes


# -- measuring -------------------------------------------------------------------------------------

def measure(op: str, nbytes: int, iters: int, device: torch.device) -> Row:
    """Time one collective on float32 buffers of about `nbytes` (a whole number of elements per rank)."""
    dist = torch.distributed
    n = dist.get_world_size()
    count = max(n, nbytes // 4 // n * n)
    full = torch.zeros(count, device=device)  # zeros: repeated sums stay finite
    part = torch.zeros(count // n, device=device)
    run = {"all_reduce": lambda: dist.all_reduce(full),
           "all_gather": lambda: dist.all_gather_into_tensor(full, part),
           "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
           "broadcast": lambda: dist.broadcast(full, src=0), "reduce": lambda: dist.reduce(full, dst=0)}[op]
    for _ in range(WARMUP):
        run()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    _sync(device)
    mean = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    return make_row(op, count * 4, float(mean) / n, n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(sizes: list[int], iters: int, device: torch.device) -> list[Row]:
    return [measure(op, size, iters, device) for op in COLLECTIVES for size in sizes]


def format_rows(rows: list[Row], world: int, backend: str) -> str:
    head = f"{backend}, {world} process(es); time: mean per operation, averaged over ranks\n"
    head += f"{'collective':<15}{'size':>12}{'time (us)':>13}{'algbw (GB/s)':>14}{'busbw (GB/s)':>14}"
    return head + "".join(f"\n{r.op:<15}{human_bytes(r.bytes):>12}{r.seconds * 1e6:>13.1f}"
                          f"{r.algbw / 1e9:>14.3f}{r.busbw / 1e9:>14.3f}" for r in rows)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return ""


# -- a recipe's step: the planner's traffic (qshard.tools.plan.step_traffic) at the measured bandwidths ----------

def traffic_seconds(t: Traffic, rows: list[Row], world: int) -> tuple[float, Row | None]:
    """Time of `t` at the bus bandwidth measured for the same collective at the nearest message size."""
    same = [r for r in rows if r.op == t.op and r.busbw > 0]
    if not same or world < 2:
        return 0.0, None
    row = min(same, key=lambda r: abs(math.log(r.bytes) - math.log(max(t.message_bytes, 1))))
    return t.bytes_per_step * bus_factor(t.op, world) / row.busbw, row


def estimate(recipe, spec, rows: list[Row], world: int, flops: float) -> dict:
    """Per rank and optimizer step: bytes and seconds per collective, compute seconds, and the verdict."""
    s = settings_from_recipe(recipe, spec, gpus=world, nodes=1)
    traffic = []
    for t in step_traffic(spec, s):
        seconds, row = traffic_seconds(t, rows, world)
        traffic.append({**asdict(t), "seconds": seconds, "busbw_used": row.busbw if row else None,
                        "at_size": row.bytes if row else None})
    lora = lora_params(spec, s)
    tokens = s.micro_batch * s.seq_len * s.accumulation  # per rank; data.max_length as the upper bound
    comm, compute = sum(t["seconds"] for t in traffic), compute_seconds(spec, s, lora, flops)
    return {"engine": s.engine, "world_size": world, "params": spec.active_params + lora, "tokens_per_rank": tokens,
            "flops": flops, "traffic": traffic, "comm_s": comm, "compute_s": compute,
            "bound": "communication" if comm > compute else "compute"}


def format_estimate(e: dict) -> str:
    lines = [f"\nrecipe: engine {e['engine']} at {e['world_size']} process(es), per rank and optimizer step"]
    if not e["traffic"]:
        lines.append("  no collectives in the step (one process, or engine none)")
    for t in e["traffic"]:
        bw = f"busbw {t['busbw_used'] / 1e9:.3f} GB/s measured at {human_bytes(t['at_size'])}" if t["at_size"] else ""
        lines.append(f"  {t['op']:<15}{human_bytes(t['bytes_per_step']):>10} in messages of "
                     f"{human_bytes(t['message_bytes'])} ({t['what']}): {t['seconds'] * 1e3:.2f} ms  {bw}")
    lines.append(f"communication {e['comm_s'] * 1e3:.2f} ms (no overlap assumed) vs compute "
                 f"{e['compute_s'] * 1e3:.2f} ms ({e['params'] / 1e6:.2f}M params x {e['tokens_per_rank']} tokens "
                 f"at {e['flops'] / 1e12:.1f} TFLOP/s, --tflops; the planner's FLOPs: qshard/tools/plan.py)")
    ratio = e["comm_s"] / e["compute_s"] if e["compute_s"] else math.inf
    lines.append(f"-> {e['bound']}-bound (communication is {ratio:.0%} of compute)")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------------

@dataclass
class Job:
    sizes: list[int]
    iters: int
    recipe: object = None  # qshard.config.Recipe
    spec: object = None    # qshard.tools.plan.ModelSpec of its model


def prepare(sizes: str, iters: int, recipe_path: str | None, overrides: list[str]) -> Job:
    """Every input checked (sizes, recipe, the model's config.json) before any process starts."""
    from qshard.config import load_recipe

    if iters < 1:
        raise QShardError(f"--iters {iters}: nothing would be timed", where="--iters", fix="give 1 or more")
    recipe = load_recipe(recipe_path, overrides) if recipe_path else None
    return Job(parse_sizes(sizes), iters, recipe, read_model_spec(recipe.model.path) if recipe else None)


def launch_command(args) -> list[str]:
    """`qshard bench-comm` again under torchrun with --nproc processes (as cli._launch does for train)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "qshard.cli", "bench-comm", f"--sizes={args.sizes}", f"--iters={args.iters}"]
    cmd += [f"--set={item}" for item in args.set]
    cmd += ([f"--tflops={args.tflops}"] if args.tflops else []) + ([f"--json={args.json}"] if args.json else [])
    return cmd + ([args.recipe] if args.recipe else [])


def main(job: Job, tflops: float | None = None, json_out: str | None = None) -> int:
    """Runs on every rank (under a launcher, or alone); rank 0 prints and writes."""
    from qshard.runtime import init_runtime, shutdown

    rt = init_runtime(need_group=True)
    try:
        rows = bench(job.sizes, job.iters, rt.device)
    finally:
        shutdown(rt)
    if not rt.is_main:
        return 0
    backend = "nccl" if rt.device.type == "cuda" else "gloo"
    print(format_rows(rows, rt.world_size, backend))
    # the stated throughput: the planner's GPU figure (H100 bf16 at 40%), or 1 TFLOP/s on a CPU
    flops = tflops * 1e12 if tflops else (GPU_FLOPS if rt.device.type == "cuda" else 1e12)
    est = estimate(job.recipe, job.spec, rows, rt.world_size, flops) if job.recipe is not None else None
    if est is not None:
        print(format_estimate(est))
    if json_out:
        Path(json_out).write_text(json.dumps({"backend": backend, "world_size": rt.world_size,
                                              "rows": [asdict(r) for r in rows], "estimate": est}, indent=1) + "\n")
    return 0
