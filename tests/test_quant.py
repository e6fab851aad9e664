"""Our shardable quantized layers against bitsandbytes' own modules: bit-identical, forward and backward."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qshard.quant.bnb4bit import Linear4bit
from qshard.quant.bnb8bit import Linear8bit


def _bnb_4bit(w, b, quant_type, double_quant):
    ref = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=w.dtype,
                            compress_statistics=double_quant, quant_type=quant_type)
    ref.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                   quant_type=quant_type)
    ref.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    return ref.to("cpu").train()


def _out_and_grad(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    return y, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_layer_equals_bitsandbytes_bit_for_bit(quant_type, double_quant, dtype):
    torch.manual_seed(0)
    w, b = torch.randn(96, 160, dtype=dtype), torch.randn(96, dtype=dtype)
    ours = Linear4bit.from_float(w, b, quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype)
    ref = _bnb_4bit(w, b, quant_type, double_quant)
    x = torch.randn(3, 5, 160, dtype=dtype)
    y1, g1 = _out_and_grad(ours.train(), x)
    y2, g2 = _out_and_grad(ref, x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert torch.equal(ours.packed, ref.weight.data.view(torch.uint8).reshape(-1))
    # 4-bit error is bounded: NF4's largest gap between codes is ~0.28 of the block absmax.
    err = (ours.dequantize().float() - w.float()).abs().mean().item()
    assert 0.05 < err < 0.25


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp32-autocast-bf16"])
def test_4bit_layer_keeps_nothing_of_its_weight_from_forward_to_backward(autocast):
    """Between forward and backward nothing holds the packed weight or the QuantState the forward used (bitsandbytes'
    own MatMul4Bit keeps both in its autograd context: under ZeRO-3 gathered copies, the whole base by the end of
    a forward); the backward reads the layer again and gives bitsandbytes' output and input gradient bit for bit,
    under autocast too."""
    import gc
    import weakref

    torch.manual_seed(0)
    w, b = torch.randn(96, 160), torch.randn(96)
    ours = Linear4bit.from_float(w, b, quant_type="nf4", double_quant=True, compute_dtype=torch.float32).train()
    ref = _bnb_4bit(w, b, "nf4", True)
    states, matmul = [], bnb.matmul_4bit

    def recording(A, B, *args, quant_state, **kwargs):
        states.append(weakref.ref(quant_state))
        return matmul(A, B, *args, quant_state=quant_state, **kwargs)

    x = torch.randn(3, 5, 160)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        xs = x.clone().requires_grad_(True)
        bnb.matmul_4bit = recording
        try:
            y1 = ours(xs)
        finally:
            bnb.matmul_4bit = matmul
        gc.collect()
        assert len(states) == 1 and states[0]() is None
        (g1,) = torch.autograd.grad(y1.square().sum(), xs)
        y2, g2 = _out_and_grad(ref, x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_4bit_storage_is_uint8_parameters_only():
    """Engines shard parameters and never cast integer ones: nothing may hide in buffers or attributes."""
    layer = Linear4bit.from_float(torch.randn(64, 128), quant_type="nf4", double_quant=True)
    assert {n: p.dtype for n, p in layer.named_parameters()} == {
        "packed": torch.uint8, "absmax": torch.uint8, "nested_absmax": torch.uint8, "offset": torch.uint8}
    assert list(layer.buffers()) == []
    assert layer.packed.numel() == 64 * 128 // 2
    assert not any(p.requires_grad for p in layer.parameters())
    before = layer.dequantize()
    layer.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to a module: must be a no-op here
    assert torch.equal(layer.dequantize(), before)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layer_equals_bitsandbytes_bit_for_bit(dtype, training):
    torch.manual_seed(1)
    w, b = torch.randn(96, 160, dtype=dtype), torch.randn(96, dtype=dtype)
    ref = bnb.nn.Linear8bitLt(160, 96, bias=True, has_fp16_weights=False, threshold=6.0)
    ref.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    ref.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    ref = ref.to("cpu").train(training)
    ours = Linear8bit.from_float(w, b).train(training)
    x = torch.randn(3, 5, 160, dtype=dtype)
    y1, g1 = _out_and_grad(ours, x)
    y2, g2 = _out_and_grad(ref, x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert (ours.dequantize().float() - w.float()).abs().max().item() < 0.05
