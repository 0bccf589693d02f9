"""Linear evaluation on frozen features, shared by the SSL linear eval and the experts' linear probe.

SogCLR / MoCo v3 ``lincls``: momentum SGD (0.9), no weight decay, batch 1024, lr = base * batch / 256
with a per-epoch cosine, 90 epochs; the classifier starts from N(0, 0.01) weights and zero bias. The
backbone runs once per image (no augmentation during classifier training: the features are cached),
and features are standardised with the train split's statistics (a frozen, non-affine BatchNorm).
Top-1 / top-5 are measured on the validation split.

Used by ``training/ssl/linear.py`` (``python -m pipeline linear-eval``) and
``ensemble/linear_probe.py`` (``python -m pipeline linear-probe``, MoDE Table 9).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import artifacts
from pipeline.artifacts import atomic_path, file_fingerprint, write_text
from pipeline.sections import LinearEvalConfig
from stages.clustering.common import one_cpu_thread
from training.evaluation.tasks import discover_tasks, load_task


@dataclass(frozen=True)
class Split:
    """A labelled image split: ``refs`` (:class:`training.ssl.data.ImageRef`) and its fingerprint."""

    name: str
    refs: list[Any]
    fingerprint: str


@dataclass(frozen=True)
class LinearTask:
    """A classification task with a train and a validation split."""

    name: str
    train: Split
    val: Split
    num_classes: int


def split_of(name: str, source: str, split: str, files: Iterable[Path] = ()) -> Split:
    """A split of ``source`` (training.ssl.data.list_images), fingerprinted by its files."""
    from training.ssl.data import list_images

    refs, _ = list_images(source, split)
    files = list(files) or sorted({Path(r.path) for r in refs})
    return Split(name, refs, file_fingerprint(*files))


def eval_task_splits(eval_root: str | Path, names: list[str] | None = None) -> list[LinearTask]:
    """Classification tasks under ``eval_root`` with a ``<task>/train/`` split (any task form that
    ``training.evaluation.tasks.load_task`` reads); validation = the task's own (test) files."""
    out = []
    for task in discover_tasks(eval_root, names or ()):
        train_dir = task.root / "train"
        if task.kind != "classification" or not train_dir.is_dir():
            if names:
                raise FileNotFoundError(f"linear_eval.tasks: {task.name} has no train split ({train_dir})")
            continue
        if task.source != "wds":
            raise ValueError(f"linear evaluation: task {task.name} must be webdataset shards (got {task.source})")
        train_task = load_task(train_dir, task.name)
        out.append(
            LinearTask(
                task.name,
                split_of("train", "::".join(map(str, train_task.files)), "train", train_task.files),
                split_of("val", "::".join(map(str, task.files)), "val", task.files),
                len(task.classnames),
            )
        )
    if not out:
        raise FileNotFoundError(f"linear evaluation: no classification task with a train/ split under {eval_root}")
    return out


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


def cap_per_class(refs: list[Any], labels: list[int], cap: int) -> list[int]:
    """Indices keeping the first ``cap`` samples of each class (0 = all)."""
    if not cap:
        return list(range(len(refs)))
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= cap:
            keep.append(i)
    return keep


@torch.no_grad()
def extract_features(
    encode: Callable[[list[Any]], torch.Tensor], split: Split, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, d] float32, labels [n]) of every image of ``split``; ``encode`` maps PIL images."""
    from training.ssl.data import ImageReader

    reader = ImageReader()
    feats, labels = [], []
    for refs in _batches(split.refs, batch):
        decoded = [reader.image(r) for r in refs]
        feats.append(encode([img for img, _ in decoded]).float().cpu())
        labels += [y for _, y in decoded]
    y = torch.tensor(labels)
    if (y < 0).any():
        raise ValueError(f"linear evaluation: split {split.name} has images without a label")
    return torch.cat(feats), y


def cached_features(
    path: Path, key: dict[str, Any], compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features from ``path`` when it was made with ``key``, else computed and saved there."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            return saved["x"], saved["y"]
    x, y = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        artifacts.torch_save({"key": key, "x": x, "y": y}, tmp)
    return x, y


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` (k capped at the number of classes)."""
    out = {}
    for k in ks:
        pred = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[f"top{k}"] = 100.0 * float((pred == y[:, None]).any(dim=1).float().mean())
    return out


def train_linear(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: LinearEvalConfig,
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a linear classifier on frozen features; top-1 / top-5 (%) on the validation split."""
    with one_cpu_thread():  # tiny ops: one intra-op thread is ~10x faster on a busy CPU
        return _train_linear(x_train, y_train, x_val, y_val, cfg, num_classes, seed)


def _train_linear(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: LinearEvalConfig,
    num_classes: int | None,
    seed: int,
) -> dict[str, float]:
    classes = num_classes or int(max(y_train.max(), y_val.max())) + 1
    x_train, x_val = x_train.float(), x_val.float()
    if cfg.standardize:
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    base_lr = cfg.lr * cfg.batch_size / 256.0
    opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    loss_fn = nn.CrossEntropyLoss()
    n = x_train.shape[0]
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, cfg.batch_size):
            rows = order[lo : lo + cfg.batch_size]
            loss = loss_fn(head(x_train[rows]), y_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        result = topk_accuracy(head(x_val), y_val)
        result["train_top1"] = topk_accuracy(head(x_train), y_train, (1,))["top1"]
    return result


def write_rows(stem: Path, rows: list[dict[str, Any]]) -> None:
    """``<stem>.csv`` and ``<stem>.jsonl`` (the report formats of the ensemble stage)."""
    import csv
    import io

    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(stem.with_suffix(".csv"), buf.getvalue())
    write_text(stem.with_suffix(".jsonl"), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
