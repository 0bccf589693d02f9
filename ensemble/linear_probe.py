"""Linear probe of the data experts (MoDE Table 9): concatenated expert image features vs the dense model.

For every classification task under ``data.eval_root`` that has a ``<task>/train/`` split, each
model's L2-normalised image embeddings of the train and test images are computed once and cached
(``<run>/ensemble/linear_probe/features/<model>/<task>_<split>.pt``), then the linear evaluation of
``training/evaluation/linear_probe.py`` (``linear_eval`` section: momentum SGD, no weight decay, batch 1024,
90 epochs, standardised features) is fitted on

* ``experts-concat``: the concatenation of all experts' embeddings (E x dim features), the paper's
  probe;
* ``dense``: ``train/dense/final.pt`` when it exists, else the seed model ``train/seed/final.pt``
  (the row's ``dense_source`` says which);
* ``expert-<k>``: each expert alone (for reference).

Rows (model, task, top1, top5, ...) and per-model means go to ``<run>/ensemble/linear_probe.csv`` and
``.jsonl``. Run with ``python -m pipeline linear-probe --config C``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import file_fingerprint
from pipeline.config import PipelineConfig
from training import runs
from training.evaluation.linear_probe import (
    cached_features,
    eval_task_splits,
    extract_features,
    train_linear,
    write_rows,
)

log = logging.getLogger("pipeline")


def probe_models(cfg: PipelineConfig) -> tuple[list[tuple[str, Path]], tuple[str, Path]]:
    """([(expert-k, final.pt)], (dense source, final.pt)); experts in index order.

    Raises:
        FileNotFoundError: no trained expert or no dense/seed model.
    """
    train = runs.train_dir(cfg)
    found = []
    for path in train.glob(f"{runs.EXPERT_PREFIX}*/{runs.FINAL}"):
        k = runs.expert_index(path.parent.name)
        if k is not None:
            found.append((k, path))
    if not found:
        raise FileNotFoundError(f"linear-probe: no {train}/expert_<k>/final.pt; train the experts first")
    experts = [(f"expert-{k}", path) for k, path in sorted(found)]
    dense = runs.final_path(cfg, "dense")
    if dense.is_file():
        return experts, ("dense", dense)
    seed = runs.final_path(cfg, runs.SEED)
    if not seed.is_file():
        raise FileNotFoundError(f"linear-probe: neither {dense} nor {seed} exists")
    log.info("linear-probe: no %s; the seed model %s stands in for the dense model", dense, seed)
    return experts, ("seed", seed)


def _features(
    cfg: PipelineConfig, name: str, path: Path, tasks: list[Any], device: torch.device
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    from training.evaluation.clip import load_clip

    bundle = None
    out = {}
    batch = cfg.ensemble.batch_size
    for task in tasks:
        for split in (task.train, task.val):
            key = {"weights": file_fingerprint(path), "data": split.fingerprint}
            cache = cfg.run_dir / "ensemble" / "linear_probe" / "features" / name / f"{task.name}_{split.name}.pt"

            def compute(split=split):
                nonlocal bundle
                if bundle is None:
                    bundle = load_clip(cfg.train.model, path, device)
                return extract_features(lambda images: bundle.encode_images(images, batch), split, batch)

            out[(task.name, split.name)] = cached_features(cache, key, compute)
    return out


def run_linear_probe(cfg: PipelineConfig, progress: bool = True, device: str = "cpu") -> list[dict[str, Any]]:
    """Fit the probes; returns the rows written to ``<run>/ensemble/linear_probe.{csv,jsonl}``."""
    le = cfg.linear_eval
    tasks = eval_task_splits(cfg.data.eval_root, le.tasks)
    experts, (dense_source, dense_path) = probe_models(cfg)
    dev = torch.device(device)
    feats = {name: _features(cfg, name, path, tasks, dev) for name, path in experts}
    dense = _features(cfg, dense_source, dense_path, tasks, dev)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        candidates: dict[str, tuple[torch.Tensor, ...]] = {}
        parts = [feats[name] for name, _ in experts]
        xtr = torch.cat([p[(task.name, "train")][0] for p in parts], dim=1)
        xva = torch.cat([p[(task.name, "val")][0] for p in parts], dim=1)
        ytr, yva = parts[0][(task.name, "train")][1], parts[0][(task.name, "val")][1]
        candidates["experts-concat"] = (xtr, ytr, xva, yva)
        candidates["dense"] = (*dense[(task.name, "train")], *dense[(task.name, "val")])
        for name, _ in experts:
            candidates[name] = (*feats[name][(task.name, "train")], *feats[name][(task.name, "val")])
        for model, (a, b, c, d) in candidates.items():
            result = train_linear(a, b, c, d, le, task.num_classes, cfg.run.seed)
            rows.append(
                {
                    "model": model, "task": task.name, "top1": round(result["top1"], 2),
                    "top5": round(result["top5"], 2), "train_top1": round(result["train_top1"], 2),
                    "dim": int(a.shape[1]), "n_train": int(b.numel()), "n_val": int(d.numel()),
                    "dense_source": dense_source if model == "dense" else "",
                }
            )
            if progress:
                log.info("linear-probe %s / %s: top1 %.2f", model, task.name, result["top1"])
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        rows.append(
            {"model": model, "task": "mean", "top1": round(sum(r["top1"] for r in mine) / len(mine), 2),
             "top5": round(sum(r["top5"] for r in mine) / len(mine), 2), "dim": mine[0]["dim"],
             "dense_source": mine[0]["dense_source"]}
        )
    write_rows(cfg.run_dir / "ensemble" / "linear_probe", rows)
    return rows
