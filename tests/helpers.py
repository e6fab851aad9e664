"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "What color is the sky?", "input": "", "output": "The sky is blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "What is the opposite of hot?", "input": "", "output": "The opposite of hot is cold."},
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit."},
    {"instruction": "What do cats say?", "input": "", "output": "Cats say meow."},
    {"instruction": "Spell dog.", "input": "", "output": "D O G."},
    {"instruction": "What is ice?", "input": "", "output": "Ice is frozen water."},
]


def recipe_dict(model: Path, data: Path, out: Path, **train) -> dict:
    """A small, fast recipe as a plain dict (tests override what they exercise)."""
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "quantization": {"method": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 64},
        "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-2,
                  "warmup_steps": 0, "seed": 0, **train},
    }


def set_engine(recipe: dict, engine: str) -> dict:
    """Set the recipe's distributed section for a compatibility-table engine name (none, ddp, zero1..3,
    zero3_offload, fsdp2)."""
    if engine.startswith("zero"):
        recipe["distributed"] = {"engine": "deepspeed", "zero_stage": int(engine[4])}
        if engine.endswith("offload"):
            recipe["distributed"].update(offload_optimizer="cpu", offload_params="cpu")
    elif engine != "none":
        recipe["distributed"] = {"engine": engine}
    return recipe


def write_rows(path: Path) -> Path:
    """ROWS as an alpaca JSONL file."""
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def torchrun(script: str, spec: Path, nproc: int = 2, timeout: float = 900) -> None:
    """`script SPEC` in one torchrun launch of `nproc` gloo processes (OMP 1 thread each); fails with
    the workers' stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           script, str(spec)], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]


def run_cells(root: Path, cells: list[dict], probe: list[list[int]], nproc: int = 2) -> None:
    """Train every cell in one `nproc`-rank launch of tests/dist_worker.py (spec written to root/spec.json)."""
    spec = root / "spec.json"
    spec.write_text(json.dumps({"cells": cells, "probe": probe}))
    torchrun("tests/dist_worker.py", spec, nproc)


def shardload_results(root: Path, models: dict[str, str], cases: list[list[str]]) -> dict[tuple, list[dict]]:
    """Run tests/shardload_worker.py on 2 ranks for `cases` ([engine, method, dtype, model key]) over `models`;
    each case's per-rank results."""
    spec = root / "spec.json"
    spec.write_text(json.dumps({"models": models, "out": str(root), "cases": cases}))
    torchrun("tests/shardload_worker.py", spec)
    return {tuple(case): [json.loads((root / f"{'-'.join(case)}-rank{k}.json").read_text()) for k in range(2)]
            for case in cases}


def assert_transformers_reads_as_qshard(folder: Path, ids: list[list[int]]) -> None:
    """The reference we did not write for a compressed-tensors folder: transformers + compressed-tensors, in the
    quantizer's environment (`make quantizers`), load it in float32 and give, on `ids`, the logits qshard's own
    reader gives (quantization.method checkpoint, float32 compute) within float32 summation order (1e-4 of the
    largest logit)."""
    import torch

    from qshard.model.load import QuantSpec, load_float32
    from qshard.tools.quantize import quantizer_python

    script = ("import json, sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
              "with torch.no_grad():\n"
              "    print(json.dumps([m(input_ids=torch.tensor([x])).logits.tolist() for x in json.loads(sys.argv[2])]))\n")
    run = subprocess.run([quantizer_python(), "-c", script, str(folder), json.dumps(ids)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = [torch.tensor(x) for x in json.loads(run.stdout.strip().splitlines()[-1])]
    model = load_float32(str(folder), QuantSpec("checkpoint"))
    with torch.no_grad():
        for x, want in zip(ids, reference):
            got = model(input_ids=torch.tensor([x])).logits
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
