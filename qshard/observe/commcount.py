"""Bytes, calls and time of every collective a training step issues, counted where all engines meet.

DDP's reducer (C++), FSDP2, DeepSpeed (deepspeed.comm over torch.distributed) and DTensor's functional
collectives all end in the ops of torch's `c10d` library (`c10d::allreduce_`, `_allgather_base_`,
`reduce_scatter_tensor_coalesced_`, ...): the ProcessGroup sends every call through the dispatcher.
`CommCounter` puts a Python kernel in front of each of them (qshard/_compat.py install_c10d_kernels: torch
has no public hook for this), records kind and bytes, and redispatches to the real gloo / NCCL kernel.
Nothing else goes through Python: the cost is one short Python call per collective, 20-45 us of CPU with
the completion callback (measured: a world-1 gloo loop of 1,000-float all-reduce / all-gather /
reduce-scatter), i.e. under 1 ms a step for the 2-15 collectives a step of the engines issues on a 2-layer
model. Disabled (one process, or train.count_comm: false), it registers nothing: every collective goes
straight to its backend.

Bytes follow nccl-tests' size S, the convention of `qshard bench-comm` and of the planner's per-step
traffic (qshard.tools.plan.step_traffic), per rank: all_reduce / broadcast / reduce: the buffer; all_gather: the whole
gathered output; reduce_scatter: the whole input each rank reduces; others: what this rank sends.

Time: gloo completes a collective's future when the transfer is done, so each call's issue ->
completion interval is known; `seconds` is the wall time during which at least one collective was in
flight (the union of those intervals). Gloo gives reduce-scatter no future: those calls are listed
in `untimed` and left out. NCCL completes futures before the GPU has run the transfer, so on CUDA
tensors no time is reported (None).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from qshard import _compat

# c10d op -> (kind, index of the argument whose tensors are S). Ops absent from an older torch are skipped.
OPS = {
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "allgather_": ("all_gather", 0), "_allgather_base_": ("all_gather", 0),
    "allgather_coalesced_": ("all_gather", 0), "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "reduce_scatter_": ("reduce_scatter", 1), "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0), "reduce_": ("reduce", 0), "gather_": ("gather", 1), "scatter_": ("scatter", 0),
    "alltoall_": ("all_to_all", 1), "alltoall_base_": ("all_to_all", 1),
    "send": ("send", 0), "recv_": ("recv", 0), "recv_any_source_": ("recv", 0),
    "barrier": ("barrier", None), "monitored_barrier_": ("barrier", None),
}


@dataclass
class StepTraffic:
    """What one rank's collectives moved between `start` and `stop`."""

    bytes: dict[str, int] = field(default_factory=dict)   # kind -> S summed over calls
    calls: dict[str, int] = field(default_factory=dict)   # kind -> number of calls
    seconds: float | None = None                          # collectives in flight (wall); None on CUDA
    step_seconds: float = 0.0                             # the counted window's wall time
    untimed: list[str] = field(default_factory=list)      # kinds left out of `seconds` (no completion future)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


class CommCounter:
    """Counts the collectives this process issues while a window is open (`start` ... `stop`: one
    training step), except inside `paused()`. Disabled (one process, no process group, or
    train.count_comm: false), it installs nothing, counts nothing and `stop` returns None. `close`
    unregisters the kernels and returns the run's totals."""

    def __init__(self, enabled: bool = True):
        global _installed
        self.enabled, self._open, self._paused = enabled, False, 0
        self._lock = threading.Lock()
        self._lib = None
        self._no_future: set[str] = set()  # ops whose Work has no future on this backend
        self.steps, self.run_bytes, self.run_seconds, self.run_step_seconds = 0, {}, 0.0, 0.0
        self.run_untimed: set[str] = set()
        self._reset()
        if _installed is not None:  # a previous run in this process that ended without close()
            _installed.close()
        if enabled:
            self._lib = _compat.install_c10d_kernels(OPS, self._kernel)
            _installed = self

    def _reset(self) -> None:
        self._bytes: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._intervals: list[list[float]] = []  # [issued, completed (nan while in flight)]
        self._timed = True    # False: on CUDA, where completion is not observable here
        self._untimed: set[str] = set()  # kinds whose calls had no completion future
        self._t0 = time.perf_counter()

    def _kernel(self, name: str, op, below):
        kind, arg = OPS[name]

        def kernel(keyset, *args, **kwargs):
            if not self._open or self._paused:
                return op.redispatch(keyset & below, *args, **kwargs)
            issued = time.perf_counter()
            result = op.redispatch(keyset & below, *args, **kwargs)
            self._record(name, _nbytes(args[arg]) if arg is not None else 0, result, args, issued)
            return result

        return kernel

    def _record(self, name: str, nbytes: int, result, args, issued: float) -> None:
        kind = OPS[name][0]
        with self._lock:
            self._bytes[kind] = self._bytes.get(kind, 0) + nbytes
            self._calls[kind] = self._calls.get(kind, 0) + 1
        work = result[-1] if isinstance(result, tuple) else result
        if not self._timed or work is None or _on_cuda(args[0]):
            self._timed = False
            return
        future = None if name in self._no_future else _compat.c10d_work_future(work)
        if future is None:  # gloo's reduce-scatter has none (and will not have next call)
            self._no_future.add(name)
            self._untimed.add(kind)
            return
        interval = [issued, float("nan")]
        self._intervals.append(interval)
        future.add_done_callback(lambda _f: interval.__setitem__(1, time.perf_counter()))

    def start(self) -> None:
        """Open a window, forgetting what an unfinished previous one counted (a skipped step)."""
        if self.enabled:
            self._reset()
            self._open = True

    def stop(self) -> StepTraffic | None:
        if not self.enabled:
            return None
        now = time.perf_counter()
        self._open = False
        with self._lock:
            seconds = _union_seconds(self._intervals, now) if self._timed else None
            traffic = StepTraffic(dict(self._bytes), dict(self._calls), seconds, now - self._t0,
                                  sorted(self._untimed))
        self.steps += 1
        if self.steps == 2:  # the run's first step is left out of the means: ZeRO-3 traces the module order in it
            self.run_bytes, self.run_seconds, self.run_step_seconds = {}, 0.0, 0.0
        for kind, n in traffic.bytes.items():
            self.run_bytes[kind] = self.run_bytes.get(kind, 0) + n
        self.run_seconds = None if seconds is None or self.run_seconds is None else self.run_seconds + seconds
        self.run_step_seconds += traffic.step_seconds
        self.run_untimed.update(traffic.untimed)
        return traffic

    @contextlib.contextmanager
    def paused(self):
        """Collectives that are not the engine's (the loop's own bookkeeping) are left out."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def close(self, planned: dict[str, int] | None = None) -> dict:
        """Unregister the kernels (later collectives go straight to their backend) and return the mean
        per step over the run's steps but its first (unless it is the only one):
        {"steps", "bytes": {kind: bytes}, "comm_s", "step_s", "untimed", "planned": {kind: bytes}}."""
        global _installed
        self._open = False
        if self._lib is not None:
            _compat.remove_c10d_kernels(self._lib)
            self._lib = None
            _installed = None if _installed is self else _installed
        if not self.steps:
            return {}
        n = max(1, self.steps - 1)
        mean = lambda x: None if x is None else x / n  # noqa: E731
        return {"steps": self.steps, "bytes": {k: round(v / n) for k, v in self.run_bytes.items()},
                "comm_s": mean(self.run_seconds), "step_s": mean(self.run_step_seconds),
                "untimed": sorted(self.run_untimed), "planned": planned}


_installed: CommCounter | None = None  # at most one counter's kernels are registered at a time


def comm_record(traffic: StepTraffic | None, planned: dict[str, int] | None) -> dict:
    """The metrics.jsonl keys of one step (none for a single process)."""
    if traffic is None:
        return {}
    record = {"comm_bytes": traffic.bytes, "comm_calls": traffic.calls, "step_s": round(traffic.step_seconds, 6)}
    if traffic.seconds is not None:
        record["comm_s"] = round(traffic.seconds, 6)
        if traffic.untimed:
            record["comm_untimed"] = traffic.untimed
    if planned is not None:
        record["comm_planned_bytes"] = planned
    return record


def format_comm(summary: dict) -> str:
    """One line per kind for the end-of-run summary: measured bytes per step against the plan."""
    planned = summary.get("planned") or {}
    lines = [f"communication per step (this rank; mean of {max(1, summary['steps'] - 1)} step(s), the first left out; "
             "planned: the planner's traffic, qshard.tools.plan.step_traffic):"]
    for kind in sorted(summary["bytes"].keys() | planned.keys()):
        measured, plan = summary["bytes"].get(kind, 0), planned.get(kind)
        ratio = f" ({measured / plan:.2f}x)" if plan else ""
        lines.append(f"  {kind:<15}{_mb(measured):>12} measured  {_mb(plan) if plan is not None else '-':>12} "
                     f"planned{ratio}")
    if summary.get("comm_s") is not None and summary["step_s"]:
        lines.append(f"  collectives in flight {summary['comm_s'] * 1e3:.1f} ms of a {summary['step_s'] * 1e3:.1f} ms "
                     f"step ({summary['comm_s'] / summary['step_s']:.0%})" +
                     (f"; not timed: {', '.join(summary['untimed'])}" if summary.get("untimed") else ""))
    return "\n".join(lines)


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.3f} MB"


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    return sum(_nbytes(x) for x in arg) if isinstance(arg, (list, tuple)) else 0


def _on_cuda(arg) -> bool:
    first = arg
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    return isinstance(first, torch.Tensor) and first.is_cuda


def _union_seconds(intervals: list[list[float]], now: float) -> float:
    """Length of the union of [issued, completed] intervals; one still in flight ends `now`."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted((s, now if e != e else e) for s, e in intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


# -- the planner's figure for the same step --------------------------------------------------------

def planned_step_bytes(recipe, world_size: int, precision: str) -> dict[str, int]:
    """The planner's traffic (qshard.tools.plan.step_traffic, which `qshard bench-comm` and the planner's step
    time read too) of one optimizer step, bytes per kind, for this recipe at `world_size` ranks and the
    resolved precision (the planner assumes bf16 for auto)."""
    from dataclasses import replace

    from qshard.tools.plan import read_model_spec, settings_from_recipe, step_traffic

    spec = read_model_spec(recipe.model.path)
    s = replace(settings_from_recipe(recipe, spec, gpus=world_size, nodes=1), precision=precision)
    planned: dict[str, int] = {}
    for t in step_traffic(spec, s):
        planned[t.op] = planned.get(t.op, 0) + t.bytes_per_step
    return planned
