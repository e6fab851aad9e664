"""What the CPU suite cannot reach, on CUDA GPUs: bitsandbytes' CUDA kernels under the piecewise
quantization of the sharded loader, FSDP2 and ZeRO-3 on NCCL, and GPU memory and step time against the
anchor stack on the same card.

    python bench/cuda_check.py                 # ~5 minutes on one H100/H200 (the 400M model is built first)
    python bench/cuda_check.py --steps 10      # shorter
    python bench/cuda_check.py --nproc 2       # on a machine with 2 GPUs: the sharded loader too

1. tests/test_shardload.py::test_pieces_equal_the_whole_tensors_quantization, which on a machine with a
   GPU also runs on CUDA: a rank's pieces, quantized by the CUDA kernels, equal the whole tensor's
   quantization (4 formats x 5 shapes x world sizes 1-4).
2. QLoRA on the 400M init-tiny Llama (`bench/recipe-400m.yaml`: NF4 + double quant, r=16 all-linear),
   bf16 (dense weights and compute), micro-batch 8 x at most 128 tokens: qshard with engine none, then
   FSDP2 and DeepSpeed ZeRO-3 on --nproc processes (NCCL). Their per-step losses are compared with engine
   none's; peak GPU memory is torch.cuda.max_memory_allocated (qshard's metrics.jsonl, max over ranks).
   With --nproc >= 2 each engine also runs with shard_on_load off, and the losses of both loads are
   compared. With one process qshard loads whole whatever shard_on_load says (there is nothing to
   shard), so the sharded loader itself is not exercised there.
3. The anchor on the same GPU, same rows, batches and steps: transformers + bitsandbytes + peft in a plain
   AdamW loop, one process (`bench/anchor_zero3.py --engine none --precision bf16`).

Step time is the median duration of the steps after the first three (warm-up), from the elapsed
time logged at each step. At this size a step is dominated by the host (kernel launches, Python), so
step times vary by tens of percent between runs; memory is deterministic.
Writes <out>/results.json and <out>/report.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from engines import (
    median_step_s,  # bench/engines.py (this folder is on sys.path when run as a script)
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
COMMON = ["model.dtype=bfloat16", "train.precision=bf16", "train.micro_batch_size=8", "train.log_every=1"]
WARMUP_STEPS = 3  # left out of the median step time (the second step of a ZeRO-3 run took 18 s on an H200)
ENGINES = {"fsdp2": ["distributed.engine=fsdp2"],
           "zero3": ["distributed.engine=deepspeed", "distributed.zero_stage=3"]}


def step_time(elapsed: list[float]) -> float | None:
    step = median_step_s(elapsed, warmup=WARMUP_STEPS)
    return None if step != step else step  # NaN: too few steps


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print(f"  rc={rc} {time.perf_counter() - t0:.0f}s  {log.name}", file=sys.stderr, flush=True)
    if rc != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return rc, time.perf_counter() - t0


def qshard_run(label: str, sets: list[str], nproc: int, args, out: Path) -> dict:
    run_dir = out / label.replace(" ", "_").replace(",", "").replace("=", "-")
    cmd = [PY, "-m", "qshard.cli", "train", "bench/recipe-400m.yaml", "--overwrite", "--nproc", str(nproc),
           *[f"--set={s}" for s in COMMON + sets + [f"train.max_steps={args.steps}", f"train.output_dir={run_dir}"]]]
    rc, wall = run(cmd, out / f"{run_dir.name}.log", args.timeout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    rows = [r for r in rows if "loss" in r and "step" in r]
    peaks = [m.get("gpu_peak_mb", 0) for r in rows for m in r.get("rank_memory", [r])]
    return {"label": label, "rc": rc, "nproc": nproc, "wall_s": round(wall, 1), "losses": [r["loss"] for r in rows],
            "step_s": step_time([r["elapsed_s"] for r in rows]), "gpu_peak_mb": max(peaks, default=None)}


def anchor_run(args, out: Path) -> dict:
    path = out / "anchor.json"
    cmd = [PY, "bench/anchor_zero3.py", "--engine", "none", "--precision", "bf16", "--micro-batch", "8",
           "--model", args.model, "--steps", str(args.steps), "--out", str(path)]
    rc, wall = run(cmd, out / "anchor.log", args.timeout)
    if rc != 0:
        return {"label": "anchor", "rc": rc}
    a = json.loads(path.read_text())
    return {"label": "anchor: transformers + bnb + peft, plain loop", "rc": 0, "nproc": 1, "wall_s": round(wall, 1),
            "losses": a["losses"], "step_s": step_time(a["elapsed_s"]),
            "gpu_peak_mb": a["rank_memory"][0]["trained"].get("gpu_peak_mb"), "versions": a["versions"]}


def max_diff(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "-"
    return "identical" if a == b else f"{max(abs(x - y) for x, y in zip(a, b)):.1e}"


def cell(value, spec: str) -> str:
    return format(value, spec) if value else "-"


def report(results: dict) -> str:
    anchor, rows = results["anchor"], results["runs"]
    none = next((r["losses"] for r in rows if r["label"] == "qshard, engine none"), [])
    whole = {r["label"].split(",")[0]: r["losses"] for r in rows if r["label"].endswith("shard_on_load=false")}

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    lines = ["| run | processes | rc | peak GPU allocated (MiB, max over ranks) | peak / anchor | median step (s) | "
             "step / anchor | first / last loss | loss vs engine none (max abs diff) | "
             "loss vs shard_on_load=false |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in [anchor, *rows]:
        losses = r.get("losses") or []
        engine = r["label"].split(",")[0]
        vs_whole = max_diff(losses, whole[engine]) if engine in whole and r["label"] not in whole else "-"
        cells = [r["label"], r.get("nproc", "-"), r["rc"], cell(r.get("gpu_peak_mb"), ".0f"),
                 ratio(r.get("gpu_peak_mb"), anchor.get("gpu_peak_mb")), cell(r.get("step_s"), ".3f"),
                 ratio(r.get("step_s"), anchor.get("step_s")),
                 f"{losses[0]:.4f} / {losses[-1]:.4f}" if losses else "-",
                 "-" if r is anchor else max_diff(losses, none), vs_whole]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="build/bench-400m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=None, help="processes for the engines (default: one per GPU)")
    p.add_argument("--out", default="runs/cuda-check")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--only", nargs="*", default=None, help="engines to run (fsdp2, zero3; default both)")
    p.add_argument("--no-anchor", action="store_true", help="leave the anchor and the pytest check out")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/cuda_check.py needs a CUDA GPU")
    nproc = args.nproc or torch.cuda.device_count()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                     "torch": torch.__version__, "steps": args.steps, "nproc": nproc}

    pytest_line = "not run"
    if not args.no_anchor:
        print("[1] piecewise quantization on CUDA", file=sys.stderr)
        rc, _ = run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     "tests/test_shardload.py::test_pieces_equal_the_whole_tensors_quantization"],
                    out / "pytest-pieces.log", args.timeout)
        pytest_line = f"rc={rc} ({(out / 'pytest-pieces.log').read_text().strip().splitlines()[-1]})"
    results["pieces_pytest"] = pytest_line

    if not (ROOT / args.model / "config.json").exists():
        print("[2] building the 400M model", file=sys.stderr)
        run([PY, "-m", "qshard.cli", "init-tiny", args.model, "--size", "400m"], out / "init-tiny.log", args.timeout)
    print("[3] anchor + qshard runs", file=sys.stderr)
    results["anchor"] = {"label": "anchor (not run)", "rc": "-"} if args.no_anchor else anchor_run(args, out)
    runs = [("qshard, engine none", ["distributed.engine=none"], 1)]
    for engine, sets in ENGINES.items():
        if args.only is None or engine in args.only:
            runs.append((f"qshard {engine}", sets + ["distributed.shard_on_load=true"], nproc))
            if nproc > 1:
                runs.append((f"qshard {engine}, shard_on_load=false", sets + ["distributed.shard_on_load=false"], nproc))
    results["runs"] = [qshard_run(label, sets, n, args, out) for label, sets, n in runs]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = (f"{results['device']} x {results['gpus']}, torch {results['torch']}, {args.steps} steps, engines on "
            f"{nproc} process(es); piecewise-quantization pytest on CUDA: {pytest_line}\n\n{report(results)}\n")
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
