"""``ensemble`` stage: evaluate every expert (and the dense seed), route, combine, report.

One shard per evaluation task. ``process_shard`` runs every model on the task with the task's
evaluator and saves its outputs, then computes the task's routing weights from its metadata
(class names, or captions for retrieval) and the fine cluster centres. ``finalize`` combines the
saved outputs (single experts, ``all_unit``, routed ``ensemble``, ``dense``) without re-running any
model and writes the report.

Outputs in ``<run>/ensemble/``:

* ``outputs/<task>/<model>.pt``: the evaluator's outputs (zero-shot: ``logits`` [N, C] raw cosine
  similarities + ``targets``; retrieval: normalised ``image_features``, ``text_features`` and
  ``text_image``) plus ``meta`` (model and task fingerprints: a model whose ``final.pt`` and task
  are unchanged is not re-run, even after ``--force``);
* ``outputs/<task>/routing.pt`` / ``routing.json``: the task's weights and how they were made;
* ``report.csv`` (MoDE's result.csv columns + ``dense``), ``report.md``, ``routing.json``,
  ``metrics.jsonl`` and the plots ``cluster_sizes.png``, ``routing_weights.png``, ``scores.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ensemble import report
from ensemble.datasets import EvalTask, discover_tasks, load_task
from ensemble.evaluators import Embed, evaluator_for, get_evaluator
from ensemble.models import SEED, ModelSpec, load_clip, model_specs
from ensemble.routing import Centers, entropy_bits
from pipeline import artifacts, experts
from pipeline.config import PipelineConfig, to_jsonable
from pipeline.distributed import resolve_device
from pipeline.runner import Shard
from stages.cluster import load_centers
from stages.text_encoder import embed_texts

log = logging.getLogger("pipeline")

OUTPUTS_DIR = "outputs"
OUTPUT_VERSION = 1
"""Bump when the saved outputs change meaning, so cached ones are recomputed."""
_RUNTIME_KEYS = ("device", "batch_size")
UPSTREAM = ("embed", "cluster")
"""Stage manifests this stage consumes (text model, centres); models are fingerprinted by content."""


# --------------------------------------------------------------------------- inputs


def hash_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The ensemble section minus runtime choices, and the model architecture."""
    section = {k: v for k, v in to_jsonable(cfg.ensemble).items() if k not in _RUNTIME_KEYS}
    return {"ensemble": section, "model": cfg.train.model}


def run_centers(cfg: PipelineConfig) -> tuple[Centers, dict[str, Any]]:
    """The run's fine centres, fine→coarse map and the cluster manifest."""
    fine, coarse, fine_to_coarse, manifest = load_centers(cfg)
    return Centers(fine.float(), fine_to_coarse.long(), int(coarse.shape[0])), manifest


def embed_manifest(cfg: PipelineConfig) -> dict[str, Any]:
    """The embed manifest: which text model made the caption features (and so the centres)."""
    return artifacts.read_manifest(cfg.run_dir / "embed", "embed")


def make_embed(cfg: PipelineConfig) -> Embed:
    """``embed(texts, templates=None)`` with the caption text model of the run."""
    manifest = embed_manifest(cfg)

    def embed(texts: Sequence[str], templates: Sequence[Any] | None = None) -> np.ndarray:
        return embed_texts(texts, model_manifest=manifest, templates=templates, device=cfg.ensemble.device)

    return embed


def eval_tasks(cfg: PipelineConfig) -> list[tuple[EvalTask, ModuleType]]:
    """Every configured task with the evaluator that handles it (tasks without one are skipped)."""
    names = cfg.ensemble.evaluators
    if not names:
        raise ValueError("ensemble.evaluators: empty; name at least one of zeroshot, retrieval")
    for name in names:
        get_evaluator(name)
    out = []
    for task in discover_tasks(cfg.data.eval_root, cfg.ensemble.tasks):
        evaluator = evaluator_for(task.kind, names)
        if evaluator is None:
            log.info("ensemble: task %s (%s) skipped: no %s evaluator in ensemble.evaluators", task.name, task.kind, task.kind)
            continue
        out.append((task, evaluator))
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def list_shards(cfg: PipelineConfig, stage_dir: Path) -> list[Shard]:
    """One shard per eval task, fingerprinted by its files, every model's ``final.pt``, the
    centres and the text model (what the task's outputs and routing depend on).

    Raises:
        FileNotFoundError: an upstream stage is missing, an expert is not trained, or a task is missing.
    """
    centers, cmanifest = run_centers(cfg)
    emanifest = embed_manifest(cfg)
    specs = model_specs(cfg, centers.num_experts)
    models = {s.name: artifacts.file_fingerprint(s.path, cache=stage_dir) for s in specs}
    text_model = {k: emanifest.get(k) for k in ("model", "dim", "normalize", "pooling")}
    shards = []
    for task, evaluator in eval_tasks(cfg):
        identity = {
            "task": task.fingerprint(),
            "evaluator": evaluator.NAME,
            "models": models,
            "centers": cmanifest.get("centers_digest", ""),
            "text_model": text_model,
        }
        shards.append(Shard(task.name, _digest(identity), {"task": task.name, "evaluator": evaluator.NAME}))
    return shards


# --------------------------------------------------------------------------- one task


def outputs_dir(stage_dir: Path, task: str) -> Path:
    """``<stage>/outputs/<task>``."""
    return stage_dir / OUTPUTS_DIR / task


def _save_pt(path: Path, obj: Any) -> None:
    with artifacts.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_outputs(path: Path) -> dict[str, Any]:
    """One model's saved outputs."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _cached_meta(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The saved meta when ``path`` holds outputs made from the same model, task and evaluator."""
    if not path.is_file():
        return None
    try:
        saved = load_outputs(path).get("meta", {})
    except Exception:  # noqa: BLE001 - an unreadable file is simply recomputed
        return None
    same = all(saved.get(k) == v for k, v in meta.items())
    return saved if same else None


def _evaluate_model(
    cfg: PipelineConfig, spec: ModelSpec, task: EvalTask, evaluator: ModuleType, path: Path, meta: dict[str, Any]
) -> tuple[int, Counter]:
    """Run one model on the task and save its outputs; returns (samples, skipped samples)."""
    skipped: Counter = Counter()
    bundle = load_clip(cfg.train.model, spec.path, resolve_device(cfg.ensemble.device))
    outputs = evaluator.evaluate(bundle, task, batch_size=cfg.ensemble.batch_size, skipped=skipped)
    num = int(next(iter(outputs.values())).shape[0])
    _save_pt(path, {**outputs, "meta": {**meta, "num_samples": num, "skipped": dict(skipped)}})
    log.info("ensemble: %s on %s: %d samples", spec.name, task.name, num)
    return num, skipped


def process_shard(cfg: PipelineConfig, shard: Shard, stage_dir: Path) -> dict[str, Any]:
    """Evaluate every model on one task (reusing unchanged outputs) and route the task."""
    task = load_task(Path(cfg.data.eval_root) / shard.inputs["task"], shard.inputs["task"])
    evaluator = get_evaluator(shard.inputs["evaluator"])
    centers, _ = run_centers(cfg)
    specs = model_specs(cfg, centers.num_experts)
    out_dir = outputs_dir(stage_dir, task.name)
    task_fp = task.fingerprint()
    samples, evaluated, cached, skipped = 0, 0, 0, Counter()
    for spec in specs:
        path = out_dir / f"{spec.name}.pt"
        meta = {
            "version": OUTPUT_VERSION,
            "evaluator": evaluator.NAME,
            "arch": cfg.train.model,
            "model": artifacts.file_fingerprint(spec.path),
            "task": task_fp,
        }
        saved = _cached_meta(path, meta)
        if saved is not None:
            cached += 1
            samples, skipped = saved["num_samples"], Counter(saved.get("skipped", {}))
        else:
            evaluated += 1
            samples, skipped = _evaluate_model(cfg, spec, task, evaluator, path, meta)
    weights, summary = evaluator.route(task, make_embed(cfg), centers, cfg.ensemble)
    _save_pt(out_dir / "routing.pt", {"weights": weights})
    artifacts.write_json(out_dir / "routing.json", summary)
    if cached:
        skipped["cached_outputs"] = cached
    return {"in": samples, "out": len(specs), "evaluated": evaluated, "skipped": dict(skipped)}


# --------------------------------------------------------------------------- combination


def task_systems(
    evaluator: ModuleType,
    outputs: dict[str, dict[str, Any]],
    weights: dict[str, torch.Tensor],
    num_experts: int,
) -> dict[str, dict[str, float]]:
    """Metrics of every system on one task: ``expert-k``, ``all_unit``, ``ensemble`` and ``dense``.

    Args:
        evaluator: the task's evaluator module.
        outputs: saved outputs by model name (``expert_<k>``, optionally ``seed``).
        weights: the task's routing weights (dict of tensors, last dim = expert).
        num_experts: ``E``.
    """
    experts = [outputs[f"expert_{k}"] for k in range(num_experts)]
    systems = {f"expert-{k}": dict(evaluator.metrics(out)) for k, out in enumerate(experts)}
    uniform = {key: torch.full_like(w, 1.0 / num_experts) for key, w in weights.items()}
    systems["all_unit"] = evaluator.combined_metrics(experts, uniform)
    systems["ensemble"] = evaluator.combined_metrics(experts, weights)
    if SEED in outputs:
        systems["dense"] = dict(evaluator.metrics(outputs[SEED]))
    return systems


def report_rows(
    task: EvalTask, evaluator: ModuleType, systems: dict[str, dict[str, float]], num_experts: int
) -> list[dict[str, Any]]:
    """The task's report.csv rows in percent, with ``expert-max`` (best single expert)."""
    rows = []
    for spec in evaluator.report_rows(task):
        row: dict[str, Any] = {"dataset": spec.dataset, "num_classes": spec.num_classes}
        for system, values in systems.items():
            row[system] = 100.0 * values[spec.metric]
        row["expert-max"] = max(row[f"expert-{k}"] for k in range(num_experts))
        rows.append(row)
    return rows


def _json_value(value: float) -> float | None:
    return None if value != value else value  # NaN (acc5 below 5 classes) → null


def finalize(cfg: PipelineConfig, stage_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Combine the saved outputs with the routing weights; write the report files."""
    centers, _ = run_centers(cfg)
    num_experts = centers.num_experts
    specs = model_specs(cfg, num_experts)
    has_dense = any(s.name == SEED for s in specs)
    columns = report.report_columns(num_experts, has_dense)
    rows: list[dict[str, Any]] = []
    metric_lines: list[str] = []
    routing_all: dict[str, Any] = {}
    metric_tables: dict[str, str] = {}
    shards = list_shards(cfg, stage_dir)
    for shard in shards:
        task = load_task(Path(cfg.data.eval_root) / shard.inputs["task"], shard.inputs["task"])
        evaluator = get_evaluator(shard.inputs["evaluator"])
        out_dir = outputs_dir(stage_dir, task.name)
        outputs = {s.name: load_outputs(out_dir / f"{s.name}.pt") for s in specs}
        weights = torch.load(out_dir / "routing.pt", map_location="cpu", weights_only=True)["weights"]
        systems = task_systems(evaluator, outputs, weights, num_experts)
        rows += report_rows(task, evaluator, systems, num_experts)
        routing_all[task.name] = artifacts.read_json(out_dir / "routing.json")
        for system, values in systems.items():
            for metric, value in values.items():
                line = {"task": task.name, "system": system, "metric": metric, "value": _json_value(value)}
                metric_lines.append(json.dumps(line, sort_keys=True))
        metric_names = list(next(iter(systems.values())))
        metric_tables[task.name] = report.markdown_table(
            [{"system": s, **v} for s, v in systems.items()], ["system", *metric_names]
        )
    table = report.with_average(rows, columns)
    _write_files(cfg, stage_dir, table, columns, metric_lines, routing_all, metric_tables, specs)
    files = ["report.csv", "report.md", "routing.json", "metrics.jsonl", "routing_weights.png", "scores.png"]
    if (stage_dir / "cluster_sizes.png").is_file():
        files.append("cluster_sizes.png")
    return {
        "outputs": files,
        "tasks": [s.name for s in shards],
        "models": [s.name for s in specs],
        "routing": cfg.ensemble.routing,
        "average": table[-1],
    }


def _heatmap_rows(routing_all: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    labels, weights = [], []
    for task, summary in routing_all.items():
        if summary["kind"] == "retrieval":
            labels += [f"{task} (text queries, mean)", f"{task} (image queries, mean)"]
            weights += [summary["text_query_weights_mean"], summary["image_query_weights_mean"]]
        else:
            labels.append(task)
            weights.append(summary["weights"])
    return labels, weights


def _write_files(
    cfg: PipelineConfig,
    stage_dir: Path,
    table: list[dict[str, Any]],
    columns: list[str],
    metric_lines: list[str],
    routing_all: dict[str, Any],
    metric_tables: dict[str, str],
    specs: list[ModelSpec],
) -> None:
    artifacts.write_text(stage_dir / "report.csv", report.csv_text(table, columns))
    artifacts.write_text(stage_dir / "metrics.jsonl", "\n".join(metric_lines) + "\n")
    artifacts.write_json(stage_dir / "routing.json", routing_all)
    labels, weights = _heatmap_rows(routing_all)
    report.plot_routing(stage_dir / "routing_weights.png", labels, weights)
    report.plot_scores(stage_dir / "scores.png", table[:-1], columns)
    images = [p for p in [report.copy_cluster_plot(cfg.run_dir, stage_dir)] if p]
    images += ["routing_weights.png", "scores.png"]
    routing_rows = [
        {
            "task": task,
            "num_items": s["num_items"],
            "votes": s["votes"],
            "mean_dist": s["mean_dist"],
            "weights": s["weights"],
            "entropy_bits": entropy_bits(torch.tensor(s["weights"])),
        }
        for task, s in routing_all.items()
    ]
    text = report.report_markdown(
        run=cfg.run.name,
        formula=cfg.ensemble.routing,
        image_routing=cfg.ensemble.retrieval_image_routing,
        models=[s.column for s in specs],
        table=report.markdown_table(table, columns),
        routing_rows=routing_rows,
        metric_tables=metric_tables,
        images=images,
    )
    artifacts.write_text(stage_dir / "report.md", text + experts.markdown_section(cfg))


if __name__ == "__main__":
    import sys

    from pipeline.distributed import torchrun_stage

    sys.exit(torchrun_stage("ensemble"))
