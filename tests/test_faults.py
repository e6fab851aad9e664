"""Kill any process at any moment, run the same command again, and training continues as if nothing
happened: real SIGKILLs (qshard.observe.faults injection points), real torchrun restarts, gloo, DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qshard.observe.faults import SAVE_POINTS
from qshard.state import checkpoint
from tests.helpers import recipe_dict, write_rows

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 2
ENGINES = {"ddp": {"engine": "ddp"}, "zero2": {"engine": "deepspeed", "zero_stage": 2},
           "zero3": {"engine": "deepspeed", "zero_stage": 3}, "fsdp2": {"engine": "fsdp2"}}


def _write_recipe(tmp: Path, model: Path, out: Path, distributed: dict | None, nproc: int, **train) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_rows(data)
    r = recipe_dict(model, data, out, max_steps=STEPS, micro_batch_size=4 // nproc, save_every=SAVE_EVERY,
                    sample_tokens=0, keep_checkpoints=3, **train)
    r["lora"]["dropout"] = 0.1  # RNG state matters for exactness
    if distributed:
        r["distributed"] = distributed
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _qshard(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QSHARD_FAULT", None)
    if fault:
        env["QSHARD_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "qshard.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b) and len(_losses(a)) == STEPS
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def references(micro_model, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: one process in-process, and every engine inside ONE 2-rank launch."""
    from qshard.config import parse_recipe
    from qshard.train import run

    tmp = tmp_path_factory.mktemp("refs")
    refs = {"none": tmp / "ref-none"}
    run(parse_recipe(yaml.safe_load(_write_recipe(tmp, micro_model, refs["none"], None, nproc=1).read_text())),
        log=lambda *_: None)
    cells = []
    for engine, dist in ENGINES.items():
        refs[engine] = tmp / f"ref-{engine}"
        recipe = yaml.safe_load(_write_recipe(tmp, micro_model, refs[engine], dist, nproc=2).read_text())
        cells.append({"name": engine, "recipe": recipe})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cells": cells, "probe": [[1, 2, 3]]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "tests/dist_worker.py", str(spec)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return refs


@pytest.mark.parametrize("engine", list(ENGINES))
def test_rank_killed_mid_step_restarts_and_resumes_bit_exact(engine, micro_model, references, tmp_path):
    """Rank 1 SIGKILLs itself in step 5 (after backward); torchrun --max-restarts=1 restarts both
    ranks, which resume from checkpoint-4 and finish with the uninterrupted run's exact numbers."""
    run = _write_recipe(tmp_path, micro_model, tmp_path / "faulted", ENGINES[engine], nproc=2)
    proc = _qshard(str(run), "--nproc", "2", "--max-restarts", "1", fault="step@5@1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_run(references[engine], tmp_path / "faulted")


def test_single_process_killed_then_rerun_with_resume_auto_is_bit_exact(micro_model, references, tmp_path):
    run = _write_recipe(tmp_path, micro_model, tmp_path / "faulted", None, nproc=1)
    killed = _qshard(str(run), fault="step@5")
    assert killed.returncode == -9
    assert _qshard(str(run), "--resume", "auto").returncode == 0
    _assert_same_run(references["none"], tmp_path / "faulted")


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_kill_during_checkpoint_write_never_leaves_a_usable_half_checkpoint(point, micro_model, references,
                                                                            tmp_path):
    """Killed while writing checkpoint-4: resume finds checkpoint-2, never the half-written one."""
    run = _write_recipe(tmp_path, micro_model, tmp_path / "faulted", None, nproc=1)
    assert _qshard(str(run), fault=f"{point}@4").returncode == -9
    out = tmp_path / "faulted"
    assert checkpoint.find_resume(out, warn=lambda *_: None) == out / "checkpoint-2"
    assert (out / "latest").read_text() == "checkpoint-2"
    assert _qshard(str(run), "--resume", "auto").returncode == 0
    _assert_same_run(references["none"], out)


def test_dead_rank_stops_the_job_within_seconds_and_leaves_no_process(micro_model, tmp_path):
    run = _write_recipe(tmp_path, micro_model, tmp_path / "dead", ENGINES["ddp"], nproc=2)
    start = time.monotonic()
    proc = _qshard(str(run), "--nproc", "2", fault="step@3@1")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60  # start-up (~10 s) + detection, not a 10-30 minute collective timeout
    assert "local_rank: 1" in proc.stderr and "Signal 9 (SIGKILL)" in proc.stderr  # torchrun names the dead rank
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert left == []


def test_hung_rank_is_caught_by_the_watchdog(micro_model, tmp_path):
    run = _write_recipe(tmp_path, micro_model, tmp_path / "hang", ENGINES["ddp"], nproc=2, watchdog_s=5)
    start = time.monotonic()
    proc = _qshard(str(run), "--nproc", "2", fault="hang-step@3@1", timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert "watchdog: rank 1 made no progress for 5 s in step 3" in proc.stderr
    assert "File " in proc.stderr.split("watchdog: rank 1")[1]  # a stack dump follows


def test_non_finite_loss_stops_naming_step_and_rank(micro_model, tmp_path):
    run = _write_recipe(tmp_path, micro_model, tmp_path / "nan", ENGINES["ddp"], nproc=2)
    proc = _qshard(str(run), "--nproc", "2", fault="nan-step@3@1")
    assert proc.returncode != 0
    assert "non-finite loss at step 3" in proc.stderr
    assert "rank 1: its own loss is non-finite; first non-finite gradient: base_model.model.model" in proc.stderr
    assert "rank 0: its loss is finite" in proc.stderr
    assert checkpoint.find_resume(tmp_path / "nan", warn=lambda *_: None).name == "checkpoint-2"


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_keeps_the_run(before, after, micro_model, tmp_path):
    """2 -> 1 and 1 -> 2 processes (same global batch): adapter, optimizer and data position carry
    over; the losses follow the unbroken run within float-summation noise (dropout 0 here, since
    per-rank RNG streams cannot be carried across world sizes, as the log says)."""
    dist = ENGINES["fsdp2"]
    ref = _write_recipe(tmp_path, micro_model, tmp_path / "ref", dist, nproc=before, lr_scheduler="constant")
    for path in (ref,):
        r = yaml.safe_load(path.read_text())
        r["lora"]["dropout"] = 0.0
        path.write_text(yaml.safe_dump(r))
    assert _qshard(str(ref), "--nproc", str(before)).returncode == 0
    out = tmp_path / "moved"
    first = _write_recipe(tmp_path, micro_model, out, dist, nproc=before, lr_scheduler="constant")
    r = yaml.safe_load(first.read_text())
    r["lora"]["dropout"], r["train"]["max_steps"] = 0.0, 4
    first.write_text(yaml.safe_dump(r))
    assert _qshard(str(first), "--nproc", str(before)).returncode == 0
    r["train"]["max_steps"], r["train"]["micro_batch_size"] = STEPS, 4 // after
    first.write_text(yaml.safe_dump(r))
    proc = _qshard(str(first), "--nproc", str(after), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {before} process(es) as {after}" in proc.stdout + proc.stderr
    assert _losses(out)[:4] == _losses(tmp_path / "ref")[:4]
    assert max(abs(a - b) for a, b in zip(_losses(out), _losses(tmp_path / "ref"))) < 1e-4
    x, y = _adapter(out), _adapter(tmp_path / "ref")
    assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-3


def test_two_nodes_simulated_on_one_machine_train_and_resume(micro_model, tmp_path):
    """Two torchrun launches with --nnodes=2 (one process each) form one job; GROUP_RANK 0/1 with
    LOCAL_RANK 0 on both, so only the global rank 0 may write files."""
    run = _write_recipe(tmp_path, micro_model, tmp_path / "nodes", ENGINES["ddp"], nproc=2)
    r = yaml.safe_load(run.read_text())
    r["train"]["max_steps"] = 4
    run.write_text(yaml.safe_dump(r))

    def launch(*extra: str) -> list[subprocess.Popen]:
        port = 29000 + os.getpid() % 1000
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("QSHARD_FAULT", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=qshard-{port}",
               "-m", "qshard.cli", "train", str(run), *extra]
        return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]

    for p in launch():
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "nodes")] == ["checkpoint-2", "checkpoint-4"]
    r["train"]["max_steps"] = STEPS
    run.write_text(yaml.safe_dump(r))
    for p in launch("--resume", "auto"):
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    assert [json.loads(line)["step"] for line in (tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, STEPS + 1))


def test_non_finite_step_can_be_skipped_instead(micro_model, tmp_path, monkeypatch):
    from qshard.config import parse_recipe
    from qshard.train import run

    monkeypatch.setenv("QSHARD_FAULT", "nan-step@3")
    recipe = yaml.safe_load(_write_recipe(tmp_path, micro_model, tmp_path / "skip", None, nproc=1,
                                          on_nonfinite="skip").read_text())
    outcome = run(parse_recipe(recipe), log=lambda *_: None)
    assert outcome.steps == STEPS and len(outcome.losses) == STEPS - 1  # step 3 left no loss behind
    warned = [json.loads(line) for line in (tmp_path / "skip" / "warnings.jsonl").read_text().splitlines()]
    assert [(w["kind"], w["step"]) for w in warned] == [("skipped", 3)]
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "skip").values())


def test_skip_is_refused_with_deepspeed_before_loading(micro_model, tmp_path):
    from qshard.config import parse_recipe
    from qshard.errors import QShardError
    from qshard.train import run

    recipe = yaml.safe_load(_write_recipe(tmp_path, micro_model, tmp_path / "ds", ENGINES["zero2"], nproc=1,
                                          on_nonfinite="skip").read_text())
    with pytest.raises(QShardError, match="on_nonfinite: skip cannot be used with zero2"):
        run(parse_recipe(recipe), log=lambda *_: None)


def test_resume_auto_after_a_death_before_the_first_checkpoint_refuses_then_overwrite_restarts(micro_model, references,
                                                                                               tmp_path):
    """--resume auto never wipes a folder: with no checkpoint it refuses (exit 2, the folder as it was);
    --overwrite then replaces the run qshard made, and the new run equals an uninterrupted one."""
    from tests.hostile import changed, snapshot

    run = _write_recipe(tmp_path, micro_model, tmp_path / "early", None, nproc=1)
    assert _qshard(str(run), fault="step@1").returncode == -9  # killed before checkpoint-2
    before = snapshot(tmp_path / "early")
    proc = _qshard(str(run), "--resume", "auto")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "found no valid checkpoint" in proc.stderr and "nothing was changed" in proc.stderr
    assert changed(before, snapshot(tmp_path / "early")) == []
    proc = _qshard(str(run), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(references["none"], tmp_path / "early")


def test_non_finite_step_is_skipped_under_fsdp2(micro_model, tmp_path):
    """FSDP2Engine.skip_step (once unreachable: defined inside a helper function) drops the step's
    gradients on both ranks; the run finishes with finite adapters and one warning."""
    run = _write_recipe(tmp_path, micro_model, tmp_path / "skip2", ENGINES["fsdp2"], nproc=2, on_nonfinite="skip")
    proc = _qshard(str(run), "--nproc", "2", fault="nan-step@3@1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [json.loads(line) for line in (tmp_path / "skip2" / "warnings.jsonl").read_text().splitlines()]
    assert [(w["kind"], w["step"]) for w in warned] == [("skipped", 3)]
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "skip2").values())
