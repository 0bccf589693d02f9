"""Zero-shot classification (clip_benchmark semantics, MoDE logits).

Per model: every class name is put in every template, embedded, L2-normalised, averaged over
templates and re-normalised into a ``[D, C]`` classifier. Logits are the raw cosine similarities
between the normalised image embeddings and that classifier (MoDE: no logit scale, no softmax), so
the experts' logits can be summed with routing weights. Metrics: ``acc1``, ``acc5`` (NaN below 5
classes) and ``mean_per_class_recall`` (balanced accuracy over the classes present).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ensemble import routing
from ensemble.datasets import EvalTask, fill_template, iter_classification
from ensemble.evaluators import Embed, ReportRow, routing_params
from ensemble.models import ClipBundle
from ensemble.routing import Centers
from ensemble.stats import ItemScores
from pipeline.config import EnsembleConfig

NAME = "zeroshot"
TASK_KIND = "classification"
DEFAULT_METRIC = "acc1"
METRICS = ("acc1", "acc5", "mean_per_class_recall")


def text_classifier(
    bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str], batch_size: int
) -> torch.Tensor:
    """``[D, C]`` zero-shot classifier: template-averaged, re-normalised class embeddings."""
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    emb = bundle.encode_texts(prompts, batch_size).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1).T.contiguous()


def evaluate(
    bundle: ClipBundle, task: EvalTask, *, batch_size: int, skipped: Counter | None = None
) -> dict[str, Any]:
    """``{"logits": [N, C] cosine similarities, "targets": [N]}`` of one model on one task."""
    classifier = text_classifier(bundle, task.classnames, task.templates, batch_size)
    targets: list[int] = []

    def images() -> Iterator[Any]:
        for image, label in iter_classification(task, skipped):
            targets.append(label)
            yield image

    features = bundle.encode_images(images(), batch_size)
    return {"logits": features @ classifier, "targets": torch.tensor(targets, dtype=torch.long)}


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` as fractions in [0, 1]."""
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("zeroshot: no samples to score")
    order = logits.argsort(dim=1, descending=True, stable=True)
    correct = order == targets[:, None]
    acc5 = float(correct[:, :5].any(dim=1).float().mean()) if num_classes >= 5 else math.nan
    pred = order[:, 0]
    recalls = [float((pred[targets == c] == c).float().mean()) for c in targets.unique().tolist()]
    return {
        "acc1": float(correct[:, 0].float().mean()),
        "acc5": acc5,
        "mean_per_class_recall": sum(recalls) / len(recalls),
    }


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


def metrics(outputs: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The metrics of one model's outputs."""
    yield from classification_metrics(outputs["logits"].float(), outputs["targets"]).items()


def combine(outputs_list: Sequence[dict[str, Any]], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the models' cosine logits (``weights``: ``[E]``)."""
    targets = outputs_list[0]["targets"]
    for out in outputs_list[1:]:
        if not torch.equal(out["targets"], targets):
            raise ValueError("zeroshot: models were scored on different samples; rerun the ensemble with --force")
    stacked = torch.stack([o["logits"].double() for o in outputs_list])
    return (stacked * weights.double().view(-1, 1, 1)).sum(dim=0)


def combined_metrics(outputs_list: Sequence[dict[str, Any]], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of the logits combined with ``weights["task"]`` (``[E]``)."""
    return classification_metrics(combine(outputs_list, weights["task"]), outputs_list[0]["targets"])


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
