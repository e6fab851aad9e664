"""Load-time sharding checks, inside ONE torchrun launch (see tests/test_shardload.py).

    torchrun --nproc-per-node=2 tests/shardload_worker.py SPEC.json

SPEC: {"models": {name: DIR}, "out": DIR, "cases": [[engine, method, dtype, model name], ...]}.
For every case each rank loads the base twice: sharded while loading (qshard/shardload.py), watched
by a TorchDispatchMode that records the largest tensor any op touches, and whole
(qshard.model.load.load_base_model + LoRA, the reference). It gathers the sharded model's parameters and writes <out>/<case>-rank<k>.json: the
names whose gathered value differs from the reference (bit for bit), the largest tensor seen during
the sharded and the whole load, the largest full parameter and the most elements of any linear layer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qshard import _compat
from qshard.engines import create_engine
from qshard.model import shardload
from qshard.model.experts import ExpertStack
from qshard.model.load import QuantSpec, load_base_model, open_base
from qshard.model.lora import attach_lora, resolve_targets
from qshard.runtime import init_runtime


class LargestTensor(TorchDispatchMode):
    """The most bytes of any real (non-meta) tensor an op takes or returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not hasattr(t, "device_mesh"):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def attach(base):
    return attach_lora(base, r=4, alpha=8, dropout=0.0, targets=resolve_targets(base, "all-linear"),
                       use_dora=False, seed=0)


def gathered(engine_name: str, model) -> dict[str, torch.Tensor]:
    if engine_name == "fsdp2":
        return {n: p.full_tensor() for n, p in model.named_parameters()}
    import deepspeed

    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    rt = init_runtime()
    for engine_name, method, dtype, model in spec["cases"]:
        quant = QuantSpec(method=method)
        engine = create_engine("fsdp2" if engine_name == "fsdp2" else "deepspeed", device=rt.device,
                               precision="fp32", world_size=rt.world_size, micro_batch=1, accumulation=1,
                               max_grad_norm=None, zero_stage=3)
        model_dir, skeleton = open_base(spec["models"][model], dtype=dtype, quant=quant)
        with LargestTensor() as sharded_watch:
            load = shardload.load_fsdp2 if engine_name == "fsdp2" else shardload.load_zero3
            sharded = load(skeleton, model_dir, engine, attach, 0, rt.rank, rt.world_size, rt.device, quant=quant,
                           log=lambda *_: None)
        actual = gathered(engine_name, sharded)
        model_dir, skeleton = open_base(spec["models"][model], dtype=dtype, quant=quant)
        with LargestTensor() as whole_watch:
            reference = attach(load_base_model(skeleton, model_dir, quant=quant, log=lambda *_: None))
        expected = dict(reference.named_parameters())
        result = {"rank": rt.rank,
                  "names": sorted(expected), "missing": sorted(expected.keys() - actual.keys()),
                  "differ": [n for n in expected if n in actual and not (
                      actual[n].dtype == expected[n].dtype and torch.equal(actual[n], expected[n].detach()))],
                  "largest_sharded_load": sharded_watch.largest, "largest_whole_load": whole_watch.largest,
                  "largest_param": max(p.untyped_storage().nbytes() for p in expected.values()),
                  "largest_linear_elements": max(m.in_features * m.out_features for m in reference.modules()
                                                 if hasattr(m, "in_features")),
                  # the dense bytes of the largest fused MoE expert weight (one layer's expert stack)
                  "largest_expert_stack": max((s.num_experts * s.rows * s.cols * s.dtype.itemsize
                                               for s in reference.modules() if isinstance(s, ExpertStack)), default=0)}
        Path(spec["out"], f"{engine_name}-{method}-{dtype}-{model}-rank{rt.rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    _compat.exit_without_teardown(0)  # as `qshard train` ends a distributed worker
