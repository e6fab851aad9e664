"""Hostile run folders: a checkpoint tampered with and re-hashed (as a careless tool would), links into
the user's files, garbage in metrics.jsonl. Each case: the refusal names the file or tensor, --resume
auto falls back to the previous valid checkpoint, and nothing outside the run folder changes.

One real run (3 steps, a checkpoint per step) is made per module; each case tampers a copy of it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qshard.config import parse_recipe
from qshard.errors import QShardError
from qshard.observe.metrics import read_metrics, truncate_after
from qshard.state import checkpoint
from qshard.state.checkpoint import (
    REQUIRED,
    CheckpointInvalid,
    load_state,
    save_state,
    verify,
)
from qshard.state.resume import check_resume_compatible, expected_adapter_shapes
from tests.helpers import recipe_dict, write_rows
from tests.hostile import assert_refused, changed, run_cli, snapshot

ADAPTER = "adapter/adapter_model.safetensors"
LAYER0 = "base_model.model.model.layers.0.self_attn.q_proj"
TARGETS = ["q_proj", "v_proj"]  # fewer adapted layers: a faster run, same format


@pytest.fixture(scope="module")
def base(tmp_path_factory, micro_model):
    """A finished 3-step nf4 run (checkpoint-1..3) made through the CLI, its recipe, and the model's
    expected adapter shapes."""
    root = tmp_path_factory.mktemp("hostile-ckpt")
    data = write_rows(root / "train.jsonl")
    raw = recipe_dict(micro_model, data, root / "run", max_steps=3, save_every=1, keep_checkpoints=3, sample_tokens=0)
    raw["lora"]["target_modules"] = TARGETS
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("train", str(root / "recipe.yaml"))
    assert result.code == 0, result.err[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(root / "run")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return {"run": root / "run", "raw": raw, "expected": expected_of(parse_recipe(raw))}


def expected_of(recipe):
    from qshard.model.load import open_base
    from qshard.model.lora import resolve_targets
    from qshard.precision import Precision
    from qshard.validate import quant_spec

    _, skeleton = open_base(recipe.model.path, dtype=recipe.model.dtype,
                            quant=quant_spec(recipe, Precision("fp32", torch.device("cpu"))))
    return expected_adapter_shapes(skeleton, resolve_targets(skeleton, recipe.lora.target_modules), recipe.lora.r,
                                   recipe.lora.use_dora)


@pytest.fixture
def case(tmp_path, base):
    """A copy of the run with its own recipe, and a folder of the user's outside it."""
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    raw = json.loads(json.dumps(base["raw"]))
    raw["train"]["output_dir"] = str(run)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("the user's own file\n")
    return {"run": run, "ckpt": run / "checkpoint-3", "recipe": tmp_path / "recipe.yaml", "outside": outside,
            "expected": base["expected"]}


# -- tampering, then re-hashing as a careless tool would ---------------------------------------------

def rehash(ckpt: Path) -> None:
    """List every file under `ckpt` in its manifest with its size and sha256, following links."""
    files = {}
    for top, _, names in os.walk(ckpt, followlinks=True):
        for name in names:
            path = Path(top, name)
            rel = path.relative_to(ckpt).as_posix()
            if rel != "manifest.json" and path.is_file():
                files[rel] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    edit_json(ckpt / "manifest.json", lambda m: m.update(files=files))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    data = change(data) or data
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, change) -> None:
    tensors = dict(load_file(str(path)))
    change(tensors)
    save_file(tensors, str(path))


def edit_state(ckpt: Path, stem: str, change) -> None:
    state = load_state(ckpt, stem)
    change(state)
    save_state(ckpt, stem, state)


def link_outside(ckpt: Path, name: str, outside: Path) -> None:
    """Move `name` out of the checkpoint (to the user's folder) and leave a link to it in its place."""
    target = outside / Path(name).name
    shutil.move(str(ckpt / name), target)
    (ckpt / name).symlink_to(target, target_is_directory=target.is_dir())


def state_of(ckpt: Path, key: str, value) -> None:
    edit_json(ckpt / "trainer_state.json", lambda s: s.update({key: value}))


def scheduler_of(ckpt: Path, change) -> None:
    edit_json(ckpt / "trainer_state.json", lambda s: change(s["scheduler"]))


def first_param(state: dict) -> dict:
    return next(iter(state["state"].values()))


def mkfifo(ckpt: Path, _outside: Path) -> None:
    os.mkfifo(ckpt / "pipe")


# (id, tamper(ckpt, outside), fragment of the refusal): refused by verify() even with the manifest re-hashed
STRUCTURE = [
    ("adapter-file-link", lambda c, o: link_outside(c, ADAPTER, o), f"{ADAPTER} is a symbolic link"),
    ("adapter-folder-link", lambda c, o: link_outside(c, "adapter", o), "adapter is a symbolic link"),
    ("optimizer-link", lambda c, o: link_outside(c, "optimizer.safetensors", o), "optimizer.safetensors is a symbolic"),
    ("extra-link-to-system-file", lambda c, o: (c / "notes.txt").symlink_to("/etc/hostname"), "notes.txt is a symbolic"),
    ("dangling-link", lambda c, o: (c / "gone").symlink_to(o / "nothing"), "gone is a symbolic link"),
    ("fifo", mkfifo, "pipe is not a regular file"),
    ("extra-file", lambda c, o: (c / "extra.bin").write_bytes(b"\0" * 8), "lists 'extra.bin', which is not a file of"),
    ("extra-rank-file", lambda c, o: (c / "adapter" / "rng-rank0.json").write_text("{}"), "lists 'adapter/rng-rank0"),
]


@pytest.mark.parametrize("tamper, fragment", [c[1:] for c in STRUCTURE], ids=[c[0] for c in STRUCTURE])
def test_links_and_strange_files_in_a_checkpoint_are_refused(case, tamper, fragment):
    tamper(case["ckpt"], case["outside"])
    rehash(case["ckpt"])
    before = snapshot(case["outside"])
    with pytest.raises(CheckpointInvalid, match="checkpoint-3: ") as err:
        verify(case["ckpt"])
    assert fragment in str(err.value)
    assert changed(before, snapshot(case["outside"])) == []


def test_a_checkpoint_folder_that_is_a_link_is_refused(case):
    shutil.move(str(case["ckpt"]), case["outside"] / "checkpoint-3")
    case["ckpt"].symlink_to(case["outside"] / "checkpoint-3", target_is_directory=True)
    with pytest.raises(CheckpointInvalid, match="checkpoint-3 is a symbolic link"):
        verify(case["ckpt"])
    warnings = []
    assert checkpoint.find_resume(case["run"], warn=warnings.append) == case["run"] / "checkpoint-2"
    assert warnings == [("skipping checkpoint: checkpoint-3 is a symbolic link (a checkpoint is a real folder of "
                         "its run)")]


def test_a_file_not_in_the_manifest_is_refused(case):
    (case["ckpt"] / "adapter" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointInvalid, match="adapter/extra.safetensors is not listed in manifest.json"):
        verify(case["ckpt"])


def manifest_entry(name: str, source: str = "trainer_state.json"):
    """Add a manifest entry `name` with the size and hash of a real file (only the name can refuse it)."""
    def tamper(ckpt):
        data = (ckpt / source).read_bytes()
        edit_json(ckpt / "manifest.json", lambda m: m["files"].update(
            {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))
    return tamper


MANIFESTS = [
    ("absolute", manifest_entry("/etc/hostname"), "'/etc/hostname' leaves the checkpoint folder"),
    ("dot-dot", manifest_entry("../latest"), "'../latest' leaves the checkpoint folder"),
    ("dot-dot-inside", manifest_entry("adapter/../trainer_state.json"), "leaves the checkpoint folder"),
    ("dot-slash", manifest_entry("./trainer_state.json"), "'./trainer_state.json' leaves the checkpoint folder"),
    ("manifest-lists-itself", manifest_entry("manifest.json"), "lists 'manifest.json', which is not a file of"),
    ("no-files", lambda c: edit_json(c / "manifest.json", lambda m: m.update(files={})), "lists no files"),
    ("files-not-a-mapping", lambda c: edit_json(c / "manifest.json", lambda m: m.update(files=[])), "files is not a"),
    ("not-an-object", lambda c: (c / "manifest.json").write_text("[]"), "malformed manifest.json"),
    ("step-disagrees", lambda c: edit_json(c / "manifest.json", lambda m: m.update(step=2)), "manifest.json says step 2"),
    ("step-a-string", lambda c: edit_json(c / "manifest.json", lambda m: m.update(step="3")), "says step '3'"),
    ("format-version", lambda c: edit_json(c / "manifest.json", lambda m: m.update(format_version=2)),
     "format_version 2"),
    ("size-a-string", lambda c: edit_json(c / "manifest.json", lambda m: m["files"]["recipe.yaml"].update(size="9")),
     "malformed manifest.json entry for 'recipe.yaml'"),
]


@pytest.mark.parametrize("tamper, fragment", [c[1:] for c in MANIFESTS], ids=[c[0] for c in MANIFESTS])
def test_a_forged_manifest_is_refused(case, tamper, fragment):
    tamper(case["ckpt"])
    with pytest.raises(CheckpointInvalid) as err:
        verify(case["ckpt"])
    assert fragment in str(err.value)


@pytest.mark.parametrize("name", REQUIRED)
def test_a_checkpoint_without_a_file_the_format_needs_is_refused(case, name):
    (case["ckpt"] / name).unlink()
    rehash(case["ckpt"])
    with pytest.raises(CheckpointInvalid, match=f"manifest.json does not list {name}"):
        verify(case["ckpt"])


def test_a_checkpoint_folder_named_otherwise_is_refused(case):
    odd = case["run"] / "checkpoint-03"
    case["ckpt"].rename(odd)
    with pytest.raises(CheckpointInvalid, match="checkpoint-03: not a checkpoint folder"):
        verify(odd)
    for name in ("checkpoint-²", "checkpoint-3x", "checkpoint-"):
        (case["run"] / name).mkdir()
    assert [p.name for p in checkpoint.list_checkpoints(case["run"])] == ["checkpoint-1", "checkpoint-2"]


# -- contents, tampered and re-hashed --------------------------------------------------------------

def non_finite(value: float):
    def tamper(tensors):
        tensors[f"{LAYER0}.lora_B.weight"][0, 0] = value
    return tamper


CONTENTS = [
    ("state-malformed", lambda c: (c / "trainer_state.json").write_text('{"step": 3,'), "trainer_state.json is not valid"),
    ("state-a-list", lambda c: (c / "trainer_state.json").write_text("[3]"), "trainer_state.json is not a JSON object"),
    ("step-a-string", lambda c: state_of(c, "step", "3"), "has step '3'"),
    ("step-a-bool", lambda c: state_of(c, "step", True), "has step True"),
    ("step-a-float", lambda c: state_of(c, "step", 3.0), "has step 3.0"),
    ("step-negative", lambda c: state_of(c, "step", -3), "has step -3"),
    ("step-absurd", lambda c: state_of(c, "step", 10**15), "has step 1000000000000000"),
    ("step-disagrees", lambda c: state_of(c, "step", 2), "trainer_state.json says step 2, the folder is checkpoint-3"),
    ("seed-too-big", lambda c: state_of(c, "seed", 2**40), "has seed"),
    ("world-size-zero", lambda c: state_of(c, "world_size", 0), "has world_size 0"),
    ("world-size-without-rng", lambda c: state_of(c, "world_size", 2), "rng-rank1.json/.safetensors are missing"),
    ("global-batch-missing", lambda c: edit_json(c / "trainer_state.json", lambda s: s.pop("global_batch") and None),
     "has global_batch None"),
    ("fingerprints-a-list", lambda c: state_of(c, "fingerprints", []), "fingerprints"),
    ("scheduler-step", lambda c: scheduler_of(c, lambda s: s.update(last_epoch=7)), "scheduler is not the LambdaLR"),
    ("scheduler-foreign-key", lambda c: scheduler_of(c, lambda s: s.update(optimizer=None)), "scheduler"),
    ("scheduler-lambda-state", lambda c: scheduler_of(c, lambda s: s.update(lr_lambdas=[{"__code__": 1}])), "scheduler"),
    ("scheduler-nan-lr", lambda c: scheduler_of(c, lambda s: s.update(base_lrs=[math.nan])), "scheduler"),
    ("scheduler-a-string", lambda c: state_of(c, "scheduler", "cosine"), "scheduler"),
    ("grad-scaler-negative", lambda c: state_of(c, "grad_scaler", {"scale": -1.0, "growth_factor": 2.0,
                                                                   "backoff_factor": 0.5, "growth_interval": 2000,
                                                                   "_growth_tracker": 0}), "grad_scaler"),
    ("adapter-garbage", lambda c: (c / ADAPTER).write_bytes(b"\x10" * 64), f"{ADAPTER} is not a readable safetensors"),
    ("adapter-empty", lambda c: save_file({}, str(c / ADAPTER)), "holds no tensors"),
    ("adapter-nan", lambda c: edit_tensors(c / ADAPTER, non_finite(math.nan)), f"{LAYER0}.lora_B.weight has non-finite"),
    ("adapter-inf", lambda c: edit_tensors(c / ADAPTER, non_finite(math.inf)), f"{LAYER0}.lora_B.weight has non-finite"),
    ("adapter-rank", lambda c: edit_tensors(c / ADAPTER, lambda t: t.update({f"{LAYER0}.lora_A.weight": torch.zeros(4, 64)})),
     f"{LAYER0}.lora_A.weight has shape (4, 64), not of the adapter's rank r=8"),
    ("adapter-3d", lambda c: edit_tensors(c / ADAPTER, lambda t: t.update({f"{LAYER0}.lora_B.weight": torch.zeros(64, 8, 1)})),
     f"{LAYER0}.lora_B.weight has shape (64, 8, 1)"),
    ("adapter-integers", lambda c: edit_tensors(c / ADAPTER, lambda t: t.update(
        {f"{LAYER0}.lora_A.weight": torch.zeros(8, 64, dtype=torch.int32)})), "has dtype torch.int32"),
    ("adapter-missing-partner", lambda c: edit_tensors(c / ADAPTER, lambda t: t.pop(f"{LAYER0}.lora_B.weight")),
     f"the adapter has no {LAYER0}.lora_B.weight"),
    ("adapter-foreign-tensor", lambda c: edit_tensors(c / ADAPTER, lambda t: t.update(
        {"base_model.model.lm_head.weight": torch.zeros(2, 2)})), "lm_head.weight is not a LoRA tensor"),
    ("adapter-config-rank", lambda c: edit_json(c / "adapter/adapter_config.json", lambda a: a.update(r="8")),
     "adapter_config.json has r '8'"),
    ("optimizer-shape", lambda c: edit_state(c, "optimizer", lambda s: first_param(s).update(exp_avg=torch.zeros(8, 32))),
     "exp_avg has shape (8, 32), the adapter tensor has (8, 64)"),
    ("optimizer-nan", lambda c: edit_state(c, "optimizer", lambda s: first_param(s)["exp_avg_sq"].fill_(math.nan)),
     "exp_avg_sq has non-finite values"),
    ("optimizer-missing-param", lambda c: edit_state(c, "optimizer", lambda s: s["state"].pop(next(iter(s["state"])))),
     f"optimizer has no state for {LAYER0}.lora_A.weight"),
    ("optimizer-foreign-param", lambda c: edit_state(c, "optimizer", lambda s: s["state"].update(
        {"base_model.model.lm_head.weight": first_param(s)})), "'base_model.model.lm_head.weight', which is not an"),
    ("optimizer-no-moments", lambda c: edit_state(c, "optimizer", lambda s: [first_param(s).pop(m) for m in
                                                                             ("exp_avg", "exp_avg_sq")]), "no moments"),
    ("optimizer-betas", lambda c: edit_state(c, "optimizer", lambda s: s["param_groups"][0].update(betas="fast")),
     "param_groups"),
    ("optimizer-dangling-tensor", lambda c: edit_json(c / "optimizer.json", lambda j: json.loads(
        json.dumps(j).replace('"__tensor__": ".0.0.1"', '"__tensor__": "nowhere"'))), "optimizer.json/.safetensors are"),
    ("optimizer-json-garbage", lambda c: (c / "optimizer.json").write_text('{"__dict__": 5}'), "optimizer.json/.safe"),
    ("rng-malformed", lambda c: (c / "rng-rank0.json").write_text("{"), "rng-rank0.json/.safetensors are not"),
    ("rng-torch-size", lambda c: edit_state(c, "rng-rank0", lambda s: s.update(torch=torch.zeros(7, dtype=torch.uint8))),
     "rng-rank0.json/.safetensors do not hold an RNG state"),
    ("rng-python-index", lambda c: edit_state(c, "rng-rank0", lambda s: s["python"][1].__setitem__(-1, 9999)),
     "rng-rank0.json/.safetensors do not hold an RNG state"),
    ("recipe-garbage", lambda c: (c / "recipe.yaml").write_text("train: [unclosed"), "recipe.yaml is not a valid recipe"),
]


@pytest.mark.parametrize("tamper, fragment", [c[1:] for c in CONTENTS], ids=[c[0] for c in CONTENTS])
def test_tampered_and_rehashed_contents_are_refused(case, tamper, fragment):
    tamper(case["ckpt"])
    rehash(case["ckpt"])
    with pytest.raises(CheckpointInvalid, match="^checkpoint-3: ") as err:
        verify(case["ckpt"])
    assert fragment in str(err.value)
    warnings = []
    assert checkpoint.find_resume(case["run"], warn=warnings.append) == case["run"] / "checkpoint-2"
    assert len(warnings) == 1 and fragment in warnings[0]


def swap(key: str, shape: tuple[int, ...]):
    return lambda tensors: tensors.update({key: torch.zeros(shape)})


SHAPES = [  # structurally fine, so only the model's own shapes can refuse them
    ("in-features", swap(f"{LAYER0}.lora_A.weight", (8, 32)),
     f"{LAYER0}.lora_A.weight has shape (8, 32), this model needs (8, 64)"),
    ("out-features", swap(f"{LAYER0}.lora_B.weight", (128, 8)),
     f"{LAYER0}.lora_B.weight has shape (128, 8), this model needs (64, 8)"),
    ("layer-missing", lambda t: [t.pop(f"{LAYER0}.lora_{ab}.weight") for ab in "AB"],
     f"the adapter has no {LAYER0}.lora_A.weight (2 missing)"),
    ("layer-extra", lambda t: t.update({f"base_model.model.model.layers.7.mlp.up_proj.lora_{ab}.weight": torch.zeros(8, 8)
                                        for ab in "AB"}), "layers.7.mlp.up_proj.lora_A.weight (2 extra)"),
    ("dora-magnitude-extra", swap(f"{LAYER0}.lora_magnitude_vector", (64,)), f"{LAYER0}.lora_magnitude_vector (1 extra)"),
]


@pytest.mark.parametrize("tamper, fragment", [c[1:] for c in SHAPES], ids=[c[0] for c in SHAPES])
def test_an_adapter_that_does_not_fit_the_model_is_refused(case, tamper, fragment):
    edit_tensors(case["ckpt"] / ADAPTER, tamper)
    rehash(case["ckpt"])
    with pytest.raises(CheckpointInvalid) as err:
        verify(case["ckpt"], expected=case["expected"])
    assert fragment in str(err.value)
    with pytest.raises(QShardError, match="cannot resume: checkpoint-3: ") as err:
        checkpoint.resolve_resume(str(case["ckpt"]), case["run"], expected=case["expected"])
    assert fragment in err.value.what and err.value.where == "--resume"
    warnings = []
    assert checkpoint.resolve_resume("auto", case["run"], warn=warnings.append,
                                     expected=case["expected"]) == case["run"] / "checkpoint-2"
    assert len(warnings) == 1 and fragment in warnings[0]


def test_expected_shapes_are_the_saved_adapter_of_an_nf4_run(base):
    saved = load_file(str(base["run"] / "checkpoint-3" / ADAPTER))
    assert {k: tuple(v.shape) for k, v in saved.items()} == base["expected"]
    assert len(base["expected"]) == 8  # q_proj and v_proj (quantized shells) of 2 layers, lora_A and lora_B
    assert base["expected"][f"{LAYER0}.lora_A.weight"] == (8, 64)


def test_expected_shapes_are_peft_s_own_keys_for_dora(micro_model):
    from qshard.model.load import load_base_model, open_base
    from qshard.model.lora import adapter_state_dict, attach_lora

    _, skeleton = open_base(str(micro_model), dtype="float32")
    expected = expected_adapter_shapes(skeleton, ["v_proj", "down_proj"], 4, use_dora=True)
    model = attach_lora(load_base_model(skeleton, micro_model, log=lambda *_: None), r=4, alpha=8, dropout=0.0,
                        targets=["v_proj", "down_proj"], use_dora=True, seed=0)
    assert {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()} == expected
    assert len(expected) == 12  # lora_A, lora_B and the magnitude of 2 layers x 2 targets


# -- deleting only what qshard wrote ---------------------------------------------------------------

def test_prune_never_follows_or_removes_a_linked_checkpoint(case):
    user = case["outside"] / "my-checkpoint"
    shutil.copytree(case["run"] / "checkpoint-1", user)
    shutil.rmtree(case["run"] / "checkpoint-1")
    (case["run"] / "checkpoint-1").symlink_to(user, target_is_directory=True)
    before = snapshot(case["outside"])
    checkpoint.prune(case["run"], keep=1)
    assert (case["run"] / "checkpoint-1").is_symlink() and changed(before, snapshot(case["outside"])) == []
    assert sorted(p.name for p in case["run"].glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


@pytest.mark.parametrize("foreign", ["no-manifest", "unlisted-file", "inner-link"])
def test_prune_leaves_a_folder_holding_what_qshard_did_not_write(case, foreign):
    old = case["run"] / "checkpoint-1"
    if foreign == "no-manifest":
        (old / "manifest.json").unlink()
    elif foreign == "unlisted-file":
        (old / "my-notes.txt").write_text("mine")
    else:
        (old / "data").symlink_to(case["outside"], target_is_directory=True)
    before = snapshot(case["outside"])
    checkpoint.prune(case["run"], keep=1)
    assert old.is_dir() and not (case["run"] / "checkpoint-2").exists()
    assert changed(before, snapshot(case["outside"])) == []


def test_staging_leftover_that_is_a_link_is_unlinked_not_followed(case):
    (case["run"] / ".staging-checkpoint-4").symlink_to(case["outside"], target_is_directory=True)
    before = snapshot(case["outside"])
    stage = checkpoint.staging_dir(case["run"], 4)
    assert stage.is_dir() and not stage.is_symlink() and list(stage.iterdir()) == []
    assert changed(before, snapshot(case["outside"])) == []


def test_a_save_over_links_in_the_run_folder_writes_through_none_of_them(case):
    """`latest`, `.latest.tmp` and `checkpoint-4` are links to the user's files: each is replaced or
    moved aside, no user file is written or deleted."""
    run, outside = case["run"], case["outside"]
    (outside / "notes").mkdir()
    for name, target in (("latest", outside / "precious.txt"), (".latest.tmp", outside / "precious.txt"),
                         ("checkpoint-4", outside / "notes")):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(target)
    before = snapshot(outside)
    stage = checkpoint.staging_dir(run, 4)
    shutil.copytree(run / "checkpoint-3", stage, dirs_exist_ok=True)
    (stage / "manifest.json").unlink()
    edit_json(stage / "trainer_state.json", lambda s: s.update(step=4) or s["scheduler"].update(last_epoch=4))
    final = checkpoint.commit(stage, run, 4)
    assert changed(before, snapshot(outside)) == []
    assert (run / "latest").read_text() == "checkpoint-4" and not (run / "latest").is_symlink()
    assert os.readlink(run / "checkpoint-4.moved-aside-0") == str(outside / "notes")
    assert verify(final)["step"] == 4


def test_write_json_replaces_a_link_instead_of_writing_through_it(case):
    (case["run"] / "sharding.json").unlink(missing_ok=True)
    (case["run"] / "sharding.json").symlink_to(case["outside"] / "precious.txt")
    before = snapshot(case["outside"])
    checkpoint.write_json(case["run"] / "sharding.json", [{"rank": 0}])
    assert changed(before, snapshot(case["outside"])) == []
    assert json.loads((case["run"] / "sharding.json").read_text()) == [{"rank": 0}]


# -- metrics.jsonl -----------------------------------------------------------------------------------

def metrics_lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


@pytest.mark.parametrize("garbage", ['{"step": 3, "loss": 5.9', "\x00\x00\x00", '["step", 2]', '{"loss": 1.0}',
                                     '{"step": "2"}', '{"step": true}'])
def test_truncate_after_keeps_records_to_the_step_and_drops_what_is_not_one(case, garbage):
    lines = metrics_lines(case["run"])
    assert len(lines) == 3
    (case["run"] / "metrics.jsonl").write_text(lines[0] + "\n" + garbage + "\n" + "\n".join(lines[1:]) + "\n" + garbage)
    assert [r["step"] for r in read_metrics(case["run"])] == [1, 2, 3]
    assert truncate_after(case["run"], 2) == 2
    assert metrics_lines(case["run"]) == lines[:2]


def test_truncate_after_survives_bytes_that_are_not_utf8_and_replaces_a_link(case):
    user = case["outside"] / "metrics.jsonl"
    user.write_bytes((case["run"] / "metrics.jsonl").read_bytes() + b'{"step": 4, "lo\xff\xfe')
    (case["run"] / "metrics.jsonl").unlink()
    (case["run"] / "metrics.jsonl").symlink_to(user)
    before = snapshot(case["outside"])
    assert truncate_after(case["run"], 3) == 1
    assert changed(before, snapshot(case["outside"])) == []
    assert [r["step"] for r in read_metrics(case["run"])] == [1, 2, 3]
    assert not (case["run"] / "metrics.jsonl").is_symlink()


def test_report_reads_a_run_killed_mid_write(case):
    with open(case["run"] / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.')
    result = run_cli("report", str(case["run"]))
    assert result.code == 0, result.err
    assert "skipped 1 line(s) of metrics.jsonl" in result.err


# -- resume past the end -----------------------------------------------------------------------------

def test_resume_past_max_steps_names_the_step_and_the_limit(case):
    recipe = parse_recipe(yaml.safe_load(case["recipe"].read_text()))
    with pytest.raises(QShardError) as err:
        check_resume_compatible(case["ckpt"], recipe, 1, say=lambda *_: None)
    assert "at step 3 and train.max_steps is 3" in err.value.what and err.value.where == "train.max_steps"
    assert "raise train.max_steps above 3" in err.value.fix and "output_dir" in err.value.fix


# -- through the CLI: what a user sees ---------------------------------------------------------------

def resume(case, *extra: str):
    return run_cli("train", str(case["recipe"]), "--resume", *(extra or ("auto",)))


def test_cli_falls_back_past_a_rehashed_checkpoint_and_replaces_it(case):
    state_of(case["ckpt"], "step", 99)
    rehash(case["ckpt"])
    before = snapshot(case["outside"])
    result = resume(case)
    assert result.code == 0, result.err[-3000:]
    assert "skipping checkpoint: checkpoint-3: trainer_state.json says step 99" in result.out
    assert f"resumed from {case['run'] / 'checkpoint-2'} at step 2" in result.out
    assert verify(case["ckpt"])["step"] == 3 and [r["step"] for r in read_metrics(case["run"])] == [1, 2, 3]
    assert changed(before, snapshot(case["outside"])) == []


def test_cli_never_follows_a_link_out_of_a_checkpoint(case):
    link_outside(case["ckpt"], ADAPTER, case["outside"])
    rehash(case["ckpt"])
    before = snapshot(case["outside"])
    result = resume(case)
    assert result.code == 0, result.err[-3000:]
    assert f"checkpoint-3: {ADAPTER} is a symbolic link" in result.out
    assert f"resumed from {case['run'] / 'checkpoint-2'} at step 2" in result.out
    assert changed(before, snapshot(case["outside"])) == []
    aside = case["run"] / "checkpoint-3.moved-aside-0"  # not ours to delete: kept, its link intact
    assert (aside / ADAPTER).is_symlink() and verify(case["ckpt"])["step"] == 3


def test_cli_falls_back_past_a_checkpoint_that_is_a_link(case):
    shutil.move(str(case["ckpt"]), case["outside"] / "checkpoint-3")
    case["ckpt"].symlink_to(case["outside"] / "checkpoint-3", target_is_directory=True)
    before = snapshot(case["outside"])
    result = resume(case)
    assert result.code == 0, result.err[-3000:]
    assert "skipping checkpoint: checkpoint-3 is a symbolic link" in result.out
    assert f"resumed from {case['run'] / 'checkpoint-2'} at step 2" in result.out
    assert changed(before, snapshot(case["outside"])) == []
    assert (case["run"] / "checkpoint-3.moved-aside-0").is_symlink() and verify(case["ckpt"])["step"] == 3


def test_cli_resume_of_a_named_invalid_checkpoint_is_refused_without_fallback(case):
    edit_tensors(case["ckpt"] / ADAPTER, non_finite(math.nan))
    rehash(case["ckpt"])
    before = snapshot(case["run"], case["outside"])
    result = resume(case, str(case["ckpt"]))
    assert_refused(result, "cannot resume: checkpoint-3", f"{LAYER0}.lora_B.weight has non-finite values", "--resume")
    assert changed(before, snapshot(case["run"], case["outside"])) == []


def test_cli_refuses_an_adapter_of_another_shape_without_a_traceback(case):
    """lora_A of the wrong width, with optimizer moments to match: only the model's own shapes tell. Whether
    verify (given them) or restore (the engine's copy) refuses it, the user sees a qshard error naming the
    checkpoint, not a traceback."""
    key = f"{LAYER0}.lora_A.weight"
    edit_tensors(case["ckpt"] / ADAPTER, swap(key, (8, 32)))
    edit_state(case["ckpt"], "optimizer", lambda s: first_param(s).update(exp_avg=torch.zeros(8, 32),
                                                                          exp_avg_sq=torch.zeros(8, 32)))
    rehash(case["ckpt"])
    assert verify(case["ckpt"])["step"] == 3  # structurally sound
    before = snapshot(case["outside"])
    assert_refused(resume(case, str(case["ckpt"])), "cannot resume", "checkpoint-3")
    assert changed(before, snapshot(case["outside"])) == []


def test_restore_turns_an_engine_refusal_into_a_qshard_error(case):
    from qshard.state.resume import restore

    class Engine:
        def load_adapter(self, state):
            raise ValueError("adapter keys differ: missing ['x'], unexpected ['y']")

    with pytest.raises(QShardError) as err:
        restore(case["ckpt"], Engine(), scheduler=None, rt=None)
    assert err.value.what == (f"cannot resume from {case['ckpt']}: the adapter does not fit this run (ValueError: "
                              "adapter keys differ: missing ['x'], unexpected ['y'])")


def test_cli_resume_past_max_steps_is_refused_and_changes_nothing(case):
    before = snapshot(case["run"], case["outside"])
    assert_refused(resume(case), "step 3", "train.max_steps")
    assert changed(before, snapshot(case["run"], case["outside"])) == []


def test_cli_resume_with_a_partial_metrics_line_logs_each_step_once(case):
    """Killed while writing step 3's record and checkpoint-3: resume redoes step 3 from checkpoint-2."""
    shutil.rmtree(case["ckpt"])
    lines = metrics_lines(case["run"])
    (case["run"] / "metrics.jsonl").write_text(lines[0] + "\nnot json\n" + lines[1] + "\n" + lines[2][:25])
    result = resume(case)
    assert result.code == 0, result.err[-3000:]
    assert [r["step"] for r in read_metrics(case["run"])] == [1, 2, 3]
    assert metrics_lines(case["run"])[:2] == lines[:2] and len(metrics_lines(case["run"])) == 3
