"""Checkpoint key(s) -> the skeleton's parameter, and how to combine them: transformers' own rules.

transformers 5 converts many published checkpoints while loading: it renames tensors (GPT-NeoX's
`embed_out` -> `lm_head`, Mixtral's `block_sparse_moe` -> `mlp`) and merges several into one (the
per-expert `experts.N.w1/w3` of a Mixture-of-Experts layer stacked into `experts.gate_up_proj`). The
rules are data (`transformers.conversion_mapping.get_model_conversion_mapping`); they are read from
the installed transformers, never copied, and applied as its loader applies them
(`core_model_loading.convert_and_load_state_dict_in_model`): every renaming in turn, then at most one
converter; keys in natural order, so a converter's list of experts is in expert order; tensors grouped
by the first parameter name they produce.

Each group is a `Target`: the one unit qshard's streaming loaders read. A plain rename reads one
tensor; a converter reads its sources (one layer's experts at most, in the rules transformers ships)
only when it is built, so a loader holds one target's tensors at a time. The names and shapes a
target produces come from running the same operations on meta tensors: the header check sees the
converted checkpoint without reading a weight.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qshard.errors import QShardError

# The conversion operations qshard applies: pure functions of their input tensors (torch.stack, cat,
# chunk, reshape), so they run on meta tensors for the header check and one target at a time for the
# load. Any other operation (a quantizer's, a vision tower's fusion) is refused by name.
STREAMABLE_OPS = frozenset({"MergeModulelist", "Concatenate", "Chunk", "Split", "Interleave", "Transpose",
                            "SplitModulelist", "PermuteForRope"})
Read = Callable[[str], torch.Tensor]  # checkpoint key -> the tensor (real, or a meta stand-in)


@dataclass
class Target:
    """Parameters `shapes` (name -> shape, in the model's names) built from checkpoint tensors `sources`
    by `rule` (None: one tensor, at most renamed). `patterns[i]` is the rule's pattern `sources[i]` matched."""

    first: str  # the name transformers groups the target under (the first parameter it fills)
    sources: list[str] = field(default_factory=list)
    rule: object | None = None  # a transformers WeightConverter
    patterns: list[str] = field(default_factory=list)
    shapes: dict[str, torch.Size] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def renamed(self) -> bool:
        """Whether the checkpoint stores this under another name, or in several tensors."""
        return self.rule is not None or self.names != self.sources

    def build(self, model: nn.Module, read: Read) -> dict[str, torch.Tensor]:
        """{parameter name: tensor}, reading the sources only now (`read(key)`)."""
        if self.rule is None:
            return {self.first: read(self.sources[0])}
        rule = copy.deepcopy(self.rule)  # it collects tensors: one instance per target, as transformers does
        for pattern, key in zip(self.patterns, self.sources):
            rule.add_tensor(self.first, key, pattern, functools.partial(read, key))  # read when converted
        with torch.no_grad():
            built = rule.convert(self.first, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in built.items()}


    def expert_reader(self, model: nn.Module, read: Read, count: int) -> Callable[[int], dict[str, torch.Tensor]] | None:
        """e -> {parameter name: expert e's slice}, built from expert e's sources alone, when this target
        stacks `count` experts with transformers' MergeModulelist first (dim 0) and no other source:
        the slice is then the rule applied to one source per pattern. None otherwise."""
        ops = list(getattr(self.rule, "operations", []))
        if not ops or type(ops[0]).__name__ != "MergeModulelist" or getattr(ops[0], "dim", 0) != 0:
            return None
        by_pattern: dict[str, list[str]] = {}
        for pattern, key in zip(self.patterns, self.sources):
            by_pattern.setdefault(pattern, []).append(key)
        if any(len(keys) != count for keys in by_pattern.values()):
            return None

        def expert(e: int) -> dict[str, torch.Tensor]:
            one = Target(self.first, [keys[e] for keys in by_pattern.values()], self.rule, list(by_pattern))
            return {name: tensor[0] for name, tensor in one.build(model, read).items()}

        return expert


def plan(model: nn.Module, headers: dict[str, tuple[torch.dtype, list[int]]],
         names: list[str]) -> tuple[list[Target], list[str]]:
    """The targets of a checkpoint whose tensors are `headers` {key: (stored dtype, shape)} for `model`
    (the empty skeleton, quantized shells or LoRA wrappers in place) whose checkpoint names are `names`,
    in checkpoint order, and the keys this architecture has no place for. A rule that cannot be
    streamed is a QShardError naming it."""
    from transformers.core_model_loading import (
        WeightConverter,
        dot_natural_key,
        rename_source_key,
    )

    rules = conversion_rules(model)
    renamings = [r for r in rules if not isinstance(r, WeightConverter)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    by_pattern = {pattern: rule for rule in converters for pattern in rule.source_patterns}
    known = dict.fromkeys(names, True)
    prefix = getattr(model, "base_model_prefix", None)
    targets: dict[str, Target] = {}
    ignored = []
    for key in sorted(headers, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if name not in known and key in known:  # as transformers: a key the rules should have left alone
            name, pattern = rename_source_key(key, [], [], prefix, known)
        if name not in known:
            ignored.append(key)
            continue
        rule = by_pattern[pattern] if pattern is not None else None
        target = targets.setdefault(name, Target(name, rule=rule))
        target.sources.append(key)
        target.patterns.append(pattern)

    def stand_in(key: str) -> torch.Tensor:
        return torch.empty(headers[key][1], dtype=headers[key][0], device="meta")

    for target in targets.values():
        if target.rule is not None:
            check_streamable(model, target.rule)
        target.shapes = {name: t.shape for name, t in _built_on_meta(model, target, stand_in).items()}
    return list(targets.values()), ignored


def conversion_rules(model: nn.Module) -> list:
    """The renamings and converters transformers applies when it loads this model's checkpoints."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model)


def check_streamable(model: nn.Module, rule) -> None:
    unknown = [type(op).__name__ for op in rule.operations if type(op).__name__ not in STREAMABLE_OPS]
    if unknown:
        raise QShardError(f"transformers converts {_architecture(model)} checkpoints with {_describe(rule)}, whose "
                          f"operation(s) {', '.join(unknown)} qshard cannot apply while streaming the checkpoint",
                          where=f"config.json: model_type {model.config.model_type!r}",
                          fix="save the model once with transformers' save_pretrained in its converted form, or "
                              "train an architecture whose checkpoints need no such conversion")


def _built_on_meta(model: nn.Module, target: Target, read: Read) -> dict[str, torch.Tensor]:
    """The target built from meta stand-ins: its names and shapes, no tensor read."""
    try:
        return target.build(model, read)
    except Exception as e:  # the rule's own code refuses tensors it cannot combine (sizes, count)
        raise QShardError(f"transformers' rule {_describe(target.rule)} for {_architecture(model)} cannot combine "
                          f"the checkpoint tensors {shown(target.sources)} ({type(e).__name__}: {e})",
                          where=f"checkpoint tensor {target.sources[0]}",
                          fix="the checkpoint does not match its config.json: use the model's own files") from None


def _architecture(model: nn.Module) -> str:
    return f"{type(model).__name__} (model_type {model.config.model_type!r})"


def _describe(rule) -> str:
    ops = ", ".join(type(op).__name__ for op in getattr(rule, "operations", []))
    return f"{type(rule).__name__}({rule.source_patterns} -> {rule.target_patterns}{'; ' + ops if ops else ''})"


def shown(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
