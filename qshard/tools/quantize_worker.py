"""The part of `qshard quantize` that runs inside the quantizer's own virtualenv (`make quantizers`: llm-compressor
with its own pins). It imports nothing from qshard, whose dependencies that environment does not have.

    .venv-quant/bin/python qshard/tools/quantize_worker.py SPEC.json

SPEC (written by qshard/tools/quantize.py): {"model": dense model folder, "out": folder to write,
"method": "gptq" | "awq", "bits": 4 | 8, "group_size": int, "symmetric": bool, "ignore": [module names],
"calibration": file of {"input_ids": [[...], ...]}}. Writes a compressed-tensors (pack-quantized) model folder.
"""

from __future__ import annotations

import json
import sys


def main(spec_path: str) -> int:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(open(spec_path).read())
    ids = json.loads(open(spec["calibration"]).read())["input_ids"]
    calibration = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto", trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], trust_remote_code=False)
    torch.manual_seed(0)
    if spec["method"] == "awq":
        skip_pinning_without_an_accelerator()
    oneshot(model=model, tokenizer=tokenizer, dataset=calibration, recipe=recipe(spec),
            num_calibration_samples=len(ids), max_seq_length=max(len(x) for x in ids),
            shuffle_calibration_samples=False, pipeline="sequential" if spec["method"] == "awq" else "independent")
    model.save_pretrained(spec["out"], save_compressed=True)
    tokenizer.save_pretrained(spec["out"])
    return 0


def skip_pinning_without_an_accelerator() -> None:
    """Workaround, llm-compressor 0.14.0.1: AWQ's smoothing pins the cached activations of each layer
    (IntermediatesCache.pin_memory) so that copies to an accelerator can be non-blocking, and on a machine without
    one torch refuses to pin ("Cannot access accelerator device when none is available"). Pinning only speeds
    host-to-device copies, so without an accelerator it is skipped; the values are the same. Remove when
    llm-compressor checks for an accelerator itself (tests/test_quantize.py runs AWQ on CPU)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def recipe(spec: dict):
    """GPTQ or AWQ on every Linear but the ignored ones, integer weights in groups (W4A16-style, activations
    untouched)."""
    weights = {"num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"], "strategy": "group",
               "group_size": spec["group_size"]}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if spec["method"] == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(config_groups=groups, ignore=spec["ignore"])
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(config_groups=groups, ignore=spec["ignore"], dampening_frac=0.01)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
