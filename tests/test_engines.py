"""Every sharded cell of the compatibility table against one process: same losses, same adapter,
and (under ZeRO-3 / FSDP2) the frozen base really split across the 2 ranks.

All cells run inside ONE 2-process torchrun launch (tests/dist_worker.py), so process start-up and
imports are paid once; the single-process references run here, in the test process.

Tolerances, and why:
- fp32 compute (NF4/FP4/int8 bases on CPU): the only difference is the order of float sums (two
  half-batches reduced across ranks vs one batch), measured at ~1e-6 on the loss. Assert 1e-4.
- bf16 base: the two half-batches are padded to different lengths, so bf16 matmuls see different
  shapes and round differently; the loss moves by ~1e-3. Assert 5e-3 (bf16 epsilon is 7.8e-3).
- Adapters after 5 AdamW steps: Adam normalises each update to about the learning rate, so an
  element whose gradient is ~0 can flip sign on float noise and move by up to ~lr. Assert the
  max difference for fp32 cells (1e-3 vs lr 1e-2), and for bf16 the mean difference relative to
  the mean magnitude (1e-2) plus a max of 2 x lr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qshard import compat
from qshard.config import parse_recipe
from qshard.model.load import QuantSpec, load_model
from qshard.model.lora import attach_lora, resolve_targets
from qshard.train import run
from tests.helpers import recipe_dict, run_cells, write_rows

# (engine, base) from the table; DoRA (which reads the dense base weight) rides on the NF4 cells of
# the engines the option rules allow it with, as "nf4+dora".
SHARDED_CELLS = [(engine, base) for engine, base in compat.supported_cells() if engine != "none"]
SHARDED_CELLS += [(engine, "nf4+dora") for engine in ("fsdp2", "zero2")
                  if not any(engine in engines for engines, option, *_ in compat.OPTION_RULES if option == "lora.use_dora")]
SPLITS_BASE = {"zero3", "zero3_offload", "fsdp2"}
FIXTURES = Path(__file__).parent / "fixtures" / "ptq"
PTQ_MODELS = {"gptq": FIXTURES / "gptq_llama_w4_g32_sym", "awq": FIXTURES / "autoawq_llama_w4_g64_zp",
              "compressed-tensors": FIXTURES / "ct_llama_w4a16_g32_sym"}  # made by the real tools
LR, STEPS, GLOBAL_BATCH = 1e-2, 5, 4
PROBE = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]]


def _recipe(model_dir, data, out, engine: str, base: str, micro_batch: int) -> dict:
    r = recipe_dict(model_dir, data, out, max_steps=STEPS, micro_batch_size=micro_batch, learning_rate=LR,
                    sample_tokens=0)
    base, _, variant = base.partition("+")
    r["lora"]["use_dora"] = variant == "dora"
    if base in PTQ_MODELS:
        r["model"]["path"] = str(PTQ_MODELS[base])
        base = "checkpoint"
    r["quantization"]["method"] = {"bf16": "none"}.get(base, base)
    r["model"]["dtype"] = "bfloat16" if base == "bf16" else "float32"
    if engine.startswith("zero"):
        r["distributed"] = {"engine": "deepspeed", "zero_stage": int(engine[4])}
        if engine.endswith("offload"):
            r["distributed"].update(offload_optimizer="cpu", offload_params="cpu")
    elif engine != "none":
        r["distributed"] = {"engine": engine}
    return r


@pytest.fixture(scope="module")
def matrix(micro_model, tmp_path_factory):
    """Runs every sharded cell on 2 ranks and every base on 1 process; returns both sides' results."""
    root = tmp_path_factory.mktemp("matrix")
    data = root / "train.jsonl"
    write_rows(data)
    cells = [{"name": f"{e}-{b}", "recipe": _recipe(micro_model, data, root / f"{e}-{b}", e, b, GLOBAL_BATCH // 2)}
             for e, b in SHARDED_CELLS]
    run_cells(root, cells, PROBE)
    singles = {}
    for base in sorted({b for _, b in SHARDED_CELLS}):
        recipe = parse_recipe(_recipe(micro_model, data, root / f"single-{base}", "none", base, GLOBAL_BATCH))
        outcome = run(recipe, log=lambda *_: None)
        singles[base] = {"losses": outcome.losses, "sharding": outcome.sharding[0],
                         "adapter": load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))}
    sharded = {}
    for e, b in SHARDED_CELLS:
        ranks = [json.loads((root / f"{e}-{b}" / f"result-rank{k}.json").read_text()) for k in range(2)]
        sharded[(e, b)] = {"ranks": ranks, "dir": root / f"{e}-{b}",
                           "adapter": load_file(str(root / f"{e}-{b}" / "adapter" / "adapter_model.safetensors"))}
    return {"singles": singles, "sharded": sharded, "model": micro_model}


@pytest.mark.parametrize("engine,base", SHARDED_CELLS, ids=[f"{e}-{b}" for e, b in SHARDED_CELLS])
def test_sharded_losses_match_single_process(matrix, engine, base):
    ranks = matrix["sharded"][(engine, base)]["ranks"]
    single = matrix["singles"][base]["losses"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank reports the global loss
    assert len(ranks[0]["losses"]) == STEPS
    tol = 5e-3 if base == "bf16" else 1e-4
    diffs = [abs(a - b) for a, b in zip(ranks[0]["losses"], single)]
    assert max(diffs) <= tol, diffs


@pytest.mark.parametrize("engine,base", SHARDED_CELLS, ids=[f"{e}-{b}" for e, b in SHARDED_CELLS])
def test_sharded_adapter_is_complete_and_matches_single_process(matrix, engine, base):
    ours, ref = matrix["sharded"][(engine, base)]["adapter"], matrix["singles"][base]["adapter"]
    assert ours.keys() == ref.keys() and len(ours) == (42 if "dora" in base else 28)  # 7 linears x 2 layers x A, B(, m)
    for key, tensor in ours.items():
        assert tensor.shape == ref[key].shape and tensor.numel() > 0, key  # never ZeRO-3's empty tensors
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    diff = torch.cat([(ours[k] - ref[k]).abs().flatten() for k in ref])
    if base == "bf16":
        magnitude = torch.cat([ref[k].abs().flatten() for k in ref]).mean()
        assert diff.mean() / magnitude <= 1e-2 and diff.max() <= 2 * LR
    else:
        assert diff.max() <= 1e-3


def test_dora_with_zero3_is_refused_before_loading(micro_model, tmp_path):
    from qshard.errors import QShardError

    recipe = parse_recipe(_recipe(micro_model, tmp_path / "missing.jsonl", tmp_path / "out", "zero3", "nf4+dora", 2))
    with pytest.raises(QShardError, match="use_dora cannot be used with zero3") as e:
        run(recipe)  # the data file does not even exist: the refusal comes first
    assert "fsdp2" in e.value.fix and not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine,base", SHARDED_CELLS, ids=[f"{e}-{b}" for e, b in SHARDED_CELLS])
def test_frozen_base_is_split_only_where_the_engine_shards(matrix, engine, base):
    ranks = matrix["sharded"][(engine, base)]["ranks"]
    kind = "base_dense" if base == "bf16" else "base_quantized"
    assert ranks[0]["sharding"] == ranks[1]["sharding"]  # the report is gathered: same table on every rank
    full = matrix["singles"][base]["sharding"][f"{kind}_full"]
    local = [r["sharding"][r["rank"]][f"{kind}_local"] for r in ranks]
    assert full > 0
    if engine in SPLITS_BASE:
        assert all(x <= 0.6 * full for x in local), (local, full)
        assert full <= sum(local) <= full * 1.01  # padding of uneven splits only
    else:
        assert local == [full, full]  # DDP / ZeRO-1/2 replicate the frozen base by design


@pytest.mark.parametrize("engine,base", SHARDED_CELLS, ids=[f"{e}-{b}" for e, b in SHARDED_CELLS])
def test_saved_adapter_reproduces_the_sharded_models_logits(matrix, engine, base):
    cell = matrix["sharded"][(engine, base)]
    sharded_logits = torch.tensor(cell["ranks"][0]["logits"])
    assert torch.equal(sharded_logits, torch.tensor(cell["ranks"][1]["logits"]))
    method, _, variant = base.partition("+")
    spec = QuantSpec({"bf16": "none"}.get(method, "checkpoint" if method in PTQ_MODELS else method))
    path = PTQ_MODELS.get(method, matrix["model"])
    model = load_model(str(path), dtype="bfloat16" if base == "bf16" else "float32", quant=spec, log=lambda *_: None)
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, targets=resolve_targets(model, "all-linear"),
                        use_dora=variant == "dora", seed=0)
    from qshard.engines.single import SingleEngine

    engine_1 = SingleEngine(torch.device("cpu"))
    engine_1.wrap(model, lambda params: torch.optim.SGD(params, lr=0.0))
    engine_1.load_adapter(cell["adapter"])
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()
    tol = 2e-2 if base == "bf16" else 1e-4
    assert (logits - sharded_logits).abs().max().item() <= tol
