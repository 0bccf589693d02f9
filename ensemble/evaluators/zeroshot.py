"""The ``zeroshot`` evaluator of the ensemble: the shared zero-shot classification of
``training/evaluation/zeroshot.py`` (per-model logits and metrics, logits combined with weights) plus
what only the ensemble needs: task routing from the class names, per-image scores for the
intervals and the report row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ensemble import routing
from ensemble.evaluators import Embed, ReportRow, routing_params
from ensemble.routing import Centers
from ensemble.stats import ItemScores
from pipeline.config import EnsembleConfig
from training.evaluation.tasks import EvalTask, fill_template
from training.evaluation.zeroshot import METRICS, combine, combined_metrics, evaluate, metrics

__all__ = ["NAME", "TASK_KIND", "combined_metrics", "evaluate", "item_scores", "metrics", "report_rows", "route"]

NAME = "zeroshot"
TASK_KIND = "classification"
DEFAULT_METRIC = "acc1"


def item_scores(outputs_list: Sequence[dict[str, Any]], weights: dict[str, torch.Tensor]) -> dict[str, ItemScores]:
    """Per-image scores of the combined logits, one :class:`ItemScores` per metric (for intervals).

    ``acc1`` / ``acc5``: 1 when the target is in the top 1 / 5 (acc5 is None below 5 classes);
    ``mean_per_class_recall``: the top-1 hits grouped by target class.
    """
    logits = combine(outputs_list, weights["task"])
    targets = outputs_list[0]["targets"]
    order = logits.argsort(dim=1, descending=True, stable=True)
    correct = (order == targets[:, None]).double()
    top1 = correct[:, 0].numpy()
    acc5 = correct[:, :5].sum(dim=1).numpy() if logits.shape[1] >= 5 else None
    return {
        "acc1": ItemScores(top1),
        "acc5": ItemScores(acc5) if acc5 is not None else None,
        "mean_per_class_recall": ItemScores(top1, targets.numpy()),
    }


def route(
    task: EvalTask, embed: Embed, centers: Centers, ecfg: EnsembleConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Task-level weights ``{"task": [E]}`` from the class names (templates averaged)."""
    templates = [lambda c, t=t: fill_template(t, c) for t in task.templates]
    features = torch.from_numpy(embed(list(task.classnames), templates=templates))
    result = routing.route(
        features, centers.fine, centers.fine_to_coarse, routing_params(ecfg, centers), num_experts=centers.num_experts
    )
    weights = result.weights[0]
    summary = {
        "kind": TASK_KIND,
        "formula": ecfg.routing,
        "num_items": len(task.classnames),
        "weights": weights.tolist(),
        "votes": torch.bincount(result.expert, minlength=centers.num_experts).tolist(),
        "mean_dist": float(result.dist.mean()),
        "per_class": [
            {"class": c, "fine": int(f), "expert": int(e), "dist": float(d)}
            for c, f, e, d in zip(task.classnames, result.fine, result.expert, result.dist, strict=True)
        ],
    }
    return {"task": weights}, summary


def report_rows(task: EvalTask) -> list[ReportRow]:
    """One row: the task's metric (``acc1`` unless task.json names another)."""
    metric = task.report_metric or DEFAULT_METRIC
    if metric not in METRICS:
        raise ValueError(f"eval task '{task.name}': report_metric {metric!r} is not one of {list(METRICS)}")
    return [ReportRow(task.name, metric, len(task.classnames))]
