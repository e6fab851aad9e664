"""Surviving faults: a hang watchdog, and the fault-injection points the fault tests use.

Fault injection (tests and bench/faults.py only): `QSHARD_FAULT=<point>@<step>[@<rank>]` makes that
rank SIGKILL itself when it reaches `<point>` at optimizer step `<step>` (1-based) — exactly what an
OOM kill or a lost node looks like to the other ranks. Points: `step` (after backward, before the
optimizer step) and the checkpoint-write points in `SAVE_POINTS`. `hang-step` makes the rank sleep
there instead (for the watchdog), `nan-step` poisons its loss. Faults fire only in a job's first
attempt (TORCHELASTIC_RESTART_COUNT 0), so a restarted job can recover. Unset in normal runs.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading

SAVE_POINTS = ("save:start", "save:mid_file", "save:before_manifest", "save:before_rename")


def armed(name: str, step: int, rank: int) -> bool:
    spec = os.environ.get("QSHARD_FAULT")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    where, at_step, *at_rank = spec.split("@")
    return where == name and int(at_step) == step and (not at_rank or int(at_rank[0]) == rank)


def point(name: str, step: int, rank: int) -> None:
    if armed(name, step, rank):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if armed(f"hang-{name}", step, rank):
        import time

        time.sleep(10**6)


def poisoned(step: int, rank: int) -> bool:
    return armed("nan-step", step, rank)


class Watchdog:
    """If one step takes longer than `timeout_s` (a rank stuck in data loading, or in a collective
    whose peer is gone), print which rank and step, every thread's stack, and exit non-zero, instead
    of waiting out the 10-30 minute collective timeout. Re-armed at every step."""

    def __init__(self, timeout_s: float | None, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._timer: threading.Timer | None = None

    def arm(self, step: int) -> None:
        self.disarm()
        if self.timeout_s:
            self._timer = threading.Timer(self.timeout_s, self._fire, args=(step,))
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, step: int) -> None:
        sys.stderr.write(f"\nqshard: watchdog: rank {self.rank} made no progress for {self.timeout_s:.0f} s in step "
                         f"{step}; stacks of all threads follow (train.watchdog_s sets the limit)\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(124)
