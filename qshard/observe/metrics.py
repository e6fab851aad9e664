"""What a run reports: one JSON object per logged step in metrics.jsonl (+ TensorBoard if installed).

A run killed inside a write leaves a partial last line, and a file in a run folder may be edited or
damaged: readers skip any line that is not a record (a JSON object with an integer `step`)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


def memory_mb(device: torch.device) -> dict[str, float]:
    """This process's memory now: resident and peak resident (CPU), allocated/reserved/peak (GPU)."""
    import psutil

    mb = 1024 * 1024
    out = {"rss_mb": psutil.Process().memory_info().rss / mb,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out.update(gpu_alloc_mb=torch.cuda.memory_allocated(device) / mb,
                   gpu_reserved_mb=torch.cuda.memory_reserved(device) / mb,
                   gpu_peak_mb=torch.cuda.max_memory_allocated(device) / mb)
    return {k: round(v, 1) for k, v in out.items()}


def memory_all_ranks(device: torch.device) -> list[dict[str, float]]:
    """memory_mb of every rank, gathered (collective: every rank calls it at the same step)."""
    mine = memory_mb(device)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    rows: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, mine)
    return rows


class MetricsLog:
    """Appends records on the main process only; other ranks pass enabled=False."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        path = out_dir / METRICS_FILE
        if enabled and path.is_symlink():
            path.unlink()  # a link in the run folder is replaced, never appended through
        self.file = open(path, "a") if enabled else None
        self.tb = _tensorboard(out_dir / "tensorboard") if enabled else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
                elif isinstance(value, dict):  # comm_bytes and the like: one scalar per kind
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{sub}", v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl in file order; lines that are not records are skipped."""
    path = Path(run_dir) / METRICS_FILE
    return [record for record in map(parse_record, path.read_text(errors="replace").splitlines()) if record]


def parse_record(line: str) -> dict | None:
    """One metrics record, or None for a line that is not one (blank, partial, garbage, no integer step)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def truncate_after(run_dir: Path, step: int) -> int:
    """On resume, keep the records of steps up to the checkpoint's (the later ones are about to be
    redone) and drop every line that is not a record, such as the partial line of a killed write;
    returns how many such lines were dropped. The file is replaced by rename (checkpoint.write_text):
    a kill during the rewrite loses nothing, and a link is replaced, not written through."""
    from qshard.state.checkpoint import write_text

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = [parse_record(line) for line in lines]
    write_text(path, "".join(line + "\n" for line, record in zip(lines, records) if record and record["step"] <= step))
    return records.count(None)
