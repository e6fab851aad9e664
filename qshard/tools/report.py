"""`qshard report RUN_DIR`: PNG plots and a Markdown summary of a run folder.

Data first, pictures second: `read_run` parses the folder (every malformed file is a QShardError
naming the file and line), `series`, `memory_breakdown` and `summarize` are pure
functions of what was read, and `figures` draws exactly those series. The series are also written
next to the PNGs (report/series.json), so what a plot shows can be checked without looking at pixels.

What a run folder holds: metrics.jsonl (qshard/observe/metrics.py, one record per logged step, with
`rank_memory`: one memory dict per rank and, on several ranks, `comm_bytes` / `comm_planned_bytes`:
bytes per collective kind measured in the step and estimated by the planner, qshard/observe/commcount.py),
recipe.yaml, and when present sharding.json (a list of per-rank dicts,
qshard/observe/monitor.py::sharding_report) and warnings.jsonl (`step`, `kind`, `message`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qshard.errors import QShardError
from qshard.observe.metrics import METRICS_FILE

REPORT_DIR = "report"
MB = 2 ** 20
KINDS = ("base_quantized", "base_dense", "lora", "buffers")  # monitor.sharding_report's kinds


@dataclass
class RunData:
    run_dir: Path
    metrics: list[dict]
    recipe: dict | None
    sharding: list[dict] | None
    warnings: list[dict]


@dataclass
class Report:
    out_dir: Path
    files: list[Path]
    series: dict
    summary: dict


# -- reading the folder ----------------------------------------------------------------------------

def read_run(run_dir: str | Path) -> RunData:
    """Everything the report uses; only metrics.jsonl is required."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise QShardError(f"{run_dir} has no {METRICS_FILE}", where=str(path),
                          fix="give the run's folder (its train.output_dir); a run writes metrics.jsonl at its "
                              "first logged step (train.log_every)")
    metrics = read_jsonl(path, required=("step", "loss"))
    if not metrics:
        raise QShardError(f"{path} holds no records", where=str(path),
                          fix="wait until the run has logged a step (train.log_every), or give another run")
    warnings_file = run_dir / "warnings.jsonl"
    return RunData(run_dir=run_dir, metrics=metrics, recipe=_read_recipe(run_dir / "recipe.yaml"),
                   sharding=_read_json(run_dir / "sharding.json", list),
                   warnings=read_jsonl(warnings_file, required=("message",)) if warnings_file.is_file() else [])


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """One JSON object per line, each with the `required` keys. Lines that are not JSON objects (the
    partial last line of a run killed mid-write, damaged lines) are skipped with a note on stderr."""
    import sys

    records, skipped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict):
            skipped.append(number)
            continue
        missing = [k for k in required if k not in record]
        if missing:
            raise QShardError(f"line {number} of {path.name} lacks {', '.join(missing)}", where=f"{path}:{number}",
                              fix=f"each line must be a JSON object with {', '.join(required)}; delete the line "
                                  "if it was not written by qshard")
        records.append(record)
    if skipped:
        print(f"qshard report: skipped {len(skipped)} line(s) of {path.name} that are not JSON objects "
              f"(line {', '.join(map(str, skipped[:5]))})", file=sys.stderr)
    return records


def _read_json(path: Path, kind: type):
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QShardError(f"{path.name} is not valid JSON ({e.msg})", where=f"{path}:{e.lineno}",
                          fix=f"delete {path.name} (the report is made without it) or rewrite it") from None
    if not isinstance(value, kind):
        raise QShardError(f"{path.name} holds a {type(value).__name__}, not a {kind.__name__}", where=str(path),
                          fix=f"delete {path.name} (the report is made without it) or rewrite it")
    return value


def _read_recipe(path: Path) -> dict | None:
    import yaml

    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QShardError(f"recipe.yaml of the run cannot be read ({e})", where=str(path),
                          fix="restore the file the run wrote, or delete it (engine and world size then "
                              "come from the metrics only)") from None
    return recipe if isinstance(recipe, dict) else None


# -- the data, as plotted --------------------------------------------------------------------------

def series(metrics: list[dict]) -> dict:
    """Every line plotted over steps: {plot: {name: [values]}}; a key absent from a record is skipped."""
    out = {key: _xy(metrics, key) for key in ("lr", "grad_norm", "tokens_per_s")}
    out["loss"] = {**_xy(metrics, "loss"), **{f"eval_{k}": v for k, v in _xy(metrics, "eval_loss").items()}}
    out["memory"] = memory_series(metrics)
    if any("comm_bytes" in m for m in metrics):
        out["comm"] = comm_series(metrics)
    return out


def comm_series(metrics: list[dict]) -> dict:
    """Bytes per step and collective kind, measured and planned (0 where a record lacks a kind), and
    the seconds collectives were in flight against the step's (None on GPUs): {"step", "measured":
    {kind: [...]}, "planned": {kind: [...]}, "comm_s", "step_s", "untimed": kinds left out of comm_s}."""
    rows = [m for m in metrics if "comm_bytes" in m]
    kinds = sorted({k for m in rows for k in (*m["comm_bytes"], *(m.get("comm_planned_bytes") or {}))})
    return {"step": [m["step"] for m in rows],
            "measured": {k: [m["comm_bytes"].get(k, 0) for m in rows] for k in kinds},
            "planned": {k: [(m.get("comm_planned_bytes") or {}).get(k, 0) for m in rows] for k in kinds},
            "comm_s": [m.get("comm_s") for m in rows], "step_s": [m.get("step_s") for m in rows],
            "untimed": sorted({k for m in rows for k in m.get("comm_untimed", [])})}


def comm_summary(comm: dict) -> dict:
    """Per kind the median over the logged steps (robust to ZeRO-3's tracing first step), measured and
    planned, and the median seconds in flight and per step."""
    timed = [(c, s) for c, s in zip(comm["comm_s"], comm["step_s"]) if c is not None and s]
    return {"kinds": {k: {"measured": _median(comm["measured"][k]), "planned": _median(comm["planned"][k])}
                      for k in comm["measured"]},
            "comm_s": _median([c for c, _ in timed]) if timed else None,
            "step_s": _median([s for _, s in timed]) if timed else None, "untimed": comm["untimed"]}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _xy(metrics: list[dict], key: str) -> dict[str, list]:
    rows = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
    return {"step": [s for s, _ in rows], key: [v for _, v in rows]}


def memory_key(metrics: list[dict]) -> tuple[str, str]:
    """(current, peak) memory keys: GPU allocated when the run was on a GPU, else resident set."""
    sample = _rank_rows(metrics[0])[0]
    return ("gpu_alloc_mb", "gpu_peak_mb") if "gpu_alloc_mb" in sample else ("rss_mb", "peak_rss_mb")


def memory_series(metrics: list[dict]) -> dict:
    """One line per rank: {"key": ..., "ranks": [{"step": [...], "mb": [...]}, ...]}."""
    key, _ = memory_key(metrics)
    world = max(len(_rank_rows(m)) for m in metrics)
    ranks = []
    for r in range(world):
        rows = [(m["step"], _rank_rows(m)[r][key]) for m in metrics
                if r < len(_rank_rows(m)) and _rank_rows(m)[r].get(key) is not None]
        ranks.append({"step": [s for s, _ in rows], "mb": [v for _, v in rows]})
    return {"key": key, "ranks": ranks}


def _rank_rows(record: dict) -> list[dict]:
    """Per-rank memory of one record; records without `rank_memory` carry rank 0's keys only."""
    return record.get("rank_memory") or [record]


def memory_breakdown(sharding: list[dict]) -> dict:
    """MB held on each rank per kind of tensor (local), and the unsharded total of each kind."""
    rows = sorted(sharding, key=lambda r: r.get("rank", 0))
    return {"rank": [r.get("rank", i) for i, r in enumerate(rows)],
            **{kind: [r.get(f"{kind}_local", 0) / MB for r in rows] for kind in KINDS},
            "full": {kind: max(r.get(f"{kind}_full", 0) for r in rows) / MB for kind in KINDS}}


# -- the summary -----------------------------------------------------------------------------------

def summarize(run: RunData) -> dict:
    """The figures summary.md states, each computed from the folder's files."""
    metrics = run.metrics
    _, peak_key = memory_key(metrics)
    world = max(len(_rank_rows(m)) for m in metrics)
    peaks = [max((_rank_rows(m)[r].get(peak_key) or 0.0) for m in metrics if r < len(_rank_rows(m)))
             for r in range(world)]
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    return {"engine": engine_label(run.recipe), "base": _base_label(run.recipe), "world_size": world,
            "steps": metrics[-1]["step"], "records": len(metrics),
            "tokens": segment_total([m.get("tokens", 0) for m in metrics]),
            "seconds": segment_total([m.get("elapsed_s", 0.0) for m in metrics]),
            "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"],
            "final_eval_loss": evals[-1] if evals else None, "peak_key": peak_key, "peak_mb": peaks,
            "imbalance": imbalance(peaks), "warnings": len(run.warnings),
            "comm": comm_summary(comm_series(metrics)) if any("comm_bytes" in m for m in metrics) else None}


def segment_total(values: list[float]) -> float:
    """Total of a running count that restarts at 0 when a run is resumed (tokens, elapsed_s are counted
    from the resume): the sum of each segment's last value. Steps after a segment's last logged record
    are not in the file, so a resumed run's total can be short by up to train.log_every steps."""
    total = 0
    for current, following in zip(values, values[1:] + [None]):
        if following is None or following < current:
            total += current
    return total


def imbalance(peaks: list[float]) -> float:
    """(max - min) / max over ranks: 0 when every rank holds the same."""
    return (max(peaks) - min(peaks)) / max(peaks) if peaks and max(peaks) > 0 else 0.0


def engine_label(recipe: dict | None) -> str:
    d = (recipe or {}).get("distributed") or {}
    engine = d.get("engine", "unknown (no recipe.yaml)" if recipe is None else "none")
    if engine != "deepspeed":
        return engine
    offload = [f"{what} offload" for what in ("optimizer", "params") if d.get(f"offload_{what}", "none") != "none"]
    return f"deepspeed ZeRO-{d.get('zero_stage', '?')}" + (f" ({', '.join(offload)})" if offload else "")


def _base_label(recipe: dict | None) -> str:
    return ((recipe or {}).get("quantization") or {}).get("method", "unknown")


def format_summary(summary: dict, warnings: list[dict], run_dir: Path, plots: list[str]) -> str:
    """summary.md."""
    s = summary
    key = "GPU peak allocated" if s["peak_key"] == "gpu_peak_mb" else "peak resident set (CPU)"
    lines = [f"# Run report: {run_dir}", "",
             "| | |", "|---|---|",
             f"| engine | {s['engine']} |", f"| base | {s['base']} |", f"| world size | {s['world_size']} |",
             f"| steps | {s['steps']} ({s['records']} logged) |", f"| tokens | {s['tokens']} |",
             f"| time | {s['seconds']:.1f} s |",
             f"| loss | {s['first_loss']:.4f} (first logged) -> {s['final_loss']:.4f} (final) |"]
    if s["final_eval_loss"] is not None:
        lines.append(f"| eval loss (last) | {s['final_eval_loss']:.4f} |")
    lines += [f"| memory imbalance | {s['imbalance']:.1%} ((max - min) / max of the ranks' peaks) |", "",
              f"## Peak memory per rank ({key})", "", "| rank | MB |", "|---|---|"]
    lines += [f"| {r} | {mb:.1f} |" for r, mb in enumerate(s["peak_mb"])]
    if s.get("comm"):
        lines += ["", *format_comm_table(s["comm"])]
    lines += ["", f"## Warnings ({len(warnings)})", ""]
    lines += [f"- step {w.get('step', '?')}, {w.get('kind', 'warning')}: {w['message']}" for w in warnings] or ["none"]
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def format_comm_table(comm: dict) -> list[str]:
    lines = ["## Communication per step (rank 0; median of the logged steps)", "",
             "| collective | measured MB | planned MB | measured / planned |", "|---|---|---|---|"]
    for kind, v in comm["kinds"].items():
        ratio = f"{v['measured'] / v['planned']:.2f}" if v["planned"] else "-"
        lines.append(f"| {kind} | {v['measured'] / 1e6:.3f} | {v['planned'] / 1e6:.3f} | {ratio} |")
    if comm["comm_s"] is not None:
        lines += ["", f"Collectives in flight {comm['comm_s'] * 1e3:.1f} ms of a {comm['step_s'] * 1e3:.1f} ms step "
                      f"({comm['comm_s'] / comm['step_s']:.0%})" +
                  (f"; not timed: {', '.join(comm['untimed'])}." if comm["untimed"] else ".")]
    return lines


# -- the pictures ----------------------------------------------------------------------------------

def figures(data: dict) -> dict:
    """One matplotlib Figure per plot, drawn from `data` (what `write_report` saves as series.json).
    Uses Figure directly, not pyplot: no global backend or state is touched."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise QShardError("qshard report draws its plots with matplotlib, which is not installed",
                          where="qshard report", fix="pip install matplotlib") from None

    out = {}
    for name, ylabel in (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
                         ("tokens_per_s", "tokens / s")):
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        ax.plot(data[name]["step"], data[name][name], label=name)
        if name == "loss" and data["loss"]["eval_step"]:
            ax.plot(data["loss"]["eval_step"], data["loss"]["eval_eval_loss"], marker="o", label="eval_loss")
            ax.legend()
        _labels(ax, name, "step", ylabel)
        out[name] = fig
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for rank, line in enumerate(data["memory"]["ranks"]):
        ax.plot(line["step"], line["mb"], label=f"rank {rank}")
    ax.legend()
    _labels(ax, f"memory per rank ({data['memory']['key']})", "step", "MB")
    out["memory"] = fig
    if "comm" in data:
        out["communication"] = _comm_figure(data["comm"])
    if "memory_breakdown" in data:
        out["memory_breakdown"] = _breakdown_figure(data["memory_breakdown"])
    return out


def _comm_figure(c: dict):
    """Measured bytes per step and kind (solid), the planner's (dashed, same colour)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for kind in c["measured"]:
        line, = ax.plot(c["step"], [b / 1e6 for b in c["measured"][kind]], marker=".", label=f"{kind} measured")
        if any(c["planned"][kind]):
            ax.plot(c["step"], [b / 1e6 for b in c["planned"][kind]], linestyle="--", color=line.get_color(),
                    label=f"{kind} planned")
    ax.legend(fontsize="small")
    _labels(ax, "communication per step (rank 0)", "step", "MB")
    return fig


def _breakdown_figure(b: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    bottom = [0.0] * len(b["rank"])
    labels = [f"rank {r}" for r in b["rank"]]
    for kind in KINDS:
        ax.bar(labels, b[kind], bottom=bottom, label=f"{kind} (unsharded {b['full'][kind]:.2f} MB)")
        bottom = [x + y for x, y in zip(bottom, b[kind])]
    ax.legend(fontsize="small")
    _labels(ax, "held on each rank (local bytes)", "", "MB")
    return fig


def _labels(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


# -- the command -----------------------------------------------------------------------------------

def report_data(run: RunData, summary: dict) -> dict:
    """All plotted series: metrics over steps, plus the breakdown and the plan comparison when present."""
    data = series(run.metrics)
    if run.sharding:
        data["memory_breakdown"] = memory_breakdown(run.sharding)
    return data


def _refuse_links(out_dir: Path, names: list[str]) -> None:
    """The report writes only its own files: never through a link a user put at report/ or at one of
    its file names (they would overwrite whatever the link points at)."""
    links = [p for p in [out_dir, *(out_dir / n for n in names)] if p.is_symlink()]
    if links or (out_dir.exists() and not out_dir.is_dir()):
        shown = ", ".join(str(p) for p in links) or str(out_dir)
        raise QShardError(f"the report would write through {shown}", where=str(out_dir),
                          fix="remove the link (or the file named report) from the run folder; qshard writes "
                              "its report only into a folder of its own")


def write_report(run_dir: str | Path) -> Report:
    """RUN_DIR/report/: one PNG per plot, series.json (the plotted data) and summary.md."""
    run = read_run(run_dir)
    summary = summarize(run)
    data = report_data(run, summary)
    out_dir = run.run_dir / REPORT_DIR
    figs = figures(data)
    _refuse_links(out_dir, [f"{name}.png" for name in figs] + ["series.json", "summary.md"])
    out_dir.mkdir(exist_ok=True)
    files = []
    for name, fig in figs.items():
        files.append(out_dir / f"{name}.png")
        fig.savefig(files[-1], dpi=100)
    (out_dir / "series.json").write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / "summary.md").write_text(format_summary(summary, run.warnings, run.run_dir, [f.name for f in files]))
    return Report(out_dir, files + [out_dir / "series.json", out_dir / "summary.md"], data, summary)
