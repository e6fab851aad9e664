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

A checkpoint is read only inside its own folder and trusted only as far as it is checked: `verify`
refuses links, files the manifest does not list, and contents that do not fit the format (a manifest
can be re-hashed after tampering). Deleting is limited to what qshard wrote: staging leftovers, and
checkpoint folders whose manifest lists every file in them; a link is never followed, and the
`latest` pointer is written for people and other tools, never read to choose a checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

import torch

from qshard.errors import QShardError

MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "checkpoint-"
FORMAT_VERSION = 1
NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)", re.ASCII)  # one spelling per step: no "checkpoint-03"
# what resume.save_checkpoint writes, besides rng-rank<k> for every rank k of the run
REQUIRED = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.json",
            "optimizer.safetensors", "recipe.yaml", "rng-rank0.json", "rng-rank0.safetensors", "trainer_state.json")
RNG_FILE = re.compile(r"rng-rank(0|[1-9][0-9]*)\.(json|safetensors)", re.ASCII)


class CheckpointInvalid(Exception):
    """A folder that must not be resumed from; the message names what is wrong."""


def staging_dir(output_dir: Path, step: int) -> Path:
    stage = output_dir / f".staging-{PREFIX}{step}"
    _remove(stage)  # leftovers of a save that died; never a valid checkpoint
    stage.mkdir(parents=True)
    return stage


def commit(stage: Path, output_dir: Path, step: int, fault=lambda name: None) -> Path:
    """Seal a fully written staging folder: manifest, fsync, rename, move `latest`.

    `fault(point)` is the fault-injection hook of the tests (qshard.observe.faults); a no-op otherwise."""
    files = sorted(p for p in stage.rglob("*") if p.is_file() and not p.is_symlink())
    manifest = {"format_version": FORMAT_VERSION, "step": step,
                "files": {p.relative_to(stage).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                          for p in files}}
    for p in files:
        _fsync_file(p)
    fault("save:before_manifest")
    write_json(stage / MANIFEST, manifest)
    _fsync_dir(stage)
    final = output_dir / f"{PREFIX}{step}"
    _make_room(final)
    fault("save:before_rename")
    os.rename(stage, final)
    write_text(output_dir / LATEST, final.name)
    _fsync_dir(output_dir)
    return final


def _make_room(final: Path) -> None:
    """Free the name a save is about to take. Taken only when a step is saved again after resuming from
    an earlier checkpoint: a checkpoint of ours is replaced; anything else under that name (a link, a
    folder qshard did not write) is renamed aside, never deleted or followed."""
    if not (final.exists() or final.is_symlink()):
        return
    if _ours(final):
        shutil.rmtree(final)
        return
    aside = next(p for i in itertools.count() if not _occupied(p := final.with_name(f"{final.name}.moved-aside-{i}")))
    os.rename(final, aside)


def prune(output_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` of the checkpoints qshard wrote here; never the one this run
    resumed from, never a link or a folder holding files its manifest does not list."""
    ours = [ckpt for ckpt in list_checkpoints(output_dir) if _ours(ckpt)]
    for old in ours[:-keep]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Entries named checkpoint-<step> (folders, and links, which verify refuses), oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*")
             if NAME.fullmatch(p.name) and (p.is_dir() or p.is_symlink())]
    return sorted(found, key=_step_of)


def _step_of(ckpt: Path) -> int | None:
    match = NAME.fullmatch(ckpt.name)
    return int(match.group(1)) if match else None


def _ours(folder: Path) -> bool:
    """Whether qshard wrote this folder and nothing else is in it: a real folder whose manifest names its
    step and lists every file it holds (a corrupt file is still ours to delete; a link never is)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    files, odd = _contents(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = set(manifest["files"]) | {MANIFEST}
        named = manifest["step"] == _step_of(folder)
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return False
    return named and not odd and all(name in listed for name in files)


def _contents(folder: Path) -> tuple[list[str], list[str]]:
    """Relative names of the regular files under `folder`, and of everything that is neither a file nor
    a folder (links, pipes, sockets); links are not followed."""
    files, odd = [], []
    for top, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(top, name)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                odd.append(path.relative_to(folder).as_posix())
            elif path.is_file():
                files.append(path.relative_to(folder).as_posix())
    return sorted(files), sorted(odd)


def _occupied(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    """Delete a path qshard names: a folder with what is in it, anything else (a link too) unlinked."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # removes links inside, never what they point at
    elif _occupied(path):
        path.unlink()


# -- verify ----------------------------------------------------------------------------------------

def verify(ckpt: Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Check that `ckpt` may be resumed from; return its manifest, or raise CheckpointInvalid naming the
    problem and the file (or tensor).

    Structure: a real folder named checkpoint-<step> without links or special files, a manifest of that
    step listing every file present and each file the format needs, each file of the listed size and
    sha256. Contents (a tool may have re-hashed the manifest after changing a file): trainer state,
    adapter, optimizer, RNG and recipe must be what a save writes. `expected` (from
    resume.expected_adapter_shapes) pins the adapter's keys and shapes to the model being trained."""
    # imported here, not at the top: contents.py builds on this module
    from qshard.state import contents

    ckpt = Path(ckpt)
    step = _check_folder(ckpt)
    manifest = _read_manifest(ckpt, step)
    for name, meta in manifest["files"].items():
        _check_file(ckpt, name, meta)
    contents.check(ckpt, step, expected)
    return manifest


def find_resume(output_dir: Path, warn=print, expected: dict | None = None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `warn`."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            verify(ckpt, expected)
            return ckpt
        except CheckpointInvalid as e:
            warn(f"skipping checkpoint: {e}")
    return None


def resolve_resume(resume: str | None, output_dir: Path, warn=print, expected: dict | None = None) -> Path | None:
    """`--resume auto` (newest valid, or None to start fresh) or an explicit checkpoint folder, which
    must verify (no fallback: the user named it)."""
    if resume is None:
        return None
    if resume == "auto":
        return find_resume(output_dir, warn, expected)
    ckpt = Path(resume)
    try:
        verify(ckpt, expected)
    except CheckpointInvalid as e:
        raise QShardError(f"cannot resume: {e}", where="--resume",
                          fix="use --resume auto or another checkpoint") from None
    return ckpt


def _check_folder(ckpt: Path) -> int:
    """The step a checkpoint folder is named for, once it is a real folder holding only files and folders."""
    if ckpt.is_symlink():
        raise CheckpointInvalid(f"{ckpt.name} is a symbolic link (a checkpoint is a real folder of its run)")
    step = _step_of(ckpt)
    if step is None:
        raise CheckpointInvalid(f"{ckpt.name}: not a checkpoint folder (the name is checkpoint-<step>)")
    if not (ckpt / MANIFEST).is_file() and not (ckpt / MANIFEST).is_symlink():
        raise CheckpointInvalid(f"{ckpt.name}: no {MANIFEST} (the save did not finish)")
    _, odd = _contents(ckpt)
    if odd:
        kind = "a symbolic link" if (ckpt / odd[0]).is_symlink() else "not a regular file"
        raise CheckpointInvalid(f"{ckpt.name}: {odd[0]} is {kind} (a checkpoint holds only its own files)")
    return step


def _read_manifest(ckpt: Path, step: int) -> dict:
    """The manifest, once it is well-formed, of this step, and lists exactly the files present."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointInvalid(f"{ckpt.name}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointInvalid(f"{ckpt.name}: malformed {MANIFEST} (files is not a mapping)")
    if manifest.get("format_version") != FORMAT_VERSION or not is_int(manifest.get("format_version")):
        raise CheckpointInvalid(f"{ckpt.name}: {MANIFEST} has format_version {manifest.get('format_version')!r}, "
                                f"this qshard reads {FORMAT_VERSION}")
    if not is_int(manifest.get("step")) or manifest["step"] != step:
        raise CheckpointInvalid(f"{ckpt.name}: {MANIFEST} says step {manifest.get('step')!r}, the folder is "
                                f"{ckpt.name}")
    files = manifest["files"]
    if not files:
        raise CheckpointInvalid(f"{ckpt.name}: {MANIFEST} lists no files")
    for name in files:
        _inside(ckpt, name)
        if name not in REQUIRED and not RNG_FILE.fullmatch(name):  # a re-hash would list anything
            raise CheckpointInvalid(f"{ckpt.name}: {MANIFEST} lists {name!r}, which is not a file of the "
                                    "checkpoint format")
    for name in REQUIRED:
        if name not in files:
            raise CheckpointInvalid(f"{ckpt.name}: {MANIFEST} does not list {name} (every checkpoint holds it)")
    present, _ = _contents(ckpt)
    for name in present:
        if name != MANIFEST and name not in files:
            raise CheckpointInvalid(f"{ckpt.name}: {name} is not listed in {MANIFEST} (not written by the save)")
    return manifest


def _check_file(ckpt: Path, name: str, meta: object) -> None:
    path = ckpt / name
    if not isinstance(meta, dict) or not is_int(meta.get("size")) or not isinstance(meta.get("sha256"), str):
        raise CheckpointInvalid(f"{ckpt.name}: malformed {MANIFEST} entry for {name!r}")
    if not path.is_file():
        raise CheckpointInvalid(f"{ckpt.name}: {name} is missing")
    if path.stat().st_size != meta["size"]:
        raise CheckpointInvalid(f"{ckpt.name}: {name} has {path.stat().st_size} bytes, manifest says "
                                f"{meta['size']} (truncated?)")
    if _sha256(path) != meta["sha256"]:
        raise CheckpointInvalid(f"{ckpt.name}: {name} does not match its sha256 (corrupted)")


def _inside(root: Path, name: object) -> Path:
    """Manifest paths are relative, spelled one way, and stay inside the checkpoint; anything else is refused."""
    path = PurePosixPath(name) if isinstance(name, str) and name and "\x00" not in name else None
    if (path is None or path.is_absolute() or ".." in path.parts or str(path) != name
            or not (root / name).resolve().is_relative_to(root.resolve())):
        raise CheckpointInvalid(f"{root.name}: manifest entry {name!r} leaves the checkpoint folder")
    return root / name


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    write_text(path, json.dumps(data, indent=2))


def write_text(path: Path, text: str) -> None:
    """Replace `path` whole, by rename: a reader sees the old or the new text, and a link at `path` is
    replaced, never written through (a run folder may hold links a user made)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()  # a dead write's leftover, or a link: never written through (O_NOFOLLOW below)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
