"""`qshard quantize MODEL_DIR OUT_DIR --calibration DATA`: post-training quantization (GPTQ or AWQ) of a dense model
folder with llm-compressor, written as compressed-tensors (pack-quantized), which qshard trains on with
`quantization.method: checkpoint`.

llm-compressor pins its own transformers and compressed-tensors, so it lives in a virtualenv of its own
(`make quantizers` -> .venv-quant; another with QSHARD_QUANT_PYTHON) and runs as a child process
(qshard/tools/quantize_worker.py). Here, before it starts: the model folder, the output folder and the
calibration rows are checked, and the rows are tokenized the way training tokenizes them (qshard's data
formats and chat templates). After it: the folder is loaded back by qshard's own loader and its logits are
compared with the dense model's on the calibration samples (reported, not judged: that gap is the
quantization error). The folder is written beside OUT_DIR and renamed into place, as `qshard export` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qshard.errors import QShardError
from qshard.model.load import QuantSpec
from qshard.state.rundir import check_not_protected, real_path
from qshard.tools.export import check_out_dir, move_into_place

MARKER = ".qshard-quantize.json"
METHODS = ("gptq", "awq")  # AWQ on a machine without an accelerator: quantize_worker.skip_pinning_without_an_accelerator
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("quantize_worker.py")
CHECK_SAMPLES = 4


@dataclass
class Result:
    out_dir: Path
    files: list[str] = field(default_factory=list)
    gap: dict = field(default_factory=dict)  # logits of the quantized model against the dense one


def quantize(model_dir: str, out_dir: str, *, calibration: str, method: str = "gptq", bits: int = 4,
             group_size: int = 128, symmetric: bool = True, samples: int = 128, max_length: int = 512,
             overwrite: bool = False, log=print) -> Result:
    python = quantizer_python()
    if method not in METHODS:
        raise QShardError(f"--method {method} is not available", where="--method", fix=f"use one of: {METHODS}")
    source, skeleton = open_dense(model_dir)
    ignore = check_groups(skeleton, group_size)
    out = Path(out_dir).expanduser()
    check_not_protected(out, "OUT_DIR", "qshard quantize writes (and --overwrite replaces) a folder of its own",
                        fix="write the quantized model to a new folder of its own")
    target, src = real_path(out), real_path(source)
    if target == src or src in target.parents or target in src.parents:
        raise QShardError(f"OUT_DIR {out} is, lies inside or contains the model folder {source}", where="OUT_DIR",
                          fix="write the quantized model to a new folder of its own")
    check_out_dir(out, overwrite, MARKER, "quantize")
    ids = calibration_ids(calibration, source, samples, max_length)
    log(f"quantizing {source} with {method.upper()} ({bits}-bit, groups of {group_size}, "
        f"{'symmetric' if symmetric else 'asymmetric'}) on {len(ids)} calibration samples from {calibration}")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    stage.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="qshard-quantize-") as tmp:
            spec = {"model": str(source), "out": str(stage), "method": method, "bits": bits,
                    "group_size": group_size, "symmetric": symmetric, "ignore": ignore,
                    "calibration": str(Path(tmp) / "calibration.json")}
            Path(spec["calibration"]).write_text(json.dumps({"input_ids": ids}))
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            code = subprocess.call([python, str(WORKER), str(Path(tmp) / "spec.json")])
        if code != 0:
            raise QShardError(f"llm-compressor failed (exit {code}; its output is above); nothing was written to "
                              f"{out}", where=f"{python} {WORKER.name}", fix="see the quantizer's error above")
        result = Result(out, files=sorted(p.name for p in stage.iterdir()))
        result.gap = quantization_gap(source, stage, ids[:CHECK_SAMPLES])
        log(f"loaded back by qshard (quantization.method: checkpoint): max |logit difference| to the dense model "
            f"{result.gap['max_abs_diff']:.3g} ({result.gap['relative']:.3g} of max |logit|) on "
            f"{result.gap['samples']} calibration samples; reported, not checked")
        write_marker(stage, source, calibration, spec, result)
        move_into_place(stage, out)
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def quantizer_python() -> str:
    """The quantizer environment's interpreter: QSHARD_QUANT_PYTHON, else the repository's .venv-quant."""
    python = os.environ.get("QSHARD_QUANT_PYTHON") or str(REPO / ".venv-quant" / "bin" / "python")
    if not Path(python).is_file():
        raise QShardError(f"the quantizer's environment is not installed ({python} not found)",
                          where="QSHARD_QUANT_PYTHON",
                          fix="run `make quantizers` in the qshard repository (llm-compressor in .venv-quant), or "
                              "set QSHARD_QUANT_PYTHON to a Python that has llmcompressor")
    return python


def open_dense(model_dir: str):
    """The folder, checked as any base is (config, safetensors headers, no code run), and not quantized."""
    from qshard.model.load import open_base

    source, skeleton = open_base(model_dir, dtype="auto", quant=QuantSpec("none"))
    method = (json.loads((source / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
    if method:
        raise QShardError(f"{source} is already quantized ({method})", where="MODEL_DIR",
                          fix="quantize the dense model, e.g. a `qshard export` of the run (its default is dense)")
    return source, skeleton


def check_groups(skeleton, group_size: int) -> list[str]:
    """The linears left dense (the output embedding); every other linear's input width must split into groups."""
    from torch import nn

    head = skeleton.get_output_embeddings()
    ignore = [name for name, m in skeleton.named_modules() if m is head]
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Linear) and module is not head and module.in_features % group_size:
            raise QShardError(f"{name} has {module.in_features} input features, not a multiple of --group-size "
                              f"{group_size}", where="--group-size",
                              fix="choose a group size that divides every layer's input width, e.g. 32, 64 or 128")
    return ignore


def calibration_ids(path: str, model_dir: Path, samples: int, max_length: int) -> list[list[int]]:
    """The first `samples` rows of a qshard training file, tokenized as training would tokenize them."""
    from qshard.data import tokenize_rows
    from qshard.model.load import load_tokenizer
    from qshard.rows import load_rows

    rows, fmt = load_rows(path)
    examples, _ = tokenize_rows(rows[:samples], fmt, load_tokenizer(model_dir), max_length, source=str(path))
    return [list(e.input_ids) for e in examples]


@torch.no_grad()
def quantization_gap(dense_dir: Path, quantized_dir: Path, ids: list[list[int]]) -> dict:
    """Logits of the quantized folder, as qshard loads it for training, against the dense model's (float32)."""
    from qshard.model.load import load_float32

    dense = load_float32(str(dense_dir), QuantSpec("none"))
    quantized = load_float32(str(quantized_dir), QuantSpec("checkpoint"))
    worst, scale = 0.0, 0.0
    for row in ids:
        x = torch.tensor([row])
        want, got = dense(input_ids=x).logits, quantized(input_ids=x).logits
        worst, scale = max(worst, float((want - got).abs().max())), max(scale, float(want.abs().max()))
    return {"max_abs_diff": worst, "max_abs_logit": scale, "relative": worst / scale if scale else 0.0,
            "samples": len(ids)}


def write_marker(stage: Path, source: Path, calibration: str, spec: dict, result: Result) -> None:
    from qshard.state.checkpoint import write_json

    settings = {k: spec[k] for k in ("method", "bits", "group_size", "symmetric", "ignore")}
    write_json(stage / MARKER, {"format": 1, "source": str(source.resolve()), "calibration": str(calibration),
                                "files": result.files, "gap": result.gap, **settings})
