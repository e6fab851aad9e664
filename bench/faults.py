"""Issue #9's fault benchmark: per engine, K trials that SIGKILL a random rank at a random moment
(mid-step or inside a checkpoint write) and let the job resume; each trial is compared, bit for bit,
with an uninterrupted reference run of the same recipe.

    .venv/bin/python bench/faults.py                          # 20 trials x 5 engines (long: see BENCHMARKS.md)
    .venv/bin/python bench/faults.py --trials 4 --seed 1234   # what BENCHMARKS.md reports
    .venv/bin/python bench/faults.py --engines ddp none       # a subset (same trials per engine for a seed)

Setup (the fault tests' own, tests/test_faults.py): `qshard init-tiny --size micro` (tokenizer trained
on the data), examples/data/demo_alpaca.jsonl, NF4 base, LoRA r=8 dropout 0.1, max_steps 8, save_every 2,
keep_checkpoints 3, a global batch of 4 (micro batch 2 x 2 processes, or 4 x 1 process).

Engines: ddp, deepspeed zero2, deepspeed zero3, fsdp2 run as `qshard train --nproc 2 --max-restarts 1`
(torchrun restarts both ranks, which resume from the newest valid checkpoint by themselves); `none` is
one process, killed, then rerun with `--resume auto`.

Faults: `QSHARD_FAULT=<point>@<step>@<rank>` (qshard/faults.py). Per trial, drawn from a seeded RNG (one
stream per engine, so `--engines` subsets draw the same trials): the point is `step` (after backward,
before the optimizer step) with probability 1/2, else one of the four save points, uniformly; the step
uniformly in 1..max_steps for `step`, among the saving steps (multiples of save_every) for a save point;
the rank uniformly among the ranks for `step`, rank 0 for a save point (only rank 0 writes checkpoint
files, so the save points exist only there; the other ranks wait at the save's barrier). Half the draws
go to `step` rather than 1/5 (uniform over the five points) so that every rank gets killed, not mostly
rank 0.

Per trial:
  - completed: the job (2 processes) or the `--resume auto` rerun (1 process) exited 0.
  - bit-exact: [(step, loss)] of metrics.jsonl and every tensor of adapter/adapter_model.safetensors
    equal (`==` on floats, `torch.equal` on tensors) to the reference run's.
  - detection (2 processes only): from the SIGKILL to the moment the restart begins. The benchmark
    polls the job's process tree every --poll-s seconds (/proc; workers are recognised by their
    RANK / TORCHELASTIC_RESTART_COUNT environment): kill = the midpoint between the last poll that saw
    the faulting worker alive and the first that saw it dead or a zombie; restart = the first poll that
    sees a worker of attempt 1. Also recorded: `stopped` (kill -> the last worker of attempt 0 is
    gone), `sigterm` (kill -> the timestamp of torchrun's "Sending process P closing signal SIGTERM"
    line: the elastic agent has noticed the failure and stops the other ranks) and `torchrun` (kill -> the
    timestamp of its "failed (exitcode: -9) local_rank: R" line, logged once the others are gone, which
    names the dead rank). Resolution: about one poll interval (log timestamps: 1 ms).
  - steps lost: the fault's step minus the step the job resumed from ("resumed from ... at step N" in
    its log; 0 when no checkpoint existed yet). For a `step` fault this counts the step in progress.
  - processes left: processes whose command line names the trial's output folder, after it ended.

Raw results: <workdir>/results.json; logs: <workdir>/<engine>/*.log. The Markdown goes to stdout (and
--markdown FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qshard.observe.faults import SAVE_POINTS  # noqa: E402

DATA = ROOT / "examples" / "data" / "demo_alpaca.jsonl"
MAX_STEPS, SAVE_EVERY, KEEP, GLOBAL_BATCH = 8, 2, 3, 4
# label -> (distributed section, processes)
ENGINES = {
    "ddp": ({"engine": "ddp"}, 2),
    "zero2": ({"engine": "deepspeed", "zero_stage": 2}, 2),
    "zero3": ({"engine": "deepspeed", "zero_stage": 3}, 2),
    "fsdp2": ({"engine": "fsdp2"}, 2),
    "none": ({"engine": "none"}, 1),
}
LABELS = {"ddp": "ddp", "zero2": "deepspeed zero2", "zero3": "deepspeed zero3", "fsdp2": "fsdp2",
          "none": "none (1 process)"}
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
# torchrun: "E1125 18:52:28.202000 31470 .../api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 31495) ..."
FAILED = re.compile(r"^[EW](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) .*failed \(exitcode: (-?\d+)\) local_rank: (\d+)",
                    re.M)
# "W1125 18:52:28.125000 31470 .../api.py:1028] Sending process 31494 closing signal SIGTERM"
SIGTERM = re.compile(r"^[EW](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) .*Sending process \d+ closing signal SIGTERM",
                     re.M)


def env(fault: str | None) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    e.pop("QSHARD_FAULT", None)
    if fault:
        e["QSHARD_FAULT"] = fault
    return e


def write_recipe(workdir: Path, model: Path, engine: str) -> Path:
    dist, nproc = ENGINES[engine]
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "quantization": {"method": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the RNG state matters for exactness
        "data": {"path": str(DATA), "max_length": 64},
        "train": {"output_dir": str(workdir / engine / "ref"), "max_steps": MAX_STEPS,
                  "micro_batch_size": GLOBAL_BATCH // nproc, "learning_rate": 1e-2, "warmup_steps": 0, "seed": 0,
                  "save_every": SAVE_EVERY, "keep_checkpoints": KEEP, "sample_tokens": 0},
        "distributed": dist,
    }
    path = workdir / engine / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_cmd(recipe: Path, out: Path, nproc: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "qshard.cli", "train", str(recipe), f"--set=train.output_dir={out}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--max-restarts", "1"]
    return cmd + list(extra)


def state(pid: int) -> str | None:
    """The process's state letter from /proc (Z: zombie), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants(pid: int, leaves=()) -> list[int]:
    """pid's process tree from /proc/<pid>/task/*/children, not descending into `leaves`: much cheaper
    than scanning every process (psutil's children()), which matters when polling every 20 ms on 2 cores."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in leaves:
            continue
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(x) for x in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class Job:
    """A command (stdout+stderr to a log) whose torchrun workers are watched: when each was first seen,
    last seen alive, and first seen dead (gone or a zombie)."""

    def __init__(self, cmd: list[str], log: Path, fault: str | None, poll_s: float, timeout: float):
        self.cmd, self.log, self.poll_s, self.timeout = cmd, log, poll_s, timeout
        self.workers: dict[int, dict] = {}  # pid -> {"rank", "attempt", "seen", "alive", "dead"}
        self.others: set[int] = set()  # the launcher, torchrun
        with open(log, "w") as f:
            f.write("$ " + ("QSHARD_FAULT=" + fault + " " if fault else "") + " ".join(cmd) + "\n")
            f.flush()
            start = time.time()
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(fault), stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            self.timed_out = False
            while self.proc.poll() is None:
                self._poll()
                if time.time() - start > timeout:
                    self.timed_out = True
                    self._kill_all()
                    break
                time.sleep(poll_s)
            self.rc = self.proc.wait()
            self._poll()
            self.wall_s = time.time() - start
        self.text = log.read_text()

    def _poll(self) -> None:
        now = time.time()
        live = set()
        for pid in descendants(self.proc.pid, leaves=self.workers):
            if pid in self.others:
                continue
            if pid not in self.workers:
                try:
                    p = psutil.Process(pid)
                    e, parent, age = p.environ(), p.ppid(), now - p.create_time()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                # a worker: torchrun's child with the elastic environment (read after its exec: a
                # process younger than 1 s that lacks it may not have exec'd yet, so it is asked again)
                if "TORCHELASTIC_RESTART_COUNT" not in e or "RANK" not in e or parent in self.workers:
                    if age > 1.0 or parent in self.workers:
                        self.others.add(pid)
                    continue
                self.workers[pid] = {"rank": int(e["RANK"]), "attempt": int(e["TORCHELASTIC_RESTART_COUNT"]),
                                     "seen": now, "alive": now, "dead": None}
            if state(pid) not in ("Z", "X", None):
                live.add(pid)
        for pid, w in self.workers.items():
            if pid in live:
                w["alive"] = now
            elif w["dead"] is None:
                w["dead"] = now

    def _kill_all(self) -> None:
        """Timeout only: SIGKILL what this job started (workers run in sessions of their own)."""
        for pid in [self.proc.pid, *self.workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_run(out: Path) -> tuple[list[tuple[int, float]], dict | None]:
    from safetensors.torch import load_file

    metrics = out / "metrics.jsonl"
    losses = [(r["step"], r["loss"]) for r in map(json.loads, metrics.read_text().splitlines())] \
        if metrics.exists() else []
    adapter = out / "adapter" / "adapter_model.safetensors"
    return losses, (load_file(str(adapter)) if adapter.exists() else None)


def same_run(ref: tuple, got: tuple) -> tuple[bool, str]:
    import torch

    (rl, ra), (gl, ga) = ref, got
    if gl != rl:
        diff = [(a, b) for a, b in zip(rl, gl) if a != b]
        return False, f"losses differ ({len(gl)} vs {len(rl)} steps; first difference {diff[:1]})"
    if ga is None:
        return False, "no adapter written"
    if ga.keys() != ra.keys():
        return False, "adapter keys differ"
    bad = [k for k in ra if not torch.equal(ra[k], ga[k])]
    if bad:
        worst = max((ra[k] - ga[k]).abs().max().item() for k in bad)
        return False, f"{len(bad)}/{len(ra)} adapter tensors differ (max abs diff {worst:.3g}), e.g. {bad[0]}"
    return True, ""


def left_behind(out: Path) -> list[int]:
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != me and any(str(out) in part for part in (p.info["cmdline"] or [])):
            found.append(p.info["pid"])
    return found


def log_time(m: re.Match, near: float) -> float:
    """A torchrun log timestamp (month, day, local time; no year) as epoch seconds."""
    year = datetime.fromtimestamp(near).year
    mo, d, h, mi, s = (int(x) for x in m.groups()[:5])
    return datetime(year, mo, d, h, mi, s, int(m.group(6).ljust(6, "0")[:6])).timestamp()


def draw_trials(seed: int, engine: str, k: int) -> list[dict]:
    rng = random.Random(f"{seed}:{engine}")
    nproc = ENGINES[engine][1]
    trials = []
    for _ in range(k):
        point = "step" if rng.random() < 0.5 else rng.choice(SAVE_POINTS)
        if point == "step":
            step, rank = rng.randint(1, MAX_STEPS), rng.randrange(nproc)
        else:
            step, rank = rng.choice(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY)), 0
        trials.append({"point": point, "step": step, "rank": rank})
    return trials


def run_trial(engine: str, i: int, trial: dict, recipe: Path, workdir: Path, ref: tuple, args) -> dict:
    nproc = ENGINES[engine][1]
    out = workdir / engine / f"trial-{i}"
    shutil.rmtree(out, ignore_errors=True)
    fault = f"{trial['point']}@{trial['step']}" + (f"@{trial['rank']}" if nproc > 1 else "")
    res = {**trial, "engine": engine, "trial": i, "fault": fault, "detect_s": None, "stopped_s": None,
           "sigterm_s": None,
           "torchrun_s": None, "named_rank": None, "fallback_overwrite": False, "note": ""}
    if nproc > 1:
        job = Job(train_cmd(recipe, out, nproc), workdir / engine / f"trial-{i}.log", fault, args.poll_s,
                  args.timeout)
        text, rc, wall = job.text, job.rc, job.wall_s
        first = [w for w in job.workers.values() if w["attempt"] == 0]
        second = [w for w in job.workers.values() if w["attempt"] == 1]
        victim = [w for w in first if w["rank"] == trial["rank"]]
        res["fired"] = bool(second)
        if victim and victim[0]["dead"] is not None and second:
            v = victim[0]
            t_kill = (v["alive"] + v["dead"]) / 2
            res["detect_s"] = round(min(w["seen"] for w in second) - t_kill, 3)
            res["stopped_s"] = round(max(w["dead"] for w in first) - t_kill, 3)
            sigterm = SIGTERM.search(text)
            if sigterm:
                res["sigterm_s"] = round(log_time(sigterm, t_kill) - t_kill, 3)
            failed = [m for m in FAILED.finditer(text) if m.group(7) == "-9"]
            if failed:
                res["torchrun_s"] = round(log_time(failed[0], t_kill) - t_kill, 3)
                res["named_rank"] = int(failed[0].group(8))
        if job.timed_out:
            res["note"] = f"timed out after {args.timeout:.0f} s"
    else:
        killed = Job(train_cmd(recipe, out, 1), workdir / engine / f"trial-{i}.log", fault, args.poll_s, args.timeout)
        res["fired"] = killed.rc == -signal.SIGKILL
        rerun = Job(train_cmd(recipe, out, 1, "--resume", "auto"), workdir / engine / f"trial-{i}-resume.log", None,
                    args.poll_s, args.timeout)
        text, rc, wall = killed.text + rerun.text, rerun.rc, killed.wall_s + rerun.wall_s
        if rc != 0 and "is not empty" in rerun.text:
            # killed before its first checkpoint: `--resume auto` finds nothing and refuses the folder.
            # Finish the trial the way a torchrun restart does (resume auto + overwrite) and say so.
            res["fallback_overwrite"] = True
            res["note"] = "`--resume auto` refused (\"output folder ... is not empty\", no checkpoint yet); " \
                          "rerun with --overwrite"
            again = Job(train_cmd(recipe, out, 1, "--resume", "auto", "--overwrite"),
                        workdir / engine / f"trial-{i}-overwrite.log", None, args.poll_s, args.timeout)
            text, rc, wall = text + again.text, again.rc, wall + again.wall_s
    m = RESUMED.search(text)
    res["resumed_step"] = int(m.group(2)) if m else 0
    res["steps_lost"] = trial["step"] - res["resumed_step"]
    res["rc"], res["wall_s"] = rc, round(wall, 1)
    res["completed"] = rc == 0
    res["bit_exact"], why = same_run(ref, read_run(out)) if rc == 0 else (False, f"exit {rc}")
    if why:
        res["note"] = "; ".join(filter(None, [res["note"], why]))
    if not res["fired"]:
        res["note"] = "; ".join(filter(None, [res["note"], "the fault did not fire"]))
    res["left_behind"] = left_behind(out)
    return res


def fmt_s(values: list[float], fn) -> str:
    return f"{fn(values):.2f}" if values else "n/a"


def summary_table(results: list[dict], engines: list[str]) -> str:
    lines = ["| engine | trials | completed | resumed bit-exact | detection: kill -> restart begins, median / max (s) "
             "| kill -> torchrun SIGTERMs the survivors, median (s) | kill -> survivors gone, median (s) "
             "| kill -> torchrun logs the dead rank, median (s) | steps lost, mean | processes left |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for engine in engines:
        rs = [r for r in results if r["engine"] == engine]
        if not rs:
            continue
        det = [r["detect_s"] for r in rs if r["detect_s"] is not None]
        tr = [r["torchrun_s"] for r in rs if r["torchrun_s"] is not None]
        term = [r["sigterm_s"] for r in rs if r["sigterm_s"] is not None]
        st = [r["stopped_s"] for r in rs if r["stopped_s"] is not None]
        lost = [r["steps_lost"] for r in rs if r["fired"]]
        fb = sum(r["fallback_overwrite"] for r in rs)
        completed = f"{sum(r['completed'] for r in rs)}" + (f" ({fb} with --overwrite)" if fb else "")
        lines.append(f"| {LABELS[engine]} | {len(rs)} | {completed} | {sum(r['bit_exact'] for r in rs)} | "
                     f"{fmt_s(det, statistics.median)} / {fmt_s(det, max)} | {fmt_s(term, statistics.median)} | "
                     f"{fmt_s(st, statistics.median)} | {fmt_s(tr, statistics.median)} | "
                     f"{fmt_s(lost, statistics.mean)} | "
                     f"{sum(len(r['left_behind']) for r in rs)} |")
    return "\n".join(lines)


def trials_table(results: list[dict]) -> str:
    lines = ["| engine | # | fault (point@step@rank) | resumed from step | steps lost | exit | bit-exact | "
             "detection (s) | SIGTERM / gone / logged (s) | torchrun names rank | wall (s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        named = "" if r["named_rank"] is None else str(r["named_rank"])
        parts = "" if r["detect_s"] is None else " / ".join(
            "?" if r[k] is None else f"{r[k]:.2f}" for k in ("sigterm_s", "stopped_s", "torchrun_s"))
        lines.append(f"| {r['engine']} | {r['trial']} | `{r['fault']}` | {r['resumed_step']} | {r['steps_lost']} | "
                     f"{r['rc']} | {'yes' if r['bit_exact'] else 'NO'} | "
                     f"{'' if r['detect_s'] is None else r['detect_s']} | {parts} | {named} | {r['wall_s']} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return f"{os.cpu_count()} cores ({cpu}), no GPU, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description="kill a random rank at a random moment, resume, compare bit for bit")
    p.add_argument("--trials", type=int, default=20, help="trials per engine (issue #9 asks for 20)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--seed", type=int, default=None,
                   help="RNG seed of the fault draws (default: a random one, printed)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "faults-bench"), help="model, runs and logs go here")
    p.add_argument("--poll-s", type=float, default=0.02, help="process-tree polling interval (detection resolution)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one job is killed")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the Markdown report here")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}", flush=True)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "qshard.cli", "init-tiny", str(model), "--size", "micro",
                        "--data", str(DATA)], cwd=ROOT, check=True, capture_output=True)

    started = time.time()
    results: list[dict] = []
    for engine in args.engines:
        recipe = write_recipe(workdir, model, engine)
        ref_out = workdir / engine / "ref"
        shutil.rmtree(ref_out, ignore_errors=True)
        job = Job(train_cmd(recipe, ref_out, ENGINES[engine][1]), workdir / engine / "ref.log", None, args.poll_s,
                  args.timeout)
        if job.rc != 0:
            print(f"{engine}: the reference run failed (exit {job.rc}); see {job.log}", flush=True)
            continue
        ref = read_run(ref_out)
        print(f"{engine}: reference {job.wall_s:.1f} s, losses {[l for _, l in ref[0]]}", flush=True)
        for i, trial in enumerate(draw_trials(seed, engine, args.trials)):
            r = run_trial(engine, i, trial, recipe, workdir, ref, args)
            results.append(r)
            print(f"{engine} #{i} {r['fault']}: exit {r['rc']}, resumed at {r['resumed_step']} "
                  f"(lost {r['steps_lost']}), bit-exact {r['bit_exact']}, detection {r['detect_s']} s, "
                  f"stopped {r['stopped_s']} s, torchrun {r['torchrun_s']} s (rank {r['named_rank']}), "
                  f"{r['wall_s']} s {r['note']}", flush=True)
            (workdir / "results.json").write_text(json.dumps({"seed": seed, "results": results}, indent=1))
    total = time.time() - started

    cmd = ".venv/bin/python bench/faults.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"Command: `{cmd.strip()}` (seed {seed}); {date.today().isoformat()}; {machine()}; "
        f"{total / 60:.1f} minutes in all (the benchmark's own polling: {time.process_time():.1f} s of CPU).",
        "",
        summary_table(results, args.engines),
        "",
        trials_table(results),
        "",
    ])
    print("\n" + report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    bad = [r for r in results if not (r["completed"] and r["bit_exact"] and r["fired"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
