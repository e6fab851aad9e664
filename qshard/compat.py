"""THE table of supported combinations: engine x base format -> trains, or why not and what instead.

The validator (before any loading), `qshard doctor`, error messages and the parametrised test matrix
all read `SUPPORT`. A cell is added here together with its test (tests/test_matrix.py iterates it).
"""

from __future__ import annotations

from dataclasses import dataclass

from qshard.errors import QShardError

ENGINES = ("none", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2")
BASES = ("bf16", "nf4", "fp4", "int8")


@dataclass(frozen=True)
class Cell:
    supported: bool
    reason: str = ""
    instead: str = ""


SUPPORT: dict[tuple[str, str], Cell] = {(engine, base): Cell(True) for engine in ENGINES for base in BASES}


def engine_key(engine: str, zero_stage: int = 2, offload_params: str = "none", offload_optimizer: str = "none") -> str:
    """The table's name for a distributed configuration (zero3_offload = stage 3 with any CPU offload)."""
    if engine != "deepspeed":
        return engine
    offload = "_offload" if stage_offloads(zero_stage, offload_params, offload_optimizer) else ""
    return f"zero{zero_stage}{offload}"


def stage_offloads(zero_stage: int, offload_params: str, offload_optimizer: str) -> bool:
    return zero_stage == 3 and "cpu" in (offload_params, offload_optimizer)


def base_key(quant_method: str) -> str:
    return "bf16" if quant_method == "none" else quant_method


def check(engine: str, base: str) -> None:
    """Raise before any loading when the combination cannot train, naming what to use instead."""
    cell = SUPPORT.get((engine, base))
    if cell is None:
        raise QShardError(f"unknown combination engine={engine} base={base}", where="distributed.engine")
    if not cell.supported:
        raise QShardError(f"engine {engine} with a {base} base cannot train: {cell.reason}",
                          where="distributed.engine / quantization.method", fix=f"use {cell.instead}")


def supported_cells() -> list[tuple[str, str]]:
    return [key for key, cell in SUPPORT.items() if cell.supported]
