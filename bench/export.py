"""Issue #18's benchmark: peak memory and wall time of `qshard export` (streaming merge) against PEFT's
`merge_and_unload()` + `save_pretrained` (the whole model in memory), on the same adapter.

    .venv/bin/qshard init-tiny build/bench-400m --size 400m     # once (~400M Llama, 747 MB in bf16)
    .venv/bin/python bench/export.py [--model build/bench-400m] [--steps 2] [--markdown FILE]

An NF4 run of bench/recipe-400m.yaml (model.dtype bfloat16, LoRA r16 all-linear) is trained for --steps
steps, then each configuration runs in a fresh process of its own:
  - qshard export --no-check: the merge alone, bf16 output;
  - qshard export (with its logits check: loads the exported model and qshard's base + adapter);
  - PEFT: transformers `from_pretrained(dtype=bfloat16)`, `PeftModel.from_pretrained`, `merge_and_unload`,
    `save_pretrained` (bf16; note PEFT merges into the stored bf16 base, qshard into the NF4 base as trained).
Per process: the resident set after imports (baseline) and the peak (`ru_maxrss`, which includes the
pages of files read through mmap, e.g. transformers' safetensors loading), and the wall time of the
job after imports. Raw figures go to <runs>/results.json, the Markdown table to stdout and --markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "bench" / "recipe-400m.yaml"
CONFIGS = {"qshard export --no-check": "qshard-nocheck", "qshard export (with check)": "qshard-check",
           "PEFT merge_and_unload + save_pretrained": "peft"}


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, run_dir: Path, base: Path, out: Path) -> dict:
    """One measured job, in this (fresh) process."""
    import torch  # noqa: F401  (imports count in the baseline, not the job)
    import transformers  # noqa: F401
    from peft import PeftModel

    from qshard.tools.export import export

    baseline = rss_now()
    start = time.perf_counter()
    if kind == "peft":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, str(run_dir / "adapter")).merge_and_unload()
        merged.save_pretrained(out)
        check = None
    else:
        check = export(run_dir, out, dtype="bf16", check=kind == "qshard-check", log=lambda *_: None).check
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_bytes": baseline, "peak_bytes": peak, "wall_s": wall, "check": check}


def train(model: Path, run_dir: Path, steps: int) -> float:
    cmd = [sys.executable, "-m", "qshard.cli", "train", str(RECIPE), f"--set=model.path={model}",
           "--set=model.dtype=bfloat16", f"--set=train.max_steps={steps}", f"--set=train.output_dir={run_dir}",
           "--set=distributed.engine=none", "--set=train.learning_rate=1.0e-3", "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(kind: str, run_dir: Path, model: Path, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, __file__, "--child", kind, "--run", str(run_dir), "--model", str(model), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return result


def markdown(results: dict, model: Path, steps: int, train_s: float) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.strip()
    lines = [f"### qshard export vs PEFT merge_and_unload ({datetime.now(timezone.utc):%Y-%m-%d})", "",
             "    .venv/bin/qshard init-tiny build/bench-400m --size 400m",
             f"    .venv/bin/python bench/export.py --model {model} --steps {steps}", "",
             f"Machine: {os.cpu_count()} CPUs (`nproc`), {platform.machine()}, Python {platform.python_version()}; "
             f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
             f"bitsandbytes {bitsandbytes.__version__}; "
             f"load average at the end {os.getloadavg()[0]:.1f} (wall times are noisy when other jobs share the CPUs).",
             "", "```", free, "```", "",
             f"Model: the ~400M Llama of init-tiny `--size 400m` (hidden 1024, 24 layers, vocab 32000), stored "
             f"bf16; NF4 run of bench/recipe-400m.yaml with model.dtype bfloat16, LoRA r16 all-linear, {steps} "
             f"steps ({train_s:.0f} s). Output bf16. One fresh process per row; baseline = resident set after "
             "imports; peak = ru_maxrss (includes mmap'd file pages).", "",
             "| configuration | peak RSS | added over baseline | wall (after imports) | output | check |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        check = "-" if not r["check"] else (f"max diff {r['check']['max_abs_diff']:.3g} <= "
                                            f"{r['check']['tolerance']:.3g}" if r["check"]["passed"] else "FAILED")
        lines.append(f"| {name} | {r['peak_bytes'] / 2**20:,.0f} MiB | "
                     f"{(r['peak_bytes'] - r['baseline_bytes']) / 2**20:,.0f} MiB | {r['wall_s']:.1f} s | "
                     f"{r['output_bytes'] / 1e6:,.0f} MB | {check} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="build/bench-400m")
    p.add_argument("--runs", default="build/bench-export")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--markdown", default=None)
    p.add_argument("--reuse-run", action="store_true", help="measure the run already in RUNS/run (no training)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    model = Path(args.model).resolve()
    if args.child:
        print(json.dumps(child(args.child, Path(args.run), model, Path(args.out))))
        return
    runs = (ROOT / args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    reuse = args.reuse_run and (runs / "run" / "adapter").is_dir()
    train_s = json.loads((runs / "results.json").read_text())["train_s"] if reuse else train(model, runs / "run",
                                                                                                args.steps)
    results = {name: measure(kind, runs / "run", model, runs / kind) for name, kind in CONFIGS.items()}
    (runs / "results.json").write_text(json.dumps({"train_s": train_s, "results": results}, indent=2))
    text = markdown(results, Path(args.model), args.steps, train_s)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
