"""Scores of every system on every report row, with bootstrap intervals and paired comparisons.

Used by the ensemble stage's ``finalize``: the saved outputs of every model on a task are
combined per system (:mod:`ensemble.systems`), reduced to per-item scores by the task's
evaluator, and bootstrapped (:mod:`ensemble.stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ensemble import stats
from ensemble.stats import ItemScores
from ensemble.systems import COMPARED, System, system_weights
from training.evaluation.tasks import EvalTask

ROUTED_PREFIX = "ensemble@"
"""Systems ``ensemble@<formula>``: the experts routed by another formula (routing comparison)."""


@dataclass
class TaskScores:
    """One task's report rows and the per-item scores behind them."""

    task: str
    rows: list[dict[str, Any]]
    """report.csv rows (percent)."""
    metrics: dict[str, dict[str, float]]
    """``{system: {metric: fraction}}`` (every metric, for metrics.jsonl)."""
    items: list[dict[str, ItemScores]] = field(default_factory=list)
    """Per report row: ``{system: per-item scores of the row's metric}``."""


def _value(scores: ItemScores | None) -> float:
    return math.nan if scores is None else float(stats.statistic(scores))


def score_task(
    task: EvalTask,
    evaluator: ModuleType,
    outputs: dict[str, dict[str, Any]],
    routed: dict[str, torch.Tensor],
    alternatives: dict[str, dict[str, torch.Tensor]],
    systems: dict[str, System],
) -> TaskScores:
    """Every system's metrics and per-item scores on one task.

    Args:
        task: the eval task.
        evaluator: its evaluator module (``item_scores``, ``report_rows``).
        outputs: saved outputs by model (run) name.
        routed: the task's routing weights (configured formula).
        alternatives: the weights of every formula, for ``ensemble@<formula>`` systems.
        systems: the report's systems.
    """
    all_systems = dict(systems)
    experts = systems["ensemble"].members
    weights_of = {name: system_weights(system, routed) for name, system in systems.items()}
    for formula, weights in alternatives.items():
        all_systems[f"{ROUTED_PREFIX}{formula}"] = System(experts, "routed")
        weights_of[f"{ROUTED_PREFIX}{formula}"] = weights
    per_system = {
        name: evaluator.item_scores([outputs[m] for m in system.members], weights_of[name])
        for name, system in all_systems.items()
    }
    metrics = {name: {m: _value(s) for m, s in scores.items()} for name, scores in per_system.items()}
    result = TaskScores(task.name, [], {k: v for k, v in metrics.items() if k in systems})
    num_experts = len(experts)
    for spec in evaluator.report_rows(task):
        row: dict[str, Any] = {"dataset": spec.dataset, "num_classes": spec.num_classes}
        for name in systems:
            row[name] = 100.0 * metrics[name][spec.metric]
        row["expert-max"] = max(row[f"expert-{k}"] for k in range(num_experts))
        result.rows.append(row)
        items = {name: per_system[name][spec.metric] for name in per_system}
        result.items.append({k: v for k, v in items.items() if v is not None})
    return result


@dataclass
class Intervals:
    """Bootstrap results of the whole report."""

    ci_rows: list[dict[str, Any]]
    """``dataset, system, score, ci_low, ci_high, items`` (percent)."""
    paired_rows: list[dict[str, Any]]
    """``dataset, baseline, difference, ci_low, ci_high, verdict`` (ensemble minus baseline, points)."""


def _ci_row(dataset: str, system: str, score: float, samples: np.ndarray | None, items: int) -> dict[str, Any]:
    low, high = stats.interval(samples) if samples is not None else (math.nan, math.nan)
    return {"dataset": dataset, "system": system, "score": score, "ci_low": 100 * low, "ci_high": 100 * high, "items": items}


def _paired(dataset: str, baseline: str, diff: float, samples: np.ndarray) -> dict[str, Any]:
    low, high = stats.interval(samples)
    return {
        "dataset": dataset,
        "baseline": baseline,
        "difference": diff,
        "ci_low": 100 * low,
        "ci_high": 100 * high,
        "verdict": stats.verdict(low, high),
    }


def bootstrap_report(tasks: list[TaskScores], resamples: int, seed: int) -> tuple[Intervals, dict[str, float]]:
    """Intervals of every system per row and for the average; paired ensemble-minus-baseline.

    Returns the intervals and the average row's point values of the ``ensemble@<formula>`` systems.
    """
    ci_rows: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    boots: list[dict[str, np.ndarray]] = []
    points: list[dict[str, float]] = []
    index = 0
    for task in tasks:
        for row, items in zip(task.rows, task.items, strict=True):
            boot = stats.bootstrap_row(items, resamples, seed, index) if resamples else {}
            index += 1
            values = {name: 100.0 * float(stats.statistic(s)) for name, s in items.items()}
            boots.append(boot)
            points.append(values)
            n = len(next(iter(items.values())))
            for name in items:
                ci_rows.append(_ci_row(row["dataset"], name, values[name], boot.get(name), n))
            for base in (b for b in COMPARED if b in items):
                if boot:
                    diff = boot["ensemble"] - boot[base]
                    paired.append(_paired(row["dataset"], base, values["ensemble"] - values[base], diff))
    systems = [name for name in points[0]] if points else []
    average = {name: float(np.mean([p[name] for p in points])) for name in systems}
    for name in systems:
        samples = stats.average_samples(boots, name) if resamples else None
        ci_rows.append(_ci_row("average", name, average[name], samples, len(points)))
    if resamples:
        for base in (b for b in COMPARED if b in systems):
            diff = stats.average_samples(boots, "ensemble") - stats.average_samples(boots, base)
            paired.append(_paired("average", base, average["ensemble"] - average[base], diff))
    routed = {k: v for k, v in average.items() if k.startswith(ROUTED_PREFIX)}
    return Intervals(ci_rows, paired), routed
