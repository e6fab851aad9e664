"""Health checks of a sharded run, on 2 gloo ranks: a LoRA layer cut off from the loss is named under
every engine, and a rank holding an extra large tensor raises the imbalance warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import recipe_dict, run_cells, write_rows

ENGINES = {"ddp": {"engine": "ddp"}, "zero1": {"engine": "deepspeed", "zero_stage": 1},
           "zero2": {"engine": "deepspeed", "zero_stage": 2}, "zero3": {"engine": "deepspeed", "zero_stage": 3},
           "fsdp2": {"engine": "fsdp2"}}
DETACHED = "layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def runs(micro_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    data = root / "train.jsonl"
    write_rows(data)

    def cell(name: str, dist: dict, **extra) -> dict:
        r = recipe_dict(micro_model, data, root / name, max_steps=3, micro_batch_size=2, sample_tokens=0)
        r["distributed"] = dist
        return {"name": name, "recipe": r, **extra}

    cells = [cell(f"detach-{e}", d, detach=DETACHED) for e, d in ENGINES.items()]
    cells += [cell("ballast", ENGINES["ddp"], ballast_mb={"rank": 1, "mb": 400}),
              cell("balanced-zero3", ENGINES["zero3"])]
    run_cells(root, cells, [[1, 2, 3]])
    return root


@pytest.mark.parametrize("engine", list(ENGINES))
def test_detached_lora_layer_is_named_under_every_engine(runs, engine):
    for rank in (0, 1):
        result = json.loads((runs / f"detach-{engine}" / f"result-rank{rank}.json").read_text())
        assert "error" in result, "the run should have stopped"
        # lora_B's gradient is non-zero from step 1 on, so the cut is caught there, before any update
        assert "1 LoRA tensor(s) got no gradient in the first 2 steps" in result["error"]
        assert f"{DETACHED}.lora_B" in result["error"]
        assert "detached from the loss" in result["error"]
    assert (runs / f"detach-{engine}" / "metrics.jsonl").read_text() == ""  # stopped inside step 1


def _warnings(run: Path) -> list[dict]:
    path = run / "warnings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_rank_holding_an_extra_tensor_raises_the_imbalance_warning(runs):
    imbalance = [w for w in _warnings(runs / "ballast") if w["kind"] == "imbalance"]
    assert len(imbalance) == 1 and imbalance[0]["step"] == 1
    assert "rank 1 holds the most" in imbalance[0]["message"]
    ranks = json.loads((runs / "ballast" / "metrics.jsonl").read_text().splitlines()[0])["rank_memory"]
    assert ranks[1]["rss_mb"] - ranks[0]["rss_mb"] > 300  # the 400 MB tensor, seen in the per-rank memory


def test_balanced_zero3_nf4_run_raises_no_warning(runs):
    assert _warnings(runs / "balanced-zero3") == []
    sharding = json.loads((runs / "balanced-zero3" / "sharding.json").read_text())
    assert [r["base_quantized_local"] for r in sharding][0] <= 0.6 * sharding[0]["base_quantized_full"]


# -- gradient flow every N steps (train.grad_flow_every), one process ------------------------------

def _detach_from_step(monkeypatch, suffix: str, first_bad_step: int) -> None:
    """From the `first_bad_step`-th forward on, the layer's LoRA output is cut from the graph (a layer
    that stops training mid-run: steps 1-2 pass, only a later check can see it)."""
    import qshard.train as train

    original = train.attach_lora

    def sabotaged(*args, **kwargs):
        model = original(*args, **kwargs)
        lora_b = next(m for n, m in model.named_modules() if n.endswith(suffix)).lora_B["default"]
        forward, calls = lora_b.forward, []

        def late_detach(x):
            calls.append(1)
            return forward(x).detach() if len(calls) >= first_bad_step else forward(x)

        lora_b.forward = late_detach
        return model

    monkeypatch.setattr(train, "attach_lora", sabotaged)


@pytest.mark.parametrize("every", [0, 2])
def test_grad_flow_every_n_steps_names_a_layer_that_stopped_training(micro_model, alpaca_file, tmp_path,
                                                                     monkeypatch, every):
    from qshard.config import parse_recipe
    from qshard.errors import QShardError
    from qshard.train import run

    _detach_from_step(monkeypatch, DETACHED, first_bad_step=3)  # one forward per step (micro batch 4 of 4)
    recipe = parse_recipe(recipe_dict(micro_model, alpaca_file, tmp_path / "out", max_steps=5, sample_tokens=0,
                                      grad_flow_every=every))
    if every == 0:  # steps 1-2 only: the run ends without noticing
        assert run(recipe, log=lambda *_: None).steps == 5
        return
    with pytest.raises(QShardError) as e:
        run(recipe, log=lambda *_: None)
    # detaching B's output also starves A: both are named, at the first multiple of 2 after the cut
    assert "2 LoRA tensor(s) got no gradient at step 4" in str(e.value)
    assert f"{DETACHED}.lora_A" in str(e.value) and f"{DETACHED}.lora_B" in str(e.value)
    assert "stopped receiving gradient" in e.value.fix
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # stopped inside step 4, before its update


def test_a_changed_frozen_base_tensor_stops_the_run(micro_model):
    import torch

    from qshard.errors import QShardError
    from qshard.model.load import QuantSpec, load_model
    from qshard.model.lora import attach_lora, resolve_targets
    from qshard.observe.monitor import base_fingerprint, check_base_unchanged
    from qshard.runtime import init_runtime

    base = load_model(str(micro_model), dtype="float32", quant=QuantSpec("nf4"), log=lambda *_: None)
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, targets=resolve_targets(base, "all-linear"),
                        use_dora=False, seed=0)
    rt = init_runtime()
    before = base_fingerprint(model)
    assert any(dtype == torch.uint8 for dtype, _ in before.values())  # the packed NF4 storage is covered
    check_base_unchanged(before, base_fingerprint(model), 1, rt)  # untouched: passes
    packed = next(p for n, p in model.named_parameters() if n.endswith("q_proj.base_layer.packed"))
    with torch.no_grad():
        packed[0] += 1  # what an optimizer step on a base tensor would do
    with pytest.raises(QShardError, match="q_proj.base_layer.packed"):
        check_base_unchanged(before, base_fingerprint(model), 1, rt)
