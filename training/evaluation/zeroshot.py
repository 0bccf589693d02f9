"""Zero-shot classification (clip_benchmark semantics, MoDE logits).

Per model: every class name is put in every template, embedded, L2-normalised, averaged over
templates and re-normalised into a ``[D, C]`` classifier. Logits are the raw cosine similarities
between the normalised image embeddings and that classifier (MoDE: no logit scale, no softmax), so
the experts' logits can be summed with routing weights. Metrics: ``acc1``, ``acc5`` (NaN below 5
classes) and ``mean_per_class_recall`` (balanced accuracy over the classes present).

The same code scores a model during training (:class:`ZeroShotEvaluator`), in the ensemble report
(``ensemble/evaluators/zeroshot.py`` adds routing) and in ``python -m pipeline eval``.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from training.evaluation.clip import ClipBundle
from training.evaluation.tasks import EvalTask, fill_template, iter_classification

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


def load_pixels(task: EvalTask, transform: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a classification task through ``transform``, with the labels."""
    images, labels = [], []
    for image, label in iter_classification(task):
        images.append(transform(image))
        labels.append(label)
    if not images:
        raise ValueError(f"eval task {task.name}: no samples with an image and a .cls label")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class ZeroShotEvaluator:
    """Training-time zero-shot ``acc1`` on fixed tasks; images are decoded and preprocessed once.

    Args:
        tasks: Classification tasks (:func:`training.evaluation.tasks.classification_tasks`).
        transform: The model's val transform.
        tokenizer: The model's tokenizer.
        device: Where to run.
        autocast: A context-manager factory for mixed precision.
        batch_size: Images (and prompts) per forward pass.
    """

    def __init__(
        self,
        tasks: Sequence[EvalTask],
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
        """``{"zeroshot/<task>/top1": acc1}`` for every task, plus their mean."""
        was_training = model.training
        model.eval()
        bundle = ClipBundle(model, self.transform, self.tokenizer, self.device, self.autocast)
        results = {}
        try:
            for task in self.tasks:
                if task.name not in self._data:
                    self._data[task.name] = load_pixels(task, self.transform)
                pixels, targets = self._data[task.name]
                classifier = text_classifier(bundle, task.classnames, task.templates, self.batch_size)
                logits = bundle.encode_pixels(pixels, self.batch_size) @ classifier
                results[f"zeroshot/{task.name}/top1"] = classification_metrics(logits, targets)["acc1"]
        finally:
            model.train(was_training)
        if results:
            results["zeroshot/mean_top1"] = sum(results.values()) / len(results)
        return results
