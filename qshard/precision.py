"""Mixed precision: which dtype the forward runs in, checked against the hardware before loading."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qshard.errors import QShardError

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device, gpu_capability: tuple[int, int] | None = None,
                      gpu_name: str = "") -> Precision:
    """auto -> bf16 on GPUs with compute capability >= 8.0, fp16 on older GPUs, fp32 on CPU."""
    if device.type == "cuda" and gpu_capability is None:
        gpu_capability = torch.cuda.get_device_capability(device)
        gpu_name = torch.cuda.get_device_name(device)
    if requested == "auto":
        if device.type != "cuda":
            return Precision("fp32", device)
        return Precision("bf16" if gpu_capability >= (8, 0) else "fp16", device)
    if requested == "bf16" and device.type == "cuda" and gpu_capability < (8, 0):
        major, minor = gpu_capability
        raise QShardError(f"bf16 needs compute capability 8.0 or newer; {gpu_name or 'this GPU'} has "
                          f"{major}.{minor} (e.g. RTX 20xx, V100, T4)", where="train.precision",
                          fix="use train.precision: fp16 (or auto)")
    return Precision(requested, device)


# A CPU without native bf16/fp16 matrix units (AVX512-BF16, AMX) may run half-precision matmuls through a
# slow fallback: on an AVX2-only AMD EPYC with torch 2.13, one thread, g @ w (a linear layer's backward) took
# 5.6 s in bf16 against 0.013 s in fp32 for g [32, 5632], w [5632, 2048]; F.linear (its forward) 20x.
# Whether a CPU has the fast path is what a quick product says, not its flags.
SLOW_HALF_FACTOR = 10.0


def half_matmul_slowdown(dtype: torch.dtype, tokens: int = 64, width: int = 1024) -> float:
    """How many times slower a linear layer's forward and backward products (x @ w.T, then g @ w: torch
    takes a different kernel for each) run in `dtype` than in fp32 on this CPU, best of 3."""
    import time

    x, w = torch.randn(tokens, width), torch.randn(width, width)

    def best(x: torch.Tensor, w: torch.Tensor) -> float:
        times = []
        for _ in range(4):  # the first: allocation and kernel selection
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            x @ w
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(x.to(dtype), w.to(dtype)) / max(best(x, w), 1e-7)


def cpu_half_warning(device: torch.device, dtypes: set[torch.dtype],
                     slowdown=half_matmul_slowdown) -> tuple[str, str] | None:
    """(what, fix) when this run computes in bf16/fp16 on a CPU whose half-precision matmuls are slow, else None."""
    halves = sorted((d for d in dtypes if d in (torch.bfloat16, torch.float16)), key=str)
    if device.type != "cpu" or not halves:
        return None
    factor = max(slowdown(d) for d in halves)
    if factor < SLOW_HALF_FACTOR:
        return None
    names = " and ".join(str(d).removeprefix("torch.") for d in halves)
    return (f"{names} matrix products run {factor:.0f}x slower than float32 on this CPU (no native half-precision "
            f"units such as AVX512-BF16 or AMX): training will be about that much slower",
            "on this machine set train.precision: fp32 and quantization.compute_dtype: float32 (or auto)")
