"""`qshard export RUN_DIR OUT_DIR`: merge a run's adapter into its base and write a Hugging Face model folder.

The order of work:
1. everything that can be wrong with the inputs is checked, no weight read: the run (or checkpoint)
   folder, its recipe and adapter, the base's files against its config.json, the adapter's shapes
   against the base, a --merge-into checkpoint against the base, and OUT_DIR (a fresh folder, or one
   an earlier export wrote: only that is ever replaced);
2. the base is streamed one unit at a time (qshard/tools/merge.py): read, brought to the values
   training saw, merged, (--format nf4: quantized again by bitsandbytes; --format checkpoint: a GPTQ /
   AWQ / compressed-tensors layer re-quantized onto its own scales and zero points,) written to its
   safetensors shard, freed;
3. the check: the exported folder, loaded by transformers in float32 (format checkpoint: by qshard's own
   reader), against qshard's own base + adapter on a few fixed prompts (nf4, checkpoint: with the merged
   weights quantized and dequantized the same way);
4. the staging folder (a hidden sibling of OUT_DIR) is renamed into place. A crash before that leaves
   only the hidden staging folder, never a half folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qshard.errors import QShardError
from qshard.model import experts, folder
from qshard.model.load import QuantSpec
from qshard.state.rundir import check_not_protected, real_path
from qshard.tools import merge
from qshard.tools.exportcheck import check_merge

MARKER = ".qshard-export.json"
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUT_FORMATS = ("dense", "nf4", "checkpoint")


@dataclass
class Source:
    """What an export reads: the run (or checkpoint) folder, its recipe, and its adapter folder."""

    folder: Path
    recipe: object
    adapter_dir: Path
    base_path: str  # the base as found from here (recipe.yaml's model.path may be relative to where it ran)


@dataclass
class Output:
    """What the folder holds: every tensor in `dtype`; or (format nf4) the `nf4` linears quantized by
    bitsandbytes as transformers' load_in_4bit saves them, the rest in `dtype` (also the compute dtype); or
    (format checkpoint) the `own` linears as the base checkpoint stores them, merged codes on its own scales
    and zero points, the rest in `dtype`, config.json's quantization_config kept."""

    format: str
    dtype: torch.dtype
    nf4: set[str] = field(default_factory=set)  # module names written as NF4
    double_quant: bool = True  # as the run's quantization.double_quant (qshard's NF4 default: on)
    dense_linears: list[str] = field(default_factory=list)  # llm_int8_skip_modules for transformers
    own: set[str] = field(default_factory=set)  # module names written in the base checkpoint's own PTQ format


@dataclass
class Result:
    out_dir: Path
    files: list[str] = field(default_factory=list)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> figures (see _merge_one)
    check: dict | None = None  # max_abs_diff, tolerance, passed ... (None with --no-check)


def export(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", format: str = "dense",
           merge_into: str | None = None, overwrite: bool = False, check: bool = True,
           max_shard_bytes: int = 5 * 10**9, log=print) -> Result:
    """The whole command; returns what was written and the check's figures."""
    check_format(format, merge_into)
    source = find_source(Path(run_dir).expanduser())
    recipe = source.recipe
    quant = merge.run_quant_spec(recipe)
    base = merge.open_trained_base(source.base_path, recipe.model.dtype, quant)
    output = plan_output(format, OUT_DTYPES[dtype], base, quant)
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
        result.files, result.layers = write_model(stage, base, original, adapter, output, max_shard_bytes, log)
        log(format_stats(result.layers, merge_into is not None))
        if check:
            result.check = check_merge(stage, source, adapter, original, output, log)
            if not result.check["passed"]:
                return result  # the staging folder is removed below; nothing of OUT_DIR was touched
        write_marker(stage, source, dtype, format, merge_into, result)
        move_into_place(stage, out)
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage)


# -- the inputs --------------------------------------------------------------------------------------

def check_format(format: str, merge_into: str | None = None) -> None:
    if format not in OUT_FORMATS:
        raise QShardError(f"export format {format!r} is not supported", where="--format",
                          fix=f"use one of: {', '.join(OUT_FORMATS)} (dense: merged weights in --dtype; nf4: the "
                              "base's quantized linears re-quantized by bitsandbytes, loadable with transformers; "
                              "checkpoint: a GPTQ / AWQ / compressed-tensors base's own format, on its own scales)")
    if format == "checkpoint" and merge_into:
        raise QShardError("--format checkpoint re-quantizes onto the base checkpoint's own scales, which were "
                          "fitted to the base, not to a --merge-into checkpoint", where="--merge-into",
                          fix="export --format dense --merge-into PATH, then quantize that with qshard quantize")


def plan_output(format: str, dtype: torch.dtype, base: merge.Base, quant: QuantSpec) -> Output:
    """Which linears an nf4 export quantizes: those the run's base quantized (merge.nf4_modules). Any
    --dtype is accepted: it is the dtype of the dense tensors and of the 4-bit matmul, and bitsandbytes
    computes in float32 as well as in bf16/fp16 (the 4-bit weights are the same size either way)."""
    if format == "dense":
        return Output(format, dtype)
    if format == "checkpoint":
        return Output(format, dtype, own=own_format_modules(base, quant))
    nf4 = merge.nf4_modules(base.skeleton, quant.skip_modules)
    return Output(format, dtype, set(nf4), quant.double_quant, merge.dense_linears(base.skeleton, nf4))


def own_format_modules(base: merge.Base, quant: QuantSpec) -> set[str]:
    """The linears a --format checkpoint export writes in the base's own format: every packed layer of a GPTQ /
    AWQ / compressed-tensors base that the run trained on as it is (quantization.method checkpoint)."""
    fmt = base.format
    name = fmt.name if fmt else "dense"
    if name not in ("gptq", "awq", "compressed-tensors") or quant.method != "checkpoint":
        how = (f"its base {base.model_dir} is {name}" if quant.method == "checkpoint" or fmt is None
               else f"it converted its {name} base to {quant.method}")
        fix = ("use --format nf4 (the run's 4-bit base, written as bitsandbytes stores it)"
               if "nf4" in (name, quant.method) or "fp4" in (name, quant.method)
               else "use --format dense; for a GPTQ / compressed-tensors model, quantize the dense export with qshard "
                    "quantize")
        raise QShardError(f"--format checkpoint writes a GPTQ, AWQ or compressed-tensors base trained with "
                          f"quantization.method checkpoint, and {how}", where="--format", fix=fix)
    if base.packed_experts:
        raise QShardError("this MoE base packs its experts per expert, and qshard reads them decompressed, so it "
                          "cannot write them back in the checkpoint's own format", where="--format",
                          fix="use --format dense, then qshard quantize the export")
    return {unit.packed.module for unit in base.units if unit.packed is not None}


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
    """OUT_DIR is no protected folder and none of the inputs, lies inside none of them (adapter, base,
    --merge-into), and holds none."""
    check_not_protected(out, "OUT_DIR", "an export writes (and --overwrite replaces) a folder of its own",
                        fix="export to a new folder of its own, e.g. merged/my-model")
    target = real_path(out)
    if target == real_path(source.folder) or target in real_path(source.folder).parents:
        raise QShardError(f"OUT_DIR {out} is or contains the run folder {source.folder}", where="OUT_DIR",
                          fix="export to a new folder of its own, e.g. merged/my-model")
    inputs = {"the run's adapter folder": source.adapter_dir, "the base model folder": base_dir}
    if original_dir is not None:
        inputs["the --merge-into checkpoint"] = original_dir
    for what, path in inputs.items():
        real = real_path(path)
        if target == real or real in target.parents or target in real.parents:
            relation = "is" if target == real else ("lies inside" if real in target.parents else "contains")
            raise QShardError(f"OUT_DIR {out} {relation} {what} ({path})", where="OUT_DIR",
                              fix="export to a new folder of its own, e.g. merged/my-model")


def check_out_dir(out: Path, overwrite: bool, marker: str = MARKER, command: str = "export") -> None:
    """A missing or empty folder; or, with --overwrite, a folder an earlier `qshard COMMAND` wrote (its
    marker lists every entry, none a link)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise QShardError(f"{out} exists and is not a folder", where="OUT_DIR", fix="choose another OUT_DIR")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise QShardError(f"OUT_DIR {out} is not empty", where="OUT_DIR",
                          fix=f"choose a new folder, or pass --overwrite to replace an earlier {command} there")
    why = not_an_export(out, marker)
    if why:
        raise QShardError(f"--overwrite replaces only a folder qshard {command} wrote, and {out} {why}",
                          where="OUT_DIR", fix="choose another OUT_DIR; qshard deletes nothing it did not write")


def not_an_export(out: Path, marker: str = MARKER) -> str | None:
    entries = list(out.iterdir())
    try:
        listed = set(json.loads((out / marker).read_text())["files"]) | {marker}
    except (OSError, ValueError, KeyError, TypeError):
        shown = ", ".join(sorted(p.name for p in entries)[:5])
        return f"has no readable {marker} (it holds {shown})"
    odd = sorted(p.name for p in entries if p.is_symlink() or p.name not in listed or not p.is_file())
    if odd:
        return f"holds entries qshard did not write: {', '.join(odd[:5])}"
    return None


# -- writing -----------------------------------------------------------------------------------------

def write_model(stage: Path, base: merge.Base, original: merge.Base | None, adapter: merge.Adapter,
                output: Output, max_shard_bytes: int, log) -> tuple[list[str], dict]:
    """Weights (streamed), config.json, generation_config.json and the tokenizer into `stage`."""
    from tqdm import tqdm

    from qshard.model.load import release_freed_memory

    source = original or base
    plan = plan_tensors(source.units, output)
    writer = merge.ShardWriter(stage, plan, max_shard_bytes)
    nf4 = f", {len(output.nf4)} linears as NF4" if output.nf4 else ""
    nf4 += f", {len(output.own)} linears in the base's own format" if output.own else ""
    adapted = len(adapter.modules) + len(adapter.experts)
    log(f"merging {adapted} adapted layers into {source.model_dir} -> {len(writer.shards)} "
        f"shard(s), {writer.total / 1e9:.2f} GB in {str(output.dtype).removeprefix('torch.')}{nf4}")
    stats = {}
    try:
        for unit in tqdm(source.units, unit="tensor", desc="export", dynamic_ncols=True):
            stats |= _write_unit(unit, writer, plan, base if original else None, adapter, output)
            release_freed_memory()  # the unit's temporaries (else glibc keeps them; see load.py)
        writer.finish()
    finally:
        writer.close()
    files = writer.files() + write_config(stage, source.model_dir, output)
    return files + write_tokenizer(stage, adapter, base), stats


def plan_tensors(units: list[merge.Unit], output: Output) -> dict:
    """Every tensor the folder will hold, in writing order: an NF4 weight becomes its packed codes and
    QuantState tensors (merge.nf4_plan), a layer kept in the base's own format its stored tensors, a floating
    tensor takes the output dtype."""
    plan = {}
    for unit in units:
        if unit.packed is not None and unit.packed.module in output.own:
            plan |= unit.packed.stored
            continue
        plan |= _plan_dense(unit.shapes, output)
    return plan


def _plan_dense(shapes: dict[str, tuple[torch.dtype, list[int]]], output: Output) -> dict:
    plan = {}
    for name, (stored, shape) in shapes.items():
        if _is_nf4(name, output):
            plan |= merge.nf4_plan(name, shape, output.dtype, output.double_quant)
        else:
            plan[name] = (output.dtype if stored.is_floating_point else stored, shape)
    return plan


def _is_nf4(name: str, output: Output) -> bool:
    return name.endswith(".weight") and name.removesuffix(".weight") in output.nf4


def _write_unit(unit: merge.Unit, writer: merge.ShardWriter, plan: dict, quantized: merge.Base | None,
                adapter: merge.Adapter, output: Output) -> dict:
    if unit.packed is not None and unit.packed.module in output.own:
        return _write_own_format(unit.packed, writer, adapter)
    stats = {}
    for name, tensor in unit.load().items():
        module, delta = name.removesuffix(".weight"), None
        if name.endswith(".weight") and module in adapter.modules:
            tensor, stats[module], delta = _merge_one(module, tensor, quantized, adapter)
        elif name in adapter.experts:  # a fused MoE expert weight: PEFT's ParamWrapper update, every expert
            t = adapter.experts[name]
            delta = experts.lora_delta(t["A"], t["B"], t["experts"], adapter.scaling, t["transposed"])
            stats[name] = {"delta_rel": merge.relative(delta, tensor)}
            if quantized is not None:
                stats[name]["quant_gap_rel"] = merge.relative(tensor.float() - quantized.tensor(name).float(), delta)
            tensor = tensor.float() + delta
        if _is_nf4(name, output):
            _write_nf4(name, tensor, writer, output, stats.get(module), delta)
        else:
            writer.write(name, tensor.to(plan[name][0]))
    return stats


def _merge_one(module: str, weight: torch.Tensor, quantized: merge.Base | None, adapter: merge.Adapter):
    """The merged weight, its figures (||delta|| / ||W||, and with --merge-into ||W_orig - W_deq|| / ||delta||)
    and delta."""
    t = adapter.modules[module]
    delta = merge.lora_delta(t, adapter.scaling)
    figures = {"delta_rel": merge.relative(delta, weight)}
    if quantized is not None:
        figures["quant_gap_rel"] = merge.relative(weight.float() - quantized.tensor(f"{module}.weight").float(), delta)
    return merge.merged_weight(weight, t, delta), figures, delta


def _write_own_format(packed: merge.Packed, writer: merge.ShardWriter, adapter: merge.Adapter) -> dict:
    """A PTQ layer as its checkpoint stores it; adapted, with its codes replaced by those of the merged weight on
    the layer's own scales and zero points (quant/*.requantize). Figures: ||Q(W + delta) - (W + delta)|| /
    ||delta|| (how much of the fine-tuning the checkpoint's grid cannot hold) and the share of codes changed."""
    tensors, stats = packed.read(), {}
    if packed.module in adapter.modules:
        layer = packed.build(tensors)
        weight = layer.dequantize(torch.float32)  # what method checkpoint's float32 forward applies
        merged, figures, delta = _merge_one(packed.module, weight, None, adapter)
        tensors |= layer.requantize(merged)
        rounded = packed.build(tensors).dequantize(torch.float32)
        figures["requant_rel"] = merge.relative(rounded - merged, delta)
        figures["codes_changed"] = float((rounded != weight).float().mean())
        stats[packed.module] = figures
    for leaf, tensor in tensors.items():
        writer.write(f"{packed.module}.{leaf}", tensor)
    return stats


def _write_nf4(name: str, weight: torch.Tensor, writer: merge.ShardWriter, output: Output, figures: dict | None,
               delta: torch.Tensor | None) -> None:
    """Quantize one weight (cast to the output dtype, as transformers casts before quantizing) and write its
    tensors in planned order; for an adapted layer record ||Q(W + delta) - (W + delta)|| / ||delta||: how much
    of the fine-tuning the 4-bit rounding may blur."""
    import bitsandbytes.functional as bnbF

    tensors, state = merge.quantize_nf4(name, weight.to(output.dtype), output.double_quant)
    if figures is not None:
        rounded = bnbF.dequantize_4bit(tensors[name], state).float()
        figures["requant_rel"] = merge.relative(rounded - weight.float(), delta)
    for key in merge.nf4_plan(name, list(weight.shape), output.dtype, output.double_quant):
        writer.write(key, tensors[key])


def write_config(stage: Path, model_dir: Path, output: Output) -> list[str]:
    """config.json, its dtype the output's, without the base's quantization_config; for format nf4 with the
    one transformers writes for a load_in_4bit model. generation_config.json copied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # checked by open_base already
    if hasattr(config, "quantization_config") and not output.own:
        del config.quantization_config
    if output.nf4:
        config.quantization_config = bnb_config(output).to_dict()
    config.dtype = output.dtype
    config.save_pretrained(stage)
    written = ["config.json"]
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        (stage / generation.name).write_text(json.dumps(folder.read_json(generation), indent=2) + "\n")
        written.append(generation.name)
    return written


def bnb_config(output: Output):
    """transformers' BitsAndBytesConfig for the folder: NF4, blocks of 64 (bitsandbytes' default, which qshard
    uses), double quant as the run, uint8 storage; the linears left dense listed (transformers' default list
    names only the output embedding)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=output.double_quant,
                              bnb_4bit_compute_dtype=output.dtype, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=output.dense_linears)


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


def write_marker(stage: Path, source: Source, dtype: str, out_format: str, merge_into: str | None,
                 result: Result) -> None:
    from qshard.state.checkpoint import write_json

    write_json(stage / MARKER, {"format": 1, "source": str(source.folder.resolve()), "dtype": dtype,
                                "weights": out_format, "merge_into": merge_into, "files": sorted(set(result.files)),
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


REQUANT_LABEL = "||Q(W + delta) - (W + delta)|| / ||LoRA delta||"


def format_stats(layers: dict[str, dict[str, float]], merge_into: bool) -> str:
    """Median and max of ||delta|| / ||W_base|| (and, with --merge-into, ||W_orig - W_deq|| / ||delta||; with
    format nf4 or checkpoint, ||Q(W + delta) - (W + delta)|| / ||delta||, Q the re-quantization, also per layer,
    and for format checkpoint the share of codes the merge changed)."""
    if not layers:
        return "no layer merged"
    lines = [f"merged {len(layers)} layers:"]
    keys = [("delta_rel", "||LoRA delta|| / ||W_base||")]
    if merge_into:
        keys.append(("quant_gap_rel", "||W_original - W_dequantized|| / ||LoRA delta||"))
    requant = {m: f["requant_rel"] for m, f in layers.items() if "requant_rel" in f}
    if requant:
        keys.append(("requant_rel", REQUANT_LABEL))
    if any("codes_changed" in f for f in layers.values()):
        keys.append(("codes_changed", "share of the layer's codes the merge changed"))
    for key, label in keys:
        values = {m: f[key] for m, f in layers.items() if key in f}
        top = max(values, key=values.get)
        lines.append(f"  {label}: median {statistics.median(values.values()):.3g}, max {values[top]:.3g} ({top})")
    if requant:
        lines += [f"  {REQUANT_LABEL} per layer:"] + [f"    {m}: {v:.3g}" for m, v in requant.items()]
    codes = [f["requant_rel"] for f in layers.values() if "codes_changed" in f]
    if codes and statistics.median(codes) > 0.5:
        lines.append("  (the checkpoint's grid holds less than half of the fine-tuning in most layers: its steps are "
                     "larger than most of the adapter's changes. To keep them, serve the base with the adapter, or "
                     "export --format dense and quantize that anew with qshard quantize)")
    if merge_into:
        lines.append("  (a gap near or above 1: the original differs from the weights training saw by as much as the "
                     "adapter changed them, so merging into it may undo part of the fine-tuning; the per-layer "
                     f"figures are in {MARKER})")
    return "\n".join(lines)
