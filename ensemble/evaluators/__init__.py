"""Evaluators, chosen by name in ``ensemble.evaluators``; one module per evaluator.

Every evaluator module exposes the same plain functions (the stage calls nothing else):

* ``NAME`` and ``TASK_KIND`` (the :class:`~training.evaluation.tasks.EvalTask` kind it handles);
* ``evaluate(bundle, task, *, batch_size, skipped) -> dict``: run one model on one task and
  return its outputs (tensors saved as ``<run>/ensemble/outputs/<task>/<model>.pt``);
* ``metrics(outputs) -> Iterator[(metric, value)]``: the metrics of one model's outputs;
* ``route(task, embed, centers, ecfg) -> (weights, summary)``: the routing weights of the task
  (a dict of tensors whose last dimension is the expert) and a JSON-able summary;
* ``combined_metrics(outputs_list, weights) -> dict``: the metrics of the experts' outputs
  combined with ``weights`` (the same dict layout as ``route`` returns);
* ``report_rows(task) -> list[ReportRow]``: the rows this task adds to report.csv.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ensemble.routing import Centers, RoutingParams
from pipeline.config import EnsembleConfig

EVALUATORS = {
    "zeroshot": "ensemble.evaluators.zeroshot",
    "retrieval": "ensemble.evaluators.retrieval",
}
"""Evaluator name → module."""

Embed = Callable[..., np.ndarray]
"""``embed(texts, templates=None) -> float32 [n, dim]``: the caption text model (``embed_texts``)."""


@dataclass(frozen=True)
class ReportRow:
    """One row of report.csv contributed by a task."""

    dataset: str
    metric: str
    num_classes: int | None
    """Number of classes (None for retrieval rows: the column is left empty)."""


def get_evaluator(name: str) -> ModuleType:
    """The evaluator module called ``name``."""
    if name not in EVALUATORS:
        raise ValueError(f"ensemble.evaluators: unknown evaluator '{name}' (known: {', '.join(EVALUATORS)})")
    return importlib.import_module(EVALUATORS[name])


def evaluator_for(kind: str, names: Sequence[str]) -> ModuleType | None:
    """The first configured evaluator that handles tasks of ``kind`` (None: the task is skipped)."""
    for name in names:
        module = get_evaluator(name)
        if module.TASK_KIND == kind:
            return module
    return None


def routing_params(ecfg: EnsembleConfig, centers: Centers | None = None) -> RoutingParams:
    """The routing formula and its constants from the ensemble config (and the run's calibration)."""
    sw = tuple(float(x) for x in ecfg.smooth_weight)
    if len(sw) != 2:
        raise ValueError(f"ensemble.smooth_weight: expected 2 numbers, got {list(ecfg.smooth_weight)}")
    temperature = centers.temperature if centers is not None else None
    return RoutingParams(
        ecfg.routing, (sw[0], sw[1]), ecfg.too_many_class, ecfg.paper_lambda, temperature, ecfg.calibrated_prior
    )
