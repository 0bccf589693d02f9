"""The ensemble report: ``report.csv`` (MoDE's result.csv layout), plots and ``report.md``."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import artifacts

AVERAGE = "average"


def report_columns(num_experts: int, extra: Sequence[str] = ()) -> list[str]:
    """``dataset, num_classes, expert-0..expert-(E-1), expert-max, all_unit, ensemble`` (MoDE's
    result.csv), then ``extra`` (``seed`` and the baselines present)."""
    experts = [f"expert-{k}" for k in range(num_experts)]
    return ["dataset", "num_classes", *experts, "expert-max", "all_unit", "ensemble", *extra]


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
    """Heatmap of routing weights: one row per task (or query kind), one column per expert.

    The colour scale spans the weights present (not 0–1), so near-uniform weights still show
    their differences; every cell carries its number.
    """
    plt = _pyplot()
    num_experts = len(weights[0]) if weights else 0
    flat = [w for row in weights for w in row] or [0.0, 1.0]
    low, high = min(flat), max(flat)
    if high - low < 1e-3:
        low, high = low - 0.01, high + 0.01
    label_width = 0.09 * max((len(t) for t in labels), default=0)
    size = (2.2 + label_width + 0.8 * max(num_experts, 1), 1.3 + 0.45 * max(len(labels), 1))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(weights, cmap="magma", vmin=low, vmax=high, aspect="auto")
    middle = (low + high) / 2
    for i, row in enumerate(weights):
        for k, w in enumerate(row):
            ax.text(k, i, f"{w:.2f}", ha="center", va="center", color="white" if w < middle else "black", fontsize=8)
    ax.set_xticks(range(num_experts), [f"expert-{k}" for k in range(num_experts)], rotation=45 if num_experts > 6 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(f"routing weights (colour scale {low:.2f}–{high:.2f})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _bar_colors(systems: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    fixed = {"ensemble": "tab:red", "all_unit": "tab:orange", "dense": "black", "seed": "0.55",
             "dense_equal_compute": "0.3", "random_split": "tab:purple", "full_ensemble": "tab:brown"}
    experts = [s for s in systems if s.startswith("expert-")]
    palette = plt.get_cmap("tab10" if len(experts) <= 7 else "tab20")
    skip = {1, 3, 4, 5, 7} if len(experts) <= 5 else {7}  # orange/red/purple/brown/grey are the systems' colours
    free = [palette(i) for i in range(palette.N) if i not in skip]
    colors = {s: free[i % len(free)] for i, s in enumerate(experts)}
    colors.update({s: c for s, c in fixed.items() if s in systems})
    return colors


def plot_scores(
    path: Path,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    ci_rows: Sequence[dict[str, Any]] = (),
) -> None:
    """Grouped bars per report row (experts, all_unit, ensemble, seed, baselines) with the 95%
    bootstrap intervals as error bars and each bar's value on top."""
    plt = _pyplot()
    systems = [c for c in columns[2:] if c != "expert-max"]
    bounds = {(r["dataset"], r["system"]): (r["ci_low"], r["ci_high"]) for r in ci_rows}
    colors = _bar_colors(systems)
    width = 0.85 / len(systems)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(rows) * len(systems) + 2), 4.8))
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(rows))]
        ys = [r.get(system) or 0.0 for r in rows]
        lo_hi = [bounds.get((r["dataset"], system), (math.nan, math.nan)) for r in rows]
        err = [[max(0.0, y - lo) if lo == lo else 0.0 for y, (lo, _) in zip(ys, lo_hi, strict=True)],
               [max(0.0, hi - y) if hi == hi else 0.0 for y, (_, hi) in zip(ys, lo_hi, strict=True)]]
        ax.bar(xs, ys, width, yerr=err, capsize=1.5, label=system, color=colors.get(system, "0.5"),
               error_kw={"elinewidth": 0.6})
        for x, y, (_, hi) in zip(xs, ys, lo_hi, strict=True):
            top = hi if hi == hi else y
            ax.text(x, top + 0.8, f"{y:.1f}", ha="center", va="bottom", fontsize=6.5, rotation=90)
    ax.set_xticks(range(len(rows)), [r["dataset"] for r in rows], rotation=20, ha="right")
    ax.set(ylabel="score (%)", title="experts, routed ensemble and baselines (95% bootstrap intervals)", ylim=(0, 112))
    ax.legend(fontsize=6, ncol=min(len(systems), 5), loc="upper left")
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


def _fmt(value: float) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"


def verdict_lines(paired_rows: Sequence[dict[str, Any]], descriptions: dict[str, str]) -> list[str]:
    """One sentence per baseline on the average row: better, worse or indistinguishable, with the interval."""
    lines = []
    for r in (r for r in paired_rows if r["dataset"] == AVERAGE):
        interval = f"95% CI {_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}"
        what = descriptions.get(r["baseline"], r["baseline"])
        if r["verdict"] == "indistinguishable":
            said = f"is **indistinguishable** from `{r['baseline']}` ({what}): {r['difference']:+.1f} points, {interval}."
        else:
            said = (f"is **{r['verdict']}** than `{r['baseline']}` ({what}) by {abs(r['difference']):.1f} points "
                    f"({r['difference']:+.1f}, {interval}).")
        lines.append(f"- The routed ensemble {said}")
    return lines


def headline(paired_rows: Sequence[dict[str, Any]]) -> str:
    """The answer in one sentence: do the routed experts beat the dense baselines at matched compute?"""
    average = {r["baseline"]: r for r in paired_rows if r["dataset"] == AVERAGE}
    fair = [b for b in ("dense", "dense_equal_compute") if b in average]
    if not fair:
        return ""
    named = " and ".join(f"`{b}`" for b in fair)
    verdicts = {b: average[b]["verdict"] for b in fair}
    if all(v == "better" for v in verdicts.values()):
        return f"**Yes** on this data: the routed data experts beat {named} on the average score."
    losers = [f"`{b}`" for b, v in verdicts.items() if v == "worse"]
    if losers:
        return (f"**No** on this data: the routed data experts score below {' and '.join(losers)} on the "
                "average, beyond the eval-item noise.")
    return (f"**Not shown** on this data: the routed data experts' average is within the eval-item noise "
            f"of {named}.")


def compute_lines(compute: dict[str, dict[str, int]], table_average: dict[str, Any]) -> list[str]:
    """Training compute (samples seen, the seed's included) and models per query of each system."""
    lines = ["| system | training samples (seed included) | models per query | average score |", "|---|---|---|---|"]
    for name, c in compute.items():
        score = table_average.get(name)
        lines.append(f"| {name} | {c['samples']:,} | {c['models']} | {_fmt(score)} |")
    return lines


def convergence_lines(conv: dict[str, Any] | None) -> list[str]:
    """How far from convergence the seed was when the experts branched."""
    if not conv:
        return ["No seed metrics: the experts were trained from scratch or the seed's metrics.jsonl is missing."]
    share = conv["tail_share"]
    line = (f"The seed ran {conv['steps']} steps. Its mean training loss was {conv['loss_first']:.3f} over the first "
            f"10% of steps, {conv['loss_before']:.3f} over the second-to-last 10% and {conv['loss_last']:.3f} over "
            f"the last 10%: the last 10% of its steps made {100 * share:.1f}% of its whole loss drop")
    if conv["zeroshot"]:
        evals = ", ".join(f"{v:.3f} at step {s}" for s, v in conv["zeroshot"])
        line += f"; its mean zero-shot top-1 was {evals}"
    line += "."
    if share == share and share > 0.05:
        line += (" The seed was still learning fast when the experts branched (MoDE branches near convergence),"
                 " so extra training steps, not specialisation, can dominate a comparison with it; compare with"
                 " `dense` / `dense_equal_compute`.")
    elif share == share:
        line += " The seed's loss curve had flattened when the experts branched, as in MoDE."
    return [line]


def routing_comparison_lines(routing_rows: Sequence[dict[str, Any]], routed_average: dict[str, float]) -> list[str]:
    """Mean entropy of each formula's weights over the tasks, and the ensemble's average under it."""
    formulas = sorted({f for r in routing_rows for f in r.get("formulas", {})})
    if not formulas:
        return []
    lines = ["| formula | mean entropy (bits) over tasks | ensemble average score |", "|---|---|---|"]
    for f in formulas:
        values = [r["formulas"][f]["entropy_bits"] for r in routing_rows if f in r.get("formulas", {})]
        lines.append(f"| {f} | {sum(values) / len(values):.2f} | {_fmt(routed_average.get(f'ensemble@{f}'))} |")
    return lines


def _answer_lines(intervals: Any, resamples: int) -> list[str]:
    """The paired verdicts against the baselines (or why there are none)."""
    from ensemble.systems import DESCRIPTIONS

    paired = intervals.paired_rows if intervals is not None else []
    if not paired:
        return ["No baseline to compare with (train.baselines is empty, or bootstrap_resamples is 0)."]
    answer = headline(paired)
    parts = [answer, ""] if answer else []
    parts += verdict_lines(paired, DESCRIPTIONS)
    parts += ["", f"Differences are the routed `ensemble` minus the baseline on the average row, in points, "
              f"with 95% paired bootstrap intervals over eval items ({resamples} resamples; "
              "`report_paired.csv` has every row). An interval that contains 0 is no evidence either way."]
    return parts


def _results_lines(models: Sequence[str], formula: str, image_routing: str, table: str) -> list[str]:
    """What the columns mean, then report.csv as a table."""
    return [
        f"Models: {', '.join(models)}. Routing formula: `{formula}` (docs/ensemble.md); retrieval "
        f"image queries routed by `{image_routing}`.",
        "",
        "Scores are percentages. Classification rows: acc1 unless the task names another metric; "
        "retrieval rows: recall@1 (`image_r@1` = text→image, `text_r@1` = image→text). `expert-max` "
        "is the best single expert per row (an oracle), `all_unit` the uniform average of the "
        "experts' logits, `ensemble` the routed weighted sum, `seed` the model the experts branch "
        "from, and the baselines as in the compute table. Intervals: `report_ci.csv`.",
        "",
        "## Results (report.csv)",
        "",
        table,
        "",
    ]


def _routing_lines(routing_rows: Sequence[dict[str, Any]], context: dict[str, Any]) -> list[str]:
    """The routing section: temperature, formula comparison, per-task weights."""
    parts = ["## Routing", ""]
    if context.get("temperature") is not None:
        parts += [f"Calibrated routing temperature (fitted on the run's training captions): {context['temperature']:.4g}.", ""]
    parts += [*routing_comparison_lines(routing_rows, context.get("routed_average", {})), ""]
    parts += ["| task | items | votes | mean dist | weights | entropy (bits) |", "|---|---|---|---|---|---|"]
    for r in routing_rows:
        weights = ", ".join(f"{w:.3f}" for w in r["weights"])
        parts.append(
            f"| {r['task']} | {r['num_items']} | {r['votes']} | {r['mean_dist']:.3f} | {weights} | {r['entropy_bits']:.2f} |"
        )
    return parts


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
    intervals: Any = None,
    context: dict[str, Any] | None = None,
    resamples: int = 0,
) -> str:
    """The human report: the answer first (paired verdicts), then scores, compute, routing."""
    context = context or {}
    parts = [f"# Ensemble report: run `{run}`", "", "## Do the routed data experts beat the baselines?", ""]
    parts += _answer_lines(intervals, resamples)
    parts += ["", *convergence_lines(context.get("convergence")), ""]
    parts += _results_lines(models, formula, image_routing, table)
    if context.get("compute"):
        parts += ["## Training compute", "", *compute_lines(context["compute"], context.get("average", {})), ""]
    parts += _routing_lines(routing_rows, context)
    parts += ["", "## Figures", ""]
    parts += [f"![{Path(img).stem}]({img})" for img in images]
    parts += ["", "## All metrics per task (fractions, clip_benchmark names)", ""]
    for task, text in metric_tables.items():
        parts += [f"### {task}", "", text, ""]
    return "\n".join(parts) + "\n"
