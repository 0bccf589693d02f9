"""Linear evaluation of SSL backbones (``python -m pipeline linear-eval``).

The protocol (cached frozen features, SogCLR / MoCo v3 ``lincls`` classifier) is
``training/evaluation/linear_probe.py``'s, shared with the experts' probe in
``ensemble/linear_probe.py``; this module adds the SSL backbones and the ImageNet-layout folder source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import file_fingerprint
from pipeline.config import PipelineConfig
from training.evaluation.linear_probe import (
    LinearTask,
    cached_features,
    cap_per_class,
    eval_task_splits,
    extract_features,
    split_of,
    train_linear,
    write_rows,
)

log = logging.getLogger("training")


def linear_tasks(cfg: PipelineConfig) -> list[LinearTask]:
    """The tasks of ``linear_eval.source``: one ImageNet-layout folder, or the eval tasks with a train split."""
    le = cfg.linear_eval
    if le.source == "folder":
        root = le.data or cfg.ssl.data
        train, val = split_of("train", root, "train"), split_of("val", root, "val")
        classes = 1 + max(r.label for r in train.refs)
        return [LinearTask(Path(root).name or "data", train, val, classes)]
    return eval_task_splits(cfg.data.eval_root, le.tasks)


# --------------------------------------------------------------------------- SSL backbones


def _backbone_encoder(cfg: PipelineConfig, checkpoint: str, device: torch.device) -> tuple[Callable, str]:
    """(PIL images → backbone features, fingerprint of the weights) for a checkpoint or ``random``."""
    from training.ssl.data import eval_transform
    from training.ssl.model import SSLModel

    s = cfg.ssl
    torch.manual_seed(cfg.run.seed)
    model = SSLModel(s.arch, s.mlp_dim, s.proj_dim, s.small_stem)
    if checkpoint != "random":
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("model", state))
        weights = file_fingerprint(Path(checkpoint))
    else:
        weights = f"random:{cfg.run.seed}:{s.arch}:{s.small_stem}"
    model.eval().to(device)
    transform = eval_transform(s.image_size)

    def encode(images: list[Any]) -> torch.Tensor:
        return model.features(torch.stack([transform(img) for img in images]).to(device))

    return encode, weights


def resolve_checkpoint(cfg: PipelineConfig, name: str) -> tuple[str, str]:
    """(label, checkpoint path or ``random``) of a ``--runs`` entry: an ssl run name, a path or ``random``."""
    from training.ssl.main import run_dir

    if name == "random":
        return "random-init", "random"
    if Path(name).is_file():
        return Path(name).parent.name, name
    path = run_dir(cfg).parent / name / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"linear-eval: no {path}; train it with `python -m pipeline ssl --set ssl.run_name={name}`")
    return name, str(path)


def run_linear_eval(cfg: PipelineConfig, runs: list[str] | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Linear evaluation of SSL backbones; rows also written to ``<run>/ssl/linear_eval.{csv,jsonl}``.

    Args:
        cfg: Pipeline config (``ssl`` for the architecture, ``linear_eval`` for the protocol).
        runs: ssl run names, checkpoint paths or ``random`` (default: ``linear_eval.checkpoint`` or
            the configured ``ssl.run_name``).
    """
    from training.ssl.main import run_dir

    le = cfg.linear_eval
    runs = runs or [le.checkpoint or cfg.ssl.run_name]
    tasks = linear_tasks(cfg)
    out_root = run_dir(cfg).parent
    rows = []
    for name in runs:
        label, checkpoint = resolve_checkpoint(cfg, name)
        encode, weights = _backbone_encoder(cfg, checkpoint, torch.device(device))
        for task in tasks:
            feats = {}
            for split in (task.train, task.val):
                key = {"weights": weights, "data": split.fingerprint, "size": cfg.ssl.image_size}
                path = out_root / "linear_eval" / "features" / label / f"{task.name}_{split.name}.pt"
                feats[split.name] = cached_features(
                    path, key, lambda split=split, encode=encode: extract_features(encode, split, le.image_batch)
                )
            (xtr, ytr), (xva, yva) = feats["train"], feats["val"]
            keep = cap_per_class(xtr, ytr.tolist(), le.max_train_per_class)
            result = train_linear(xtr[keep], ytr[keep], xva, yva, le, task.num_classes, cfg.run.seed)
            row = {
                "model": label, "task": task.name, "top1": round(result["top1"], 2), "top5": round(result["top5"], 2),
                "train_top1": round(result["train_top1"], 2), "n_train": len(keep), "n_val": int(yva.numel()),
                "dim": int(xtr.shape[1]), "epochs": le.epochs,
            }
            log.info("linear-eval %s / %s: top1 %.2f top5 %.2f", label, task.name, row["top1"], row["top5"])
            rows.append(row)
        if len(tasks) > 1:
            mine = [r for r in rows if r["model"] == label]
            rows.append(
                {"model": label, "task": "mean", "top1": round(sum(r["top1"] for r in mine) / len(mine), 2),
                 "top5": round(sum(r["top5"] for r in mine) / len(mine), 2)}
            )
    write_rows(out_root / "linear_eval", rows)
    return rows
