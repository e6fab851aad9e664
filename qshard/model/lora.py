"""Attach LoRA adapters (PEFT) to a loaded base, and save them as a PEFT adapter folder."""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import torch
from torch import nn

from qshard import _compat
from qshard.errors import QShardError
from qshard.model import experts
from qshard.model.load import QUANT_LAYERS

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def linear_module_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Full names of every linear layer (dense or quantized) except the output head. An nn.Linear
    subclass with a forward of its own (Phi-MoE's router returns a tuple) is not a plain linear: PEFT's
    wrapper would break it, and the loader does not quantize it either."""
    return [name for name, m in model.named_modules()
            if (isinstance(m, QUANT_LAYERS) or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward))
            and name.rpartition(".")[2] not in skip]


def resolve_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Leaf names to adapt. 'all-linear' = every linear but the head, and every fused expert weight of a
    Mixture-of-Experts model (`gate_up_proj`, `down_proj`: what the per-expert linears were before
    transformers fused them); not the router. A name may also be an experts module (`experts`: all its
    expert weights). A name that matches nothing is an error."""
    linears = linear_module_names(model)
    stacks = expert_weight_names(model)
    leaves = sorted({name.rpartition(".")[2] for name in linears} | {n.rpartition(".")[2] for n in stacks})
    if target_modules == "all-linear":
        # a leaf that also names another kind of module (CTRL's `0` of `ffn.0` and of the block `h.0`) would
        # make PEFT wrap that module too: those linears are named in full
        linear_set = set(linears)
        others = {n.rpartition(".")[2] for n, m in model.named_modules()
                  if n and n not in linear_set and not isinstance(m, experts.ExpertStack)}
        chosen = sorted({leaf for leaf in leaves if leaf not in others} |
                        {n for n in linears if n.rpartition(".")[2] in others})
        refused = set(_compat.peft_refused_targets(model, chosen))  # all-linear: what PEFT allows
        if not chosen:
            conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
            raise QShardError(f"{model.config.model_type} has no linear layer (nn.Linear) for all-linear to adapt"
                              + (f": its projections are GPT-2-style Conv1D layers ({conv1d[0]}, ...), which qshard "
                                 "neither quantizes nor adapts yet" if conv1d else ""), where="lora.target_modules",
                              fix="train an architecture built from nn.Linear layers (Llama, Qwen, Mistral, GPT-NeoX, "
                                  "...)")
        return [t for t in chosen if t not in refused]
    known = linears + stacks + sorted({n.rpartition(".")[0] for n in stacks})
    unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in known)]
    refused = _compat.peft_refused_targets(model, target_modules)
    if refused:
        raise QShardError(f"PEFT refuses LoRA on {refused} of {model.config.model_type} models",
                          where="lora.target_modules", fix=f"leave them out (all-linear does), e.g. use names from: "
                                                           f"{', '.join(n for n in leaves if n not in refused)}")
    if unknown:
        experts_hint = " (expert weights: their names, or the experts module's)" if stacks else ""
        raise QShardError(f"LoRA target(s) {unknown} match no linear layer of this model",
                          where="lora.target_modules",
                          fix=f"use names from: {', '.join(leaves)}{experts_hint} (or all-linear)")
    return list(target_modules)


def expert_weight_names(model: nn.Module) -> list[str]:
    """Full names of the fused expert weights (ExpertStacks), as checkpoints name them."""
    return [name.replace(".base_layer", "") for name, m in model.named_modules()
            if isinstance(m, experts.ExpertStack)]


def split_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """(PEFT target_modules, PEFT target_parameters) for resolved `targets`: a name that is a linear layer
    goes to the first, a fused expert weight (or its experts module) to the second (`experts.down_proj`);
    a name that is both (Qwen2-MoE's `down_proj`: the shared expert's linear and the experts' weight) to
    both."""
    linears = linear_module_names(model)
    modules = [t for t in targets if any(n == t or n.endswith("." + t) for n in linears)]
    return modules, experts.parameter_targets(model, targets)


def check_expert_options(model: nn.Module, targets: list[str], dropout: float, use_dora: bool) -> None:
    """PEFT's LoRA on fused expert weights (ParamWrapper) refuses dropout and DoRA; say so before loading."""
    _, params = split_targets(model, targets)
    if params and dropout:
        raise QShardError(f"LoRA on expert weights ({', '.join(params)}) cannot use dropout: PEFT's adapter for "
                          f"fused expert weights does not support it (lora.dropout is {dropout})",
                          where="lora.dropout", fix="set lora.dropout: 0, or list lora.target_modules without the "
                                                    "expert weights (e.g. [q_proj, k_proj, v_proj, o_proj])")
    if params and use_dora:
        raise QShardError(f"DoRA cannot adapt expert weights ({', '.join(params)}): PEFT's adapter for fused expert "
                          "weights does not support it", where="lora.use_dora",
                          fix="set lora.use_dora: false, or list lora.target_modules without the expert weights")


def adapted_shapes(model: nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear LoRA will adapt, from the model (the empty skeleton will
    do), an expert weight counted once per expert; qshard.tools.plan.lora_param_count turns them into the
    adapter's parameter count."""
    shapes = [(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, *QUANT_LAYERS)) and any(name == t or name.endswith("." + t) for t in targets)]
    for _, stack, n_in, n_out, _ in experts.adapted(model, targets):
        shapes += [(n_in, n_out)] * stack.num_experts
    return shapes


def adapted_tensors_line(peft_model: nn.Module) -> str:
    """Which base tensors got adapters, for the log: linear layers and expert weights, by leaf name."""
    from collections import Counter

    linears = Counter(name.rpartition(".")[2] for name, m in peft_model.named_modules()
                      if hasattr(m, "lora_A") and not hasattr(m, "parameter_name"))
    stacks = Counter(f"{name.replace('.base_layer', '').rpartition('.')[2]}.{m.parameter_name} "
                     f"({m.get_param().num_experts} experts)"
                     for name, m in peft_model.named_modules() if hasattr(m, "parameter_name"))
    return "LoRA adapters on: " + ", ".join(f"{leaf} x{n}" for leaf, n in [*sorted(linears.items()),
                                                                          *sorted(stacks.items())])


def attach_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, targets: list[str],
                use_dora: bool, seed: int, use_rslora: bool = False) -> nn.Module:
    """Wrap `model` in a PeftModel; adapter weights are fp32 and the only trainable tensors."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners import lora

    modules, parameters = split_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                        target_parameters=parameters or None, use_dora=use_dora, use_rslora=use_rslora, bias="none",
                        task_type="CAUSAL_LM")
    # our quantized layers get PEFT's standard LoRA Linear wrapper, which calls them as `base_layer` and
    # reads `.weight` (dequantized) only for DoRA
    _compat.peft_register_custom_layers(config, {cls: lora.Linear for cls in QUANT_LAYERS})
    quant_layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    with _compat.peft_weight_placeholders(quant_layers, active=not use_dora), \
            _compat.quiet_peft_custom_layer_warning(), experts.peft_placeholders(model):
        peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if not any(p.device.type == "meta" for p in peft_model.parameters()):
        init_adapter(peft_model, seed)
    return peft_model


def initial_adapter_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor | None:
    """The starting value of one adapter tensor, a function of its name and the seed alone, so that it
    is the same on every rank, under every engine and however the model was loaded: lora_A as PEFT
    draws it (Kaiming-uniform, a=sqrt(5)) from a generator seeded per tensor, lora_B zero. None for
    tensors PEFT derives from the base (DoRA's magnitude)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    if ".lora_A." not in name:
        return None
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def init_adapter(peft_model: nn.Module, seed: int, write=lambda param, full: param.copy_(full)) -> None:
    """Set lora_A / lora_B to their seeded starting values; `write(param, full)` stores this rank's
    part of `full` when the parameter is sharded."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            full = initial_adapter_tensor(name, p.shape, seed) if p.requires_grad else None
            if full is not None:
                write(p, full)


def adapter_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors under PEFT's file naming (`...lora_A.weight`, no adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def adapter_params_by_file_key(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters keyed as PEFT writes them to files. PEFT's own renaming decides (adapter
    name removed, DoRA's `lora_magnitude_vector.default.weight` -> `lora_magnitude_vector`): we pass
    it each parameter's index as a stand-in value and read the names back."""
    from peft import get_peft_model_state_dict

    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    tags = get_peft_model_state_dict(peft_model, state_dict={n: torch.tensor(i) for i, (n, _) in enumerate(named)})
    return {key: named[int(tag)][1] for key, tag in tags.items()}


def save_adapter(out_dir: Path, state: dict[str, torch.Tensor], peft_model: nn.Module) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"]
    config.save_pretrained(str(out_dir))
    _drop_private_keys(out_dir / ADAPTER_CONFIG)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    readable_like_any_output(out_dir)
    return out_dir


def readable_like_any_output(folder: Path) -> None:
    """safetensors writes its files mode 0600; an adapter is shared and served, so its files get the
    mode any other output gets here (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


def finish_for_sharing(out_dir: Path, tokenizer, card: str) -> None:
    """The final adapter folder, ready to share: a base path that resolves from anywhere (not relative
    to where training ran), the tokenizer beside it, and a model card (README.md)."""
    config_file = out_dir / ADAPTER_CONFIG
    data = json.loads(config_file.read_text())
    base = data.get("base_model_name_or_path")
    if base and Path(base).expanduser().exists():
        data["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "README.md").write_text(card)
    readable_like_any_output(out_dir)


def _drop_private_keys(config_file: Path) -> None:
    """PEFT may serialise private fields; other tools should see only the public config."""
    data = json.loads(config_file.read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
