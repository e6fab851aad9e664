"""Mixture-of-Experts expert weights: quantized per expert, sharded like any parameter, adapted by LoRA.

transformers 5 keeps a MoE layer's experts as fused 3-D parameters of one module (`experts.gate_up_proj
[E, 2I, H]`, `experts.down_proj [E, H, I]`; the classes decorated by `use_experts_implementation`), and
its eager forward reads one expert at a time: `F.linear(x, self.gate_up_proj[expert_idx])`. qshard
replaces each such parameter by an `ExpertStack`, a module that answers the same indexing:

- its storage is E matrices stored as the quantized linear layers store one (qshard/quant/bnb4bit.py,
  bnb8bit.py: NF4/FP4 per expert with bitsandbytes, int8 per row), each storage tensor stacked along
  a leading expert dimension, all frozen parameters: ZeRO-3 and FSDP2 partition them (FSDP2 by whole
  experts), and a rank loading sharded quantizes only the experts it holds. With method `none` it is
  the dense [E, a, b] parameter itself;
- `stack[e]` dequantizes expert e only (bitsandbytes' own dequantize, as the linear layers do), plus
  the active LoRA update of that expert;
- the experts module's forward is transformers' eager one, run under saved-tensor hooks that keep
  no dequantized expert for backward: autograd stores a recipe (stack, expert, LoRA factors) and the
  expert is dequantized again when backward needs it, as `quant.base.redequantizing_linear` does for
  linear layers. The peak is one dequantized expert, not a layer's (or the model's) expert stack.

LoRA: PEFT's `target_parameters` (ParamWrapper) is the format PEFT saves and loads for fused experts
(lora_A [r*E, in], lora_B [out, r*E]). PEFT applies it by re-parametrizing the whole stack (W + BA for
all E experts at once, dense); `ExpertLora` keeps PEFT's wrapper, its parameters, names and factor
math (`get_delta_factors`) and hands the factors to the stack instead, which adds expert e's
update to expert e only. PEFT's restriction stands: no dropout and no DoRA on expert weights.

The router (`gate`, a module with a `weight` of its own forward) is not a linear layer: it stays in
the recipe's dtype, as transformers' bitsandbytes integration leaves it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from qshard.quant.base import frozen


def fused_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, experts module, parameter name) of every fused 3-D expert parameter: a parameter of
    a class transformers decorates with `use_experts_implementation`, whose eager forward indexes it by
    expert (`_is_expert_parallel` is the attribute that decorator sets)."""
    found = []
    for name, module in model.named_modules():
        if not hasattr(module, "_is_expert_parallel"):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                found.append((name, module, pname))
    return found


def has_experts(model: nn.Module) -> bool:
    """Whether the model has fused expert weights (as transformers builds them, or as ExpertStacks)."""
    return bool(fused_parameters(model)) or any(isinstance(m, ExpertStack) for m in model.modules())


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules that hold ExpertStacks (one per MoE layer)."""
    return [m for m in model.modules() if any(isinstance(c, ExpertStack) for c in m.children())]


class ExpertStack(nn.Module):
    """One fused expert parameter [E, a, b], stored per expert as `layer_factory(a, b)` stores an [a, b]
    weight (a quantized linear of out_features a, in_features b), or dense when `layer_factory` is None."""

    def __init__(self, num_experts: int, a: int, b: int, dtype: torch.dtype, layer_factory=None, device="meta"):
        super().__init__()
        self.num_experts, self.rows, self.cols, self.weight_dtype = num_experts, a, b, dtype
        self.deltas: list = []  # LoRA factors (lhs, rhs, scaling) while an ExpertLora wrapper runs
        template = layer_factory(b, a) if layer_factory is not None else None
        object.__setattr__(self, "_template", template)  # not a submodule: its storage is ours, per expert
        if template is None:
            self.weight = frozen(torch.empty(num_experts, a, b, dtype=dtype, device=device))
        else:
            for pname, p in template.named_parameters():
                if pname != "bias":
                    self.register_parameter(pname, frozen(torch.empty(num_experts, *p.shape, dtype=p.dtype,
                                                                      device=device)))

    # what code that reads a parameter asks of it (PEFT's ParamWrapper: shape, dtype, device)
    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.num_experts, self.rows, self.cols])

    @property
    def ndim(self) -> int:
        return 3

    def dim(self) -> int:
        return 3

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def quantized(self) -> bool:
        return self._template is not None

    def storage(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.named_parameters(recurse=False))

    def expert_numel(self) -> dict[str, int]:
        """{storage name: elements per expert} (from the layout, whatever an engine did to the parameters)."""
        if self._template is None:
            return {"weight": self.rows * self.cols}
        return {n: p.numel() for n, p in self._template.named_parameters() if n != "bias"}

    def expert_layer(self, e: int) -> nn.Module:
        """The quantized layer of expert e, its storage views of this stack's rows e."""
        layer = self._template
        for pname, p in self.storage():
            layer._parameters[pname] = p[e]
        return layer

    @torch.no_grad()
    def dequantize_expert(self, e: int) -> torch.Tensor:
        """Expert e's dense [a, b] weight in the stack's dtype, without its LoRA update."""
        if self._template is None:
            return self.weight[e]
        return self.expert_layer(e).dequantize().to(self.weight_dtype)

    def dequantize(self) -> torch.Tensor:
        """All experts, dense [E, a, b] (export and merge; never in training)."""
        return torch.stack([self.dequantize_expert(e) for e in range(self.num_experts)])

    def as_stored(self, weight: torch.Tensor, quantize) -> torch.Tensor:
        """The dense [E, a, b] `weight` as this stack stores it: each expert quantized and dequantized again
        (export's base "as trained"), or cast to the stack's dtype when dense."""
        if self._template is None:
            return weight.to(self.weight_dtype)
        out = torch.empty(self.num_experts, self.rows, self.cols, dtype=self.weight_dtype)
        layer = self._template
        for e in range(self.num_experts):
            for pname, t in self.quantize_expert(weight[e], quantize).items():
                layer._parameters[pname] = t
            out[e] = layer.dequantize().to(self.weight_dtype)
        return out

    def quantize_expert(self, weight: torch.Tensor, quantize) -> dict[str, torch.Tensor]:
        """{storage name: tensor of one expert} for the dense [a, b] `weight` (`quantize(template, weight)`
        makes the filled layer: load.quantized_like)."""
        if self._template is None:
            return {"weight": weight.to(self.weight_dtype)}
        filled = quantize(self._template, weight.to(self.weight_dtype))
        return {n: p.data for n, p in filled.named_parameters() if n != "bias"}

    def __getitem__(self, idx) -> torch.Tensor:
        e = int(idx)
        weight = self.dequantize_expert(e)
        factors = [(lhs[e], rhs[e], scaling) for lhs, rhs, scaling in self.deltas]
        for lhs, rhs, scaling in factors:
            weight = weight + (lhs @ rhs) * scaling
        if self._template is not None or factors:  # a fresh tensor: rebuilt in backward rather than kept
            weight._qshard_expert = (self, e, [(lhs.detach(), rhs.detach(), s) for lhs, rhs, s in factors])
        return weight

    def extra_repr(self) -> str:
        kind = type(self._template).__name__ if self._template is not None else "dense"
        return f"experts={self.num_experts}, shape=[{self.rows}, {self.cols}], {kind}, dtype={self.weight_dtype}"


# -- keeping no dequantized expert for backward ---------------------------------------------------------

def _pack(t: torch.Tensor):
    recipe = getattr(t, "_qshard_expert", None)
    if recipe is not None:
        return recipe, None
    base = t._base
    recipe = getattr(base, "_qshard_expert", None) if base is not None else None
    if recipe is not None:  # a view of an expert weight (F.linear saves W.t())
        return recipe, (t.size(), t.stride(), t.storage_offset())
    return t


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    (stack, e, factors), view = packed
    with torch.no_grad():
        weight = stack.dequantize_expert(e)
        for lhs, rhs, scaling in factors:
            weight = weight + (lhs @ rhs) * scaling
    return weight if view is None else weight.as_strided(*view)


def _eager_forward_keeping_no_experts(module: nn.Module, *args, **kwargs):
    """transformers' eager experts forward (the decorator's dispatch bypassed: grouped kernels read the
    whole fused tensor), with expert weights rebuilt in backward instead of saved."""
    eager = type(module).forward.__wrapped__
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        return eager(module, *args, **kwargs)


def swap_in_stacks(model: nn.Module, dtype: torch.dtype, layer_factory=None) -> list[str]:
    """Replace every fused expert parameter of the (empty) skeleton by an ExpertStack; the experts
    modules run transformers' eager forward. Returns the stacks' names (checkpoint names)."""
    names = []
    for module_name, module, pname in fused_parameters(model):
        e, a, b = module._parameters[pname].shape
        del module._parameters[pname]
        module.add_module(pname, ExpertStack(e, a, b, dtype, layer_factory))
        module.forward = functools.partial(_eager_forward_keeping_no_experts, module)
        names.append(f"{module_name}.{pname}")
    return names


# -- LoRA through PEFT's target_parameters ------------------------------------------------------------

@contextlib.contextmanager
def peft_placeholders(model: nn.Module):
    """While PEFT attaches adapters, each ExpertStack is a parameter again (an empty tensor expanded to
    the stack's shape, on its device and dtype), so that PEFT's `target_parameters` finds it; after,
    the stacks are back in place and PEFT's wrappers apply LoRA through them (`ExpertLora`)."""
    moved = []
    for module in expert_modules(model):
        stacks = [(n, c) for n, c in module.named_children() if isinstance(c, ExpertStack)]
        for name, stack in stacks:
            del module._modules[name]
            empty = torch.empty((), dtype=stack.dtype, device=stack.device).expand(*stack.shape)
            module.register_parameter(name, frozen(empty))
        moved.append((module, stacks))
    try:
        yield
    finally:
        for module, stacks in moved:
            for name, stack in stacks:
                del module._parameters[name]
                module.add_module(name, stack)
        for wrapper in model.modules():
            if type(wrapper).__name__ == "ParamWrapper" and isinstance(wrapper.get_param(), ExpertStack):
                wrapper.__class__ = expert_lora_class()


@functools.cache
def expert_lora_class():
    """PEFT's ParamWrapper, with the LoRA update handed to the ExpertStack per expert instead of
    re-parametrizing the whole stack (see the module docstring)."""
    from peft.tuners.lora.layer import ParamWrapper

    class ExpertLora(ParamWrapper):
        @contextlib.contextmanager
        def _activate_lora(self, active_adapters):
            stack = self.get_param()
            factors = [self.get_delta_factors(a) for a in active_adapters if a in self.lora_A]
            stack.deltas.extend(factors)
            try:
                yield
            finally:
                del stack.deltas[len(stack.deltas) - len(factors):]

    return ExpertLora


def parameter_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """PEFT `target_parameters` (`<experts module leaf>.<parameter>`, e.g. `experts.gate_up_proj`) for the
    expert stacks that `targets` names: all of them for all-linear, else those whose parameter name
    (`gate_up_proj`), experts module name (`experts`) or PEFT target (`experts.gate_up_proj`) is listed."""
    found = []
    for module_name, module in model.named_modules():
        for pname, child in module.named_children():
            if isinstance(child, ExpertStack):
                leaf = module_name.rpartition(".")[2]
                if targets == "all-linear" or pname in targets or leaf in targets or f"{leaf}.{pname}" in targets:
                    found.append(f"{leaf}.{pname}")
    return sorted(set(found))


def adapted(model: nn.Module, targets: list[str] | str):
    """(file key prefix, stack, in_features, out_features, the stack's checkpoint name) of every stack LoRA
    adapts (`model` empty, loaded or wrapped by PEFT). PEFT's target_parameters
    puts one ParamWrapper per targeted weight of an experts module, the first (in the module's parameter
    order) innermost, so its keys carry one `.base_layer` per wrapper around it; an experts class that
    stores [E, in, out] says so (`is_transposed`)."""
    wanted = set(parameter_targets(model, targets))
    for module_name, module in model.named_modules():
        leaf = module_name.rpartition(".")[2]
        stacks = [(n, c) for n, c in module.named_children()
                  if isinstance(c, ExpertStack) and f"{leaf}.{n}" in wanted]
        outer = module_name.replace(".base_layer", "")
        for i, (pname, stack) in enumerate(stacks):
            key = f"base_model.model.{outer}" + ".base_layer" * (len(stacks) - 1 - i)
            n_in, n_out = (stack.rows, stack.cols) if getattr(module, "is_transposed", False) else (stack.cols, stack.rows)
            yield key, stack, n_in, n_out, f"{outer}.{pname}"


def adapter_shapes(model: nn.Module, targets: list[str] | str, r: int) -> dict[str, tuple[int, int]]:
    """The adapter tensors PEFT writes for the targeted stacks, by file key: lora_A [r*E, in], lora_B [out, r*E]."""
    shapes = {}
    for key, stack, n_in, n_out, _ in adapted(model, targets):
        shapes[f"{key}.lora_A.weight"] = (r * stack.num_experts, n_in)
        shapes[f"{key}.lora_B.weight"] = (n_out, r * stack.num_experts)
    return shapes


def lora_delta(a: torch.Tensor, b: torch.Tensor, experts: int, scaling: float, transposed: bool) -> torch.Tensor:
    """The [E, ...] update PEFT's ParamWrapper.get_delta_weight adds to a fused expert weight, in float32:
    lora_A [r*E, in] -> [E, r, in], lora_B [out, r*E] -> [out, r, E]; [E, out, in] (or [E, in, out] for a
    class that stores it transposed)."""
    a = a.float().reshape(experts, -1, a.shape[-1])
    b = b.float().reshape(b.shape[0], -1, experts)
    return torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", b, a) * scaling
