"""Zero-shot classification on the eval tasks (``<data.eval_root>/<task>/task.json`` + ``test-*.tar``).

The classifier of a task is open_clip's: every class name in every template, encoded, normalised,
averaged over templates and normalised again. Accuracy is top-1 over the task's shards. Reusable
outside training (the ensemble stage can call :func:`list_classification_tasks`,
:func:`load_task_images` and :func:`zeroshot_top1`).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import nn

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ClassificationTask:
    """One zero-shot classification task."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    shards: tuple[Path, ...]


def list_classification_tasks(eval_root: str | Path, names: Sequence[str] = ()) -> list[ClassificationTask]:
    """The classification tasks under ``eval_root`` (all of them, or those named, in that order).

    Raises:
        FileNotFoundError: a named task does not exist.
        ValueError: a named task is not a classification task.
    """
    root = Path(eval_root)
    folders = [root / n for n in names] if names else sorted(p.parent for p in root.glob("*/task.json"))
    tasks = []
    for folder in folders:
        spec_path = folder / "task.json"
        if not spec_path.is_file():
            raise FileNotFoundError(f"train.eval_tasks: no task {folder.name} ({spec_path} missing)")
        spec = json.loads(spec_path.read_text())
        if spec.get("type") != "classification":
            if names:
                raise ValueError(
                    f"train.eval_tasks: {folder.name} is a {spec.get('type')} task, not classification"
                )
            continue
        shards = (
            [folder / s for s in spec["shards"]] if spec.get("shards") else sorted(folder.glob("test-*.tar"))
        )
        tasks.append(
            ClassificationTask(
                folder.name, tuple(spec["classnames"]), tuple(spec["templates"]), tuple(shards)
            )
        )
    return tasks


def iter_task_samples(task: ClassificationTask) -> Iterator[tuple[bytes, int]]:
    """(image bytes, label) of every sample of the task's shards, in order."""
    for shard in task.shards:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard, mode="r:*") as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name.rsplit("/", 1)[-1]:
                    continue
                key, ext = member.name.rsplit("/", 1)[-1].split(".", 1)
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for group in groups.values():
            image = next((group[e] for e in IMAGE_EXTS if e in group), None)
            if image is not None and "cls" in group:
                yield image, int(group["cls"].decode().strip())


def load_task_images(
    task: ClassificationTask, transform: Callable, max_samples: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the task through ``transform`` (the model's val transform), with the labels."""
    images, labels = [], []
    for data, label in iter_task_samples(task):
        with Image.open(io.BytesIO(data)) as img:
            images.append(transform(img.convert("RGB")))
        labels.append(label)
        if max_samples and len(labels) >= max_samples:
            break
    if not images:
        raise ValueError(f"eval task {task.name}: no samples with an image and a .cls label")
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def build_classifier(
    model: nn.Module,
    tokenizer: Callable,
    task: ClassificationTask,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
) -> torch.Tensor:
    """[dim, classes] zero-shot weights: template-averaged, normalised class-name embeddings."""
    # Templates may use "{}" or "{c}" (the eval task format); format with both.
    templates = [lambda c, t=t: t.format(c, c=c) for t in task.templates]
    with autocast():
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, list(task.classnames), templates, num_classes_per_batch=10, device=device
        )
    return weights.float()


@torch.no_grad()
def zeroshot_top1(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    autocast: Callable = contextlib.nullcontext,
) -> float:
    """Top-1 accuracy of ``classifier`` on preprocessed ``images``."""
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        with autocast():
            features = model.encode_image(batch, normalize=True)
        pred = (features.float() @ classifier).argmax(dim=1).cpu()
        correct += int((pred == labels[start : start + batch_size]).sum())
    return correct / len(images)


class ZeroShotEvaluator:
    """Zero-shot top-1 on a fixed list of tasks; images are loaded and preprocessed once.

    Args:
        tasks: Classification tasks.
        transform: The model's val transform.
        tokenizer: The model's tokenizer.
        device: Where to run.
        autocast: A context-manager factory for mixed precision.
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        tasks: Sequence[ClassificationTask],
        transform: Callable,
        tokenizer: Callable,
        device: torch.device,
        autocast: Callable = contextlib.nullcontext,
        batch_size: int = 256,
    ) -> None:
        self.tasks, self.transform, self.tokenizer = list(tasks), transform, tokenizer
        self.device, self.autocast, self.batch_size = device, autocast, batch_size
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """``{"zeroshot/<task>/top1": accuracy}`` for every task, plus their mean."""
        was_training = model.training
        model.eval()
        results = {}
        try:
            for task in self.tasks:
                if task.name not in self._data:
                    self._data[task.name] = load_task_images(task, self.transform)
                images, labels = self._data[task.name]
                classifier = build_classifier(model, self.tokenizer, task, self.device, self.autocast)
                results[f"zeroshot/{task.name}/top1"] = zeroshot_top1(
                    model, images, labels, classifier, self.device, self.batch_size, self.autocast
                )
        finally:
            model.train(was_training)
        if results:
            results["zeroshot/mean_top1"] = sum(results.values()) / len(results)
        return results
