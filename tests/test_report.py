"""`qshard report`: the plotted series equal metrics.jsonl, the PNGs are valid images, the summary's
figures match the files, and a broken folder is a QShardError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from qshard import cli  # noqa: E402
from qshard.config import parse_recipe  # noqa: E402
from qshard.errors import QShardError  # noqa: E402
from qshard.tools.report import MB, figures, imbalance, segment_total, write_report  # noqa: E402
from tests.helpers import recipe_dict  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rank(rss: float, peak: float) -> dict:
    return {"rss_mb": rss, "peak_rss_mb": peak}


def write_synthetic_run(run: Path) -> list[dict]:
    """A 2-rank ZeRO-3 run folder as the trainer writes it, with rank 1 holding more memory."""
    run.mkdir()
    records = []
    for step in range(1, 6):
        ranks = [_rank(100.0 + step, 110.0 + step), _rank(150.0 + 2 * step, 160.0 + 3 * step)]
        record = {"step": step, "epoch": 0, "loss": 3.0 - 0.4 * step, "lr": 1e-3 * step, "grad_norm": 1.0 / step,
                  "tokens": 64 * step, "tokens_per_s": 100.0 + step, "elapsed_s": 0.5 * step,
                  **ranks[0], "rank_memory": ranks}
        if step in (2, 4):
            record["eval_loss"] = 2.9 - 0.3 * step
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "recipe.yaml").write_text("distributed:\n  engine: deepspeed\n  zero_stage: 3\nquantization:\n  method: nf4\n")
    (run / "sharding.json").write_text(json.dumps([
        {"rank": r, "base_quantized_local": 4 * MB, "base_quantized_full": 8 * MB, "base_dense_local": MB // 2,
         "base_dense_full": MB, "lora_local": MB // 4, "lora_full": MB // 2, "buffers_local": MB * r,
         "buffers_full": MB * r} for r in (0, 1)]))
    (run / "warnings.jsonl").write_text(json.dumps({"step": 1, "kind": "memory_imbalance",
                                                    "message": "rank 1 holds 40% more than rank 0"}) + "\n")
    return records


def assert_valid_pngs(files: list[Path]) -> None:
    from PIL import Image

    for path in files:
        assert path.stat().st_size > 0
        assert path.read_bytes()[:8] == PNG_MAGIC, path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100


def test_synthetic_two_rank_run_plots_exactly_its_metrics(tmp_path):
    records = write_synthetic_run(tmp_path / "run")
    report = write_report(tmp_path / "run")

    pngs = sorted(p.name for p in report.files if p.suffix == ".png")
    assert pngs == ["grad_norm.png", "loss.png", "lr.png", "memory.png", "memory_breakdown.png",
                    "tokens_per_s.png"]
    assert_valid_pngs([p for p in report.files if p.suffix == ".png"])

    s = json.loads((report.out_dir / "series.json").read_text())
    assert s == report.series
    steps = [r["step"] for r in records]
    assert s["loss"] == {"step": steps, "loss": [r["loss"] for r in records], "eval_step": [2, 4],
                         "eval_eval_loss": [records[1]["eval_loss"], records[3]["eval_loss"]]}
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert s[key] == {"step": steps, key: [r[key] for r in records]}
    assert s["memory"]["key"] == "rss_mb"
    assert [line["mb"] for line in s["memory"]["ranks"]] == [[r["rank_memory"][k]["rss_mb"] for r in records]
                                                             for k in (0, 1)]
    assert s["memory_breakdown"]["base_quantized"] == [4.0, 4.0]
    assert s["memory_breakdown"]["buffers"] == [0.0, 1.0]


def test_figures_draw_the_series_they_are_given(tmp_path):
    write_synthetic_run(tmp_path / "run")
    data = write_report(tmp_path / "run").series
    figs = figures(data)
    train, evals = figs["loss"].axes[0].lines
    assert list(train.get_xdata()) == data["loss"]["step"] and list(train.get_ydata()) == data["loss"]["loss"]
    assert list(evals.get_ydata()) == data["loss"]["eval_eval_loss"]
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert list(figs[key].axes[0].lines[0].get_ydata()) == data[key][key]
    mem_lines = figs["memory"].axes[0].lines
    assert [list(line.get_ydata()) for line in mem_lines] == [r["mb"] for r in data["memory"]["ranks"]]
    heights = [patch.get_height() for patch in figs["memory_breakdown"].axes[0].patches]
    assert heights[:2] == data["memory_breakdown"]["base_quantized"]  # one bar per rank, stacked by kind


def test_summary_figures_match_the_metrics_file(tmp_path):
    records = write_synthetic_run(tmp_path / "run")
    report = write_report(tmp_path / "run")
    summary = report.summary
    peaks = [max(r["rank_memory"][k]["peak_rss_mb"] for r in records) for k in (0, 1)]
    assert summary["engine"] == "deepspeed ZeRO-3" and summary["base"] == "nf4"
    assert summary["world_size"] == 2 and summary["steps"] == 5
    assert summary["tokens"] == records[-1]["tokens"] and summary["seconds"] == records[-1]["elapsed_s"]
    assert (summary["first_loss"], summary["final_loss"]) == (records[0]["loss"], records[-1]["loss"])
    assert summary["peak_mb"] == peaks == [115.0, 175.0]
    assert summary["imbalance"] == pytest.approx((175 - 115) / 175)
    md = (report.out_dir / "summary.md").read_text()
    assert "deepspeed ZeRO-3" in md and "| world size | 2 |" in md and "| tokens | 320 |" in md
    assert "| 1 | 175.0 |" in md and "34.3%" in md
    assert "step 1, memory_imbalance: rank 1 holds 40% more than rank 0" in md
    assert "![loss](loss.png)" in md


def test_resumed_run_counts_tokens_of_every_segment():
    # tokens restart at 0 after a resume: 30 before it, 15 after
    assert segment_total([10, 20, 30, 5, 15]) == 45
    assert imbalance([100.0, 100.0]) == 0.0 and imbalance([50.0, 100.0]) == 0.5


def test_folder_without_metrics_names_the_file(tmp_path, capsys):
    with pytest.raises(QShardError) as e:
        write_report(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(e.value) and "train.output_dir" in str(e.value)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_a_line_cut_short_is_skipped_with_a_note_and_a_record_without_loss_is_named(tmp_path, capsys):
    """A run killed mid-write leaves a partial last line: the report skips it, says so, and plots the rest."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo\n')
    report = write_report(tmp_path)
    assert report.series["loss"]["step"] == [1, 2]
    assert "skipped 1 line(s) of metrics.jsonl that are not JSON objects (line 4)" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(QShardError, match="line 1 of metrics.jsonl lacks loss"):
        write_report(tmp_path)


def test_report_of_a_real_tiny_run(micro_model, alpaca_file, tmp_path, capsys):
    from qshard.train import run

    out = tmp_path / "run"
    recipe = recipe_dict(micro_model, alpaca_file, out, log_every=1, sample_tokens=0)
    outcome = run(parse_recipe(recipe), log=lambda *_: None)
    assert cli.main(["report", str(out)]) == 0
    assert "summary.md" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pngs = sorted((out / "report").glob("*.png"))
    with_sharding = (out / "sharding.json").is_file()  # written by the trainer (the report also works without)
    assert [p.name for p in pngs] == ["grad_norm.png", "loss.png", "lr.png", "memory.png"] + \
        ["memory_breakdown.png"] * with_sharding + ["tokens_per_s.png"]
    assert_valid_pngs(pngs)
    series = json.loads((out / "report" / "series.json").read_text())
    if with_sharding:
        assert series["memory_breakdown"]["lora"] == [outcome.sharding[0]["lora_local"] / MB]
    assert series["loss"]["loss"] == [r["loss"] for r in records] == [round(x, 6) for x in outcome.losses]
    md = (out / "report" / "summary.md").read_text()
    assert "| engine | none |" in md and "| world size | 1 |" in md and "| steps | 4 (4 logged) |" in md
    assert f"| tokens | {outcome.tokens} |" in md and "## Warnings (0)" in md


def test_communication_plot_and_table_show_measured_against_planned(tmp_path):
    records = write_synthetic_run(tmp_path / "run")
    planned = {"all_gather": 4_000_000, "reduce_scatter": 500_000}
    for r in records:  # a ZeRO-3-like run: the first step traces (more gathers), then half the plan
        r.update(comm_bytes={"all_gather": 3_000_000 if r["step"] == 1 else 2_000_000, "reduce_scatter": 500_000,
                             "all_reduce": 8},
                 comm_calls={"all_gather": 4, "reduce_scatter": 2, "all_reduce": 1}, comm_planned_bytes=planned,
                 comm_s=0.01 * r["step"], step_s=0.1, comm_untimed=["reduce_scatter"])
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(tmp_path / "run")

    comm = report.series["comm"]
    assert comm["step"] == [1, 2, 3, 4, 5]
    assert comm["measured"]["all_gather"] == [3e6, 2e6, 2e6, 2e6, 2e6]
    assert comm["measured"]["all_reduce"] == [8] * 5 and comm["planned"]["all_reduce"] == [0] * 5
    assert comm["planned"]["all_gather"] == [4e6] * 5 and comm["untimed"] == ["reduce_scatter"]
    fig = figures(report.series)["communication"]
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
    assert lines["all_gather measured"] == [3.0, 2.0, 2.0, 2.0, 2.0] and lines["all_gather planned"] == [4.0] * 5
    assert_valid_pngs([report.out_dir / "communication.png"])

    summary = report.summary["comm"]
    assert summary["kinds"]["all_gather"] == {"measured": 2e6, "planned": 4e6}  # medians: step 1 does not move it
    assert summary["comm_s"] == pytest.approx(0.03) and summary["step_s"] == pytest.approx(0.1)
    md = (report.out_dir / "summary.md").read_text()
    assert "| all_gather | 2.000 | 4.000 | 0.50 |" in md and "| reduce_scatter | 0.500 | 0.500 | 1.00 |" in md
    assert "| all_reduce | 0.000 | 0.000 | - |" in md
    assert "in flight 30.0 ms of a 100.0 ms step (30%); not timed: reduce_scatter." in md


@pytest.mark.parametrize("link", ["report", "report/loss.png", "report/summary.md"])
def test_report_never_writes_through_a_link(tmp_path, link):
    """A link at report/ or at one of its files would make the report overwrite what it points at."""
    from tests.hostile import changed, snapshot

    write_synthetic_run(tmp_path / "run")
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    (victim / "loss.png").write_text("not a plot")
    (victim / "summary.md").write_text("my notes")
    if link == "report":
        (tmp_path / "run" / "report").symlink_to(victim)
    else:
        (tmp_path / "run" / "report").mkdir()
        (tmp_path / "run" / link).symlink_to(victim / Path(link).name)
    before = snapshot(victim)
    with pytest.raises(QShardError, match="would write through"):
        write_report(tmp_path / "run")
    assert changed(before, snapshot(victim)) == []
