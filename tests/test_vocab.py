"""Vocabulary-parallel embedding and head (qshard/model/vocab.py).

- Unit (tests/vocab_worker.py, 2 and 3 gloo ranks, vocabulary 67 so the last rank holds fewer rows, each
  rank's batch of another length): loss, decoder gradients and no-gradient logits equal the whole
  embedding and head in every rank, fp32 and bf16, tied and untied, Gemma 2's scaled embedding with
  soft-capped logits.
- Runs (2 ranks): ZeRO-3 and FSDP2 keep half the rows of a tied model's shared table and equal one process
  (losses, evaluation loss over an eval set that does not split evenly, logits); `vocab_parallel: false`
  leaves them to the engine; a checkpoint without the head is refused by name under the sharded load.
The engine matrix (tests/test_engines.py) runs every engine x base cell with the default (on).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qshard.config import parse_recipe
from qshard.train import run
from tests.helpers import REPO, recipe_dict, run_cells, set_engine, torchrun, write_rows

PROBE = [[1, 5, 9, 13, 17, 21]]


@pytest.mark.parametrize("ranks", [2, 3])
def test_vocabulary_parallel_pieces_equal_the_whole_embedding_and_head(tmp_path, ranks):
    out = tmp_path / "result.json"
    torchrun("tests/vocab_worker.py", out, nproc=ranks)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == ranks
    for rank, cases in enumerate(per_rank):
        for name, r in cases.items():
            where = f"rank {rank} {name}"
            assert r["loss"] <= 2e-6 * r["loss_value"], where  # fp32 rounding of the cross-rank log-sum-exp
            assert r["grad"] <= (1e-5 if "fp32" in name else 1e-2), where
            assert r["grads"] >= 10, where  # the decoder's parameters all got gradients
            assert r["logits"] == 0.0, where  # no-gradient forward: each rank's full logits, exactly
            assert r["rows_held"] == min(-(-67 // ranks), 67 - rank * -(-67 // ranks)), where
            assert r["tied_shared"] == ("tied" in name or "gemma" in name), where
            assert r["refused"] == "set distributed.vocab_parallel: false for this model", where


@pytest.fixture(scope="module")
def tied_model(micro_model, tmp_path_factory) -> Path:
    """The micro Llama with its head tied to the embedding (the checkpoint stores the table once)."""
    out = tmp_path_factory.mktemp("models") / "micro-tied"
    shutil.copytree(micro_model, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _recipe(model: Path, root: Path, name: str, engine: str, **distributed) -> dict:
    data = write_rows(root / "train.jsonl")
    evals = root / "eval.jsonl"
    evals.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))  # 3 rows: 2 + 1 on two ranks
    r = recipe_dict(model, data, root / name, max_steps=3, micro_batch_size=4 if engine == "none" else 2,
                    sample_tokens=0, eval_every=2)
    r["data"]["eval_path"] = str(evals)
    r["quantization"]["method"] = "nf4"
    set_engine(r, engine)
    r.setdefault("distributed", {}).update(distributed)
    if engine == "none":
        r.pop("distributed")
    return r


@pytest.fixture(scope="module")
def runs(micro_model, tied_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_runs")
    cells = {"zero3-tied": (tied_model, "zero3", {}), "fsdp2-tied": (tied_model, "fsdp2", {}),
             "fsdp2-untied": (micro_model, "fsdp2", {}),
             "fsdp2-engine-gathers": (micro_model, "fsdp2", {"vocab_parallel": False})}
    run_cells(root, [{"name": n, "recipe": _recipe(m, root, n, e, **d)} for n, (m, e, d) in cells.items()], PROBE)
    results = {n: [json.loads((root / n / f"result-rank{k}.json").read_text()) for k in range(2)] for n in cells}
    evals = {n: [json.loads(line)["eval_loss"] for line in (root / n / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in json.loads(line)] for n in cells}
    singles = {}
    for name, model in (("tied", tied_model), ("untied", micro_model)):
        outcome = run(parse_recipe(_recipe(model, root, f"single-{name}", "none")), log=lambda *_: None)
        with torch.no_grad():
            logits = outcome.model.eval()(input_ids=torch.tensor(PROBE), use_cache=False).logits
        metrics = (root / f"single-{name}" / "metrics.jsonl").read_text().splitlines()
        singles[name] = {"losses": outcome.losses, "logits": logits,
                         "evals": [json.loads(x)["eval_loss"] for x in metrics if "eval_loss" in json.loads(x)],
                         "eval_after": outcome.eval_after}
    return {"results": results, "evals": evals, "singles": singles}


@pytest.mark.parametrize("name", ["zero3-tied", "fsdp2-tied", "fsdp2-untied"])
def test_runs_keep_half_the_rows_and_equal_one_process(runs, name):
    ranks = runs["results"][name]
    single = runs["singles"]["tied" if "tied" in name and "untied" not in name else "untied"]
    assert ranks[0]["vocab"].startswith("embedding and head: vocabulary-parallel"), ranks[0]["vocab"]  # rank 0 logs
    assert ranks[0]["load"].startswith("loading the base sharded")
    for r in ranks:
        assert r["vocab_rows"] == [256, 256], r["vocab_rows"]  # half of the 512 rows each
        assert max(abs(a - b) for a, b in zip(r["losses"], single["losses"])) <= 1e-4, (r["losses"], single)
        assert (torch.tensor(r["logits"]) - single["logits"]).abs().max() <= 1e-4
    # evaluation over 3 rows: one rank runs a forward with no labelled token to pair the collectives up
    assert runs["evals"][name] and max(abs(a - b) for a, b in zip(runs["evals"][name], single["evals"])) <= 1e-4


def test_vocab_parallel_false_leaves_embedding_and_head_to_the_engine(runs):
    ranks = runs["results"]["fsdp2-engine-gathers"]
    single = runs["singles"]["untied"]
    assert "gathered by the engine like a layer (distributed.vocab_parallel is false)" in ranks[0]["vocab"]
    for r in ranks:
        assert r["vocab_rows"] == [512, 512]  # the full shape (FSDP2 shards it as a DTensor)
        assert max(abs(a - b) for a, b in zip(r["losses"], single["losses"])) <= 1e-4


def test_sharded_load_names_a_head_the_checkpoint_lacks(micro_model, tmp_path):
    broken = tmp_path / "no-head"
    shutil.copytree(micro_model, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    run_cells(tmp_path, [{"name": "no-head", "recipe": _recipe(broken, tmp_path, "no-head", "zero3")}], PROBE)
    result = json.loads((tmp_path / "no-head" / "result-rank0.json").read_text())
    assert "lacks 1 tensor(s) the architecture needs: lm_head.weight" in result["error"], result


def test_vocab_parallel_applies_to_zero3_and_fsdp2_only():
    with pytest.raises(Exception, match="distributed.vocab_parallel applies to ZeRO-3 and FSDP2, not ddp"):
        parse_recipe({**recipe_dict(REPO, REPO, REPO), "distributed": {"engine": "ddp", "vocab_parallel": False}})
