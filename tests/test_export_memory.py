"""`qshard export` streams: measured on a model large enough to see it, its peak memory is a few of the largest
tensors above the process's baseline, not the model (issue #18). BENCHMARKS.md has the 400M figures against PEFT's
merge_and_unload; this keeps the bound true in CI."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch

from qshard.config import parse_recipe
from qshard.train import run
from tests.helpers import REPO, recipe_dict, write_rows

# 24 layers of hidden 1024 / intermediate 4096, vocabulary 4096: 0.41B parameters, 0.82 GB in bf16; one decoder
# layer is 16.8M parameters (67 MB in float32), so "a layer" and "the model" are far apart
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=4096, tie_word_embeddings=False)
MIB = 2**20
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child of a large pytest process would
# report the parent's size
PROBE = """
import sys
import bitsandbytes.functional, peft, safetensors.torch, tqdm, transformers  # what export imports on its way
from qshard.tools import export
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key + ':')).split()[1]) * 1024
baseline = status('VmRSS')
export.export(sys.argv[1], sys.argv[2], dtype="bf16", check=False, log=lambda *_: None)
print(baseline, status('VmHWM'))
"""


def test_export_peak_is_a_few_tensors_above_baseline_not_the_model(micro_model, tmp_path):
    """A 1-step NF4 run on the model above, exported to bf16 (--no-check: the check loads whole models by design)
    in a fresh process: peak resident memory above the resident set after imports <= two decoder layers in
    float32 + 64 MiB (allocator slack, adapter, config, tokenizer), under a third of the model's bf16 bytes.
    Measured: 154 MiB added for the 784 MiB model (bound 192 MiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    model_bytes = sum(p.numel() * 2 for p in model.parameters())
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(micro_model / name, model_dir / name)
    recipe = recipe_dict(model_dir, write_rows(tmp_path / "train.jsonl"), tmp_path / "run", max_steps=1,
                         micro_batch_size=1, sample_tokens=0)
    recipe["model"]["dtype"] = "bfloat16"
    recipe["data"]["max_length"] = 32
    run(parse_recipe(recipe), log=lambda *_: None)

    probe = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run"), str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    baseline, peak = (int(x) for x in probe.stdout.split()[-2:])
    added, bound = peak - baseline, 2 * layer + 64 * MIB
    print(f"export of {model_bytes / MIB:.0f} MiB: baseline {baseline / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
          f"added {added / MIB:.0f} MiB (bound {bound / MIB:.0f} MiB)")
    assert bound < model_bytes / 3 and added <= bound
