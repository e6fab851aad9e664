"""`qshard export`'s check: the exported folder, loaded by transformers in float32 (--format checkpoint: by qshard's
own GPTQ / AWQ / compressed-tensors reader), against qshard's own base + adapter (or the quantize-dequantized merge,
for --format nf4 and checkpoint) on a few fixed prompts, at a tolerance derived from the output dtype's rounding
(`tolerance`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qshard.model.load import QuantSpec
from qshard.tools import merge

if TYPE_CHECKING:
    from qshard.tools.export import Output, Source

PROMPTS = ("The capital of France is", "Quantization stores weights in fewer bits, so",
           "def add(a, b):\n    return")


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
def check_merge(stage: Path, source: Source, adapter: merge.Adapter, original: merge.Base | None, output: Output,
                log) -> dict:
    """Logits of the exported folder (transformers, float32) against qshard's base + adapter, in float32.

    Format nf4: the reference's exported linears are replaced by bitsandbytes' quantize-dequantize of their
    merged weights (the values the folder holds, computed from the reference's own tensors), so the same
    rounding bound as a dense export applies and a serialization error cannot hide in NF4's rounding; the
    gap to the unquantized merge is what re-quantizing costs, reported, not judged."""
    from qshard.model.load import load_tokenizer

    dtype = output.dtype
    tokenizer = load_tokenizer(stage)
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS]
    exported = load_exported(stage, output)
    got = [exported(input_ids=ids).logits for ids in prompts]
    layers = exported.config.get_text_config().num_hidden_layers
    del exported
    reference = reference_model(source, adapter, original)
    figures = {}
    if dense_int8_twins(reference, measure_first=lambda: _max_diff(reference, prompts, got)[0], out=figures):
        log(f"note: LLM.int8()'s forward also quantizes activations, which no dense model does: the run's own "
            f"int8 forward differs from the export by up to {figures['int8_forward_gap']:.3g}; the check compares "
            "with the int8 weights dequantized")
    if output.nf4 or output.own:
        figures |= _requantization_gap(reference, prompts, got, log)
        round_trip = (merge.nf4_round_trip(output.dtype, output.double_quant) if output.nf4
                      else merge.own_scales_round_trip)
        # NF4 re-quantizes every linear; the own format keeps a layer without an adapter as stored
        changed = sorted(output.nf4) if output.nf4 else sorted(output.own & set(adapter.modules))
        merge.requantized_twins(reference.get_base_model(), changed, adapter, round_trip)
    worst, scale = _max_diff(reference, prompts, got)
    rel_tol = tolerance(dtype, layers)
    figures |= {"max_abs_diff": worst, "max_abs_logit": scale, "tolerance": rel_tol * scale,
                "relative_tolerance": rel_tol, "passed": worst <= rel_tol * scale, "prompts": len(PROMPTS)}
    verdict = "passed" if figures["passed"] else "FAILED"
    log(f"check {verdict}: max |logit difference| {worst:.3g} vs tolerance {rel_tol * scale:.3g} "
        f"({rel_tol:.2g} x max |logit| {scale:.3g}; {str(dtype).removeprefix('torch.')} output) on {len(PROMPTS)} prompts")
    return figures


def load_exported(stage: Path, output: Output):
    """The folder as transformers loads it, in float32. NF4 linears (bitsandbytes Linear4bit) are set to
    compute in float32 as well, and kept off bitsandbytes' AVX512-bf16 CPU kernel, which repacks the weight
    and, whatever compute_dtype says, multiplies less exactly (measured: 4.6e-3 relative on one layer, 1.7%
    of the largest logit of the micro model): the check measures the stored values, not a kernel.

    Format checkpoint: loaded by qshard's own reader (quantization.method checkpoint, float32 compute), whose
    dequantization tests/test_ptq.py checks bit for bit against gptqmodel's, autoawq's and compressed-tensors'
    own; transformers would need those libraries, which qshard does not install (tests/test_export.py loads a
    compressed-tensors export with transformers in the quantizer's environment too)."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    if output.own:
        from qshard.model.load import load_float32

        return load_float32(str(stage), QuantSpec("checkpoint"))

    model = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32, trust_remote_code=False).eval()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
            module.support_avx512bf16_for_cpu = False
    return model


def _requantization_gap(reference, prompts: list[torch.Tensor], got: list[torch.Tensor], log) -> dict:
    """max |logit difference| to the unquantized merge: the error re-quantization adds (not judged)."""
    worst, scale = _max_diff(reference, prompts, got)
    log(f"re-quantization: max |logit difference| to the unquantized merge {worst:.3g} ({worst / scale:.3g} of "
        f"max |logit| {scale:.3g}); reported, not checked")
    return {"unquantized_max_abs_diff": worst, "unquantized_relative_diff": worst / scale}


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
    from qshard.model.experts import ExpertStack
    from qshard.model.load import QUANT_LAYERS, load_model
    from qshard.model.lora import attach_lora

    quiet = lambda *_: None  # noqa: E731  (the export already said what the loader would)
    if original is not None:
        base = load_model(str(original.model_dir), dtype="float32", quant=QuantSpec("none"), log=quiet)
    else:
        recipe = source.recipe
        base = load_model(source.base_path, dtype=recipe.model.dtype, quant=merge.run_quant_spec(recipe), log=quiet)
    base.float()  # floating tensors only: quantized storage is integer and keeps the values training saw
    for module in base.modules():
        if isinstance(module, QUANT_LAYERS):
            module.compute_dtype = torch.float32
        if isinstance(module, ExpertStack):  # its experts, dequantized as training did, then in float32
            module.weight_dtype = torch.float32
    model = attach_lora(base, r=adapter.r, alpha=adapter.alpha, dropout=0.0,
                        targets=adapter.targets + adapter.target_parameters, use_dora=adapter.use_dora, seed=0)
    load_adapter_into(model, adapter.file_state(), lambda param, full: full)
    for module in model.modules():  # the adapter's own scaling (rsLoRA: alpha / sqrt(r))
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] = adapter.scaling
    return model.eval()
