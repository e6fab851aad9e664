"""Helpers for the adversarial suite (tests/test_hostile_*.py): run a qshard command the way a user
would, then assert the exit code, the message, and that no file the user had changed.

Every hostile case is an experiment with three numbers: the exit code (2 for a user error), a
fragment of the message that names the file/row/option, and the count of the user's files that
changed (0)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from qshard.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*argv: str, cwd: Path | None = None) -> Result:
    """`qshard ARGV...` in this process (no interpreter start): exit code, stdout, stderr.

    An uncaught exception propagates and fails the test: a hostile input must never produce a
    traceback. argparse's own exits (SystemExit) are turned into their code."""
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file, folder and symlink under `roots`: kind, size and sha256 (symlinks: their target)."""
    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            continue
        items = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
        for p in items:
            if p.is_symlink():
                state[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                state[str(p)] = ("dir",)
            elif p.is_file():
                state[str(p)] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Paths removed, added or modified between two snapshots."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def assert_refused(result: Result, *fragments: str, code: int = 2) -> None:
    """Exit code `code`, a qshard error (not a traceback) naming every fragment (case-insensitive)."""
    text = result.err + result.out
    assert result.code == code, f"exit {result.code}, expected {code}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    for fragment in fragments:
        assert fragment.lower() in text.lower(), f"{fragment!r} not in:\n{text[-3000:]}"
