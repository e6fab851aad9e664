"""Runs a list of recipes inside ONE torchrun launch (process start-up and imports paid once).

    torchrun --nproc-per-node=2 tests/dist_worker.py SPEC.json

SPEC: {"cells": [{"name": ..., "recipe": {...}}], "probe": [[token ids]]}. For every cell each rank
writes <output_dir>/result-rank<k>.json: per-step losses, the sharding report, and the logits of
the trained (still sharded) model on the probe batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from qshard.config import parse_recipe
from qshard.runtime import init_runtime
from qshard.train import run


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    rt = init_runtime()
    probe = torch.tensor(spec["probe"])
    for cell in spec["cells"]:
        recipe = parse_recipe(cell["recipe"])
        outcome = run(recipe, log=lambda *_: None)
        model = outcome.model.eval()
        with torch.no_grad():
            logits = model(input_ids=probe.to(rt.device), use_cache=False).logits.float().cpu()
        result = {"name": cell["name"], "rank": rt.rank, "world_size": rt.world_size, "losses": outcome.losses,
                  "sharding": outcome.sharding, "logits": logits.tolist()}
        out = Path(recipe.train.output_dir) / f"result-rank{rt.rank}.json"
        out.write_text(json.dumps(result))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
