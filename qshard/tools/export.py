"""`qshard export RUN_DIR OUT_DIR`: merge a run's adapter into its base and write a Hugging Face model folder.

The order of work:
1. everything that can be wrong with the inputs is checked, no weight read: the run (or checkpoint)
   folder, its recipe and adapter, the base's files against its config.json, the adapter's shapes
   against the base, a --merge-into checkpoint against the base, and OUT_DIR (a fresh folder, or one
   an earlier export wrote: only that is ever replaced);
2. the base is streamed one unit at a time (qshard/tools/merge.py): read, brought to the values
   training saw, merged, written to its safetensors shard, freed;
3. the check: the exported folder, loaded by transformers in float32, against qshard's own base +
   adapter on a few fixed prompts;
4. the staging folder (a hidden sibling of OUT_DIR) is renamed into place. A crash before that leaves
   only the hidden staging folder, never a half folder that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qshard.errors import QShardError
from qshard.model import folder
from qshard.model.load import QuantSpec
from qshard.tools import merge

MARKER = ".qshard-export.json"
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPTS = ("The capital of France is", "Quantization stores weights in fewer bits, so",
           "def add(a, b):\n    return")


@dataclass
class Source:
    """What an export reads: the run (or checkpoint) folder, its recipe, and its adapter folder."""

    folder: Path
    recipe: object
    adapter_dir: Path
    base_path: str  # the base as found from here (recipe.yaml's model.path may be relative to where it ran)


@dataclass
class Result:
    out_dir: Path
    files: list[str] = field(default_factory=list)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> figures (see _merge_one)
    check: dict | None = None  # max_abs_diff, tolerance, passed ... (None with --no-check)


def export(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", merge_into: str | None = None,
           overwrite: bool = False, check: bool = True, max_shard_bytes: int = 5 * 10**9, log=print) -> Result:
    """The whole command; returns what was written and the check's figures."""
    source = find_source(Path(run_dir).expanduser())
    recipe = source.recipe
    base = merge.open_trained_base(source.base_path, recipe.model.dtype, run_quant_spec(recipe))
    adapter = merge.read_adapter(source.adapter_dir)
    merge.check_adapter_fits(adapter, base.skeleton, set(base.shapes()), base.model_dir)
    original = open_original(merge_into, base) if merge_into else None
    out = Path(out_dir).expanduser()
    check_out_location(out, source, base.model_dir, original.model_dir if original else None)
    check_out_dir(out, overwrite)

    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    stage.mkdir()
    try:
        result = Result(out)
        result.files, result.layers = write_model(stage, base, original, adapter, OUT_DTYPES[dtype],
                                                  max_shard_bytes, log)
        log(format_stats(result.layers, merge_into is not None))
        if check:
            result.check = check_merge(stage, source, adapter, original, OUT_DTYPES[dtype], log)
            if not result.check["passed"]:
                return result  # the staging folder is removed below; nothing of OUT_DIR was touched
        write_marker(stage, source, dtype, merge_into, result)
        move_into_place(stage, out)
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage)


# -- the inputs --------------------------------------------------------------------------------------

def find_source(path: Path) -> Source:
    """A finished run folder (adapter/ + recipe.yaml), or one of its checkpoint-N folders."""
    from qshard.config import load_recipe
    from qshard.state import checkpoint

    if not path.is_dir():
        raise QShardError(f"{path} is not a folder", where="RUN_DIR",
                          fix="give the run's folder (train.output_dir of its recipe)")
    adapter_dir = path / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        ckpts = [c for c in checkpoint.list_checkpoints(path) if (c / "adapter" / "adapter_config.json").is_file()]
        hint = (f"the run did not finish; export its newest checkpoint: qshard export {ckpts[-1]} OUT_DIR"
                if ckpts else "finish the run (qshard train RECIPE --resume auto) or point at a run folder")
        raise QShardError(f"{path} holds no finished adapter (adapter/adapter_config.json and "
                          "adapter_model.safetensors)", where=str(adapter_dir), fix=hint)
    if checkpoint.NAME.fullmatch(path.name):
        try:
            checkpoint.verify(path)  # every file as the save wrote it (sizes, sha256, contents)
        except checkpoint.CheckpointInvalid as e:
            raise QShardError(f"{path} is not an intact checkpoint: {e}", where=str(path),
                              fix="export the finished run folder, or another checkpoint-N of it") from None
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file():
        raise QShardError(f"{path} has an adapter but no recipe.yaml, so its base and quantization are unknown",
                          where=str(recipe_file), fix="point at a folder qshard train wrote (run or checkpoint-N)")
    recipe = load_recipe(recipe_file)
    return Source(path, recipe, adapter_dir, base_path(recipe.model.path, adapter_dir))


def base_path(recipe_path: str, adapter_dir: Path) -> str:
    """recipe.yaml's model.path where it exists from here (or is a hub id), else the absolute path the
    finished adapter records (adapter_config.json's base_model_name_or_path): a relative model.path
    names a folder relative to where training ran."""
    if Path(recipe_path).expanduser().exists() or not _looks_local(recipe_path):
        return recipe_path
    recorded = folder.read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if isinstance(recorded, str) and Path(recorded).is_absolute() and Path(recorded).is_dir():
        return recorded
    raise QShardError(f"the run's base {recipe_path!r} (recipe.yaml model.path) is not found from {Path.cwd()}",
                      where=f"{adapter_dir.parent / 'recipe.yaml'}: model.path",
                      fix="run qshard export from the folder the run was started in, or give model.path as an "
                          "absolute path in recipe.yaml")


def _looks_local(path: str) -> bool:
    """A path rather than a hub id (`org/name`)."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1


def run_quant_spec(recipe) -> QuantSpec:
    """The QuantSpec the run's loader used. The compute dtype does not change stored values: fp32."""
    from qshard.precision import Precision
    from qshard.validate import quant_spec

    return quant_spec(recipe, Precision("fp32", torch.device("cpu")))


def open_original(path: str, base: merge.Base) -> merge.Base:
    """A full-precision checkpoint to merge into instead of the dequantized base: every tensor the base
    has, with the same shape."""
    try:
        original = merge.open_trained_base(path, "float32", QuantSpec("none"))
    except QShardError as e:  # the loader names model.path; here the path came from --merge-into
        raise QShardError(e.what, where=f"--merge-into {path} ({e.where})", fix=e.fix) from None
    ours, theirs = base.shapes(), original.shapes()
    for name, (_, shape) in ours.items():
        if name not in theirs or theirs[name][1] != shape:
            got = f"shape {theirs[name][1]}" if name in theirs else "no such tensor"
            raise QShardError(f"--merge-into {path} does not match the run's base: {name} is {shape} in the base "
                              f"({base.model_dir}) but {got} there", where=f"--merge-into {path}",
                              fix="give the original full-precision checkpoint the quantized base was made from")
    return original


def check_out_location(out: Path, source: Source, base_dir: Path, original_dir: Path | None) -> None:
    """OUT_DIR is none of the inputs, lies inside none of them (adapter, base, --merge-into), and holds none."""
    target = _real(out)
    if target == _real(source.folder) or target in _real(source.folder).parents:
        raise QShardError(f"OUT_DIR {out} is or contains the run folder {source.folder}", where="OUT_DIR",
                          fix="export to a new folder of its own, e.g. merged/my-model")
    inputs = {"the run's adapter folder": source.adapter_dir, "the base model folder": base_dir}
    if original_dir is not None:
        inputs["the --merge-into checkpoint"] = original_dir
    for what, path in inputs.items():
        real = _real(path)
        if target == real or real in target.parents or target in real.parents:
            relation = "is" if target == real else ("lies inside" if real in target.parents else "contains")
            raise QShardError(f"OUT_DIR {out} {relation} {what} ({path})", where="OUT_DIR",
                              fix="export to a new folder of its own, e.g. merged/my-model")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """A missing or empty folder; or, with --overwrite, a folder an earlier export wrote (its marker
    lists every entry, none a link)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise QShardError(f"{out} exists and is not a folder", where="OUT_DIR", fix="choose another OUT_DIR")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise QShardError(f"OUT_DIR {out} is not empty", where="OUT_DIR",
                          fix="choose a new folder, or pass --overwrite to replace an earlier export there")
    why = not_an_export(out)
    if why:
        raise QShardError(f"--overwrite replaces only a folder qshard export wrote, and {out} {why}",
                          where="OUT_DIR", fix="choose another OUT_DIR; qshard deletes nothing it did not write")


def not_an_export(out: Path) -> str | None:
    entries = list(out.iterdir())
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        shown = ", ".join(sorted(p.name for p in entries)[:5])
        return f"has no readable {MARKER} (it holds {shown})"
    odd = sorted(p.name for p in entries if p.is_symlink() or p.name not in listed or not p.is_file())
    if odd:
        return f"holds entries the export did not write: {', '.join(odd[:5])}"
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


# -- writing -----------------------------------------------------------------------------------------

def write_model(stage: Path, base: merge.Base, original: merge.Base | None, adapter: merge.Adapter,
                dtype: torch.dtype, max_shard_bytes: int, log) -> tuple[list[str], dict]:
    """Weights (streamed), config.json, generation_config.json and the tokenizer into `stage`."""
    from tqdm import tqdm

    from qshard.model.load import release_freed_memory

    source = original or base
    plan = {name: (dtype if stored.is_floating_point else stored, shape)
            for name, (stored, shape) in source.shapes().items()}
    writer = merge.ShardWriter(stage, plan, max_shard_bytes)
    log(f"merging {len(adapter.modules)} adapted layers into {source.model_dir} -> {len(writer.shards)} "
        f"shard(s), {writer.total / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')}")
    stats = {}
    try:
        for unit in tqdm(source.units, unit="tensor", desc="export", dynamic_ncols=True):
            stats |= _write_unit(unit, writer, plan, base if original else None, adapter)
            release_freed_memory()  # the unit's temporaries (else glibc keeps them; see load.py)
        writer.finish()
    finally:
        writer.close()
    files = writer.files() + write_config(stage, source.model_dir, dtype)
    return files + write_tokenizer(stage, adapter, base), stats


def _write_unit(unit: merge.Unit, writer: merge.ShardWriter, plan: dict, quantized: merge.Base | None,
                adapter: merge.Adapter) -> dict:
    stats = {}
    for name, tensor in unit.load().items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in adapter.modules:
            tensor, stats[module] = _merge_one(module, tensor, quantized, adapter)
        writer.write(name, tensor.to(plan[name][0]))
    return stats


def _merge_one(module: str, weight: torch.Tensor, quantized: merge.Base | None, adapter: merge.Adapter):
    """The merged weight and its figures: ||delta|| / ||W||, and with --merge-into ||W_orig - W_deq|| / ||delta||."""
    t = adapter.modules[module]
    delta = merge.lora_delta(t, adapter.scaling)
    figures = {"delta_rel": merge.relative(delta, weight)}
    if quantized is not None:
        figures["quant_gap_rel"] = merge.relative(weight.float() - quantized.tensor(f"{module}.weight").float(), delta)
    return merge.merged_weight(weight, t, delta), figures


def write_config(stage: Path, model_dir: Path, dtype: torch.dtype) -> list[str]:
    """config.json without quantization_config, its dtype the output's; generation_config.json copied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # checked by open_base already
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(stage)
    written = ["config.json"]
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        (stage / generation.name).write_text(json.dumps(folder.read_json(generation), indent=2) + "\n")
        written.append(generation.name)
    return written


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def write_tokenizer(stage: Path, adapter: merge.Adapter, base: merge.Base) -> list[str]:
    """The run's tokenizer files (beside its adapter; else the base's) copied as they are, then read back
    the way qshard reads any model folder's tokenizer (no custom code, every id has an embedding row)."""
    from qshard.model.load import load_tokenizer

    source = adapter.folder if (adapter.folder / "tokenizer_config.json").is_file() else base.model_dir
    copied = [name for name in TOKENIZER_FILES if (source / name).exists() or (source / name).is_symlink()]
    for name in copied:
        folder.check_file(source / name, folder.allowed_roots(source))  # a hub snapshot's links to its blobs only
        shutil.copyfile(source / name, stage / name)
    load_tokenizer(stage)  # config.json is already there
    return copied


def write_marker(stage: Path, source: Source, dtype: str, merge_into: str | None, result: Result) -> None:
    from qshard.state.checkpoint import write_json

    write_json(stage / MARKER, {"format": 1, "source": str(source.folder.resolve()), "dtype": dtype,
                                "merge_into": merge_into, "files": sorted(set(result.files)),
                                "check": result.check, "layers": result.layers})


def move_into_place(stage: Path, out: Path) -> None:
    """Rename the finished staging folder to OUT_DIR; an earlier export there (checked) is moved aside
    first and deleted only once the new one is in place."""
    old = None
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    elif out.exists():
        out.rmdir()
    os.rename(stage, out)
    if old is not None:
        shutil.rmtree(old)


def format_stats(layers: dict[str, dict[str, float]], merge_into: bool) -> str:
    """Median and max of ||delta|| / ||W_base|| (and, with --merge-into, ||W_orig - W_deq|| / ||delta||)."""
    if not layers:
        return "no layer merged"
    lines = [f"merged {len(layers)} layers:"]
    keys = [("delta_rel", "||LoRA delta|| / ||W_base||")]
    if merge_into:
        keys.append(("quant_gap_rel", "||W_original - W_dequantized|| / ||LoRA delta||"))
    for key, label in keys:
        values = {m: f[key] for m, f in layers.items()}
        top = max(values, key=values.get)
        lines.append(f"  {label}: median {statistics.median(values.values()):.3g}, max {values[top]:.3g} ({top})")
    if merge_into:
        lines.append("  (a gap near or above 1: the original differs from the weights training saw by as much as the "
                     "adapter changed them, so merging into it may undo part of the fine-tuning; the per-layer "
                     f"figures are in {MARKER})")
    return "\n".join(lines)


# -- the check ---------------------------------------------------------------------------------------

def tolerance(dtype: torch.dtype, num_layers: int) -> float:
    """Largest |logit difference| / max |reference logit| the check accepts.

    The exported model is the reference's weights with the LoRA product folded in and each weight
    rounded once to the output dtype (relative error <= u: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32). Rounding
    errors are independent, so a layer's output errs by about u relative, and the errors of the
    ~sqrt(layers + 1) matmuls on the residual path add in quadrature; the maximum over all logits of a
    few prompts is within ~8 standard deviations. fp32 gets a floor of 1e-4: float32 sums in another
    order (W + sBA vs Wx + sB(Ax), bitsandbytes' kernels vs a dense matmul)."""
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    return max(1e-4, 8 * u * math.sqrt(num_layers + 1))


@torch.no_grad()
def check_merge(stage: Path, source: Source, adapter: merge.Adapter, original: merge.Base | None, dtype: torch.dtype,
                log) -> dict:
    """Logits of the exported folder (transformers, float32) against qshard's base + adapter, in float32."""
    from transformers import AutoModelForCausalLM

    from qshard.model.load import load_tokenizer

    tokenizer = load_tokenizer(stage)
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS]
    exported = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32, trust_remote_code=False).eval()
    got = [exported(input_ids=ids).logits for ids in prompts]
    layers = exported.config.get_text_config().num_hidden_layers
    del exported
    reference = reference_model(source, adapter, original)
    figures = {}
    if dense_int8_twins(reference, measure_first=lambda: _max_diff(reference, prompts, got)[0], out=figures):
        log(f"note: LLM.int8()'s forward also quantizes activations, which no dense model does: the run's own "
            f"int8 forward differs from the export by up to {figures['int8_forward_gap']:.3g}; the check compares "
            "with the int8 weights dequantized")
    worst, scale = _max_diff(reference, prompts, got)
    rel_tol = tolerance(dtype, layers)
    figures |= {"max_abs_diff": worst, "max_abs_logit": scale, "tolerance": rel_tol * scale,
                "relative_tolerance": rel_tol, "passed": worst <= rel_tol * scale, "prompts": len(PROMPTS)}
    verdict = "passed" if figures["passed"] else "FAILED"
    log(f"check {verdict}: max |logit difference| {worst:.3g} vs tolerance {rel_tol * scale:.3g} "
        f"({rel_tol:.2g} x max |logit| {scale:.3g}; {str(dtype).removeprefix('torch.')} output) on {len(PROMPTS)} prompts")
    return figures


def _max_diff(reference, prompts: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """max |reference - got| and max |reference| over every logit of every prompt."""
    worst, scale = 0.0, 0.0
    for ids, logits in zip(prompts, got):
        want = reference(input_ids=ids).logits
        worst, scale = max(worst, float((want - logits).abs().max())), max(scale, float(want.abs().max()))
    return worst, scale


def dense_int8_twins(model, measure_first, out: dict) -> bool:
    """Replace every int8 base layer by a dense float32 linear of its dequantized weight (the weight training
    saw), after `measure_first()` recorded the int8 forward's gap in out['int8_forward_gap']."""
    from torch import nn

    from qshard.quant.bnb8bit import Linear8bit

    parents = [(m, name, c) for m in model.modules() for name, c in m.named_children() if isinstance(c, Linear8bit)]
    if not parents:
        return False
    out["int8_forward_gap"] = measure_first()
    for parent, name, layer in parents:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight.data = layer.dequantize().float()
        if layer.bias is not None:
            dense.bias.data = layer.bias.float()
        setattr(parent, name, dense.requires_grad_(False))
    return True


def reference_model(source: Source, adapter: merge.Adapter, original: merge.Base | None):
    """The run's base loaded as training loaded it (or the --merge-into checkpoint), dense tensors in
    float32, with the adapter attached by qshard and its trained tensors loaded."""
    from qshard.engines.base import load_adapter_into
    from qshard.model.load import QUANT_LAYERS, load_model
    from qshard.model.lora import attach_lora

    quiet = lambda *_: None  # noqa: E731  (the export already said what the loader would)
    if original is not None:
        base = load_model(str(original.model_dir), dtype="float32", quant=QuantSpec("none"), log=quiet)
    else:
        recipe = source.recipe
        base = load_model(source.base_path, dtype=recipe.model.dtype, quant=run_quant_spec(recipe), log=quiet)
    base.float()  # floating tensors only: quantized storage is integer and keeps the values training saw
    for module in base.modules():
        if isinstance(module, QUANT_LAYERS):
            module.compute_dtype = torch.float32
    model = attach_lora(base, r=adapter.r, alpha=adapter.alpha, dropout=0.0, targets=adapter.targets,
                        use_dora=adapter.use_dora, seed=0)
    load_adapter_into(model, adapter.file_state(), lambda param, full: full)
    for module in model.modules():  # the adapter's own scaling (rsLoRA: alpha / sqrt(r))
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] = adapter.scaling
    return model.eval()
