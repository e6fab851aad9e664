"""Issue #17's scale proof on a CPU machine: a Llama with Llama-3-70B's layer shapes (hidden 8192, intermediate
28672, 64 heads / 8 KV heads, vocabulary 128,256, untied head) but only a few decoder layers, NF4, bf16,
trained by `qshard train` on N gloo ranks: sharded load, 2 steps, a checkpoint, then a resume for
--resume-steps more.
Peak resident memory of each rank is read from outside (ru_maxrss of the rank processes, via /proc while they
run) and compared with `qshard plan`'s per-GPU tensor bytes for the same recipe.

    .venv/bin/python bench/scale70b.py --engine fsdp2 --nproc 4 --layers 2
    .venv/bin/python bench/scale70b.py --engine zero3 --nproc 4 --layers 2

The model (random bf16, ~7.6 GB for 2 layers) is written once to build/llama70b-shaped-L<layers> without
building it in memory: one tensor at a time into safetensors shards. A guard kills the job when the machine's
available memory falls under --min-free-gib, so the benchmark reports an out-of-memory instead of the kernel
killing something else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
         "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
         "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16", "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}


def build_model(out: Path, layers: int) -> Path:
    from safetensors.torch import save_file

    from qshard.tools.tiny import init_tiny
    from tests.helpers import ROWS

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    init_tiny(tmp / "tok", size="micro", texts=[" ".join(r.values()) for r in ROWS])  # a tokenizer (ids < 512)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tmp / "tok" / name).exists():
            shutil.copy(tmp / "tok" / name, tmp / name)
    tok_config = json.loads((tmp / "tok" / "config.json").read_text())
    config = {**SHAPE, "num_hidden_layers": layers, "pad_token_id": tok_config.get("pad_token_id", 0),
              "eos_token_id": tok_config.get("eos_token_id", 2), "bos_token_id": tok_config.get("bos_token_id", 1)}
    shutil.rmtree(tmp / "tok")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    h, i, v, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], 8 * 128
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)

    index, files = {}, []

    def shard(tensors: dict, n: int):
        name = f"model-{n:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        files.append(name)

    shard({"model.embed_tokens.weight": rand(v, h)}, 1)
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shard({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
               p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
               p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
               p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}, 2 + 2 * layer)
        shard({p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
               p + "mlp.down_proj.weight": rand(h, i)}, 3 + 2 * layer)
    shard({"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)}, 2 + 2 * layers)
    total = sum((tmp / f).stat().st_size for f in files)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}, indent=1))
    tmp.rename(out)
    return out


def rank_pids(root: int) -> list[int]:
    """The ranks: python processes running qshard.cli train that torchrun's launcher started."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-ax"], capture_output=True, text=True).stdout
    children, procs = {}, {}
    for line in out.splitlines():
        pid, ppid, args = line.split(None, 2)
        children.setdefault(int(ppid), []).append(int(pid))
        procs[int(pid)] = args
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            stack.append(child)
            # a rank is the launcher's own child; a process a rank forks (same command line, same RANK) is not
            if ("qshard.cli" in procs[child] and "torch.distributed.run" not in procs[child]
                    and "torch.distributed.run" in procs.get(pid, "")):
                found.append(child)
    return found


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and RssFile (its file-backed part now: mapped safetensors pages count in RSS too),
    in KiB; {} once the process is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "RssFile"):
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_train(args, recipe: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "qshard.cli", "train", str(recipe), f"--nproc={args.nproc}", *extra]
    log = open(args.out / f"train{'-resume' if extra else ''}.log", "w")
    job = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks, file_peaks, ranks, min_free, killed = {}, {}, {}, available_gib(), False
    while job.poll() is None:
        for pid in rank_pids(job.pid):
            st = proc_status(pid)
            if pid not in ranks:
                ranks[pid] = rank_of(pid)
            peaks[pid] = max(peaks.get(pid, 0), st.get("VmHWM", 0))
            file_peaks[pid] = max(file_peaks.get(pid, 0), st.get("RssFile", 0))
        min_free = min(min_free, available_gib())
        if min_free < args.min_free_gib and not killed:
            os.killpg(job.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    by_rank = sorted((ranks[pid] if ranks.get(pid) is not None else -1, pid) for pid in peaks)
    return {"rc": job.returncode, "killed_low_memory": killed, "min_available_gib": round(min_free, 2),
            "rank_peak_rss_mib": sorted(round(k / 1024) for k in peaks.values()),
            "peak_rss_mib_by_rank": {str(r): round(peaks[pid] / 1024) for r, pid in by_rank},
            "peak_file_rss_mib_by_rank": {str(r): round(file_peaks[pid] / 1024) for r, pid in by_rank}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["fsdp2", "zero3"], default="fsdp2")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--min-free-gib", type=float, default=1.0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="train.precision; fp32 where this CPU's bf16 matmuls are slow (qshard doctor says)")
    p.add_argument("--resume-steps", type=int, default=2,
                   help="steps the resumed run trains (its first is DeepSpeed's tracing step; the planner models "
                        "the steps after it)")
    p.add_argument("--no-vocab-parallel", action="store_true",
                   help="distributed.vocab_parallel: false (the engine gathers embedding and head like a layer)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "scale70b")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    model = build_model(REPO / "build" / f"llama70b-shaped-L{args.layers}", args.layers)
    args.out = args.out / (f"{args.engine}-n{args.nproc}-L{args.layers}{'-gathered' if args.no_vocab_parallel else ''}"
                           f"{'-fp32' if args.precision == 'fp32' else ''}")
    if args.out.exists() and not (args.out / "recipe.yaml").is_file():  # only a folder this script wrote is replaced
        sys.exit(f"{args.out} exists and is not an earlier run of this benchmark (no recipe.yaml): choose another --out")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    from tests.helpers import write_rows

    data = write_rows(args.out / "train.jsonl")
    distributed = {"engine": "fsdp2"} if args.engine == "fsdp2" else {"engine": "deepspeed", "zero_stage": 3}
    distributed["vocab_parallel"] = not args.no_vocab_parallel
    recipe = {"model": {"path": str(model), "dtype": "bfloat16"}, "quantization": {"method": "nf4"},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "data": {"path": str(data), "max_length": args.seq},
              "train": {"output_dir": str(args.out / "run"), "max_steps": 2, "micro_batch_size": 1,
                        "precision": args.precision, "save_every": 1, "sample_tokens": 0, "learning_rate": 1e-4},
              "distributed": distributed}
    import yaml

    (args.out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    plan = subprocess.run([sys.executable, "-m", "qshard.cli", "plan", str(args.out / "recipe.yaml"), "--gpus",
                           str(args.nproc), "--gpu-mem", "80GiB", "--out", str(args.out / "plan")],
                          cwd=REPO, capture_output=True, text=True)
    (args.out / "plan.txt").write_text(plan.stdout + plan.stderr)
    result = {"engine": args.engine, "nproc": args.nproc, "layers": args.layers, "seq": args.seq,
              "vocab_parallel": not args.no_vocab_parallel,
              "available_gib_before": round(available_gib(), 2)}
    result["train"] = run_train(args, args.out / "recipe.yaml", [])
    if result["train"]["rc"] == 0:
        resume = {**recipe, "train": {**recipe["train"], "max_steps": 2 + args.resume_steps}}
        (args.out / "recipe-resume.yaml").write_text(yaml.safe_dump(resume))
        result["resume"] = run_train(args, args.out / "recipe-resume.yaml", ["--resume=auto"])
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
