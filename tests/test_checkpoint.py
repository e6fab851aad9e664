"""qshard.state.checkpoint on real files: atomic commit, verification, fallback, pruning, pickle-free state,
and an exact resume of a real training run (same losses, bit-identical adapter)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.observe.metrics import read_metrics
from qshard.state import checkpoint
from qshard.state.checkpoint import (
    CheckpointInvalid,
    commit,
    find_resume,
    load_state,
    prune,
    save_state,
    staging_dir,
    verify,
)
from qshard.state.resume import rng_state, set_rng_state
from qshard.train import run
from tests.helpers import recipe_dict, write_rows

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


def write_contents(stage, step: int) -> None:
    """What resume.save_checkpoint writes, for a one-layer rank-2 adapter (verify reads the contents)."""
    from safetensors.torch import save_file

    from qshard.config import dump_recipe
    from qshard.state.resume import rng_state

    torch.manual_seed(step)
    adapter = {f"{LAYER}.lora_A.weight": torch.randn(2, 8), f"{LAYER}.lora_B.weight": torch.randn(8, 2)}
    (stage / "adapter").mkdir()
    save_file(adapter, str(stage / "adapter/adapter_model.safetensors"))
    (stage / "adapter/adapter_config.json").write_text('{"r": 2, "peft_type": "LORA"}')
    params = [torch.nn.Parameter(t.clone()) for t in adapter.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for _ in range(step):
        sum(p.sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
    names = [k.replace(".weight", ".default.weight") for k in adapter]
    state = optimizer.state_dict()
    save_state(stage, "optimizer", {"state": {names[i]: v for i, v in state["state"].items()},
                                    "param_groups": [{**state["param_groups"][0], "params": names}]})
    save_state(stage, "rng-rank0", rng_state())
    (stage / "trainer_state.json").write_text(json.dumps({
        "step": step, "epoch": 0, "offset_in_epoch": step, "seed": 0, "world_size": 1, "global_batch": 4,
        "scheduler": scheduler.state_dict(), "grad_scaler": None, "fingerprints": {}}))
    recipe = parse_recipe(recipe_dict(stage / "model", stage / "data.jsonl", stage.parent))
    (stage / "recipe.yaml").write_text(dump_recipe(recipe))


def save(out, step: int, extra: dict[str, bytes] | None = None):
    stage = staging_dir(out, step)
    write_contents(stage, step)
    for name, content in (extra or {}).items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(content)
    return commit(stage, out, step)


def rewrite_manifest(ckpt, change):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    change(manifest["files"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def rehash(ckpt):
    """Bring the manifest in line with the files, as a careless tool might after changing one."""
    def update(files):
        files.clear()
        files.update({p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size,
                                                       "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                      for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "manifest.json"})
    rewrite_manifest(ckpt, update)


def reason(ckpt) -> str:
    with pytest.raises(CheckpointInvalid) as err:
        verify(ckpt)
    return str(err.value)


# -- commit ----------------------------------------------------------------------------------------

def test_commit_writes_a_manifest_of_sizes_and_hashes_and_moves_latest(tmp_path):
    ckpt = save(tmp_path, 7)
    assert ckpt == tmp_path / "checkpoint-7"
    assert not (tmp_path / ".staging-checkpoint-7").exists()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["format_version"] == 1
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert len(files) == 8
    assert manifest["files"] == {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size,
                                                                  "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                                 for p in files}
    assert (tmp_path / "latest").read_text() == "checkpoint-7"
    save(tmp_path, 9)
    assert (tmp_path / "latest").read_text() == "checkpoint-9"
    assert verify(tmp_path / "checkpoint-9")["step"] == 9


def test_staging_dir_discards_leftovers_of_a_dead_save(tmp_path):
    stage = staging_dir(tmp_path, 3)
    (stage / "half-written.bin").write_bytes(b"x")
    assert list(staging_dir(tmp_path, 3).iterdir()) == []


def test_resaving_a_step_replaces_the_old_folder(tmp_path):
    save(tmp_path, 4, {"old.bin": b"old"})
    ckpt = save(tmp_path, 4)
    assert not (ckpt / "old.bin").exists() and verify(ckpt)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "latest"]


# -- verify ----------------------------------------------------------------------------------------

def test_missing_manifest_is_refused(tmp_path):
    ckpt = save(tmp_path, 1)
    (ckpt / "manifest.json").unlink()
    assert reason(ckpt) == "checkpoint-1: no manifest.json (the save did not finish)"


def test_unreadable_manifest_is_refused(tmp_path):
    ckpt = save(tmp_path, 1)
    (ckpt / "manifest.json").write_text('{"files": ')
    assert reason(ckpt).startswith("checkpoint-1: unreadable manifest.json")


def test_truncated_file_is_refused_with_both_sizes(tmp_path):
    ckpt = save(tmp_path, 1)
    weights = ckpt / "adapter/adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    assert reason(ckpt) == (f"checkpoint-1: adapter/adapter_model.safetensors has {size - 10} bytes, manifest says "
                            f"{size} (truncated?)")


def test_one_flipped_byte_is_refused(tmp_path):
    ckpt = save(tmp_path, 1)
    weights = ckpt / "adapter/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    assert reason(ckpt) == "checkpoint-1: adapter/adapter_model.safetensors does not match its sha256 (corrupted)"


def test_missing_file_is_refused(tmp_path):
    ckpt = save(tmp_path, 1)
    (ckpt / "trainer_state.json").unlink()
    assert reason(ckpt) == "checkpoint-1: trainer_state.json is missing"


@pytest.mark.parametrize("entry", ["../x", "adapter/../../x", "/etc/hostname"])
def test_manifest_entry_leaving_the_folder_is_refused(tmp_path, entry):
    ckpt = save(tmp_path, 1)
    (tmp_path / "x").write_bytes(b"outside")  # exists, so only the path check can refuse it
    rewrite_manifest(ckpt, lambda files: files.update({entry: {"size": 7, "sha256": "0" * 64}}))
    assert reason(ckpt) == f"checkpoint-1: manifest entry {entry!r} leaves the checkpoint folder"


def test_manifest_entry_without_a_size_is_refused(tmp_path):
    ckpt = save(tmp_path, 1)
    rewrite_manifest(ckpt, lambda files: files["trainer_state.json"].pop("size"))
    assert "trainer_state.json" in reason(ckpt)


# -- find_resume / resolve_resume ------------------------------------------------------------------

def test_find_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    newest = save(tmp_path, 6)
    state = newest / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": 7'))  # same size, different bytes
    warnings = []
    assert find_resume(tmp_path, warn=warnings.append) == tmp_path / "checkpoint-4"
    assert warnings == ["skipping checkpoint: checkpoint-6: trainer_state.json does not match its sha256 (corrupted)"]


def test_find_resume_orders_steps_numerically(tmp_path):
    save(tmp_path, 9)
    save(tmp_path, 10)
    assert find_resume(tmp_path) == tmp_path / "checkpoint-10"


def test_find_resume_never_picks_a_staging_folder(tmp_path):
    save(tmp_path, 3)
    save(tmp_path, 5)
    shutil.copytree(tmp_path / "checkpoint-5", tmp_path / ".staging-checkpoint-8")  # complete, even a manifest
    assert find_resume(tmp_path, warn=pytest.fail) == tmp_path / "checkpoint-5"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-5"]


def test_find_resume_with_no_valid_checkpoint_is_none(tmp_path):
    (save(tmp_path, 1) / "manifest.json").unlink()
    warnings = []
    assert find_resume(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 1
    assert find_resume(tmp_path / "does-not-exist") is None


def test_explicit_resume_of_an_invalid_folder_is_a_user_error(tmp_path):
    with pytest.raises(QShardError) as err:
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)
    assert err.value.what == "cannot resume: checkpoint-3: no manifest.json (the save did not finish)"
    assert err.value.where == "--resume"


# -- prune -----------------------------------------------------------------------------------------

def test_prune_keeps_the_newest_n(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_prune_never_deletes_the_protected_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    prune(tmp_path, keep=1, protect=tmp_path / "checkpoint-2")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


# -- save_state / load_state -----------------------------------------------------------------------

def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)  # NaN == NaN and -0.0 != 0.0, bit for bit


def assert_bit_equal(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_bit_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_bit_equal(x, y)
    else:
        assert a == b


def test_adamw_state_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(4, 5)).square().sum().backward()
    opt.step()
    state = opt.state_dict()
    save_state(tmp_path, "optimizer", state)
    loaded = load_state(tmp_path, "optimizer")
    assert_bit_equal(loaded, state)
    assert list(loaded["state"]) == [0, 1]  # integer keys stay integers
    assert loaded["state"][0]["step"].item() == 1.0
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], state["state"][0]["exp_avg_sq"])


def test_nested_state_with_scalars_and_many_dtypes_round_trips_bit_exactly(tmp_path):
    state = {
        "ints": [0, -3, 2**40], "floats": (0.1, float("inf"), -1e-300), "none": None, "flag": True,
        "text": "naïve ✓", 7: "int key", (1, "a"): "tuple key", "empty": {"l": [], "t": (), "d": {}},
        "tensors": {
            "f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
            "i64": torch.tensor([-(2**62), 1]), "u8": torch.arange(256, dtype=torch.uint8),
            "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5), "transposed": torch.randn(3, 2).T,
        },
    }
    state["tensors"]["f32"][0, 0] = float("nan")
    save_state(tmp_path, "s", state)
    assert_bit_equal(load_state(tmp_path, "s"), state)
    assert "__tensor__" in (tmp_path / "s.json").read_text()  # tensors live in safetensors, not in the JSON


def test_a_bare_tensor_round_trips(tmp_path):
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    save_state(tmp_path, "t", t)
    assert_bit_equal(load_state(tmp_path, "t"), t)


def test_tensors_that_share_memory_round_trip(tmp_path):
    base = torch.arange(8.0)
    state = {"whole": base, "same": base, "view": base[2:5]}
    save_state(tmp_path, "shared", state)
    assert_bit_equal(load_state(tmp_path, "shared"), state)


def test_rng_state_round_trip_replays_the_same_random_numbers(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(123)
    save_state(tmp_path, "rng", rng_state())
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_state(tmp_path, "rng"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# -- exact resume of a real run --------------------------------------------------------------------

def train(model, data, out, steps: int, resume: str | None = None, quantization: str = "nf4", **train_options):
    raw = recipe_dict(model, data, out, max_steps=steps, save_every=3, **train_options)
    raw["quantization"]["method"] = quantization
    raw["lora"]["dropout"] = 0.1  # so a resume that lost the RNG state would show in the losses
    raw["lora"]["target_modules"] = ["q_proj", "v_proj"]  # PEFT reads each target's dequantized weight: fewer is faster
    return run(parse_recipe(raw), resume=resume, log=lambda *_: None)


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_reproduces_the_uninterrupted_run_exactly(micro_model, alpaca_file, tmp_path):
    """6 steps straight vs 3 steps + resume to 6 (8 rows, batch 4: the resume is mid-epoch 2), on nf4. A
    constant schedule, because changing max_steps changes a cosine schedule's length by design."""
    straight = train(micro_model, alpaca_file, tmp_path / "a", 6, lr_scheduler="constant")
    first = train(micro_model, alpaca_file, tmp_path / "b", 3, lr_scheduler="constant")
    resumed = train(micro_model, alpaca_file, tmp_path / "b", 6, resume="auto", lr_scheduler="constant")

    assert first.losses == straight.losses[:3]
    assert resumed.steps == 6 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[3:]
    logged = read_metrics(tmp_path / "b")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == [r["loss"] for r in read_metrics(tmp_path / "a")]
    assert [r["loss"] for r in logged[3:]] == [round(loss, 6) for loss in straight.losses[3:]]
    assert len(adapter(tmp_path / "a")) == 8  # lora_A and lora_B of q_proj and v_proj in both layers
    assert_bit_identical(adapter(tmp_path / "b"), adapter(tmp_path / "a"))
    assert_bit_identical(load_file(str(tmp_path / "b/checkpoint-6/optimizer.safetensors")),
                         load_file(str(tmp_path / "a/checkpoint-6/optimizer.safetensors")))


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory, micro_model):
    """6 steps, default cosine schedule, dense base (quantization: none, cheap to set up), saves at 3 and 6."""
    folder = tmp_path_factory.mktemp("cosine")
    data = folder / "train.jsonl"
    write_rows(data)
    outcome = train(micro_model, data, folder / "run", 6, quantization="none")
    return outcome, folder / "run", data


def killed_after(run_dir, dest, step: int, logged_steps: int):
    """A copy of a finished run as a kill after `logged_steps` would leave it, newest checkpoint `step`."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "adapter")
    for ckpt in checkpoint.list_checkpoints(dest):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    lines = (dest / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dest / "metrics.jsonl").write_text("".join(lines[:logged_steps]))
    return dest


def test_resume_of_a_killed_cosine_run_is_exact(cosine_run, micro_model, tmp_path):
    straight, run_dir, data = cosine_run
    lrs = [r["lr"] for r in read_metrics(run_dir)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-3  # the schedule really decays
    killed = killed_after(run_dir, tmp_path / "b", step=3, logged_steps=5)
    resumed = train(micro_model, data, killed, 6, resume="auto", quantization="none")
    assert len(straight.losses) == 6 and resumed.steps == 6
    assert resumed.losses == straight.losses[3:]
    assert_bit_identical(adapter(killed), adapter(run_dir))


def test_resume_with_another_rng_state_is_not_exact(cosine_run, micro_model, tmp_path):
    """The control for the tests above: dropout 0.1 makes the losses depend on the restored RNG."""
    straight, run_dir, data = cosine_run
    killed = killed_after(run_dir, tmp_path / "b", step=3, logged_steps=3)
    ckpt = killed / "checkpoint-3"
    torch.manual_seed(999)
    save_state(ckpt, "rng-rank0", rng_state())  # another RNG state, re-hashed: it verifies
    rehash(ckpt)
    resumed = train(micro_model, data, killed, 6, resume="auto", quantization="none")
    assert resumed.steps == 6
    assert resumed.losses[0] != straight.losses[3]


def test_logged_lr_is_the_lr_the_step_used(cosine_run):
    _, run_dir, _ = cosine_run
    lrs = [r["lr"] for r in read_metrics(run_dir)]
    used = [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]  # train.make_scheduler, cosine
    assert lrs == pytest.approx(used)


def test_resumed_metrics_have_each_step_once(cosine_run, micro_model, tmp_path):
    """Steps logged after the last checkpoint are redone on resume; their old records must go."""
    _, run_dir, data = cosine_run
    killed = killed_after(run_dir, tmp_path / "b", step=3, logged_steps=5)  # steps 4, 5 logged, then killed
    train(micro_model, data, killed, 6, resume="auto", quantization="none")
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]
