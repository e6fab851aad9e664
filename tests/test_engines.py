"""Every sharded cell of the compatibility table against one process: same losses, same adapter,
and (under ZeRO-3 / FSDP2) the frozen base really split across the 2 ranks. Then the NF4 cells
varied (VARIED): gradient accumulation 2, fp16, 4 ranks, each against one process with the same
global batch.

Every 2-rank cell runs inside ONE 2-process torchrun launch (tests/dist_worker.py), the 4-rank cells
in one 4-process launch, so process start-up and imports are paid once per world size; the
single-process references run here, in the test process.

Tolerances, and why:
- fp32 compute (NF4/FP4/int8 bases on CPU): the only difference is the order of float sums (two
  half-batches reduced across ranks vs one batch), measured at ~1e-6 on the loss. Assert 1e-4.
- bf16 base: the two half-batches are padded to different lengths, so bf16 matmuls see different
  shapes and round differently; the loss moves by ~1e-3. Assert 5e-3 (bf16 epsilon is 7.8e-3).
- Adapters after 5 AdamW steps: Adam normalises each update to about the learning rate, so an
  element whose gradient is ~0 can flip sign on float noise and move by up to ~lr. Assert the
  max difference for fp32 cells (1e-3 vs lr 1e-2), and for bf16 the mean difference relative to
  the mean magnitude (1e-2) plus a max of 2 x lr.
- Gradient norms (VARIED): AdamW is nearly blind to a uniform gradient scale, so losses alone would
  barely notice an engine that divides by the accumulation steps a second time; the pre-clip norm
  halves. Assert relative 1e-4 (metrics.jsonl rounds to 1e-6; measured <= 1e-6).
- fp16 (autocast on CPU, NF4 compute in fp16): the one-process reference runs micro 2 x accumulation
  4, the very micro-batches of a 2-rank micro 2 x accumulation 2 cell, so fp16 sees the same shapes
  and only the fp32 gradient sums differ: measured 1.5e-7, the fp32 rule (1e-4) holds. With other
  micro-batches padding moves fp16 losses by up to 7e-4 (measured), as bf16's do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from qshard import _compat, compat
from qshard.config import parse_recipe
from qshard.model.load import QuantSpec, load_model
from qshard.model.lora import attach_lora, resolve_targets
from qshard.observe.metrics import read_metrics
from qshard.train import run
from tests.helpers import recipe_dict, run_cells, set_engine, write_rows

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


class Varied(NamedTuple):
    """An NF4 cell at another world size, accumulation or precision (auto: fp32 on CPU)."""
    name: str
    engine: str
    ranks: int
    micro: int
    accumulation: int
    precision: str = "auto"


# micro x accumulation x ranks = VARIED_BATCH (all 8 rows: each step is one reshuffled epoch), the batch
# of the one-process reference (micro 2 x accumulation 4).
VARIED_BATCH = 8
VARIED = [Varied(f"{engine}-accum2", engine, 2, 2, 2) for engine in ("ddp", "zero2", "zero3", "fsdp2")] + [
    Varied("ddp-fp16-accum2", "ddp", 2, 2, 2, "fp16"),
    Varied("zero3-4ranks", "zero3", 4, 2, 1),
    Varied("fsdp2-4ranks-accum2", "fsdp2", 4, 1, 2),
]
# DeepSpeed runs fp16 on a CPU only with oneDNN fp16 (x86: AVX512-FP16 or AMX-FP16, which the AMD EPYC
# development machine lacks); qshard asks the same question before loading (_compat.deepspeed_cpu_fp16)
# and refuses, so these cells run only where the CPU has it.
CPU_FP16 = _compat.deepspeed_cpu_fp16()
DEEPSPEED_FP16 = [Varied(f"{engine}-fp16-accum2", engine, 2, 2, 2, "fp16") for engine in ("zero2", "zero3")
                  if CPU_FP16]


def _recipe(model_dir, data, out, engine: str, base: str, micro_batch: int, accumulation: int = 1,
            precision: str = "auto") -> dict:
    r = recipe_dict(model_dir, data, out, max_steps=STEPS, micro_batch_size=micro_batch, learning_rate=LR,
                    sample_tokens=0, gradient_accumulation_steps=accumulation, precision=precision)
    base, _, variant = base.partition("+")
    r["lora"]["use_dora"] = variant == "dora"
    if base in PTQ_MODELS:
        r["model"]["path"] = str(PTQ_MODELS[base])
        base = "checkpoint"
    r["quantization"]["method"] = {"bf16": "none"}.get(base, base)
    r["model"]["dtype"] = "bfloat16" if base == "bf16" else "float32"
    return set_engine(r, engine)


def _varied_cell(model_dir, data, root: Path, v: Varied) -> dict:
    cell = {"name": v.name, "recipe": _recipe(model_dir, data, root / v.name, v.engine, "nf4", v.micro,
                                              v.accumulation, v.precision)}
    return cell


def _results(out: Path, ranks: int) -> dict:
    """What a launched cell left: every rank's result, the saved adapter and rank 0's per-step metrics."""
    results = [json.loads((out / f"result-rank{k}.json").read_text()) for k in range(ranks)]
    if "error" in results[0]:
        return {"ranks": results}
    return {"ranks": results, "dir": out, "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
            "grad_norms": [m["grad_norm"] for m in read_metrics(out)]}


@pytest.fixture(scope="module")
def matrix(micro_model, tmp_path_factory):
    """Runs every sharded cell and the 2-rank VARIED cells on 2 ranks, every base on 1 process; returns
    both sides' results."""
    root = tmp_path_factory.mktemp("matrix")
    data = root / "train.jsonl"
    write_rows(data)
    cells = [{"name": f"{e}-{b}", "recipe": _recipe(micro_model, data, root / f"{e}-{b}", e, b, GLOBAL_BATCH // 2)}
             for e, b in SHARDED_CELLS]
    varied = [v for v in VARIED + DEEPSPEED_FP16 if v.ranks == 2]
    cells += [_varied_cell(micro_model, data, root, v) for v in varied]
    run_cells(root, cells, PROBE)
    singles = {}
    for base in sorted({b for _, b in SHARDED_CELLS}):
        recipe = parse_recipe(_recipe(micro_model, data, root / f"single-{base}", "none", base, GLOBAL_BATCH))
        outcome = run(recipe, log=lambda *_: None)
        singles[base] = {"losses": outcome.losses, "sharding": outcome.sharding[0],
                         "adapter": load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))}
    sharded = {(e, b): _results(root / f"{e}-{b}", 2) for e, b in SHARDED_CELLS}
    return {"singles": singles, "sharded": sharded, "model": micro_model,
            "varied": {v.name: _results(root / v.name, 2) for v in varied}}


@pytest.fixture(scope="module")
def four_ranks(micro_model, tmp_path_factory):
    """The 4-rank VARIED cells, in one 4-process launch."""
    root = tmp_path_factory.mktemp("four_ranks")
    data = write_rows(root / "train.jsonl")
    varied = [v for v in VARIED if v.ranks == 4]
    run_cells(root, [_varied_cell(micro_model, data, root, v) for v in varied], PROBE, nproc=4)
    return {"varied": {v.name: _results(root / v.name, 4) for v in varied}}


@pytest.fixture(scope="module")
def varied_references(micro_model, tmp_path_factory):
    """One process, micro 2 x accumulation 4 = VARIED_BATCH, per precision."""
    root = tmp_path_factory.mktemp("varied_references")
    data = write_rows(root / "train.jsonl")
    references = {}
    for precision in ("auto", "fp16"):
        recipe = _recipe(micro_model, data, root / precision, "none", "nf4", 2, 4, precision)
        outcome = run(parse_recipe(recipe), log=lambda *_: None)
        references[precision] = {
            "losses": outcome.losses, "grad_norms": [m["grad_norm"] for m in read_metrics(outcome.output_dir)],
            "adapter": load_file(str(outcome.adapter_dir / "adapter_model.safetensors")),
            "sharding": outcome.sharding[0]}
    return references


def _varied(request, v: Varied) -> dict:
    """A VARIED cell's results, from the launch of its world size."""
    return request.getfixturevalue("matrix" if v.ranks == 2 else "four_ranks")["varied"][v.name]


@pytest.mark.parametrize("engine,base", SHARDED_CELLS, ids=[f"{e}-{b}" for e, b in SHARDED_CELLS])
def test_sharded_losses_match_single_process(matrix, engine, base):
    ranks = matrix["sharded"][(engine, base)]["ranks"]
    single = matrix["singles"][base]["losses"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank reports the global loss
    assert len(ranks[0]["losses"]) == STEPS
    tol = 5e-3 if base == "bf16" else 1e-4
    diffs = [abs(a - b) for a, b in zip(ranks[0]["losses"], single)]
    print(f"{engine}-{base}: max |loss - one process| {max(diffs):.2e} (tolerance {tol:.0e})")
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
    assert "fsdp2" in str(e.value) and not (tmp_path / "out").exists()  # the fix, alone or listed with others


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
    logits = _one_process_logits(matrix["model"], base, cell["adapter"])
    tol = 2e-2 if base == "bf16" else 1e-4
    assert (logits - sharded_logits).abs().max().item() <= tol


def _one_process_logits(model_dir: Path, base: str, adapter: dict, compute_dtype=torch.float32) -> torch.Tensor:
    """PROBE's logits from a fresh one-process model of `base` with the saved `adapter` loaded."""
    method, _, variant = base.partition("+")
    spec = QuantSpec({"bf16": "none"}.get(method, "checkpoint" if method in PTQ_MODELS else method),
                     compute_dtype=compute_dtype)
    path = PTQ_MODELS.get(method, model_dir)
    model = load_model(str(path), dtype="bfloat16" if base == "bf16" else "float32", quant=spec, log=lambda *_: None)
    model = attach_lora(model, r=8, alpha=16, dropout=0.0, targets=resolve_targets(model, "all-linear"),
                        use_dora=variant == "dora", seed=0)
    from qshard.engines.single import SingleEngine

    engine_1 = SingleEngine(torch.device("cpu"))
    engine_1.wrap(model, lambda params: torch.optim.SGD(params, lr=0.0))
    engine_1.load_adapter(adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()


# -- the NF4 cells varied: accumulation 2, fp16, 4 ranks -------------------------------------------

@pytest.mark.parametrize("v", VARIED, ids=[v.name for v in VARIED])
def test_varied_cell_matches_one_process_with_the_same_global_batch(request, varied_references, v):
    assert v.micro * v.accumulation * v.ranks == VARIED_BATCH
    cell, ref = _varied(request, v), varied_references[v.precision]
    losses = cell["ranks"][0]["losses"]
    assert all(r["losses"] == losses for r in cell["ranks"]) and len(losses) == STEPS
    tol = 1e-4
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref["losses"]))
    norm_diff = max(abs(a - b) / b for a, b in zip(cell["grad_norms"], ref["grad_norms"]))
    print(f"{v.name}: max |loss - one process| {loss_diff:.2e}, max relative grad-norm difference {norm_diff:.2e} "
          f"(tolerance {tol:.0e})")
    assert loss_diff <= tol and norm_diff <= tol, (losses, ref["losses"], cell["grad_norms"], ref["grad_norms"])
    if v.precision == "fp16":  # the comparison tells fp16 from fp32: the two one-process runs differ by more
        fp16_vs_fp32 = max(abs(a - b) for a, b in zip(ref["losses"], varied_references["auto"]["losses"]))
        print(f"{v.name}: one process, fp16 vs fp32: max |loss difference| {fp16_vs_fp32:.2e}")
        assert fp16_vs_fp32 > tol


@pytest.mark.parametrize("v", VARIED, ids=[v.name for v in VARIED])
def test_varied_cell_adapter_matches_one_process_and_reproduces_its_logits(request, micro_model, varied_references, v):
    cell, ref = _varied(request, v), varied_references[v.precision]["adapter"]
    ours = cell["adapter"]
    assert ours.keys() == ref.keys() and len(ours) == 28
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    sharded_logits = torch.tensor(cell["ranks"][0]["logits"])
    assert all(torch.equal(sharded_logits, torch.tensor(r["logits"])) for r in cell["ranks"])
    # The trained model's NF4 layers compute in the run's precision (fp16 runs: fp16) also outside autocast.
    compute = torch.float16 if v.precision == "fp16" else torch.float32
    logits_diff = (_one_process_logits(micro_model, "nf4", ours, compute) - sharded_logits).abs().max().item()
    print(f"{v.name}: max |adapter - one process| {diff:.2e}, max |logits - reloaded adapter| {logits_diff:.2e}")
    assert diff <= 1e-3 and logits_diff <= 1e-4


@pytest.mark.parametrize("v", [v for v in VARIED if v.ranks == 4 and v.engine in SPLITS_BASE],
                         ids=lambda v: v.name)
def test_four_ranks_hold_a_quarter_of_the_base_each(four_ranks, varied_references, v):
    ranks = four_ranks["varied"][v.name]["ranks"]
    full = varied_references["auto"]["sharding"]["base_quantized_full"]
    local = [r["sharding"][r["rank"]]["base_quantized_local"] for r in ranks]
    print(f"{v.name}: base bytes per rank {local} of {full} ({max(local) / full:.3f} at most)")
    assert all(x <= 0.3 * full for x in local), (local, full)
    assert full <= sum(local) <= full * 1.01


@pytest.mark.skipif(not CPU_FP16, reason="this CPU has no oneDNN fp16: the refusal test below runs instead")
def test_deepspeed_fp16_matches_one_process_where_the_cpu_has_fp16(matrix, varied_references):
    """DeepSpeed casts every floating parameter (embeddings, norms, LoRA) to fp16 while the one process
    autocasts fp32 weights: measured 7e-4 on this machine with DeepSpeed's device check bypassed
    (ZeRO-2 5.0e-4, ZeRO-3 7.1e-4). Assert 2e-3, about 2 fp16 epsilons."""
    for v in DEEPSPEED_FP16:
        ranks = matrix["varied"][v.name]["ranks"]
        diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], varied_references["fp16"]["losses"]))
        print(f"{v.name}: max |loss - one process fp16| {diff:.2e}")
        assert diff <= 2e-3


@pytest.mark.skipif(CPU_FP16, reason="this CPU has oneDNN fp16: DeepSpeed fp16 trains (test above)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_fp16_is_refused_before_loading_where_the_cpu_lacks_it(micro_model, tmp_path, stage):
    """DeepSpeed itself would stop inside deepspeed.initialize, after the base is loaded, with "Type fp16
    is not supported on your device."; qshard refuses first, with what to use instead."""
    from qshard.errors import QShardError

    recipe = parse_recipe(_recipe(micro_model, tmp_path / "missing.jsonl", tmp_path / "out", f"zero{stage}", "nf4",
                                  2, precision="fp16"))
    with pytest.raises(QShardError, match=f"fp16 cannot be used with zero{stage} on this CPU") as e:
        run(recipe)
    assert "distributed.engine: ddp" in str(e.value) and not (tmp_path / "out").exists()


def test_fp16_with_fsdp2_is_refused_before_loading(micro_model, tmp_path):
    from qshard.errors import QShardError

    recipe = parse_recipe(_recipe(micro_model, tmp_path / "missing.jsonl", tmp_path / "out", "fsdp2", "nf4", 2,
                                  precision="fp16"))
    with pytest.raises(QShardError, match="train.precision: fp16 cannot be used with fsdp2") as e:
        run(recipe)  # the data file does not even exist: the refusal comes first
    assert "ddp / deepspeed" in str(e.value) and not (tmp_path / "out").exists()  # the fix, alone or listed


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_ddp_reducer_is_released_before_the_process_group_is_destroyed(micro_model, tmp_path, monkeypatch, fails):
    """_compat.release_ddp_reducer: a DDP module that still holds its C++ Reducer when the group is destroyed
    may leave the Reducer the group's last owner, whose destructor can deadlock with gloo's threads over the
    GIL (a hang at the end of 1 in ~8 restarted DDP jobs). Checked after a finished run and after a run that
    failed in the loop (the exception's traceback keeps the model alive)."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    from qshard.errors import QShardError

    alive_at_teardown = []
    destroy = torch.distributed.destroy_process_group

    def observed_destroy(*args, **kwargs):
        alive_at_teardown.append(sum(isinstance(o, DistributedDataParallel) and o.reducer is not None
                                     for o in gc.get_objects()))
        return destroy(*args, **kwargs)

    monkeypatch.setattr(torch.distributed, "destroy_process_group", observed_destroy)
    data = write_rows(tmp_path / "train.jsonl")
    recipe = parse_recipe({**recipe_dict(micro_model, data, tmp_path / "out", max_steps=3, sample_tokens=0),
                           "distributed": {"engine": "ddp"}})
    if fails:
        monkeypatch.setenv("QSHARD_FAULT", "nan-step@2")
        with pytest.raises(QShardError, match="non-finite loss at step 2"):
            run(recipe, log=lambda *_: None)
    else:
        run(recipe, log=lambda *_: None)
    assert alive_at_teardown == [0]
