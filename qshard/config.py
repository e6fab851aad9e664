"""The recipe: every option, its default and its limits, parsed once at the edge.

A recipe is YAML with sections `model`, `quantization`, `lora`, `data`, `train`, `distributed`.
`--set a.b=value` overrides any key (the value is parsed as YAML: `--set train.max_steps=50`).
Unknown keys are errors with a "did you mean"; no validator silently rewrites a value.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from qshard.errors import QShardError

DType = Literal["auto", "bfloat16", "float16", "float32"]
MAX_RECIPE_BYTES = 1 << 20      # a recipe is a page of YAML; anything larger is not one
MAX_YAML_NODES = 100_000        # after expanding aliases (an alias bomb expands to billions)

# Paths: `~` expanded, surrounding blanks refused, never empty.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
PathText = Annotated[Name, AfterValidator(os.path.expanduser)]


class Section(BaseModel):
    # strict: YAML already gives typed values, so `r: true` or `max_steps: "5"` is a mistake, not a 1 or a 5
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class ModelSection(Section):
    path: PathText = Field(description="Local Hugging Face causal-LM folder (config.json + safetensors) or a hub id.")
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
    skip_modules: list[Name] = Field(["lm_head"], description="Linear layers kept dense (by name suffix).")


class LoraSection(Section):
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A "
                                                 "(alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], Annotated[list[Name], Field(min_length=1)]] = Field(
        "all-linear", description="Module names (suffixes such as q_proj) to adapt; all-linear = every linear "
                                  "layer except the output head.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale the update by alpha / sqrt(r) "
                                                "instead of alpha / r (PEFT's use_rslora).")


class DataSection(Section):
    path: PathText = Field(description="Training data: a .json list or .jsonl file.")
    format: Literal["auto", "alpaca", "chat", "text"] = Field("auto", description="Row format; auto detects it "
                                                                                  "from the first row.")
    text_field: Name = Field("text", description="Field holding the text, for format: text.")
    template: Literal["auto", "tokenizer", "fallback"] = Field(
        "auto", description="Chat rendering: the tokenizer's chat template, or qshard's documented fallback; "
                            "auto = the tokenizer's if it has one.")
    max_length: int = Field(1024, ge=1, le=1_048_576, description="Longest sequence in tokens; longer ones are "
                                                                  "truncated (and counted).")
    packing: bool = Field(False, description="Concatenate whole examples into sequences of up to max_length.")
    eval_path: PathText | None = Field(None, description="Separate evaluation file (same format).")
    eval_fraction: float = Field(0.0, ge=0.0, le=0.5, description="Share of the training rows held out for "
                                                                  "evaluation when eval_path is not given.")


class TrainSection(Section):
    output_dir: PathText = Field("runs/qshard", description="Run folder: adapter, checkpoints, metrics, recipe.")
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
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds adapter init, dropout and the data order.")
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
    trim_heap: bool = Field(True, description="On CPU, return freed heap memory to the OS after each optimizer "
                                              "step (glibc malloc_trim): lower peak memory for a few tens of ms a "
                                              "step; false keeps glibc's default.")
    count_comm: bool = Field(True, description="With several processes, count each step's collectives (bytes, "
                                               "calls, time) into metrics.jsonl; false = do not hook torch's "
                                               "collectives at all.")
    sample_prompt: Name | None = Field(None, description="Prompt to generate from at the end of training "
                                                        "(default: the first training example's prompt).")
    sample_tokens: int = Field(40, ge=0, le=4096, description="Tokens to generate for the end-of-run sample; 0 = "
                                                              "no sample.")


class DistributedSection(Section):
    engine: Literal["none", "ddp", "deepspeed", "fsdp2"] = Field("none", description="How work is spread over "
                                                                                     "processes.")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="DeepSpeed: optimizer state on CPU.")
    offload_params: Literal["none", "cpu"] = Field("none", description="DeepSpeed stage 3: parameters on CPU.")
    deepspeed_config: PathText | None = Field(None, description="Your own DeepSpeed JSON; qshard fills 'auto' values.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free each decoder layer's gathered weights after "
                                                          "forward (the root's stay gathered for backward).")
    fsdp_cpu_offload: bool = Field(False, description="FSDP2: keep sharded parameters on CPU.")
    shard_on_load: bool = Field(True, description="ZeRO-3 / FSDP2: no rank holds the whole base while loading "
                                                  "(not with DoRA); false loads it whole first.")
    vocab_parallel: bool = Field(True, description="ZeRO-3 / FSDP2: each rank keeps only its rows of the input "
                                                   "embedding and the head and the ranks exchange activations, "
                                                   "so neither is ever gathered whole; false lets the engine "
                                                   "gather them like a layer.")


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        problems = [why for why in _conflicts(self)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _conflicts(r: Recipe) -> list[str]:
    """Options that contradict each other or do nothing with the rest of the recipe (an option that is
    silently ignored is a mistake the user cannot see). Engine-dependent options are checked by
    qshard.validate, which also knows a user's DeepSpeed JSON."""
    t, d, q = r.train, r.data, r.quantization
    out = []
    if t.eval_every and not d.eval_path and not d.eval_fraction:
        out.append("train.eval_every needs evaluation data: set data.eval_path or data.eval_fraction")
    if d.eval_path and d.eval_fraction:
        out.append("data.eval_fraction is ignored when data.eval_path is given: set only one")
    if t.max_steps is not None and t.epochs != 1:
        out.append("train.epochs is ignored when train.max_steps is set: set only one")
    if t.max_steps is not None and t.warmup_steps > t.max_steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) exceeds train.max_steps ({t.max_steps})")
    if t.sample_prompt is not None and t.sample_tokens == 0:
        out.append("train.sample_prompt is set but train.sample_tokens is 0 (no sample is generated)")
    if not q.double_quant and q.method not in ("nf4", "fp4"):
        out.append(f"quantization.double_quant applies to nf4/fp4, not to method {q.method}")
    if q.int8_threshold != 6.0 and q.method != "int8":
        out.append(f"quantization.int8_threshold applies to int8, not to method {q.method}")
    if q.compute_dtype != "auto" and q.method not in ("nf4", "fp4"):
        out.append(f"quantization.compute_dtype applies to nf4/fp4, not to method {q.method}")
    if q.skip_modules != ["lm_head"] and q.method in ("none", "checkpoint"):
        out.append(f"quantization.skip_modules has no effect with method {q.method}")
    return out + _engine_conflicts(d_=r.distributed)


def _engine_conflicts(d_: "DistributedSection") -> list[str]:
    """Engine options set (to a non-default value) for an engine that does not read them."""
    defaults, out = DistributedSection.model_fields, []
    only = {"zero_stage": "deepspeed", "offload_optimizer": "deepspeed", "offload_params": "deepspeed",
            "deepspeed_config": "deepspeed", "reshard_after_forward": "fsdp2", "fsdp_cpu_offload": "fsdp2"}
    for key, engine in only.items():
        if getattr(d_, key) != defaults[key].default and d_.engine != engine:
            out.append(f"distributed.{key} applies to engine {engine}, not {d_.engine}")
    if d_.engine == "deepspeed" and d_.deepspeed_config:
        # the JSON decides stage and offloads; recipe values beside it would be silently overridden
        out += [f"distributed.{key} is decided by distributed.deepspeed_config (its zero_optimization); remove it"
                for key in ("zero_stage", "offload_optimizer", "offload_params")
                if getattr(d_, key) != defaults[key].default]
    elif d_.offload_params == "cpu" and d_.engine == "deepspeed" and d_.zero_stage != 3:
        out.append("distributed.offload_params: cpu needs engine: deepspeed with zero_stage: 3")
    for key in ("shard_on_load", "vocab_parallel"):
        if not getattr(d_, key) and d_.engine in ("none", "ddp"):
            out.append(f"distributed.{key} applies to ZeRO-3 and FSDP2, not {d_.engine}")
    return out


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides, validate. Every problem is a QShardError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QShardError(f"recipe not found: {path}", where=str(path), fix="check the path to the YAML recipe")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise QShardError(f"recipe is {path.stat().st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}",
                              where=str(path), fix="point at the YAML recipe, not a data or model file")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QShardError(f"cannot read the recipe: {e}", where=str(path),
                          fix="give a readable UTF-8 YAML file") from None
    raw = read_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise QShardError("recipe must be a mapping of sections", where=str(path),
                          fix="start the file with sections such as `model:` and `data:`")
    for item in overrides:
        _apply_override(raw, item)
    return parse_recipe(raw, source=str(path))


def read_yaml(text: str, source: str) -> Any:
    """safe_load, refusing documents whose aliases expand past MAX_YAML_NODES (a "billion laughs"
    recipe is small on disk and exhausts memory once validated)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise QShardError(f"the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases",
                              where=source, fix="write the values out; a recipe needs no anchors or aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise QShardError(f"recipe is not valid YAML: {e}", where=source) from None
    except RecursionError:
        raise QShardError("the YAML is nested too deeply", where=source) from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    """Values in the document once every alias is expanded (memoised on the shared nodes)."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = 1  # a recursive alias counts once while it is being measured
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    seen[id(node)] = size
    return size


def parse_recipe(raw: dict, source: str = "recipe") -> Recipe:
    return parse_section(Recipe, raw, source)


def parse_section(model: type[BaseModel], raw: dict, source: str):
    """`raw` validated as `model` (a recipe, or another qshard YAML file); unknown keys named, with a suggestion."""
    _check_known_keys(raw, model, prefix="", source=source)
    try:
        return model.model_validate(raw)
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
        node[leaf] = read_yaml(value, f"--set {item}") if value.strip() else None
    except QShardError as e:
        raise QShardError(f"cannot parse the value of {key}: {e.what}", where=f"--set {item}",
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
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "list[", "constrained-str")))
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {got!r})"
        message = err["msg"].removeprefix("Value error, ")
        if loc:
            problems.append(f"{loc}: {message}{shown}")
        else:  # the recipe-wide checks (_conflicts): each message starts with the option it names
            problems += message.split("; ")
    first_option = problems[0].split(":")[0].split(" ")[0]
    return QShardError("invalid recipe:\n  - " + "\n  - ".join(problems), where=f"{source}: {first_option}",
                       fix="change the value(s) named above; `qshard train --help` lists the options")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written into every run folder)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
