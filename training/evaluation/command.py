"""``python -m pipeline eval``: score open_clip checkpoints or a run's models on task folders.

Prints one clip_benchmark-style JSON object per (model, task) on stdout::

    {"dataset": "shapes", "model": "mode-tiny-rn", "pretrained": "runs/demo/train/seed/final.pt",
     "task": "zeroshot_classification", "language": "en",
     "metrics": {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}}

Retrieval tasks give ``"task": "zeroshot_retrieval"`` and ``image_retrieval_recall@k`` /
``text_retrieval_recall@k`` (k = 1, 5, 10). ``acc5`` is null below 5 classes. The scores come from
the same functions as training-time evaluation and the ensemble report.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import write_text
from pipeline.config import PipelineConfig, load_config
from pipeline.runtime import resolve_device
from training.evaluation import retrieval, zeroshot
from training.evaluation.clip import load_clip
from training.evaluation.tasks import EvalTask, discover_tasks, is_task_dir, load_task

log = logging.getLogger("pipeline")

TASK_NAMES = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
"""Task kind → clip_benchmark task name."""
RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class EvalModel:
    """One model to score: open_clip architecture and weights (None: random init, seeded)."""

    name: str
    arch: str
    checkpoint: Path | None


def resolve_tasks(paths: Sequence[str | Path]) -> list[EvalTask]:
    """Each path is a task folder (any supported layout) or a folder of task folders.

    Raises:
        FileNotFoundError: a path is missing or holds no task (one line).
    """
    tasks: list[EvalTask] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"eval: no task folder {path} (pass --tasks, or make demo-data for the demo's)")
        tasks += [load_task(path)] if is_task_dir(path) else discover_tasks(path)
    return tasks


def _run_order(name: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"expert_(\d+)", name)
    return (0, 0, name) if name == "seed" else (1, int(match.group(1)), name) if match else (2, 0, name)


def run_models(run: Path) -> tuple[list[EvalModel], PipelineConfig]:
    """The trained models of a run (``<run>/train/<name>/final.pt``: seed, experts, baselines) and the
    run's config (from the first model's ``config.yaml``).

    Raises:
        FileNotFoundError: the run has no trained model.
    """
    finals = sorted((run / "train").glob("*/final.pt"), key=lambda p: _run_order(p.parent.name))
    if not finals:
        raise FileNotFoundError(f"eval: no {run / 'train'}/<model>/final.pt; train the run first (make train)")
    models, cfg = [], None
    for final in finals:
        config = final.parent / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"eval: {final} has no {config} to name its architecture")
        run_cfg = load_config(config, [])
        cfg = cfg or run_cfg
        models.append(EvalModel(final.parent.name, run_cfg.train.model, final))
    return models, cfg


def _arch(model: str) -> str:
    """An open_clip model name, or the name of a model config JSON file (registered with open_clip)."""
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        import open_clip

        open_clip.add_model_config(path)
        return path.stem
    return model


def score(bundle: Any, task: EvalTask, batch_size: int) -> dict[str, float | None]:
    """clip_benchmark metrics of one loaded model on one task (NaN → None)."""
    module = zeroshot if task.kind == "classification" else retrieval
    skipped: Counter = Counter()
    outputs = module.evaluate(bundle, task, batch_size=batch_size, skipped=skipped)
    if skipped:
        log.info("eval: %s: skipped %s", task.name, dict(skipped))
    return {k: None if math.isnan(v) else v for k, v in module.metrics(outputs)}


def result_row(task: EvalTask, model: EvalModel, metrics: dict[str, float | None]) -> dict[str, Any]:
    """One clip_benchmark-style result."""
    return {
        "dataset": task.name,
        "model": model.arch,
        "pretrained": str(model.checkpoint) if model.checkpoint else RANDOM_INIT,
        "task": TASK_NAMES[task.kind],
        "language": "en",
        "metrics": metrics,
    }


def evaluate_models(
    models: Sequence[EvalModel], tasks: Sequence[EvalTask], device: torch.device, batch_size: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Every model on every task, one result each (model-major order)."""
    rows = []
    for model in models:
        if model.checkpoint is None:
            log.warning("eval: %s has no --pretrained checkpoint; scoring a random init (seed %d)", model.arch, seed)
            torch.manual_seed(seed)
        bundle = load_clip(model.arch, model.checkpoint, device, owner="eval")
        for task in tasks:
            rows.append(result_row(task, model, score(bundle, task, batch_size)))
            log.info("eval: %s on %s: %s", model.name, task.name, rows[-1]["metrics"])
    return rows


def run_eval(
    cfg: PipelineConfig,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    tasks: Sequence[str] = (),
    run: str | None = None,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """Score ``--model``/``--pretrained`` or ``--run``'s models on ``--tasks`` (default: the run's or
    the config's ``data.eval_root``); prints one JSON line per result and writes ``output`` (a JSON list).

    Raises:
        FileNotFoundError: a checkpoint, task folder or run model is missing (one line).
        ValueError: neither or both of ``model`` and ``run`` are given.
    """
    if (model is None) == (run is None):
        raise ValueError("eval: give exactly one of --model (with --pretrained) or --run")
    if run is not None:
        models, run_cfg = run_models(Path(run))
        default_root = run_cfg.data.eval_root
    else:
        if pretrained and not Path(pretrained).is_file():
            raise FileNotFoundError(f"eval: no checkpoint {pretrained} (only local files are read)")
        models = [EvalModel(model, _arch(model), Path(pretrained) if pretrained else None)]
        default_root = cfg.data.eval_root
    found = resolve_tasks(list(tasks) or [default_root])
    device = resolve_device(cfg.ensemble.device)
    rows = evaluate_models(models, found, device, cfg.ensemble.batch_size, cfg.run.seed)
    for row in rows:
        print(json.dumps(row))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(output), json.dumps(rows, indent=2) + "\n")
    return rows
