"""GPTQ / AWQ / compressed-tensors layers keep no dense weight for backward (qshard.quant.base.
redequantizing_linear): the same outputs and input gradients as F.linear(x, dequantize(x.dtype), b), bit
for bit, with nothing of the weight's size saved; and under ZeRO-3 / FSDP2, whose storage is gathered
only around a module's forward and backward, training with and without activation checkpointing
still equals one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qshard.config import parse_recipe
from qshard.quant import awq, compressed_tensors, gptq
from qshard.train import run
from tests.helpers import recipe_dict, run_cells, write_rows

FIXTURES = Path(__file__).parent / "fixtures" / "ptq"
# (fixture, module): qwen2's q_proj has a bias; act-order, asymmetric, 8-bit and per-channel variants
LAYERS = [("gptq_qwen2_w4_g32_asym_actorder", "model.layers.0.self_attn.q_proj"),
          ("gptq_llama_w4_g32_sym", "model.layers.1.mlp.down_proj"),
          ("gptq_qwen2_w8_perchannel_asym", "model.layers.0.mlp.up_proj"),
          ("autoawq_qwen2_w4_g32_zp", "model.layers.0.self_attn.q_proj"),
          ("autoawq_llama_w4_g64_zp", "model.layers.0.mlp.gate_proj"),
          ("ct_qwen2_w4a16_g32_asym", "model.layers.0.self_attn.q_proj"),
          ("ct_llama_w4a16_channel_asym", "model.layers.1.self_attn.o_proj"),
          ("ct_qwen2_w8a16_g32_sym", "model.layers.0.mlp.down_proj")]


def _layer(name: str, module: str) -> torch.nn.Module:
    """One quantized linear of a fixture (written by gptqmodel / autoawq / llmcompressor), built by our reader."""
    qc = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    stored = load_file(FIXTURES / name / "model.safetensors")
    tensors = {k[len(module) + 1:]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == module}
    if qc["quant_method"] == "gptq":
        return gptq.GPTQLinear.from_checkpoint(tensors, gptq.read_config(qc), where=module)
    if qc["quant_method"] == "awq":
        return awq.AWQLinear.from_checkpoint(tensors, awq.read_config(qc), where=module)
    scheme = compressed_tensors.read_config(qc).scheme_for(module)
    return compressed_tensors.PackQuantizedLinear.from_checkpoint(tensors, scheme, where=module)


def _dense_linear(layer, x):
    """The path this replaced: F.linear saves the dense weight until backward."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantize(x.dtype), bias)


def _out_grad_and_saved(forward, x):
    """Output, input gradient and the shapes of everything autograd saved for backward."""
    x = x.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = forward(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    return y, g, saved


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-autocast-bf16"])
@pytest.mark.parametrize("name,module", LAYERS, ids=[n for n, _ in LAYERS])
def test_layer_equals_dense_linear_bit_for_bit_and_saves_no_weight(name, module, dtype, autocast):
    layer = _layer(name, module)
    torch.manual_seed(0)
    x = torch.randn(3, 7, layer.in_features, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_new, g_new, saved_new = _out_grad_and_saved(layer, x)
        y_old, g_old, saved_old = _out_grad_and_saved(lambda x: _dense_linear(layer, x), x)
    weight = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}  # W or W.T
    assert y_new.dtype == y_old.dtype and g_new.dtype == g_old.dtype == dtype
    assert torch.equal(y_new, y_old) and torch.equal(g_new, g_old)
    assert weight & set(saved_old)  # what the old path kept per layer
    assert saved_new == []  # nothing at all: not the weight, not x


@pytest.mark.parametrize("name,module", LAYERS, ids=[n for n, _ in LAYERS])
def test_dequantizing_a_slice_of_rows_at_a_time_changes_no_bit(name, module, monkeypatch):
    """dequantize_by_rows at its smallest slices (one packed word of rows, or one row) equals one whole-tensor
    slice; the fixtures are small enough that test_ptq.py's library comparisons run in one slice."""
    from qshard.quant import base

    layer = _layer(name, module)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        monkeypatch.setitem(base.SLICE_ELEMENTS, "cpu", 2**40)
        whole = layer.dequantize(dtype)
        monkeypatch.setitem(base.SLICE_ELEMENTS, "cpu", 1)
        sliced = layer.dequantize(dtype)
        assert sliced.shape == whole.shape == (layer.out_features, layer.in_features)
        assert sliced.stride() == whole.stride() and torch.equal(sliced, whole)


@pytest.mark.parametrize("name,module", [LAYERS[0], LAYERS[3], LAYERS[5]], ids=["gptq", "awq", "ct"])
def test_gradients_and_second_derivatives_match_finite_differences(name, module):
    """In float64 the redequantizing backward is exact enough for gradcheck; its backward is itself
    differentiable (gradgradcheck), and a bias that requires a gradient (never, in a frozen base) gets one."""
    layer = _layer(name, module)  # dequantize(float64) is exact: codes times 16-bit scales
    x = torch.randn(1, 2, layer.in_features, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(layer.out_features, dtype=torch.float64, requires_grad=True)
    from qshard.quant.base import redequantizing_linear

    def f(x, bias):
        return redequantizing_linear(x, layer, bias)

    assert torch.autograd.gradcheck(f, (x, bias), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, bias), fast_mode=True)


def test_storage_released_before_backward_is_a_clear_error():
    """An engine that partitions storage after forward and does not gather it for backward would make
    the backward dequantize nothing: that is caught by name, not as a shape mismatch."""
    layer = _layer(*LAYERS[1])
    x = torch.randn(2, layer.in_features, requires_grad=True)
    y = layer(x)
    for p in layer.parameters():
        p.data = torch.empty(0, dtype=p.dtype)  # what ZeRO-3 leaves outside a gather
    with pytest.raises(RuntimeError, match="GPTQLinear's partitioned storage was not gathered for backward"):
        y.sum().backward()


def test_ptq_model_with_lora_saves_no_dense_weight():
    """The whole GPTQ fixture with LoRA on every linear (fp32): of the layer linears' [out, in] / [in, out]
    weights the old path saved every one (bar layer 0's q/k/v, whose input needs no gradient); now none."""
    from qshard.model.load import QuantSpec, load_model
    from qshard.model.lora import attach_lora, resolve_targets

    model = load_model(str(FIXTURES / "gptq_llama_w4_g32_sym"), dtype="float32", quant=QuantSpec("checkpoint"),
                       log=lambda *_: None)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, gptq.GPTQLinear)}
    shapes |= {(i, o) for o, i in shapes}
    peft = attach_lora(model, r=4, alpha=8, dropout=0.0, targets=resolve_targets(model, "all-linear"),
                       use_dora=False, seed=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = peft(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits.square().mean()
    loss.backward()
    assert len(shapes) >= 3 and [s for s in saved if s in shapes] == []
    assert all(p.grad is not None for n, p in peft.named_parameters() if p.requires_grad)


# -- sharding engines: storage gathered again for backward -----------------------------------------------

CELLS = [("zero3", True), ("fsdp2", True), ("zero3", False)]  # (engine, activation checkpointing)


def _recipe(data: Path, out: Path, engine: str, checkpointing: bool, method: str = "checkpoint") -> dict:
    r = recipe_dict(FIXTURES / "gptq_llama_w4_g32_sym", data, out, max_steps=3, micro_batch_size=2 if engine else 4,
                    sample_tokens=0)
    r["quantization"]["method"] = method
    r["model"]["gradient_checkpointing"] = checkpointing
    if engine == "zero3":
        r["distributed"] = {"engine": "deepspeed", "zero_stage": 3}
    elif engine:
        r["distributed"] = {"engine": engine}
    return r


@pytest.mark.parametrize("method", ["checkpoint", "nf4"], ids=["gptq", "nf4"])
def test_sharded_gptq_with_checkpointing_matches_one_process(tmp_path, method):
    """ZeRO-3 gathers a module's storage again in a hook on its outputs, FSDP2 a decoder layer's in a hook
    on the layer's outputs; both run before the redequantizing backward, with activation checkpointing
    (the layer's forward recomputed in backward) too. The same holds for the NF4 layer's backward, which reads
    its storage again too (quant/bnb4bit.py `_Regathering4bitMatmul`; the GPTQ base converted to NF4 on load).
    fp32 on CPU: only the order of float sums differs (measured ~1e-6 in tests/test_engines.py); assert 1e-4."""
    data = write_rows(tmp_path / "train.jsonl")
    cells = [{"name": f"{e}-{c}", "recipe": _recipe(data, tmp_path / f"{e}-{c}", e, c, method)} for e, c in CELLS]
    run_cells(tmp_path, cells, [[1, 5, 9, 13]])
    single = run(parse_recipe(_recipe(data, tmp_path / "single", "", True, method)), log=lambda *_: None).losses
    for engine, ckpt in CELLS:
        losses = json.loads((tmp_path / f"{engine}-{ckpt}" / "result-rank0.json").read_text())["losses"]
        print(f"{engine} checkpointing={ckpt}: max |loss - one process| "
              f"{max(abs(a - b) for a, b in zip(losses, single)):.2e}")
        assert len(losses) == 3 and max(abs(a - b) for a, b in zip(losses, single)) <= 1e-4, (engine, ckpt)
