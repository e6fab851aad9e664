"""Atomic, verifiable checkpoints written only as safetensors and JSON.

Layout of `<output_dir>/checkpoint-<step>/`:

    adapter/                 PEFT adapter folder (loadable on its own with PeftModel.from_pretrained)
    optimizer.safetensors    optimizer tensors, keys are paths into optimizer.json
    optimizer.json           the optimizer state dict with tensors replaced by {"__tensor__": key}
    trainer_state.json       step, data position, scheduler and grad-scaler state, fingerprints
    rng-rank<k>.json/.safetensors   every rank's RNG state (python, numpy, torch CPU and CUDA)
    recipe.yaml              the resolved recipe
    manifest.json            written last: every file's size and sha256

A save writes into `.staging-checkpoint-<step>`, fsyncs each file, writes the manifest, renames the
folder into place, then replaces the `latest` pointer by rename. A folder without a valid manifest
is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from qshard.errors import QShardError

MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "checkpoint-"
FORMAT_VERSION = 1


class CheckpointInvalid(Exception):
    """A folder that must not be resumed from; the message names what is wrong."""


def staging_dir(output_dir: Path, step: int) -> Path:
    stage = output_dir / f".staging-{PREFIX}{step}"
    if stage.exists():
        shutil.rmtree(stage)  # leftovers of a save that died; never a valid checkpoint
    stage.mkdir(parents=True)
    return stage


def commit(stage: Path, output_dir: Path, step: int, fault=lambda name: None) -> Path:
    """Seal a fully written staging folder: manifest, fsync, rename, move `latest`.

    `fault(point)` is the fault-injection hook of the tests (qshard.observe.faults); a no-op otherwise."""
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    manifest = {"format_version": FORMAT_VERSION, "step": step,
                "files": {str(p.relative_to(stage)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                          for p in files}}
    for p in files:
        _fsync_file(p)
    fault("save:before_manifest")
    write_json(stage / MANIFEST, manifest)
    _fsync_dir(stage)
    final = output_dir / f"{PREFIX}{step}"
    if final.exists():
        shutil.rmtree(final)  # only reached when re-saving the same step after a resume
    fault("save:before_rename")
    os.rename(stage, final)
    pointer = output_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    _fsync_file(pointer)
    os.replace(pointer, output_dir / LATEST)
    _fsync_dir(output_dir)
    return final


def prune(output_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints; never the one this run resumed from."""
    for old in list_checkpoints(output_dir)[:-keep]:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders by step, oldest first (validity not checked)."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(ckpt: Path) -> dict:
    """Check the manifest against the files; return it, or raise CheckpointInvalid naming the problem."""
    manifest_file = ckpt / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointInvalid(f"{ckpt.name}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_file.read_text())
        entries = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointInvalid(f"{ckpt.name}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(entries, dict):
        raise CheckpointInvalid(f"{ckpt.name}: malformed {MANIFEST} (files is not a mapping)")
    for name, meta in entries.items():
        path = _inside(ckpt, name)
        if not isinstance(meta, dict) or not {"size", "sha256"} <= meta.keys():
            raise CheckpointInvalid(f"{ckpt.name}: malformed {MANIFEST} entry for {name!r}")
        if not path.is_file():
            raise CheckpointInvalid(f"{ckpt.name}: {name} is missing")
        if path.stat().st_size != meta["size"]:
            raise CheckpointInvalid(f"{ckpt.name}: {name} has {path.stat().st_size} bytes, manifest says "
                                    f"{meta['size']} (truncated?)")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointInvalid(f"{ckpt.name}: {name} does not match its sha256 (corrupted)")
    return manifest


def find_resume(output_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `warn`."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointInvalid as e:
            warn(f"skipping checkpoint: {e}")
    return None


def resolve_resume(resume: str | None, output_dir: Path, warn=print) -> Path | None:
    """`--resume auto` (newest valid, or None to start fresh) or an explicit checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        return find_resume(output_dir, warn)
    ckpt = Path(resume)
    try:
        verify(ckpt)
    except CheckpointInvalid as e:
        raise QShardError(f"cannot resume: {e}", where="--resume", fix="use --resume auto or another checkpoint")
    return ckpt


def _inside(root: Path, name: str) -> Path:
    """Manifest paths are relative and stay inside the checkpoint; anything else is refused."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointInvalid(f"{root.name}: manifest entry {name!r} leaves the checkpoint folder")
    return root / name


# -- state <-> safetensors + JSON -----------------------------------------------------------------

def save_state(stage: Path, stem: str, state: object) -> None:
    """Any nest of dicts/lists/scalars/tensors as <stem>.json + <stem>.safetensors (no pickle)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "", tensors)
    write_json(stage / f"{stem}.json", skeleton)
    # clone: safetensors refuses tensors that share memory (views into one flat buffer)
    save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
              str(stage / f"{stem}.safetensors"))


def load_state(ckpt: Path, stem: str) -> object:
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / f"{stem}.safetensors"))
    return _join_tensors(json.loads((ckpt / f"{stem}.json").read_text()), tensors)


def _split_tensors(obj: object, path: str, out: dict) -> object:
    if isinstance(obj, torch.Tensor):
        out[path or "root"] = obj
        return {"__tensor__": path or "root"}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, f"{path}.k{i}", out), _split_tensors(v, f"{path}.{i}", out)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_split_tensors(v, f"{path}.{i}", out) for i, v in enumerate(obj)]}
    return obj


def _join_tensors(obj: object, tensors: dict) -> object:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join_tensors(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
    return obj


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
