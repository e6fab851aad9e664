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


def _train(args) -> int:
    from qshard.config import load_recipe
    from qshard.train import run

    recipe = load_recipe(args.recipe, args.set)  # validated here, before any process is started
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    outcome = run(recipe, overwrite=args.overwrite, resume=args.resume)
    return 3 if outcome.stopped_by_signal else 0


def _launch(args) -> int:
    """Start N processes on this machine through torchrun, each running this same command."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "-m", "qshard.cli", "train", args.recipe]
    cmd += [f"--set={item}" for item in args.set]
    cmd += ["--overwrite"] * args.overwrite + ([f"--resume={args.resume}"] if args.resume else [])
    return subprocess.call(cmd)


def _init_tiny(args) -> int:
    from qshard.data import load_rows
    from qshard.tiny import init_tiny

    texts = []
    for path in args.data:
        rows, _ = load_rows(path)
        texts += [" ".join(str(v) for v in _strings(row)) for row in rows]
    out = init_tiny(args.dir, arch=args.arch, size=args.size, seed=args.seed, texts=texts,
                    vocab_size=args.vocab_size)
    print(f"wrote a random {args.arch} model ({args.size}) and its tokenizer to {out}")
    return 0


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
    from qshard.tiny import ARCHS, SIZES

    p = argparse.ArgumentParser(prog="qshard", description="LoRA fine-tuning on quantized base models.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML recipe")
    t.add_argument("recipe", help="YAML recipe (sections model, quantization, lora, data, train, distributed)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.max_steps=50 (repeatable)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty train.output_dir")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest valid checkpoint (auto) or PATH")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N processes on this machine (through torchrun); for several machines run "
                        "torchrun yourself (see README)")
    t.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: restart all processes up to K times after a failure; each restart "
                        "resumes from the newest checkpoint")
    t.set_defaults(func=_train)

    i = sub.add_parser("init-tiny", help="write a randomly initialised model + tokenizer folder")
    i.add_argument("dir")
    i.add_argument("--arch", default="llama", choices=ARCHS)
    i.add_argument("--size", default="tiny", choices=list(SIZES))
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 512; 32000 for 400m)")
    i.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="train the tokenizer on this dataset's text too (repeatable)")
    i.set_defaults(func=_init_tiny)
    return p


if __name__ == "__main__":
    sys.exit(main())
