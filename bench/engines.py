"""Issue #3's benchmark: peak resident memory per rank and step time of every qshard engine over an NF4
base, side by side with the anchor stack (transformers + bitsandbytes + peft + DeepSpeed ZeRO-3),
measured in the same run and reported as ratios qshard / anchor.

    .venv/bin/python bench/engines.py                      # everything: 2 passes x 7 configurations, ~20 minutes on 2 cores
    .venv/bin/python bench/engines.py --engines ddp zero3  # a subset (the anchor always runs)
    .venv/bin/python bench/engines.py --rounds 3 --allocators mmap1m --steps 7  # step ratios, alternating rounds

Every configuration runs in its own processes (2 ranks, gloo, CPU):
  - qshard: `qshard train bench/recipe-400m.yaml --nproc 2 --overwrite --set ...`; per-rank memory and
    step times come from the run's metrics.jsonl (`rank_memory`, `elapsed_s`).
  - anchor: `torchrun --nproc-per-node=2 bench/anchor_zero3.py` (same rows, tokens, batches and steps).
  - baseline: a process that only imports torch + transformers (and one that also imports peft,
    bitsandbytes and deepspeed), so readers can subtract the interpreter's own footprint.

Peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss` at the last step: it includes the load phase. Step time
is the median of the differences of elapsed time between consecutive steps, step 1 (warm-up) dropped.
Each configuration runs twice, under glibc's default malloc and with a fixed 1 MiB mmap threshold (see
ALLOCATORS): RSS on CPU is as much the allocator's retention as live tensors.

Step times on a shared machine drift by more than the differences being measured (the anchor's own median
step was 4.4 s in one session and 7.9 s in the next). `--rounds R` runs the anchor and every engine R times,
alternating the order each round (anchor first, then anchor last), and reports each engine's step ratio per
round: engine and anchor measured minutes apart, under the same load. The verdict is the median of those ratios.
The Markdown report goes to stdout (and to --markdown FILE if given); raw numbers to <runs>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RECIPE = "bench/recipe-400m.yaml"

# label -> recipe overrides (distributed section)
ENGINES = {
    "ddp": ["distributed.engine=ddp"],
    "zero1": ["distributed.engine=deepspeed", "distributed.zero_stage=1"],
    "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.engine=deepspeed", "distributed.zero_stage=3"],
    "zero3_offload": ["distributed.engine=deepspeed", "distributed.zero_stage=3",
                      "distributed.offload_optimizer=cpu", "distributed.offload_params=cpu"],
    "fsdp2": ["distributed.engine=fsdp2"],
}
LABELS = {"ddp": "qshard ddp", "zero1": "qshard deepspeed zero1", "zero2": "qshard deepspeed zero2",
          "zero3": "qshard deepspeed zero3", "zero3_offload": "qshard zero3 + cpu offload (params + optimizer)",
          "fsdp2": "qshard fsdp2"}

BASELINE_SNIPPET = """
import json, resource, psutil
{imports}
print(json.dumps({{"rss_mb": psutil.Process().memory_info().rss / 2**20,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


# glibc malloc settings each configuration runs under. "default": what a user gets. "mmap1m": a fixed
# mmap threshold of 1 MiB (MALLOC_MMAP_THRESHOLD_), so every tensor of 1 MiB or more is its own mapping,
# returned to the OS when freed; by default glibc raises the threshold (up to 32 MiB) after the first
# large free, and freed large tensors then stay in the heap and in RSS. The second setting measures
# memory closer to what is live, the first what top shows.
ALLOCATORS = {"default": {}, "mmap1m": {"MALLOC_MMAP_THRESHOLD_": str(2**20)}}


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["DS_ACCELERATOR"] = "cpu"
    e.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    e.update(extra or {})
    return e


def run_logged(cmd: list[str], log: Path, timeout: float, extra_env: dict[str, str] | None = None) -> float:
    """Run cmd from the repo root, stdout+stderr to `log`; return wall seconds; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, env=env(extra_env), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return wall


def median_step_s(elapsed: list[float], warmup: int = 1) -> float:
    """Median duration of the steps after the first `warmup` ones, from elapsed time at each step's end."""
    diffs = [b - a for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:])]
    return statistics.median(diffs) if diffs else float("nan")


def baseline(imports: str, log: Path) -> dict:
    code = BASELINE_SNIPPET.format(imports=imports)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                         check=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(out.stdout + out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_qshard(name: str, args, runs: Path, extra_env: dict[str, str]) -> dict:
    out_dir = runs / name
    cmd = [str(VENV_BIN / "qshard"), "train", RECIPE, "--nproc", str(args.nproc), "--overwrite",
           f"--set=model.path={args.model}", f"--set=train.max_steps={args.steps}",
           f"--set=train.output_dir={out_dir}"] + [f"--set={s}" for s in ENGINES[name] + args.set]
    wall = run_logged(cmd, runs / "logs" / f"{name}.log", args.timeout, extra_env)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = records[-1]
    return {"name": name, "label": LABELS[name], "command": " ".join(cmd), "wall_s": wall,
            "steps": len(records), "losses": [r["loss"] for r in records],
            "elapsed_s": [r["elapsed_s"] for r in records],
            "step_s": median_step_s([r["elapsed_s"] for r in records]),
            "peak_rss_mb": [m["peak_rss_mb"] for m in last["rank_memory"]],
            "last_rss_mb": [m["rss_mb"] for m in last["rank_memory"]]}


def run_anchor(args, runs: Path, extra_env: dict[str, str]) -> dict:
    out = runs / "anchor.json"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc-per-node={args.nproc}", "bench/anchor_zero3.py",
           "--model", args.model, "--steps", str(args.steps), "--out", str(out)]
    wall = run_logged(cmd, runs / "logs" / "anchor.log", args.timeout, extra_env)
    rec = json.loads(out.read_text())
    ranks = rec["rank_memory"]
    return {"name": "anchor", "label": "ANCHOR: transformers+bnb NF4+peft+DeepSpeed ZeRO-3",
            "command": "DS_ACCELERATOR=cpu " + " ".join(cmd), "wall_s": wall, "steps": rec["steps"],
            "losses": rec["losses"], "elapsed_s": rec["elapsed_s"], "step_s": median_step_s(rec["elapsed_s"]),
            "peak_rss_mb": [r["trained"]["peak_rss_mb"] for r in ranks],
            "last_rss_mb": [r["trained"]["rss_mb"] for r in ranks],
            "phases": ranks, "versions": rec["versions"], "load_s": rec["load_s"]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpu": cpu, "nproc": os.cpu_count(), "ram_gb": round(mem_kb / 2**20, 1), "python": platform.python_version()}


def model_facts(model: str) -> dict:
    from safetensors import safe_open

    folder = ROOT / model
    files = sorted(folder.glob("*.safetensors"))
    params = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                params += n
    config = json.loads((folder / "config.json").read_text())
    return {"params": params, "disk_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "hidden": config["hidden_size"], "layers": config["num_hidden_layers"],
            "intermediate": config["intermediate_size"], "vocab": config["vocab_size"],
            "dtype": config.get("dtype") or config.get("torch_dtype")}


def round_ratios(rounds: list[dict]) -> dict[str, dict]:
    """Per engine: its step and peak ratios to the anchor of the same round, one per round (None where a run
    failed), and the median of the step ratios."""
    out: dict[str, dict] = {}
    for rnd in rounds:
        a = rnd["anchor"]
        for r in rnd["engines"]:
            e = out.setdefault(r["name"], {"label": r["label"], "step": [], "peak": []})
            ok = "failed" not in r and "failed" not in a
            e["step"].append(r["step_s"] / a["step_s"] if ok else None)
            e["peak"].append(max(r["peak_rss_mb"]) / max(a["peak_rss_mb"]) if ok else None)
    for e in out.values():
        steps = [x for x in e["step"] if x is not None]
        e["step_median"] = statistics.median(steps) if steps else float("nan")
    return out


def rounds_table(rounds: list[dict]) -> str:
    def cell(xs: list[float | None]) -> str:
        return " / ".join("failed" if x is None else f"{x:.2f}" for x in xs)

    lines = ["| engine | step ratio to the same round's anchor, per round | median | peak ratio, per round |"
             " anchor median step per round (s) |", "|---|---|---|---|---|"]
    anchor_steps = " / ".join(f"{rnd['anchor']['step_s']:.2f}" for rnd in rounds)
    for e in round_ratios(rounds).values():
        lines.append(f"| {e['label']} | {cell(e['step'])} | **{e['step_median']:.2f}** | {cell(e['peak'])} | "
                     f"{anchor_steps} |")
    return "\n".join(lines)


def fmt_pair(values: list[float], digits: int = 0) -> str:
    return " / ".join(f"{v:,.{digits}f}" for v in values)


def table(rows: list[dict], anchor: dict, base: dict) -> str:
    a_peak, a_step, b = max(anchor["peak_rss_mb"]), anchor["step_s"], base["peak_rss_mb"]
    lines = ["| engine | peak RSS rank0 / rank1 (MB) | ratio to anchor peak | ratio above baseline | "
             "RSS at last step rank0 / rank1 (MB) | median step time (s) | ratio to anchor | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in [anchor, *rows]:
        if "failed" in r:
            lines.append(f"| {r['label']} | failed: {r['failed']} (log: {r['log']}) | | | | | | |")
            continue
        peak = max(r["peak_rss_mb"])
        lines.append(f"| {r['label']} | {fmt_pair(r['peak_rss_mb'])} | {peak / a_peak:.2f} | "
                     f"{(peak - b) / (a_peak - b):.2f} | {fmt_pair(r['last_rss_mb'])} | {r['step_s']:.2f} | "
                     f"{r['step_s'] / a_step:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def anchor_phases(anchor: dict) -> str:
    names = [("imported", "after imports"), ("loaded", "after from_pretrained (NF4)"),
             ("peft", "after get_peft_model"), ("initialized", "after deepspeed.initialize"),
             ("trained", "after the last step")]
    lines = ["| anchor phase | RSS rank0 / rank1 (MB) | peak RSS so far rank0 / rank1 (MB) |", "|---|---|---|"]
    for key, label in names:
        lines.append(f"| {label} | {fmt_pair([p[key]['rss_mb'] for p in anchor['phases']])} | "
                     f"{fmt_pair([p[key]['peak_rss_mb'] for p in anchor['phases']])} |")
    return "\n".join(lines)


def code_state() -> str:
    """HEAD plus a hash of uncommitted changes under qshard/ (others may edit while the benchmark runs)."""
    import hashlib

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    h = hashlib.sha256(git("diff", "HEAD", "--", "qshard").encode())
    for name in sorted(git("ls-files", "--others", "--exclude-standard", "qshard").split()):
        h.update(name.encode() + (ROOT / name).read_bytes())
    return f"{head}+{h.hexdigest()[:10]}"


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description="qshard engines vs the anchor stack: memory and step time")
    p.add_argument("--model", default="build/bench-400m", help="model folder (built with init-tiny if absent)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS),
                   help="glibc malloc settings to measure under (each one a full pass)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the anchor and every engine this many times, alternating the order, and report "
                        "each engine's step ratio to the anchor of the same round")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--runs", default="runs/bench-400m", help="folder for run outputs and logs")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--markdown", default=None, help="also write the Markdown report to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every qshard run, e.g. train.trim_heap=false")
    args = p.parse_args()
    runs_root = ROOT / args.runs
    runs_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before, code_before = load_average(), code_state()

    if not (ROOT / args.model / "config.json").is_file():
        run_logged([str(VENV_BIN / "qshard"), "init-tiny", args.model, "--size", "400m"],
                   runs_root / "logs" / "init-tiny.log", args.timeout)
    facts = model_facts(args.model)
    base = baseline("import torch, transformers", runs_root / "logs" / "baseline.log")
    base_all = baseline("import torch, transformers, peft, bitsandbytes, deepspeed",
                        runs_root / "logs" / "baseline2.log")

    passes = {}
    for alloc in args.allocators:
        extra, rounds = ALLOCATORS[alloc], []
        for k in range(args.rounds):
            runs = runs_root / alloc if args.rounds == 1 else runs_root / alloc / f"round{k + 1}"
            tag = alloc if args.rounds == 1 else f"{alloc} round {k + 1}/{args.rounds}"
            order = ["anchor", *args.engines] if k % 2 == 0 else [*args.engines, "anchor"]
            anchor, rows = None, []
            for name in order:
                print(f"[{tag}] {name} ... ", end="", file=sys.stderr, flush=True)
                try:
                    if name == "anchor":
                        anchor = result = run_anchor(args, runs, extra)
                    else:
                        result = run_qshard(name, args, runs, extra)
                        rows.append(result)
                    print(f"{result['wall_s']:.0f}s", file=sys.stderr)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:  # report it, measure the rest
                    if name == "anchor":
                        raise
                    rows.append({"name": name, "label": LABELS[name], "failed": str(e).splitlines()[0],
                                 "log": str(runs / "logs" / f"{name}.log")})
                    print(f"FAILED: {e}", file=sys.stderr)
            rounds.append({"anchor": anchor, "engines": rows, "order": order})
        passes[alloc] = {"env": extra, "anchor": rounds[0]["anchor"], "engines": rounds[0]["engines"],
                         "rounds": rounds}
    total = time.perf_counter() - started
    code_after = code_state()
    code = (f"qshard code {code_before} (HEAD + hash of uncommitted changes under qshard/)"
            if code_after == code_before else
            f"WARNING: qshard/ changed during the benchmark ({code_before} -> {code_after}); runs may mix versions")

    m = machine()
    v = next(iter(passes.values()))["anchor"]["versions"]
    lines = [
        f"Model: `{args.model}` (Llama, hidden {facts['hidden']}, {facts['layers']} layers, intermediate "
        f"{facts['intermediate']}, vocab {facts['vocab']}, untied head): {facts['params']:,} parameters, "
        f"{facts['disk_mb']:,.0f} MiB of safetensors ({facts['dtype']}).",
        f"{args.nproc} ranks (gloo, CPU), {args.steps} steps of batch 1 per rank, max_length 128, fp32 compute, "
        f"NF4 + double quant base, LoRA r 16 / alpha 32 / dropout 0 on all linears but lm_head, torch AdamW.",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gb']} GiB RAM; {date.today().isoformat()}; "
        f"python {m['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"bitsandbytes {v['bitsandbytes']}, deepspeed {v['deepspeed']}. Benchmark wall time {total:.0f} s; "
        f"load average (1/5/15 min) {load_before} before, {load_average()} after. {code}.",
        "",
        f"Baseline RSS of a process that has only imported torch + transformers: {base['rss_mb']:.0f} MB "
        f"(+ peft, bitsandbytes, deepspeed: {base_all['rss_mb']:.0f} MB). \"ratio above baseline\" is "
        f"(peak - {base['rss_mb']:.0f}) / (anchor peak - {base['rss_mb']:.0f}).",
    ]
    for alloc, res in passes.items():
        setting = ("glibc defaults" if not res["env"] else
                   ", ".join(f"{k}={v}" for k, v in res["env"].items()))
        if len(res["rounds"]) > 1:
            lines += ["", f"#### malloc: {setting}: {len(res['rounds'])} alternating rounds", "",
                      rounds_table(res["rounds"]), "", "The table below is round 1."]
        lines += ["", f"#### malloc: {setting}", "", table(res["engines"], res["anchor"], base), "",
                  anchor_phases(res["anchor"]), "",
                  "Losses per step (qshard: global token mean; anchor: mean of the ranks' token means):", "",
                  *[f"- {r['name']}: {', '.join(f'{x:.4f}' for x in r['losses'])}"
                    for r in [res["anchor"], *res["engines"]] if "losses" in r]]
    report = "\n".join(lines)
    (runs_root / "results.json").write_text(json.dumps({
        "model": facts, "machine": m, "baseline": base, "baseline_all_imports": base_all, "passes": passes,
        "total_s": total, "code": [code_before, code_after], "command": " ".join([Path(sys.executable).name, *sys.argv])}, indent=1))
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
