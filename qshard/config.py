"""The recipe: every option, its default and its limits, parsed once at the edge.

A recipe is YAML with sections `model`, `quantization`, `lora`, `data`, `train`, `distributed`.
`--set a.b=value` overrides any key (the value is parsed as YAML: `--set train.max_steps=50`).
Unknown keys are errors with a "did you mean"; no validator silently rewrites a value.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qshard.errors import QShardError

DType = Literal["auto", "bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str = Field(description="Local Hugging Face causal-LM folder (config.json + safetensors) or a hub id.")
    dtype: DType = Field("auto", description="dtype of the base weights that stay dense (embeddings, norms, "
                                             "lm_head) and the dtype weights are cast to before quantization; "
                                             "auto = the checkpoint's own dtype.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class QuantizationSection(Section):
    method: Literal["none", "nf4", "fp4", "int8", "checkpoint"] = Field(
        "nf4", description="How the frozen base linears are stored: bitsandbytes nf4/fp4/int8 (a GPTQ/AWQ/"
                           "compressed-tensors checkpoint is converted), none (dense), or checkpoint (keep a "
                           "GPTQ/AWQ/compressed-tensors checkpoint's own quantization).")
    double_quant: bool = Field(True, description="4-bit only: quantize the per-block scales too (QLoRA's DQ).")
    compute_dtype: DType = Field("auto", description="dtype the 4-bit matmul computes in; auto = the training "
                                                     "precision's dtype.")
    int8_threshold: float = Field(6.0, ge=0.0, description="int8 only: LLM.int8() outlier threshold.")
    skip_modules: list[str] = Field(["lm_head"], description="Linear layers kept dense (by name suffix).")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names (suffixes such as q_proj) to adapt; all-linear = every linear "
                                  "layer except the output head.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class DataSection(Section):
    path: str = Field(description="Training data: a .json list or .jsonl file.")
    format: Literal["auto", "alpaca", "chat", "text"] = Field("auto", description="Row format; auto detects it "
                                                                                  "from the first row.")
    text_field: str = Field("text", description="Field holding the text, for format: text.")
    template: Literal["auto", "tokenizer", "fallback"] = Field(
        "auto", description="Chat rendering: the tokenizer's chat template, or qshard's documented fallback; "
                            "auto = the tokenizer's if it has one.")
    max_length: int = Field(1024, ge=1, le=1_048_576, description="Longest sequence in tokens; longer ones are "
                                                                  "truncated (and counted).")
    packing: bool = Field(False, description="Concatenate whole examples into sequences of up to max_length.")
    eval_path: str | None = Field(None, description="Separate evaluation file (same format).")
    eval_fraction: float = Field(0.0, ge=0.0, le=0.5, description="Share of the training rows held out for "
                                                                  "evaluation when eval_path is not given.")


class TrainSection(Section):
    output_dir: str = Field("runs/qshard", description="Run folder: adapter, checkpoints, metrics, recipe.")
    epochs: int = Field(1, ge=1, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward pass on each process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to learning_rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled weight decay (AdamW).")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm; null = off.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw = torch.optim.AdamW; the others are bitsandbytes optimizers.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision for the forward pass; auto = bf16 on GPUs that support it, fp16 on "
                            "older GPUs, fp32 on CPU. Adapter weights always stay fp32.")
    seed: int = Field(42, description="Seeds adapter init, dropout and the data order.")
    log_every: int = Field(1, ge=1, description="Steps between metric lines.")
    eval_every: int | None = Field(None, ge=1, description="Steps between evaluations (and at the end).")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept.")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="A non-finite loss stops the run (naming "
                                                                      "step, rank and module) or skips that step.")
    imbalance_warn: float = Field(0.15, gt=0.0, le=1.0, description="Warn when ranks' memory differs by more "
                                                                  "than this share of the largest.")
    grad_flow_every: int = Field(0, ge=0, description="Besides steps 1-2, check every N steps that each LoRA "
                                                      "tensor gets a finite, non-zero gradient; 0 = steps 1-2 only.")
    watchdog_s: float | None = Field(600.0, gt=0, description="A step that takes longer than this (a hung rank "
                                                              "or collective) dumps every thread's stack and exits; "
                                                              "null = off.")
    count_comm: bool = Field(True, description="With several processes, count each step's collectives (bytes, "
                                               "calls, time) into metrics.jsonl; false = do not hook torch's "
                                               "collectives at all.")
    sample_prompt: str | None = Field(None, description="Prompt to generate from at the end of training "
                                                        "(default: the first training example's prompt).")
    sample_tokens: int = Field(40, ge=0, le=4096, description="Tokens to generate for the end-of-run sample; 0 = "
                                                              "no sample.")


class DistributedSection(Section):
    engine: Literal["none", "ddp", "deepspeed", "fsdp2"] = Field("none", description="How work is spread over "
                                                                                     "processes.")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="DeepSpeed: optimizer state on CPU.")
    offload_params: Literal["none", "cpu"] = Field("none", description="DeepSpeed stage 3: parameters on CPU.")
    deepspeed_config: str | None = Field(None, description="Your own DeepSpeed JSON; qshard fills 'auto' values.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free each decoder layer's gathered weights after "
                                                          "forward (the root's stay gathered for backward).")
    fsdp_cpu_offload: bool = Field(False, description="FSDP2: keep sharded parameters on CPU.")
    shard_on_load: bool = Field(True, description="ZeRO-3 / FSDP2: no rank holds the whole base while loading "
                                                  "(not with DoRA); false loads it whole first.")


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.distributed.offload_params == "cpu" and not (self.distributed.engine == "deepspeed"
                                                            and self.distributed.zero_stage == 3):
            raise ValueError("distributed.offload_params: cpu needs engine: deepspeed with zero_stage: 3")
        return self


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides, validate. Every problem is a QShardError."""
    path = Path(path)
    if not path.is_file():
        raise QShardError(f"recipe not found: {path}", where=str(path), fix="check the path to the YAML recipe")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QShardError(f"recipe is not valid YAML: {e}", where=str(path)) from None
    if not isinstance(raw, dict):
        raise QShardError("recipe must be a mapping of sections", where=str(path),
                          fix="start the file with sections such as `model:` and `data:`")
    for item in overrides:
        _apply_override(raw, item)
    return parse_recipe(raw, source=str(path))


def parse_recipe(raw: dict, source: str = "recipe") -> Recipe:
    _check_known_keys(raw, Recipe, prefix="", source=source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise _to_qshard_error(e, source) from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise QShardError(f"bad override {item!r}", where="--set", fix="write it as section.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise QShardError(f"cannot set {key}: {part} is not a section", where=f"--set {item}")
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise QShardError(f"cannot parse the value of {key}: {e}", where=f"--set {item}",
                          fix="quote strings and close brackets, e.g. --set lora.target_modules=[q_proj,v_proj]")


def _check_known_keys(raw: Any, model: type[BaseModel], prefix: str, source: str) -> None:
    """Unknown keys, with a suggestion from the known ones (pydantic's own message has none)."""
    if not isinstance(raw, dict):
        return
    known = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(known)}"
            raise QShardError(f"unknown recipe key {dotted!r}", where=f"{source}: {dotted}", fix=hint)
        annotation = known[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_known_keys(value, annotation, prefix=f"{dotted}.", source=source)


def _to_qshard_error(e: ValidationError, source: str) -> QShardError:
    problems = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "list[")))
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{loc or 'recipe'}: {err['msg']}{shown}")
    first_loc = problems[0].split(":")[0]
    return QShardError("invalid recipe:\n  - " + "\n  - ".join(problems), where=f"{source}: {first_loc}",
                       fix="change the value(s) named above; `qshard train --help` lists the options")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written into every run folder)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
