"""The `qshard` command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from qshard.errors import QShardError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qshard import _compat

    _compat.quiet_known_noise()
    try:
        return args.func(args) or 0
    except QShardError as e:
        print(f"qshard: error: {e}", file=sys.stderr)
        return 2


def _count(minimum: int):
    """An argparse type: an integer >= minimum (argparse names the option and exits 2 otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {minimum}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive, finite number")
    return value


def _train(args) -> int:
    from qshard.config import load_recipe
    from qshard.train import run

    recipe = load_recipe(args.recipe, args.set)  # validated here, before any process is started
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    outcome = run(recipe, overwrite=args.overwrite, resume=args.resume, recipe_file=args.recipe)
    code = 3 if outcome.stopped_by_signal else 0
    if outcome.process_group:
        from qshard import _compat

        _compat.exit_without_teardown(code)
    return code


def _launch(args) -> int:
    """Start N processes on this machine through torchrun, each running this same command."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "-m", "qshard.cli", "train", args.recipe]
    cmd += [f"--set={item}" for item in args.set]
    cmd += ["--overwrite"] * args.overwrite + ([f"--resume={args.resume}"] if args.resume else [])
    return subprocess.call(cmd)


def _init_tiny(args) -> int:
    from qshard.data import load_rows
    from qshard.tools.tiny import init_tiny

    texts = []
    for path in args.data:
        rows, _ = load_rows(path)
        texts += [" ".join(str(v) for v in _strings(row)) for row in rows]
    out = init_tiny(args.dir, arch=args.arch, size=args.size, seed=args.seed, texts=texts,
                    vocab_size=args.vocab_size)
    print(f"wrote a random {args.arch} model ({args.size}) and its tokenizer to {out}")
    return 0


def _plan(args) -> int:
    from pathlib import Path

    from qshard.config import load_recipe
    from qshard.tools import plan

    recipe = load_recipe(args.recipe, args.set)
    gpu_mem = plan.parse_size(args.gpu_mem, "--gpu-mem")
    cpu_mem = plan.parse_size(args.cpu_mem, "--cpu-mem") if args.cpu_mem else None
    result = plan.make_plan(recipe, plan.read_model_spec(recipe.model.path), gpus=args.gpus, nodes=args.nodes,
                            gpu_mem=gpu_mem, cpu_mem=cpu_mem)
    print(plan.report(result))
    if result.best is None:
        return 1
    for path in plan.write_recommendation(result, recipe, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _doctor(args) -> int:
    from qshard.tools import doctor

    return doctor.main(args.recipe, args.set, overwrite=args.overwrite, resume=args.resume)


def _report(args) -> int:
    from qshard.tools.report import write_report

    report = write_report(args.run_dir)
    print(f"wrote {len(report.files)} files to {report.out_dir} (summary: {report.out_dir / 'summary.md'})")
    return 0


def _export(args) -> int:
    from qshard.tools.export import export
    from qshard.tools.plan import parse_size

    result = export(args.run_dir, args.out_dir, dtype=args.dtype, format=args.format, merge_into=args.merge_into,
                    overwrite=args.overwrite, check=not args.no_check,
                    max_shard_bytes=parse_size(args.max_shard_size, "--max-shard-size"))
    if result.check is not None and not result.check["passed"]:
        print(f"qshard: error: the exported model does not reproduce the run's base + adapter; nothing was "
              f"written to {result.out_dir} (--no-check writes it anyway)", file=sys.stderr)
        return 1
    print(f"wrote {len(result.files)} files to {result.out_dir}")
    return 0


def _quantize(args) -> int:
    from qshard.tools.quantize import quantize

    result = quantize(args.model_dir, args.out_dir, calibration=args.calibration, method=args.method, bits=args.bits,
                      group_size=args.group_size, symmetric=not args.asymmetric, samples=args.samples,
                      max_length=args.max_length, overwrite=args.overwrite)
    print(f"wrote {len(result.files)} files to {result.out_dir} (train on it with quantization.method: checkpoint)")
    return 0


def _stages(args) -> int:
    from qshard.tools import stages

    if args.plan:
        from qshard.tools.plan import parse_size

        return stages.plan(args.pipeline, gpus=args.gpus, nodes=args.nodes,
                           gpu_mem=parse_size(args.gpu_mem, "--gpu-mem"))
    return stages.run(args.pipeline, until=args.until)


def _bench_comm(args) -> int:
    from qshard.tools import commbench

    job = commbench.prepare(args.sizes, args.iters, args.recipe, args.set)  # checked before processes start
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return subprocess.call(commbench.launch_command(args))
    return commbench.main(job, tflops=args.tflops, json_out=args.json)


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _parser() -> argparse.ArgumentParser:
    from qshard.tools.tiny import ARCHS, SIZES

    p = argparse.ArgumentParser(prog="qshard", description="LoRA fine-tuning on quantized base models.")
    # the `deepspeed` launcher passes --local_rank before the command; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML recipe")
    t.add_argument("recipe", help="YAML recipe (sections model, quantization, lora, data, train, distributed)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.max_steps=50 (repeatable)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty train.output_dir")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest valid checkpoint (auto) or PATH")
    t.add_argument("--nproc", type=_count(1), default=1, metavar="N",
                   help="start N processes on this machine (through torchrun); for several machines run "
                        "torchrun yourself (see README)")
    t.add_argument("--max-restarts", type=_count(0), default=0, metavar="K",
                   help="with --nproc: restart all processes up to K times after a failure; each restart "
                        "resumes from the newest checkpoint")
    t.set_defaults(func=_train)

    i = sub.add_parser("init-tiny", help="write a randomly initialised model + tokenizer folder")
    i.add_argument("dir")
    i.add_argument("--arch", default="llama", choices=ARCHS)
    i.add_argument("--size", default="tiny", choices=list(SIZES))
    i.add_argument("--seed", type=_count(0), default=0)
    i.add_argument("--vocab-size", type=_count(8), default=None, help="BPE vocabulary size (default 512; 32000 for 400m)")
    i.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="train the tokenizer on this dataset's text too (repeatable)")
    i.set_defaults(func=_init_tiny)

    pl = sub.add_parser("plan", help="predict memory per GPU and recommend an engine/quantization/batch setup")
    pl.add_argument("recipe", help="YAML recipe (only the model's config.json is read, no weights)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    pl.add_argument("--gpus", type=_count(1), default=1, metavar="N", help="GPUs per node")
    pl.add_argument("--nodes", type=_count(1), default=1, metavar="M")
    pl.add_argument("--gpu-mem", default="80GiB", help="memory of one GPU, e.g. 24GiB")
    pl.add_argument("--cpu-mem", default=None, help="CPU memory per node (limits offloading), e.g. 512GiB")
    pl.add_argument("--out", default="plan", metavar="DIR", help="where the recommended recipe is written")
    pl.set_defaults(func=_plan)

    dr = sub.add_parser("doctor", help="check the environment (and a recipe against it)")
    dr.add_argument("recipe", nargs="?", help="YAML recipe to validate against this machine")
    dr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    dr.add_argument("--overwrite", action="store_true", help="check as `qshard train --overwrite` would")
    dr.add_argument("--resume", metavar="auto|PATH", help="check as `qshard train --resume` would")
    dr.set_defaults(func=_doctor)

    rp = sub.add_parser("report", help="plots and a Markdown summary of a run folder (RUN_DIR/report/)")
    rp.add_argument("run_dir", help="the run's folder (train.output_dir), holding metrics.jsonl")
    rp.set_defaults(func=_report)

    ex = sub.add_parser("export", help="merge a run's adapter into its base and write a Hugging Face model folder")
    ex.add_argument("run_dir", help="the run's folder (train.output_dir), or one of its checkpoint-N folders")
    ex.add_argument("out_dir", help="the new model folder (config.json, safetensors, tokenizer)")
    ex.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="dtype of the written weights (with --format nf4: of the tensors kept dense and of the "
                         "4-bit matmul)")
    ex.add_argument("--format", default="dense", choices=["dense", "nf4", "checkpoint"],
                    help="dense: merged weights in --dtype; nf4: the linears the run's base quantized re-quantized "
                         "to bitsandbytes NF4 (transformers loads it as load_in_4bit); checkpoint: a run on a GPTQ / "
                         "AWQ / compressed-tensors base (method checkpoint) written in that format, the merged "
                         "weights re-quantized onto the base's own scales and zero points (the error it adds is "
                         "printed per layer)")
    ex.add_argument("--merge-into", default=None, metavar="PATH",
                    help="merge into this original full-precision checkpoint instead of the dequantized base")
    ex.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors file, e.g. 2GB")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    ex.add_argument("--no-check", action="store_true",
                    help="skip comparing the exported model's logits with the run's base + adapter")
    ex.set_defaults(func=_export)

    qz = sub.add_parser("quantize", help="GPTQ- or AWQ-quantize a dense model folder with llm-compressor (`make "
                                         "quantizers`) into compressed-tensors, which qshard trains on (method: "
                                         "checkpoint)")
    qz.add_argument("model_dir", help="a dense Hugging Face model folder, e.g. a `qshard export` of a run")
    qz.add_argument("out_dir", help="the new, quantized model folder")
    qz.add_argument("--calibration", required=True, metavar="DATA",
                    help="calibration rows: a file in any format qshard trains on (alpaca, chat, text)")
    qz.add_argument("--method", default="gptq", choices=["gptq", "awq"],
                    help="the quantization algorithm (awq: activation-aware scaling, then round to nearest; pair it "
                         "with --asymmetric as AWQ usually is)")
    qz.add_argument("--bits", type=int, default=4, choices=[4, 8], help="bits per weight")
    qz.add_argument("--group-size", type=_count(1), default=128, help="weights sharing one scale (and zero point)")
    qz.add_argument("--asymmetric", action="store_true", help="zero points as well as scales")
    qz.add_argument("--samples", type=_count(1), default=128, help="calibration rows used (the first N)")
    qz.add_argument("--max-length", type=_count(1), default=512, help="tokens per calibration row (truncated)")
    qz.add_argument("--overwrite", action="store_true", help="replace an earlier `qshard quantize` in OUT_DIR")
    qz.set_defaults(func=_quantize)

    st = sub.add_parser("stages", help="run a staged workflow (train, export, train on the export, ...) from one "
                                       "YAML file; rerun the same command to continue after a crash",
                        description=stages_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("pipeline", help="YAML file with output_dir and stages")
    st.add_argument("--until", metavar="NAME", help="stop after stage NAME")
    st.add_argument("--plan", action="store_true", help="print `qshard plan` for every training stage; run nothing")
    st.add_argument("--gpus", type=_count(1), default=8, help="with --plan: GPUs per node")
    st.add_argument("--nodes", type=_count(1), default=1, help="with --plan: nodes")
    st.add_argument("--gpu-mem", default="80GiB", help="with --plan: memory per GPU")
    st.set_defaults(func=_stages)

    bc = sub.add_parser("bench-comm", help="time all-reduce / all-gather / reduce-scatter (algbw, busbw), and "
                                           "say whether a recipe's steps are communication- or compute-bound")
    bc.add_argument("recipe", nargs="?", help="YAML recipe whose per-step communication is estimated")
    bc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    bc.add_argument("--nproc", type=_count(1), default=1, metavar="N", help="start N processes (through torchrun)")
    bc.add_argument("--sizes", default="1KB,64KB,1MB,16MB,256MB", help="message sizes, comma-separated")
    bc.add_argument("--iters", type=_count(1), default=10, metavar="K", help="timed iterations per size")
    bc.add_argument("--tflops", type=_positive_float, default=None,
                    help="compute throughput per process for the recipe estimate (default: 396 on GPU, 1 on CPU)")
    bc.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    bc.set_defaults(func=_bench_comm)
    return p


def stages_help() -> str:
    from qshard.tools import stages

    return stages.__doc__


if __name__ == "__main__":
    sys.exit(main())
