"""Runs a list of recipes inside ONE torchrun launch (process start-up and imports paid once).

    torchrun --nproc-per-node=2 tests/dist_worker.py SPEC.json

SPEC: {"cells": [{"name": ..., "recipe": {...}}], "probe": [[token ids]]}. For every cell each rank
writes <output_dir>/result-rank<k>.json: per-step losses, the sharding report, how the base was loaded
(the run's "loading the ..." line), and the logits of
the trained (still sharded) model on the probe batch; or, when the run stopped with a QShardError,
the error text. Optional per-cell sabotage, for the monitoring tests:
  "detach": "<module name suffix>"  that LoRA layer's output is detached from the graph
  "ballast_mb": {"rank": k, "mb": n}  rank k holds an extra n MB tensor during the run
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from qshard import _compat
from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.runtime import init_runtime
from qshard.train import run


def _ballast(spec: dict | None, rank: int):
    if spec and spec["rank"] == rank:
        return torch.ones(spec["mb"] * 2**18)  # float32: 4 bytes each, touched so it is resident
    return None


@contextlib.contextmanager
def _detached(suffix: str | None):
    """Make LoRA attachment detach one adapted layer's LoRA output (a wiring bug the loop must catch)."""
    if not suffix:
        yield
        return
    import qshard.train as train

    original = train.attach_lora

    def sabotaged(*args, **kwargs):
        model = original(*args, **kwargs)
        layer = next(m for n, m in model.named_modules() if n.endswith(suffix))
        forward = layer.lora_B["default"].forward
        layer.lora_B["default"].forward = lambda x: forward(x).detach()
        return model

    train.attach_lora = sabotaged
    try:
        yield
    finally:
        train.attach_lora = original


def _experts_held(model) -> list[int]:
    """[bytes this rank holds, bytes unsharded] of the MoE expert weights' storage (ExpertStacks)."""
    from qshard.engines.base import local_numel
    from qshard.model.experts import ExpertStack

    held = [0, 0]
    for stack in (m for m in model.modules() if isinstance(m, ExpertStack)):
        for _, p in stack.storage():
            held[0] += local_numel(p) * p.element_size()
            held[1] += getattr(p, "ds_numel", p.numel()) * p.element_size()
    return held


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    rt = init_runtime()
    probe = torch.tensor(spec["probe"])
    for cell in spec["cells"]:
        recipe = parse_recipe(cell["recipe"])
        ballast = _ballast(cell.get("ballast_mb"), rt.rank)
        said: list[str] = []
        try:
            with _detached(cell.get("detach")):
                outcome = run(recipe, log=lambda *args: said.append(" ".join(map(str, args))))
        except Exception as e:
            # Every rank meets these errors at the same point (checks on inputs every rank shares), so
            # all reach the barrier below; any other error still ends the launch.
            if not isinstance(e, QShardError):
                raise
            out = Path(recipe.train.output_dir) / f"result-rank{rt.rank}.json"
            out.write_text(json.dumps({"name": cell["name"], "rank": rt.rank, "error": str(e),
                                       "error_type": type(e).__name__}))
            torch.distributed.barrier()
            continue
        del ballast
        model = outcome.model.eval()
        with torch.no_grad():
            logits = model(input_ids=probe.to(rt.device), use_cache=False).logits.float().cpu()
        result = {"name": cell["name"], "rank": rt.rank, "world_size": rt.world_size, "losses": outcome.losses,
                  "experts_held": _experts_held(model),
                  "sharding": outcome.sharding, "logits": logits.tolist(),
                  "load": next((line for line in said if line.startswith("loading the")), None),
                  "vocab": next((line for line in said if line.startswith("embedding and head")), None),
                  "vocab_rows": [getattr(m, "weight").shape[0] for m in (model.get_input_embeddings(),
                                                                        model.get_output_embeddings())]}
        out = Path(recipe.train.output_dir) / f"result-rank{rt.rank}.json"
        out.write_text(json.dumps(result))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    _compat.exit_without_teardown(0)  # as `qshard train` ends a distributed worker
