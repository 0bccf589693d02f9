"""report.csv schema, the average row, and the plots/markdown writers."""

from __future__ import annotations

import csv
import io

import pytest

from ensemble import report


def test_columns_follow_mode_result_csv():
    assert report.report_columns(3) == [
        "dataset", "num_classes", "expert-0", "expert-1", "expert-2", "expert-max", "all_unit", "ensemble",
    ]
    assert report.report_columns(2, ["dense"])[-1] == "dense"


def test_average_row_and_csv_text():
    columns = report.report_columns(2, ["dense"])
    rows = [
        {"dataset": "digits", "num_classes": 10, "expert-0": 50.0, "expert-1": 70.0, "expert-max": 70.0,
         "all_unit": 60.0, "ensemble": 65.0, "dense": 55.0},
        {"dataset": "shapes", "num_classes": 6, "expert-0": 30.0, "expert-1": 20.0, "expert-max": 30.0,
         "all_unit": 25.0, "ensemble": 31.0, "dense": 29.0},
        {"dataset": "retrieval/image_r@1", "num_classes": None, "expert-0": 10.0, "expert-1": 40.0,
         "expert-max": 40.0, "all_unit": 30.0, "ensemble": 34.0, "dense": 20.0},
    ]
    table = report.with_average(rows, columns)
    parsed = list(csv.DictReader(io.StringIO(report.csv_text(table, columns))))
    assert list(parsed[0]) == columns
    assert [r["dataset"] for r in parsed] == ["digits", "shapes", "retrieval/image_r@1", "average"]
    assert parsed[2]["num_classes"] == ""
    avg = parsed[-1]
    assert float(avg["num_classes"]) == pytest.approx(8.0)  # classification rows only
    assert float(avg["expert-0"]) == pytest.approx(30.0)
    assert float(avg["expert-max"]) == pytest.approx(140 / 3, abs=1e-4)
    assert float(avg["ensemble"]) == pytest.approx(130 / 3, abs=1e-4)
    assert float(avg["dense"]) == pytest.approx(104 / 3, abs=1e-4)


def test_plots_and_markdown_are_written(tmp_path):
    columns = report.report_columns(2)
    rows = [{"dataset": "digits", "num_classes": 3, "expert-0": 10.0, "expert-1": 20.0, "expert-max": 20.0,
             "all_unit": 15.0, "ensemble": 18.0}]
    report.plot_routing(tmp_path / "r.png", ["digits"], [[0.3, 0.7]])
    report.plot_scores(tmp_path / "s.png", rows, columns)
    for name in ("r.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.report_markdown(
        run="demo", formula="code", image_routing="corpus", models=["expert-0", "expert-1"],
        table=report.markdown_table(report.with_average(rows, columns), columns),
        routing_rows=[{"task": "digits", "num_items": 3, "votes": [1, 2], "mean_dist": 0.5,
                       "weights": [0.3, 0.7], "entropy_bits": 0.88}],
        metric_tables={}, images=["r.png"],
    )
    assert "| digits | 3 | 10 | 20 | 20 | 15 | 18 |" in text
    assert "| average |" in text and "![r](r.png)" in text


def test_headline_says_no_when_the_ensemble_loses_to_a_dense_baseline():
    def row(baseline, verdict):
        return {"dataset": "average", "baseline": baseline, "difference": -3.0, "ci_low": -5.0, "ci_high": -1.0,
                "verdict": verdict}

    assert report.headline([row("dense", "worse"), row("all_unit", "better")]).startswith("**No**")
    assert report.headline([row("dense", "better"), row("dense_equal_compute", "better")]).startswith("**Yes**")
    assert report.headline([row("dense", "indistinguishable")]).startswith("**Not shown**")
    assert report.headline([row("all_unit", "better")]) == ""
    lines = report.verdict_lines([row("dense", "worse")], {"dense": "one dense model"})
    assert lines == ["- The routed ensemble is **worse** than `dense` (one dense model) by 3.0 points "
                     "(-3.0, 95% CI -5.0 to -1.0)."]
