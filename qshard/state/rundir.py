"""The run folder (`train.output_dir`): what qshard may create, replace or delete there.

A user's files are sacred. The rules, checked before anything is written:
- the run folder is never the working directory (or a folder above it), the home folder, the root,
  or a folder that is or contains one of the run's inputs (model, data, eval data, recipe, DeepSpeed
  config);
- `--overwrite` replaces only a folder qshard made for a run: one whose every entry is a name qshard
  writes (RUN_ENTRIES, checkpoint-<step>), none of them a symlink, with its recipe.yaml or marker;
  and it deletes exactly those entries, never the folder's other contents (there are none);
- the marker records which torchrun job made the folder, so a restarted job resumes only its own run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from qshard.errors import QShardError

MARKER = ".qshard-run.json"
# Every name qshard writes at the top of a run folder (qshard report adds report/).
RUN_ENTRIES = {"recipe.yaml", "adapter", "metrics.jsonl", "warnings.jsonl", "sharding.json", "latest",
               "tensorboard", "report", MARKER}
RUN_ENTRIES |= {f".{name}.tmp" for name in RUN_ENTRIES}  # checkpoint.write_text's staging names
CHECKPOINT_ENTRY = re.compile(r"^(\.staging-)?checkpoint-\d+$")


def check_location(out_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse a run folder that is, or holds, something qshard must never replace (before any write).

    `inputs` maps recipe options (model.path, data.path, ...) to the paths they name."""
    target = real_path(out_dir)
    check_not_protected(out_dir, "train.output_dir", "a run writes (and --overwrite replaces) a folder of its own",
                        fix="name a new folder, e.g. runs/my-run")
    for option, path in inputs.items():
        real = real_path(path)
        if real == target or target in real.parents:
            relation = "is" if real == target else "contains"
            raise QShardError(f"train.output_dir {out_dir} {relation} {option} ({path})", where="train.output_dir",
                              fix="choose a separate folder for the run's outputs, e.g. runs/my-run")


def check_fresh_start(out_dir: Path, overwrite: bool) -> None:
    """A new run may start in a missing or empty folder, or replace an earlier qshard run (--overwrite)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise QShardError(f"{out_dir} exists and is not a folder", where="train.output_dir",
                          fix="choose another train.output_dir")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise QShardError(f"output folder {out_dir} is not empty", where="train.output_dir",
                          fix="choose another train.output_dir, resume it with --resume auto, "
                              "or pass --overwrite to replace it")
    why = not_a_run(out_dir)
    if why:
        raise QShardError(f"--overwrite replaces only a run folder qshard made, and {out_dir} {why}",
                          where="train.output_dir", fix="choose another train.output_dir; qshard deletes nothing "
                                                        "it did not write")


def not_a_run(out_dir: Path) -> str | None:
    """Why `out_dir` is not a run folder qshard made (None when it is)."""
    entries = list(out_dir.iterdir())
    links = [p.name for p in entries if p.is_symlink()]
    if links:
        return f"holds symbolic link(s): {', '.join(sorted(links)[:5])}"
    foreign = sorted(p.name for p in entries if p.name not in RUN_ENTRIES and not CHECKPOINT_ENTRY.match(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds files qshard did not write: {shown}"
    # a run made before the marker existed: its recipe.yaml beside what a run writes
    # (a recipe.yaml alone is as likely to be the user's own recipe folder)
    made_by_a_run = (out_dir / "recipe.yaml").is_file() and any(p.name not in ("recipe.yaml", "report")
                                                               for p in entries)
    if not (out_dir / MARKER).is_file() and not made_by_a_run:
        return "is not a run folder qshard made (no marker, and nothing a run writes beside recipe.yaml)"
    return None


def check_resumable(out_dir: Path) -> None:
    """A run continues by appending to its own files: none of them may be a link to elsewhere."""
    links = sorted(p.name for p in out_dir.iterdir() if p.is_symlink() and p.name in RUN_ENTRIES)
    if links:
        raise QShardError(f"{out_dir} holds symbolic link(s) where the run writes: {', '.join(links)}",
                          where="train.output_dir", fix="replace the links with the run's own files, or start a "
                                                        "new run in another train.output_dir")


def start(out_dir: Path, job: str | None) -> None:
    """Empty an earlier run (its own entries only: check_fresh_start has proven that is all there is),
    then mark the folder as this job's."""
    if out_dir.exists():
        for entry in out_dir.iterdir():
            if entry.name in RUN_ENTRIES or CHECKPOINT_ENTRY.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    mark(out_dir, job)


def mark(out_dir: Path, job: str | None) -> None:
    """Record that this job runs the folder (a torchrun restart of the job may then continue it)."""
    from qshard.state.checkpoint import write_text

    write_text(out_dir / MARKER, json.dumps({"format": 1, "job": job}) + "\n")


def job_of(out_dir: Path) -> str | None:
    """The torchrun job id that made this run folder (None: unknown, or made outside torchrun)."""
    try:
        return json.loads((out_dir / MARKER).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def torchrun_job() -> str | None:
    """This torchrun invocation: its job id, host and agent process, the same for every restart of its
    workers (None outside torchrun). The id alone is not enough: `--rdzv-id` is often fixed by hand,
    so a later invocation would pass for the earlier one."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    import socket

    return f"{run_id}@{socket.gethostname()}:{os.getppid()}"


def check_not_protected(out: Path, where: str, why: str, fix: str) -> None:
    """An output folder (a run's, an export's, a quantized model's) is never the working directory, a folder
    holding it, the home folder or the filesystem root: those hold what the user has."""
    target, cwd = real_path(out), Path.cwd().resolve()
    forbidden = {cwd: "the working directory", Path.home().resolve(): "your home folder",
                 Path(target.anchor): "the filesystem root"}
    if target in forbidden or target in cwd.parents:
        what = forbidden.get(target, "a folder that contains the working directory")
        raise QShardError(f"{where} {out} is {what}; {why}", where=where, fix=fix)


def real_path(path: Path) -> Path:
    """Absolute, symlinks resolved (the folder a path really names, existing or not)."""
    return Path(os.path.realpath(Path(path).expanduser()))
