"""Issue #17 benchmark: training peak and step time of GPTQ, AWQ and compressed-tensors bases against an NF4 base of the
same bit width and group size.

A stack of decoder-like blocks of real shapes (TinyLlama-1.1B by default: hidden 2048, intermediate 5632,
32 heads / 4 kv heads: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048, down 2048x5632), every linear a
frozen quantized base layer, runs forward + backward on one batch (1 x 512 tokens, bf16, input requiring
grad as LoRA's does; `--dtype float32` on CPUs without AVX-512, whose bf16 matmuls are far slower: BENCHMARKS.md).
Variants (memory: each in a fresh subprocess):

    gptq-dense  GPTQ, the old path: F.linear(x, dequantize(x.dtype)) -- autograd keeps every dense weight
    gptq        GPTQ through qshard.quant.base.redequantizing_linear (dequantized again in backward)
    awq         AWQ gemm (zero point), the same path
    ct          compressed-tensors pack-quantized W4A16 (symmetric), the same path
    nf4         qshard's bitsandbytes NF4 layer (bnb.matmul_4bit, which also dequantizes again in backward)

GPTQ / AWQ / compressed-tensors: 4-bit, group 64, random packed codes; NF4: block 64 (qshard's fixed blocksize), double
quant. Measured per variant: the bytes autograd saves for backward (saved_tensors_hooks; exact), the
peak memory of one step above the memory before it (CUDA: max_memory_allocated; CPU: VmHWM - VmRSS from
/proc, the peak reset through /proc/self/clear_refs after a warm-up step, with glibc's mmap threshold
fixed at 64 KiB so freed tensors leave the resident set), and the fastest and median step times (all variants built in one
more process with glibc's default allocator settings, their steps interleaved, so that a shared machine's
changing load weighs on each alike).

    .venv/bin/python bench/ptq_train_memory.py [--blocks 4] [--tokens 512] [--steps 3] [--threads 0] \
        [--out /tmp/bench_ptq_train.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {"q": (2048, 2048), "k": (256, 2048), "v": (256, 2048), "o": (2048, 2048),
          "gate": (5632, 2048), "up": (5632, 2048), "down": (2048, 5632)}  # [out, in]
GROUP = 64
VARIANTS = ("gptq-dense", "gptq", "awq", "ct", "nf4")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE = torch.bfloat16  # --dtype: the activations' and the layers' compute dtype


def gptq_layer(out_f: int, in_f: int, device) -> nn.Module:
    from qshard.quant.gptq import GPTQConfig, GPTQLinear

    config = GPTQConfig(bits=4, group_size=GROUP, desc_act=False, sym=True, v1_zeros=False)
    layer = GPTQLinear(in_f, out_f, config, device=device)
    int32 = dict(dtype=torch.int32, device=device)
    layer.qweight.data = torch.randint(-2**31, 2**31 - 1, tuple(layer.qweight.shape), **int32)
    layer.qzeros.data = torch.full(tuple(layer.qzeros.shape), 0x88888888 - 2**32, **int32)  # zero point 8
    scales = torch.rand(in_f // GROUP, out_f, dtype=torch.float16, device=device) * 0.01 + 0.005
    layer.scales.data = scales.view(torch.uint8).reshape(-1)
    layer.g_idx.data = torch.arange(in_f, **int32) // GROUP
    layer.compute_dtype = COMPUTE
    return layer


def awq_layer(out_f: int, in_f: int, device) -> nn.Module:
    from qshard.quant.awq import AWQConfig, AWQLinear

    layer = AWQLinear(in_f, out_f, AWQConfig(group_size=GROUP, zero_point=True), device=device)
    int32 = dict(dtype=torch.int32, device=device)
    layer.qweight.data = torch.randint(-2**31, 2**31 - 1, tuple(layer.qweight.shape), **int32)
    layer.qzeros.data = torch.full(tuple(layer.qzeros.shape), 0x88888888 - 2**32, **int32)  # zero point 8
    scales = torch.rand(in_f // GROUP, out_f, dtype=torch.float16, device=device) * 0.01 + 0.005
    layer.scales.data = scales.view(torch.uint8).reshape(-1)
    layer.compute_dtype = COMPUTE
    return layer


def ct_layer(out_f: int, in_f: int, device) -> nn.Module:
    from qshard.quant.compressed_tensors import PackQuantizedLinear, WeightScheme

    layer = PackQuantizedLinear(in_f, out_f, WeightScheme(bits=4, group_size=GROUP, symmetric=True), device=device)
    layer.weight_packed.data = torch.randint(-2**31, 2**31 - 1, tuple(layer.weight_packed.shape),
                                             dtype=torch.int32, device=device)
    scale = torch.rand(out_f, in_f // GROUP, dtype=torch.bfloat16, device=device) * 0.01 + 0.005
    layer.weight_scale.data = scale.view(torch.uint8).reshape(-1)
    layer.compute_dtype = COMPUTE
    return layer


def nf4_layer(out_f: int, in_f: int, device) -> nn.Module:
    from qshard.quant.bnb4bit import Linear4bit

    weight = torch.randn(out_f, in_f, dtype=torch.bfloat16, device=device) * 0.02
    return Linear4bit.from_float(weight, quant_type="nf4", double_quant=True, compute_dtype=COMPUTE)


class DenseSaved(nn.Module):
    """The path issue #17 replaced, around a GPTQ layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return F.linear(x, self.layer.dequantize(x.dtype))


class Block(nn.Module):
    """Attention's and SwiGLU's linears with cheap stand-ins for attention (the same in every variant)."""

    def __init__(self, make):
        super().__init__()
        self.lin = nn.ModuleDict({name: make(*shape) for name, shape in SHAPES.items()})

    def forward(self, h):
        lin = self.lin
        q, kv = lin["q"](h), (lin["k"](h) * lin["v"](h)).repeat(1, 1, 8)
        h = h + lin["o"](q * torch.sigmoid(kv))
        return h + lin["down"](F.silu(lin["gate"](h)) * lin["up"](h))


def memory_now(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


def build(variant: str, blocks: int, device) -> nn.Module:
    torch.manual_seed(0)
    make = {"gptq-dense": lambda o, i: DenseSaved(gptq_layer(o, i, device)),
            "gptq": lambda o, i: gptq_layer(o, i, device),
            "awq": lambda o, i: awq_layer(o, i, device),
            "ct": lambda o, i: ct_layer(o, i, device),
            "nf4": lambda o, i: nf4_layer(o, i, device)}[variant]
    return nn.Sequential(*[Block(make) for _ in range(blocks)]).to(device)


def step(model: nn.Module, x: torch.Tensor) -> int:
    """Forward + backward of one batch; the bytes autograd saved for backward."""
    saved = []
    inp = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = model(inp)
    y.float().square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(saved)


def memory_of(variant: str, blocks: int, tokens: int) -> dict:
    """One variant alone in this (fresh) process: storage, saved bytes, the peak of a step above its start."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(variant, blocks, device)
    x = torch.randn(1, tokens, 2048, dtype=COMPUTE, device=device) * 0.1
    step(model, x)  # warm-up: bitsandbytes' CPU repacking, allocator pools, lazy inits
    before = memory_now(device)
    reset_peak(device)
    saved = step(model, x)
    return {"variant": variant, "device": str(device), "storage_bytes": sum(p.numel() * p.element_size()
                                                                          for p in model.parameters()),
            "saved_bytes": saved, "peak_extra_bytes": peak(device) - before}


def step_times(blocks: int, tokens: int, steps: int) -> dict:
    """The fastest and the median step time of every variant, their steps interleaved in one process (a shared machine's load
    then weighs on all alike)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {v: build(v, blocks, device) for v in VARIANTS}
    x = torch.randn(1, tokens, 2048, dtype=COMPUTE, device=device) * 0.1
    times = {v: [] for v in VARIANTS}
    for k in range(steps + 1):
        for v, model in models.items():
            t0 = time.perf_counter()
            step(model, x)
            if k:  # the first round warms up
                times[v].append(time.perf_counter() - t0)
    return {v: (min(t), statistics.median(t)) for v, t in times.items()}


def markdown(results: list[dict], args, command: str) -> str:
    nf4 = next(r for r in results if r["variant"] == "nf4")
    mib = 2**20
    rows = [f"| {r['variant']} | {r['storage_bytes'] / mib:.1f} | {r['saved_bytes'] / mib:.1f} | "
            f"{r['peak_extra_bytes'] / mib:.1f} | {r['peak_extra_bytes'] / nf4['peak_extra_bytes']:.2f} | "
            f"{r['step_s']:.3f} | {r['median_step_s']:.3f} | {r['step_s'] / nf4['step_s']:.2f} |" for r in results]
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.strip()
    import bitsandbytes

    return "\n".join([
        f"### PTQ base training memory (issue #17) -- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
        f"`{command}`", "",
        f"{args.blocks} blocks of TinyLlama-1.1B shapes (7 linears, {sum(o * i for o, i in SHAPES.values()) / 1e6:.1f}M "
        f"weights each), batch 1 x {args.tokens} tokens, {args.dtype}, forward + backward; GPTQ (sym), "
        "AWQ (zero point) and "
        f"compressed-tensors (pack-quantized, sym) 4-bit group {GROUP}, "
        f"NF4 block {GROUP} double quant. Device: {results[0]['device']}; nproc {os.cpu_count()}, "
        f"torch threads {args.threads or torch.get_num_threads()}; "
        f"{platform.processor() or platform.machine()}; torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}.",
        "", "```", free, "```", "",
        "| variant | base storage MiB | saved for backward MiB | step peak above start MiB | peak / NF4 | "
        "fastest step s | median step s | fastest step / NF4 |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "Step times: the fastest of the interleaved steps is the least disturbed by other processes on a shared "
        "machine; the median is given beside it.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    parser.add_argument("--out", default="/tmp/bench_ptq_train.md")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="compute dtype (bf16 matmuls are slow on CPUs without AVX-512: use float32 there)")
    parser.add_argument("--variant", choices=(*VARIANTS, "timing"), help="(internal) one measurement, as JSON")
    args = parser.parse_args()
    global COMPUTE
    COMPUTE = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant == "timing":
        print(json.dumps(step_times(args.blocks, args.tokens, args.steps)))
        return
    if args.variant:
        print(json.dumps(memory_of(args.variant, args.blocks, args.tokens)))
        return
    def child(variant: str) -> dict:
        cmd = [sys.executable, __file__, "--variant", variant, "--blocks", str(args.blocks),
               "--tokens", str(args.tokens), "--steps", str(args.steps), "--threads", str(args.threads),
               "--dtype", args.dtype]
        # memory: freed tensors leave the resident set; timing: glibc's defaults (a fixed mmap threshold
        # page-faults every temporary over 64 KiB afresh, which slows small-slice dequantization ~2x)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if variant != "timing" else None
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = [child(v) for v in VARIANTS]
    for r, (_, (fastest, median)) in zip(results, child("timing").items()):
        r["step_s"], r["median_step_s"] = fastest, median
        print(r, flush=True)
    command = " ".join(["python bench/ptq_train_memory.py", *sys.argv[1:]])
    text = markdown(results, args, command)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
