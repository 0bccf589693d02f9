"""``ensemble`` stage: evaluate every expert, the seed and the baselines, route, combine, report.

One shard per evaluation task. ``process_shard`` runs every model on the task with the task's
evaluator and saves its outputs, then computes the task's routing weights from its metadata
(class names, or captions for retrieval) and the fine cluster centres, under every routing formula
(the configured one is used; the others feed the routing comparison). ``finalize`` combines the
saved outputs per system (single experts, ``all_unit``, routed ``ensemble``, ``seed`` and the
baselines of ``train.baselines``) without re-running any model, bootstraps intervals over the
eval items, and writes the report.

Outputs in ``<run>/ensemble/``:

* ``outputs/<task>/<model>.pt``: the evaluator's outputs (zero-shot: ``logits`` [N, C] raw cosine
  similarities + ``targets``; retrieval: normalised ``image_features``, ``text_features`` and
  ``text_image``) plus ``meta`` (model and task fingerprints: a model whose ``final.pt`` and task
  are unchanged is not re-run, even after ``--force``);
* ``outputs/<task>/routing.pt`` / ``routing.json``: the task's weights and how they were made;
* ``report.csv`` (MoDE's result.csv columns, then ``seed`` and the baselines), ``report_ci.csv``
  (95% bootstrap intervals), ``report_paired.csv`` (ensemble minus each baseline, paired
  bootstrap, verdict), ``report.md``, ``routing.json``, ``calibration.json``, ``metrics.jsonl``
  and the plots ``cluster_sizes.png``, ``routing_weights.png``, ``scores.png``.
"""

from __future__ import annotations

import dataclasses
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
from ensemble.evaluators import Embed, evaluator_for, get_evaluator
from ensemble.models import ModelSpec, baseline_systems, model_specs
from ensemble.routing import (
    FORMULAS,
    Centers,
    calibrate_temperature,
    entropy_bits,
    expert_sq_distances,
    mean_entropy_bits,
    median_margin,
)
from ensemble.scoring import Intervals, TaskScores, bootstrap_report, score_task
from ensemble.systems import System, extra_columns, seed_convergence, systems_of, training_compute
from pipeline import artifacts, experts
from pipeline.config import PipelineConfig, to_jsonable
from pipeline.runner import Shard
from pipeline.runtime import Runtime
from stages.cluster import load_centers
from stages.generations import centers_upto, union_digest
from stages.text_encoder import embed_texts
from training.evaluation.clip import load_clip
from training.evaluation.tasks import EvalTask, discover_tasks, load_task
from training.runs import SEED, train_dir

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
    """The run's fine centres, fine→coarse map, calibrated routing temperature and cluster manifest."""
    _, _, _, manifest = load_centers(cfg)
    fine, owner, num = centers_upto(cfg)  # the union of every generation's centres (docs/growth.md)
    manifest = {**manifest, "centers_digest": f"{manifest.get('centers_digest', '')}{union_digest(cfg)}"}
    centers = Centers(fine, owner, num)
    calibration = routing_calibration(cfg, centers, manifest)
    return dataclasses.replace(centers, temperature=calibration["temperature"]), manifest


def _calibration_sample(cfg: PipelineConfig, size: int) -> np.ndarray:
    """Up to ``size`` training caption features, drawn (seeded) from at most 64 embed shards."""
    emanifest = embed_manifest(cfg)
    files = [cfg.run_dir / "embed" / rel for rel in emanifest.get("outputs", [])]
    rng = np.random.default_rng([cfg.run.seed, 0xCA1])
    if len(files) > 64:
        files = [files[i] for i in sorted(rng.choice(len(files), 64, replace=False))]
    arrays = [np.load(f, mmap_mode="r") for f in files]
    total = sum(len(a) for a in arrays)
    picks = np.sort(rng.choice(total, min(size, total), replace=False)) if total else np.zeros(0, int)
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    parts = [np.asarray(a[picks[(picks >= lo) & (picks < hi)] - lo]) for a, lo, hi in zip(arrays, bounds, bounds[1:], strict=False)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def routing_calibration(cfg: PipelineConfig, centers: Centers, cmanifest: dict[str, Any]) -> dict[str, Any]:
    """The ``calibrated`` routing's temperature, fitted on training captions (cached per centres).

    Uses only the run's own training captions (the embed stage's features), never eval data.
    """
    path = cfg.run_dir / "ensemble" / "calibration.json"
    key = {
        "centers": cmanifest.get("centers_digest", ""),
        "confidence": cfg.ensemble.calibrated_confidence,
        "samples": cfg.ensemble.calibration_samples,
        "seed": cfg.run.seed,
    }
    if path.is_file():
        saved = artifacts.read_json(path)
        if saved.get("key") == key:
            return saved
    sample = torch.from_numpy(_calibration_sample(cfg, cfg.ensemble.calibration_samples))
    if sample.numel() == 0:
        log.warning("ensemble: no caption features in the embed stage; the routing temperature is fitted on the fine centres")
        sample = centers.fine
    d2 = expert_sq_distances(sample, centers.fine, centers.fine_to_coarse, centers.num_experts)
    result = {
        "key": key,
        "temperature": calibrate_temperature(d2, cfg.ensemble.calibrated_confidence),
        "num_captions": int(sample.shape[0]),
        "median_margin": median_margin(d2),
    }
    artifacts.write_json(path, result)
    return result


def embed_manifest(cfg: PipelineConfig) -> dict[str, Any]:
    """The embed manifest: which text model made the caption features (and so the centres)."""
    return artifacts.read_manifest(cfg.run_dir / "embed", "embed")


def make_embed(cfg: PipelineConfig) -> Embed:
    """``embed(texts, templates=None)`` with the caption text model of the run (memoised, so the
    routing formulas compared on one task embed its metadata once)."""
    manifest = embed_manifest(cfg)
    memo: dict[Any, np.ndarray] = {}

    def embed(texts: Sequence[str], templates: Sequence[Any] | None = None) -> np.ndarray:
        key = (tuple(texts), tuple(t("{c}") for t in templates) if templates else None)
        if key not in memo:
            memo[key] = embed_texts(texts, model_manifest=manifest, templates=templates, device=cfg.ensemble.device)
        return memo[key]

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
        artifacts.torch_save(obj, tmp)


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
    cfg: PipelineConfig, spec: ModelSpec, task: EvalTask, evaluator: ModuleType, path: Path, meta: dict[str, Any],
    device: torch.device,
) -> tuple[int, Counter]:
    """Run one model on the task and save its outputs; returns (samples, skipped samples)."""
    skipped: Counter = Counter()
    bundle = load_clip(cfg.train.model, spec.path, device)
    outputs = evaluator.evaluate(bundle, task, batch_size=cfg.ensemble.batch_size, skipped=skipped)
    num = int(next(iter(outputs.values())).shape[0])
    _save_pt(path, {**outputs, "meta": {**meta, "num_samples": num, "skipped": dict(skipped)}})
    log.info("ensemble: %s on %s: %d samples", spec.name, task.name, num)
    return num, skipped


def process_shard(cfg: PipelineConfig, shard: Shard, stage_dir: Path, runtime: Runtime) -> dict[str, Any]:
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
            samples, skipped = _evaluate_model(cfg, spec, task, evaluator, path, meta, runtime.device)
    weights, summary, alternatives = route_task(cfg, task, evaluator, centers)
    _save_pt(out_dir / "routing.pt", {"weights": weights, "alternatives": alternatives})
    artifacts.write_json(out_dir / "routing.json", summary)
    if cached:
        skipped["cached_outputs"] = cached
    return {"in": samples, "out": len(specs), "evaluated": evaluated, "skipped": dict(skipped)}


def route_task(
    cfg: PipelineConfig, task: EvalTask, evaluator: ModuleType, centers: Centers
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The task's weights under the configured formula, its summary (with every formula's mean
    weights and entropy), and the weights of every formula (for the routing comparison)."""
    embed = make_embed(cfg)
    alternatives, summaries = {}, {}
    for formula in FORMULAS:
        weights, summary = evaluator.route(task, embed, centers, dataclasses.replace(cfg.ensemble, routing=formula))
        alternatives[formula], summaries[formula] = weights, summary
    summary = summaries[cfg.ensemble.routing]
    summary["entropy_bits"] = entropy_bits(torch.tensor(summary["weights"]))
    summary["formulas"] = {
        f: {"weights": v["weights"], "entropy_bits": mean_entropy_bits(alternatives[f])} for f, v in summaries.items()
    }
    if cfg.ensemble.routing == "calibrated":
        summary["temperature"] = centers.temperature
    return alternatives[cfg.ensemble.routing], summary, alternatives


# --------------------------------------------------------------------------- combination


def _json_value(value: float) -> float | None:
    return None if value != value else value  # NaN (acc5 below 5 classes) → null


def _score_tasks(cfg: PipelineConfig, stage_dir: Path, systems: dict[str, System]) -> tuple[list[TaskScores], dict]:
    """Every task's scores (from the saved outputs and routing) and its routing summary."""
    scored, routing_all = [], {}
    for shard in list_shards(cfg, stage_dir):
        task = load_task(Path(cfg.data.eval_root) / shard.inputs["task"], shard.inputs["task"])
        evaluator = get_evaluator(shard.inputs["evaluator"])
        out_dir = outputs_dir(stage_dir, task.name)
        names = {m for system in systems.values() for m in system.members}
        outputs = {name: load_outputs(out_dir / f"{name}.pt") for name in names}
        saved = torch.load(out_dir / "routing.pt", map_location="cpu", weights_only=True)
        scored.append(score_task(task, evaluator, outputs, saved["weights"], saved.get("alternatives", {}), systems))
        routing_all[task.name] = artifacts.read_json(out_dir / "routing.json")
    return scored, routing_all


def finalize(cfg: PipelineConfig, stage_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Combine the saved outputs with the routing weights; bootstrap; write the report files."""
    centers, _ = run_centers(cfg)
    num_experts = centers.num_experts
    specs = model_specs(cfg, num_experts)
    systems = systems_of(num_experts, baseline_systems(cfg, num_experts), any(s.name == SEED for s in specs))
    columns = report.report_columns(num_experts, extra_columns(systems))
    scored, routing_all = _score_tasks(cfg, stage_dir, systems)
    rows = [row for task in scored for row in task.rows]
    table = report.with_average(rows, columns)
    intervals, routed_average = bootstrap_report(scored, cfg.ensemble.bootstrap_resamples, cfg.ensemble.bootstrap_seed)
    metric_lines = [
        json.dumps({"task": t.task, "system": system, "metric": metric, "value": _json_value(value)}, sort_keys=True)
        for t in scored
        for system, values in t.metrics.items()
        for metric, value in values.items()
    ]
    metric_tables = {
        t.task: report.markdown_table(
            [{"system": s, **v} for s, v in t.metrics.items()], ["system", *next(iter(t.metrics.values()))]
        )
        for t in scored
    }
    context = {
        "compute": training_compute(train_dir(cfg), systems),
        "convergence": seed_convergence(train_dir(cfg) / SEED),
        "routed_average": routed_average,
        "temperature": centers.temperature,
        "average": table[-1],
    }
    _write_files(cfg, stage_dir, table, columns, metric_lines, routing_all, metric_tables, specs, intervals, context)
    files = ["report.csv", "report_ci.csv", "report_paired.csv", "report.md", "routing.json", "metrics.jsonl"]
    files += ["routing_weights.png", "scores.png"]
    if (stage_dir / "cluster_sizes.png").is_file():
        files.append("cluster_sizes.png")
    return {
        "outputs": files,
        "tasks": [t.task for t in scored],
        "models": [s.name for s in specs],
        "routing": cfg.ensemble.routing,
        "average": table[-1],
        "verdicts": {r["baseline"]: r["verdict"] for r in intervals.paired_rows if r["dataset"] == report.AVERAGE},
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
    intervals: Intervals,
    context: dict[str, Any],
) -> None:
    artifacts.write_text(stage_dir / "report.csv", report.csv_text(table, columns))
    ci_columns = ["dataset", "system", "score", "ci_low", "ci_high", "items"]
    artifacts.write_text(stage_dir / "report_ci.csv", report.csv_text(intervals.ci_rows, ci_columns))
    paired_columns = ["dataset", "baseline", "difference", "ci_low", "ci_high", "verdict"]
    artifacts.write_text(stage_dir / "report_paired.csv", report.csv_text(intervals.paired_rows, paired_columns))
    artifacts.write_text(stage_dir / "metrics.jsonl", "\n".join(metric_lines) + "\n")
    artifacts.write_json(stage_dir / "routing.json", routing_all)
    labels, weights = _heatmap_rows(routing_all)
    report.plot_routing(stage_dir / "routing_weights.png", labels, weights)
    report.plot_scores(stage_dir / "scores.png", table[:-1], columns, intervals.ci_rows)
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
            "formulas": s.get("formulas", {}),
        }
        for task, s in routing_all.items()
    ]
    text = report.report_markdown(
        run=cfg.run.name,
        formula=cfg.ensemble.routing,
        image_routing=cfg.ensemble.retrieval_image_routing,
        models=[s.name for s in specs],
        table=report.markdown_table(table, columns),
        routing_rows=routing_rows,
        metric_tables=metric_tables,
        images=images,
        intervals=intervals,
        context=context,
        resamples=cfg.ensemble.bootstrap_resamples,
    )
    artifacts.write_text(stage_dir / "report.md", text + experts.markdown_section(cfg))


if __name__ == "__main__":
    import sys

    from pipeline.distributed import torchrun_stage

    sys.exit(torchrun_stage("ensemble"))
