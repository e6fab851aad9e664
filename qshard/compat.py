"""THE table of supported combinations: engine x base format -> trains, or why not and what instead.

The validator (before any loading), `qshard doctor`, error messages and the parametrised test matrix
all read `SUPPORT`. A cell is added here together with its test (tests/test_matrix.py iterates it).
"""

from __future__ import annotations

from dataclasses import dataclass

from qshard.errors import QShardError

ENGINES = ("none", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp2")
BASES = ("bf16", "nf4", "fp4", "int8", "gptq", "awq", "compressed-tensors")


@dataclass(frozen=True)
class Cell:
    supported: bool
    reason: str = ""
    instead: str = ""


SUPPORT: dict[tuple[str, str], Cell] = {(engine, base): Cell(True) for engine in ENGINES for base in BASES}


# Mixture-of-Experts bases (fused expert weights, qshard/model/experts.py): the same for every engine, since
# an expert stack is parameters like any other (ZeRO-3 and FSDP2 split it; tests/test_moe.py).
MOE_SUPPORT: dict[str, Cell] = {base: Cell(True) for base in BASES}
# what the MoE row's PTQ cells mean (markdown_table prints it)
MOE_PTQ_NOTE = ("MoE with a gptq / awq / compressed-tensors base: the packed per-expert layers are decompressed on load "
                "(as transformers does) and stored as quantization.method says (dense with checkpoint / none, NF4 with "
                "nf4); kept packed: not yet. Tested on compressed-tensors checkpoints made by llm-compressor; names "
                "transformers' rules do not stack (llm-compressor's Mixtral) are refused by name")
MOE_OPTION_RULES = [
    ("lora.dropout > 0", "PEFT's LoRA on fused expert weights (target_parameters) has no dropout",
     "lora.dropout: 0, or lora.target_modules without the expert weights"),
    ("lora.use_dora", "PEFT's LoRA on fused expert weights has no DoRA",
     "lora.use_dora: false, or lora.target_modules without the expert weights"),
]


# Engines that partition parameters, the quantized base's included (each rank holds 1/N of it).
SHARDS_BASE = ("zero3", "zero3_offload", "fsdp2")


def engine_key(engine: str, zero_stage: int = 2, offload_params: str = "none", offload_optimizer: str = "none",
               ds_config: dict | None = None) -> str:
    """The table's name for a distributed configuration (zero3_offload = stage 3 with any CPU offload).

    With a user's DeepSpeed JSON (`ds_config`, already read), its `zero_optimization` decides the
    stage and the offloads: it is what DeepSpeed will run, whatever the recipe's own keys say."""
    if engine != "deepspeed":
        return engine
    if ds_config is not None:
        zero_stage, offload_params, offload_optimizer = deepspeed_json_identity(ds_config)
    offload = "_offload" if stage_offloads(zero_stage, offload_params, offload_optimizer) else ""
    return f"zero{zero_stage}{offload}"


def deepspeed_json_identity(ds_config: dict) -> tuple[int, str, str]:
    """(stage, offload_params, offload_optimizer) as DeepSpeed reads them from a config dict
    (a missing stage is DeepSpeed's default, 0, which qshard does not run: refused by the caller)."""
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise QShardError("zero_optimization must be a JSON object", where="distributed.deepspeed_config",
                          fix='write it as "zero_optimization": {"stage": 2, ...}')
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (1, 2, 3):
        raise QShardError(f"zero_optimization.stage is {stage!r}; qshard runs ZeRO stages 1, 2 and 3",
                          where="distributed.deepspeed_config: zero_optimization.stage", fix="set it to 1, 2 or 3")

    def device(section: str) -> str:
        value = zero.get(section) or {}
        return "cpu" if isinstance(value, dict) and value.get("device") in ("cpu", "nvme") else "none"

    return stage, device("offload_param"), device("offload_optimizer")


def stage_offloads(zero_stage: int, offload_params: str, offload_optimizer: str) -> bool:
    return zero_stage == 3 and "cpu" in (offload_params, offload_optimizer)


def base_key(quant_method: str, checkpoint_format: str | None = None) -> str:
    """The table's name for the base: a dense checkpoint's recipe method, or with method `checkpoint`
    the PTQ checkpoint's own format (gptq / awq / compressed-tensors). A bitsandbytes 4-bit checkpoint kept as it
    is reads nf4's (fp4's) row: its layers are the very Linear4bit that quantizing on load builds."""
    if quant_method == "checkpoint":
        return checkpoint_format or "none"
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


# Options that some engines cannot honour: (engines, option, why, what instead).
OPTION_RULES = [
    (("zero3", "zero3_offload"), "lora.use_dora",
     "DoRA reads the dense base weight in the adapter's forward, outside the base layer's own forward, where "
     "ZeRO-3 may hold only this rank's partition of it (seen: empty tensors mid-step)",
     "distributed.engine: fsdp2 (or ddp / zero_stage 1-2), or lora.use_dora: false"),
    (("zero1", "zero2", "zero3", "zero3_offload"), "train.on_nonfinite: skip",
     "DeepSpeed's step() must run every step to keep its accumulation counters",
     "train.on_nonfinite: stop, or distributed.engine ddp / fsdp2"),
    (("fsdp2",), "train.precision: fp16",
     "FSDP2 has no sharded gradient scaler here, and fp16 without loss scaling underflows small gradients to 0",
     "train.precision: bf16 (or fp32), or distributed.engine ddp / deepspeed, which scale fp16 losses"),
]


def check_options(engine: str, *, use_dora: bool, device: str, fsdp_cpu_offload: bool,
                  on_nonfinite: str = "stop", precision: str = "fp32", cpu_fp16: bool = True) -> None:
    """Refuse option combinations that cannot work, before any loading (`precision`: the resolved one;
    `cpu_fp16`: whether DeepSpeed can run fp16 on this CPU, _compat.deepspeed_cpu_fp16)."""
    chosen = {"lora.use_dora": use_dora, "train.on_nonfinite: skip": on_nonfinite == "skip",
              "train.precision: fp16": precision == "fp16"}
    for engines, option, why, instead in OPTION_RULES:
        if engine in engines and chosen.get(option):
            raise QShardError(f"{option} cannot be used with {engine}: {why}", where=option, fix=f"use {instead}")
    if engine.startswith("zero") and precision == "fp16" and device == "cpu" and not cpu_fp16:
        raise QShardError(f"train.precision: fp16 cannot be used with {engine} on this CPU: DeepSpeed runs fp16 on "
                          "a CPU only with oneDNN fp16 (x86: AVX512-FP16 or AMX-FP16), and would stop after loading "
                          "with 'Type fp16 is not supported on your device.'", where="train.precision",
                          fix="use train.precision: fp32 (or bf16), or distributed.engine: ddp, which trains fp16 "
                              "here")
    if engine == "fsdp2" and fsdp_cpu_offload and device == "cpu":
        raise QShardError("distributed.fsdp_cpu_offload moves parameters from the GPU to the CPU, but this run "
                          "is already on the CPU", where="distributed.fsdp_cpu_offload", fix="set it to false")


def markdown_table() -> str:
    """The table as Markdown (README shows it; a test keeps the two in sync)."""
    lines = ["| engine | " + " | ".join(BASES) + " |", "|---" * (len(BASES) + 1) + "|"]
    for engine in ENGINES:
        cells = ["yes" if SUPPORT[(engine, b)].supported else f"no: {SUPPORT[(engine, b)].reason}" for b in BASES]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    lines += [f"\n- {option} with {', '.join(engines)}: refused ({why}); use {instead}."
              for engines, option, why, instead in OPTION_RULES]
    lines += ["\nMixture-of-Experts models (every engine alike; the router stays dense, expert weights are "
              "stored per expert as the base method says):\n", "| base | " + " | ".join(BASES) + " |",
              "|---" * (len(BASES) + 1) + "|",
              "| MoE | " + " | ".join("yes" if MOE_SUPPORT[b].supported else "no (below)" for b in BASES) + " |"]
    lines += [f"\n- {MOE_PTQ_NOTE}."]
    lines += [f"\n- {option} with LoRA on expert weights: refused ({why}); use {instead}."
              for option, why, instead in MOE_OPTION_RULES]
    return "\n".join(lines)
