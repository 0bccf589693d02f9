"""The ensemble report: ``report.csv`` (MoDE's result.csv layout), plots and ``report.md``."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import artifacts

AVERAGE = "average"


def report_columns(num_experts: int, has_dense: bool) -> list[str]:
    """``dataset, num_classes, expert-0..expert-(E-1), expert-max, all_unit, ensemble[, dense]``."""
    experts = [f"expert-{k}" for k in range(num_experts)]
    return ["dataset", "num_classes", *experts, "expert-max", "all_unit", "ensemble"] + (["dense"] if has_dense else [])


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(nums) / len(nums) if nums else None


def with_average(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """``rows`` plus the ``average`` row: the mean of every column over the rows that have a value.

    As in MoDE the average includes ``num_classes``; retrieval rows leave it empty, so it is the
    mean over classification rows.
    """
    average = {"dataset": AVERAGE, **{c: _mean([r.get(c) for r in rows]) for c in columns[1:]}}
    return [*rows, average]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text (header + rows); empty cells for missing values."""
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(_quote(_cell(row.get(c))) for c in columns))
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return f'"{text}"' if "," in text or '"' in text else text


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows``."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_routing(path: Path, labels: Sequence[str], weights: Sequence[Sequence[float]]) -> None:
    """Heatmap of routing weights: one row per task (or query kind), one column per expert."""
    plt = _pyplot()
    num_experts = len(weights[0]) if weights else 0
    label_width = 0.09 * max((len(t) for t in labels), default=0)
    size = (2.2 + label_width + 0.8 * max(num_experts, 1), 1.3 + 0.45 * max(len(labels), 1))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(weights):
        for k, w in enumerate(row):
            ax.text(k, i, f"{w:.2f}", ha="center", va="center", color="white" if w < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(num_experts), [f"expert-{k}" for k in range(num_experts)], rotation=45 if num_experts > 6 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title("routing weights")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_scores(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Grouped bars per report row: each expert, all_unit, ensemble and dense."""
    plt = _pyplot()
    systems = [c for c in columns[2:] if c != "expert-max"]
    colors = {"all_unit": "tab:blue", "ensemble": "tab:red", "dense": "black"}
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 3.6))
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(rows))]
        ys = [r.get(system) or 0.0 for r in rows]
        grey = str(0.35 + 0.45 * j / max(len(systems), 1))
        ax.bar(xs, ys, width, label=system, color=colors.get(system, grey))
    ax.set_xticks(range(len(rows)), [r["dataset"] for r in rows], rotation=20, ha="right")
    ax.set(ylabel="score (%)", title="experts vs ensemble vs dense", ylim=(0, 100))
    ax.legend(fontsize=7, ncol=min(len(systems), 4))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def copy_cluster_plot(run_dir: Path, stage_dir: Path) -> str | None:
    """Copy ``<run>/cluster/cluster_sizes.png`` next to the report (None if there is none)."""
    source = run_dir / "cluster" / "cluster_sizes.png"
    if not source.is_file():
        return None
    with artifacts.atomic_path(stage_dir / "cluster_sizes.png") as tmp:
        shutil.copyfile(source, tmp)
    return "cluster_sizes.png"


# --------------------------------------------------------------------------- report.md


def report_markdown(
    *,
    run: str,
    formula: str,
    image_routing: str,
    models: Sequence[str],
    table: str,
    routing_rows: Sequence[dict[str, Any]],
    metric_tables: dict[str, str],
    images: Sequence[str],
) -> str:
    """The human report."""
    parts = [
        f"# Ensemble report: run `{run}`",
        "",
        f"Models: {', '.join(models)}. Routing formula: `{formula}` (docs/ensemble.md); retrieval "
        f"image queries routed by `{image_routing}`.",
        "",
        "Scores are percentages. Classification rows: acc1 unless the task names another metric; "
        "retrieval rows: recall@1 (`image_r@1` = text→image, `text_r@1` = image→text). `expert-max` "
        "is the best single expert per row (an oracle), `all_unit` the uniform average of the "
        "experts' logits, `ensemble` the routed weighted sum, `dense` the seed model.",
        "",
        "## Results (report.csv)",
        "",
        table,
        "",
        "## Routing",
        "",
        "| task | items | votes | mean dist | weights | entropy (bits) |",
        "|---|---|---|---|---|---|",
    ]
    for r in routing_rows:
        weights = ", ".join(f"{w:.3f}" for w in r["weights"])
        parts.append(
            f"| {r['task']} | {r['num_items']} | {r['votes']} | {r['mean_dist']:.3f} | {weights} | {r['entropy_bits']:.2f} |"
        )
    parts += ["", "## Figures", ""]
    parts += [f"![{Path(img).stem}]({img})" for img in images]
    parts += ["", "## All metrics per task (fractions, clip_benchmark names)", ""]
    for task, text in metric_tables.items():
        parts += [f"### {task}", "", text, ""]
    return "\n".join(parts) + "\n"
