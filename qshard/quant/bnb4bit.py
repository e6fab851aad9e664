"""NF4 / FP4 base layers (QLoRA), quantized by bitsandbytes, stored as engine-shardable parameters.

bitsandbytes' own `Linear4bit` keeps its quantization constants in a `QuantState` object beside a
`Params4bit` weight. Sharding engines only see parameters, so FSDP2 trips over the detached state
(`fix_4bit_weight_quant_state_from_module`) and DeepSpeed's `module.bfloat16()` would cast float
constants. Here every tensor needed to dequantize is a frozen *uint8 parameter*:

    packed         4-bit codes, two per byte, flat [(out*in + 1) // 2]
    absmax         per-block scales: uint8 codes with double quant, else float32 bytes
    nested_absmax  float32 bytes of the second-level scales (double quant only)
    offset         float32 bytes of the double-quant offset (double quant only)

Engines partition and all-gather integer parameters like any other, never cast them (FSDP2 skips
non-float params in mixed precision; DeepSpeed only casts floating tensors), and the forward calls
the very same `bnb.matmul_4bit` as `Linear4bit`, so results match bitsandbytes bit for bit. While
training, it does so inside `_Regathering4bitMatmul`, whose backward reads the layer's storage again
instead of keeping the (under ZeRO-3: gathered) weight from forward to backward.

A checkpoint that transformers saved from a `load_in_4bit` model (config.json `quant_method:
bitsandbytes`; qshard's own `export --format nf4`) is read as it is (`read_config`,
`Linear4bit.from_checkpoint`). Per quantized linear `<m>` it stores

    <m>.weight                  the packed codes, [(out*in + 1) // 2 bytes, 1] in bnb_4bit_quant_storage
    <m>.weight.absmax           as our `absmax` (uint8 codes with double quant, else float32)
    <m>.weight.quant_map        the 16-value code book (float32): bitsandbytes' nf4 / fp4 one
    <m>.weight.nested_absmax    float32 second-level scales (double quant only)
    <m>.weight.nested_quant_map the 256-value dynamic map (double quant only)
    <m>.weight.quant_state.bitsandbytes__<nf4|fp4>  uint8 bytes of a JSON object: quant_type, blocksize,
                                dtype, shape [out, in], and with double quant nested_blocksize,
                                nested_dtype, nested_offset (our `offset`, a float32 written as a float)

so every parameter of the layer is a byte copy of a stored tensor; the two code books are constants
of bitsandbytes, checked equal rather than stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from qshard.errors import QShardError
from qshard.quant.base import QuantLinear, as_bytes, cut, frozen, rows_per_slice

BLOCKSIZE = 64  # bitsandbytes' default, the one transformers' BitsAndBytesConfig uses
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for double quant
QUANT_METHOD = "bitsandbytes"
STATE_LEAF = "weight.quant_state.bitsandbytes__"  # + quant type: the JSON of a layer's QuantState
# Leaves whose values (not only shapes) say what a stored layer is: read even when only its layout is wanted.
LAYOUT_LEAVES = ("weight.quant_map", "weight.nested_quant_map", STATE_LEAF)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FIX = ("download the checkpoint again, or write it again as transformers saves a load_in_4bit model "
        "(save_pretrained, or `qshard export --format nf4`); or train on the original dense model with "
        "quantization.method nf4")


@dataclass(frozen=True)
class BnbScheme:
    """How a stored 4-bit linear is laid out, as the planner reads a PTQ scheme: 4-bit codes in blocks of
    BLOCKSIZE values, each block scaled by its absmax (no zero point)."""

    bits: int = 4
    group_size: int = BLOCKSIZE
    symmetric: bool = True


@dataclass(frozen=True)
class BnbConfig:
    """What qshard needs from config.json's `quantization_config` for a bitsandbytes 4-bit checkpoint."""

    quant_type: str  # nf4 | fp4: the compatibility table's base name
    double_quant: bool
    skip_modules: tuple[str, ...] = ()  # llm_int8_skip_modules: left dense by transformers

    def scheme_for(self, module: str) -> BnbScheme | None:
        """The layout of `module` (None when transformers left it dense), matched as transformers matches."""
        return None if any(key in module for key in self.skip_modules) else BnbScheme()


def read_config(qc: dict, where: str = "config.json") -> BnbConfig:
    """Parse and vet a bitsandbytes `quantization_config`; 8-bit and other variants are refused by name."""
    field = f"{where}: quantization_config"
    if qc.get("quant_method") != QUANT_METHOD:
        raise QShardError(f"not a bitsandbytes checkpoint (quant_method={qc.get('quant_method')!r})", where=field)
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise QShardError("bitsandbytes 8-bit checkpoints (load_in_8bit) are not supported: qshard reads the 4-bit "
                          "(load_in_4bit) ones", where=f"{field}.load_in_8bit",
                          fix="train on the original dense model with quantization.method int8 (qshard quantizes "
                              "it on load, as load_in_8bit does), or on a 4-bit (load_in_4bit) checkpoint")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise QShardError("this bitsandbytes quantization_config quantizes nothing (load_in_4bit is not true)",
                          where=f"{field}.load_in_4bit", fix=_FIX)
    quant_type = str(qc.get("bnb_4bit_quant_type", "fp4")).lower()  # transformers' default is fp4
    if quant_type not in ("nf4", "fp4"):
        raise QShardError(f"bnb_4bit_quant_type {quant_type!r} is not a bitsandbytes 4-bit type (nf4 or fp4)",
                          where=f"{field}.bnb_4bit_quant_type", fix=_FIX)
    return BnbConfig(quant_type=quant_type, double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
                     skip_modules=tuple(qc.get("llm_int8_skip_modules") or ()))


class Linear4bit(QuantLinear):
    """A frozen 4-bit linear layer: y = x @ dequant(W).T + b, computed in `compute_dtype`."""

    def __init__(self, in_features: int, out_features: int, *, quant_type: str = "nf4",
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype = torch.float32, bias: bool = False, device="meta",
                 blocksize: int = BLOCKSIZE):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        n = in_features * out_features
        blocks = -(-n // blocksize)
        empty = lambda size: frozen(torch.empty(size, dtype=torch.uint8, device=device))  # noqa: E731
        self.packed = empty((n + 1) // 2)
        if double_quant:
            self.absmax = empty(blocks)
            self.nested_absmax = empty(4 * -(-blocks // NESTED_BLOCKSIZE))
            self.offset = empty(4)
        else:
            self.absmax = empty(4 * blocks)
        self.bias = frozen(torch.empty(out_features, dtype=weight_dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quant_type: str = "nf4",
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        """Quantize a dense [out, in] weight exactly as bitsandbytes' Linear4bit does."""
        import bitsandbytes.functional as bnbF

        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                    weight_dtype=weight.dtype, bias=bias is not None, device=weight.device)
        packed, state = bnbF.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE,
                                           compress_statistics=double_quant, quant_type=quant_type)
        layer.packed.data = as_bytes(packed)
        layer.absmax.data = as_bytes(state.absmax)
        if double_quant:
            layer.nested_absmax.data = as_bytes(state.state2.absmax.float())
            layer.offset.data = as_bytes(state.offset.float().reshape(1))
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], config: BnbConfig, *,
                        where: str = "") -> "Linear4bit":
        """A layer from a bitsandbytes checkpoint's tensors of one linear (keys without the module prefix:
        weight, weight.absmax, ...), every parameter a byte copy of a stored tensor (see the module docstring).
        Sizes, dtypes and code books are checked against the layer's QuantState JSON first."""
        state = _read_state(tensors, config, where)
        out_f, in_f = state["shape"]
        layer = cls(in_f, out_f, quant_type=state["quant_type"], double_quant="nested_offset" in state,
                    weight_dtype=DTYPES[state["dtype"]], bias="bias" in tensors, device=tensors["weight"].device,
                    blocksize=state["blocksize"])
        stored = {"packed": as_bytes(tensors["weight"]), "absmax": as_bytes(tensors["weight.absmax"])}
        if layer.double_quant:
            stored |= {"nested_absmax": as_bytes(tensors["weight.nested_absmax"]),
                       "offset": as_bytes(torch.tensor([state["nested_offset"]], dtype=torch.float32))}
        for name, data in stored.items():
            param = getattr(layer, name)
            if data.numel() != param.numel():
                raise QShardError(f"{where}.{_LEAF_OF[name]} holds {data.numel()} bytes, but the [{out_f}, {in_f}] "
                                  f"{state['quant_type']} weight its QuantState describes (blocks of "
                                  f"{layer.blocksize}) needs {param.numel()}", where=f"{where}.{_LEAF_OF[name]}",
                                  fix=_FIX)
            param.data = data
        _check_code_books(tensors, layer, where)
        if "bias" in tensors:
            layer.bias.data = tensors["bias"].contiguous()
        return layer

    def quantize_pieces(self, read_rows, owned, slices):
        """Blocks of 64 values are quantized independently, so the packed codes of a row range are the
        codes of those rows; the double-quant offset, however, is the mean of *all* block scales. Each
        rank therefore reads every row range once (one range in memory at a time), keeps the codes it
        owns and the float32 block scales of all (1/32 of the bf16 weight), then double-quantizes the
        scales exactly as `bitsandbytes.functional.quantize_4bit` does and keeps its own part."""
        import bitsandbytes.functional as bnbF

        rows = rows_per_slice(self.out_features, self.in_features, slices, self.blocksize)
        codes, scales = [], []
        for r0 in range(0, self.out_features, rows):
            weight = read_rows(r0, min(r0 + rows, self.out_features)).to(self.weight_dtype)
            packed, state = bnbF.quantize_4bit(weight.reshape(-1), blocksize=self.blocksize, compress_statistics=False,
                                               quant_type=self.quant_type)
            codes.append(cut(packed.reshape(-1), owned["packed"], start=r0 * self.in_features // 2))
            scales.append(state.absmax)
        absmax = torch.cat(scales)
        pieces = {"packed": torch.cat(codes)}
        if not self.double_quant:
            return pieces | {"absmax": cut(as_bytes(absmax), owned["absmax"])}
        offset = absmax.mean()  # bitsandbytes' own double quant, on the same full vector
        qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        return pieces | {"absmax": cut(qabsmax, owned["absmax"]),
                         "nested_absmax": cut(as_bytes(state2.absmax.float()), owned["nested_absmax"]),
                         "offset": cut(as_bytes(offset.float().reshape(1)), owned["offset"])}

    def quant_state(self):
        """Rebuild bitsandbytes' QuantState from our parameters (views, no copies)."""
        import bitsandbytes.functional as bnbF

        device = self.packed.device
        code = bnbF.get_4bit_type(self.quant_type, device=device)
        shape = torch.Size([self.out_features, self.in_features])
        if not self.double_quant:
            return bnbF.QuantState(absmax=self.absmax.view(torch.float32), shape=shape, code=code,
                                   blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype)
        state2 = bnbF.QuantState(absmax=self.nested_absmax.view(torch.float32), code=_nested_code(device),
                                 blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return bnbF.QuantState(absmax=self.absmax, shape=shape, code=code, blocksize=self.blocksize,
                               quant_type=self.quant_type, dtype=self.weight_dtype,
                               offset=self.offset.view(torch.float32)[0], state2=state2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight: bitsandbytes' dequantize_4bit into `dtype` (default weight_dtype).

        Into float32 these are the exact code x scale products, the values bitsandbytes' 4-bit matmul applies
        in a float32 forward (measured on CPU, bitsandbytes 0.50: equal to F.linear with them, with and without
        grad), whereas a checkpoint's weight_dtype (bf16) would round them first (0.8% of the largest logit
        of the micro model): conversions and exports of a checkpoint's layer ask for the run's dtype."""
        import bitsandbytes.functional as bnbF

        if self.packed.device.type == "meta":  # a layout only (load.ptq_layout): bitsandbytes has no meta kernels
            return torch.empty(self.out_features, self.in_features, dtype=dtype or self.weight_dtype, device="meta")
        state = self.quant_state()
        state.dtype = dtype or self.weight_dtype
        return bnbF.dequantize_4bit(self.packed.view(-1, 1), state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        # Same casts as bitsandbytes.nn.Linear4bit.forward, so the numerics are identical.
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _Regathering4bitMatmul.apply(x, bias, self).to(inp_dtype)
        return bnb.matmul_4bit(x, self.packed.view(-1, 1), bias=bias, quant_state=self.quant_state()).to(inp_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


_NESTED_CODE: dict[torch.device, torch.Tensor] = {}


class _Regathering4bitMatmul(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul that keeps nothing of the weight for backward.

    bitsandbytes' MatMul4Bit keeps the packed weight and its QuantState as plain attributes of its autograd
    context (`ctx.tensors`, `ctx.state`) from forward until the graph is freed. Under ZeRO-3 those are the
    gathered copies, which the engine cannot free after the layer's forward: at the end of a forward the
    whole base was gathered on every rank (151 MB of the 400M benchmark's peak; BENCHMARKS.md, issue #17).
    Here the forward is bitsandbytes' own call (the same output, bit for bit), and the backward reads the
    layer's parameters again, which the engines have gathered again by then (as for the PTQ layers,
    quant/base.py `_RedequantizingLinear`, whose invariants hold here too), and computes what MatMul4Bit's
    backward computes (bitsandbytes 0.50.2): grad_x = grad_out @ dequantize_4bit(W).to(grad_out.dtype). The
    base is frozen: W gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "Linear4bit") -> torch.Tensor:
        import bitsandbytes as bnb

        ctx.layer = layer
        return bnb.matmul_4bit(x, layer.packed.view(-1, 1), bias=bias, quant_state=layer.quant_state())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        import bitsandbytes.functional as bnbF

        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            layer = ctx.layer
            if layer.packed.numel() == 0:  # an engine that gathers only for forward
                raise RuntimeError("Linear4bit's partitioned storage was not gathered for backward")
            weight = bnbF.dequantize_4bit(layer.packed.view(-1, 1), layer.quant_state())  # [out, in]
            grad_x = torch.matmul(grad_out, weight.to(grad_out.dtype))
        if ctx.needs_input_grad[1]:  # a frozen base has no trainable bias; kept correct all the same
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def _nested_code(device: torch.device) -> torch.Tensor:
    """The 8-bit dynamic map bitsandbytes uses for double quant (a constant; cached per device)."""
    import bitsandbytes.functional as bnbF

    if device not in _NESTED_CODE:
        _NESTED_CODE[device] = bnbF.create_dynamic_map(signed=True).to(device)
    return _NESTED_CODE[device]


_LEAF_OF = {"packed": "weight", "absmax": "weight.absmax", "nested_absmax": "weight.nested_absmax",
            "offset": STATE_LEAF}


def _read_state(tensors: dict[str, torch.Tensor], config: BnbConfig, where: str) -> dict:
    """The layer's QuantState JSON, parsed and vetted, after checking that every tensor it needs is there."""
    key = STATE_LEAF + config.quant_type
    state_keys = [k for k in tensors if k.startswith(STATE_LEAF)]
    if key not in tensors:
        found = f" (found {', '.join(state_keys)})" if state_keys else ""
        raise QShardError(f"{where} has no {key} tensor (the QuantState JSON bitsandbytes writes beside each 4-bit "
                          f"weight){found}: config.json says {config.quant_type}",
                          where=f"{where}.{key}", fix=_FIX)
    nested = ("weight.nested_absmax", "weight.nested_quant_map") if config.double_quant else ()
    missing = [n for n in ("weight", "weight.absmax", "weight.quant_map", *nested) if n not in tensors]
    if missing:
        raise QShardError(f"checkpoint tensors {', '.join(f'{where}.{n}' for n in missing)} are missing",
                          where=f"{where}.{missing[0]}", fix=_FIX)
    raw = tensors[key]
    try:
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError(f"a {raw.dtype} tensor of shape {list(raw.shape)}, not 1-d uint8 bytes")
        state = json.loads(raw.numpy().tobytes().decode("utf-8"))
        _vet_state(state, config)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise QShardError(f"{where}.{key} is not a bitsandbytes QuantState JSON ({type(e).__name__}: {e})",
                          where=f"{where}.{key}", fix=_FIX) from None
    return state


def _vet_state(state: dict, config: BnbConfig) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"a JSON {type(state).__name__}, not an object")
    if state["quant_type"] != config.quant_type:
        raise ValueError(f"quant_type {state['quant_type']!r}, but config.json says {config.quant_type!r}")
    if state["dtype"] not in DTYPES:
        raise ValueError(f"dtype {state['dtype']!r} (expected one of {', '.join(DTYPES)})")
    shape, blocksize = state["shape"], state["blocksize"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise ValueError(f"shape {shape!r}: a linear weight has two positive sizes")
    if type(blocksize) is not int or blocksize <= 0:
        raise ValueError(f"blocksize {blocksize!r}")
    if ("nested_offset" in state) != config.double_quant:
        raise ValueError(f"double quant {'nested_offset' in state}, but config.json's bnb_4bit_use_double_quant "
                         f"is {config.double_quant}")
    if config.double_quant and (state["nested_blocksize"] != NESTED_BLOCKSIZE or state["nested_dtype"] != "float32"
                                or type(state["nested_offset"]) is not float):
        raise ValueError(f"nested_blocksize {state['nested_blocksize']!r}, nested_dtype {state['nested_dtype']!r}, "
                         f"nested_offset {state['nested_offset']!r} (bitsandbytes writes 256, float32, a float)")


def _check_code_books(tensors: dict[str, torch.Tensor], layer: Linear4bit, where: str) -> None:
    """The stored code books must be bitsandbytes' own (the layer rebuilds them rather than storing them)."""
    import bitsandbytes.functional as bnbF

    books = {"weight.quant_map": bnbF.get_4bit_type(layer.quant_type, device="cpu")}
    if layer.double_quant:
        books["weight.nested_quant_map"] = bnbF.create_dynamic_map(signed=True)
    for leaf, book in books.items():
        stored = tensors[leaf]
        if stored.dtype != torch.float32 or not torch.equal(stored.cpu(), book):
            raise QShardError(f"{where}.{leaf} is not the code book bitsandbytes uses for it (a custom "
                              "quantization map is not supported)", where=f"{where}.{leaf}", fix=_FIX)
