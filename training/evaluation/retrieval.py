"""Zero-shot image↔text retrieval (clip_benchmark semantics), one model or similarity rows combined.

Per model the normalised image and caption embeddings are kept; the similarity of caption ``t``
and image ``i`` is their dot product. Every caption belongs to one image (``text_image``) and an
image may have several captions. Metrics, for k in 1, 5, 10:

* ``image_retrieval_recall@k``: a caption query hits if its image is among the k most similar
  images (text→image);
* ``text_retrieval_recall@k``: an image query hits if at least one of its captions is among the k
  most similar captions (image→text).

Ensembles combine similarity rows per query: ``s(q, ·) = Σ_k w_k(q) s_k(q, ·)`` (the weights come
from ``ensemble/evaluators/retrieval.py``'s routing; one model alone has weight 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from training.evaluation.clip import ClipBundle
from training.evaluation.tasks import EvalTask, iter_retrieval

RECALL_KS = (1, 5, 10)
CHUNK = 1024
"""Queries scored at once; bounds memory to ``CHUNK × gallery`` similarities."""


def evaluate(
    bundle: ClipBundle, task: EvalTask, *, batch_size: int, skipped: Counter | None = None
) -> dict[str, Any]:
    """``{"image_features" [Ni, D], "text_features" [Nt, D], "text_image" [Nt]}`` of one model."""
    texts: list[str] = []
    text_image: list[int] = []

    def images() -> Iterator[Any]:
        for index, (image, captions) in enumerate(iter_retrieval(task, skipped)):
            texts.extend(captions)
            text_image.extend([index] * len(captions))
            yield image

    image_features = bundle.encode_images(images(), batch_size)
    return {
        "image_features": image_features,
        "text_features": bundle.encode_texts(texts, batch_size),
        "text_image": torch.tensor(text_image, dtype=torch.long),
    }


def _hits(
    queries: Sequence[torch.Tensor],
    gallery: Sequence[torch.Tensor],
    weights: torch.Tensor,
    positive: torch.Tensor,
    query_is_text: bool,
    ks: Sequence[int],
) -> torch.Tensor:
    """``[num_queries, len(ks)]`` bool: query hit at k, from similarity rows weighted per query and
    computed ``CHUNK`` queries at a time.

    ``positive`` is ``text_image``: for text queries the positive of query ``t`` is image
    ``positive[t]``; for image queries the positives of image ``i`` are the captions ``t`` with
    ``positive[t] == i``.
    """
    num_queries, num_gallery = queries[0].shape[0], gallery[0].shape[0]
    if num_queries == 0 or num_gallery == 0:
        raise ValueError("retrieval: no images or captions to score")
    kmax = min(max(ks), num_gallery)
    out = torch.zeros(num_queries, len(ks), dtype=torch.bool)
    for lo in range(0, num_queries, CHUNK):
        hi = min(lo + CHUNK, num_queries)
        scores = sum(
            weights[lo:hi, e : e + 1].double() * (q[lo:hi].double() @ g.double().T)
            for e, (q, g) in enumerate(zip(queries, gallery, strict=True))
        )
        top = scores.topk(kmax, dim=1).indices
        if query_is_text:
            hit = top == positive[lo:hi, None]
        else:
            hit = positive[top] == torch.arange(lo, hi)[:, None]
        for j, k in enumerate(ks):
            out[lo:hi, j] = hit[:, :k].any(dim=1)
    return out


def all_hits(
    outputs_list: Sequence[dict[str, Any]],
    text_weights: torch.Tensor,
    image_weights: torch.Tensor,
    ks: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    text_image = outputs_list[0]["text_image"]
    for out in outputs_list[1:]:
        if not torch.equal(out["text_image"], text_image):
            raise ValueError("retrieval: models were scored on different samples; rerun the ensemble with --force")
    texts = [o["text_features"] for o in outputs_list]
    images = [o["image_features"] for o in outputs_list]
    t2i = _hits(texts, images, text_weights, text_image, True, ks)
    i2t = _hits(images, texts, image_weights, text_image, False, ks)
    return t2i, i2t


def retrieval_metrics(
    outputs_list: Sequence[dict[str, Any]],
    text_weights: torch.Tensor,
    image_weights: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recalls of the models' similarities combined per query.

    Args:
        outputs_list: one ``evaluate`` output per model (same task, same sample order).
        text_weights: ``[Nt, E]`` weights of every caption query (text→image).
        image_weights: ``[Ni, E]`` weights of every image query (image→text).
        ks: the recall cut-offs.
    """
    t2i, i2t = all_hits(outputs_list, text_weights, image_weights, ks)
    out = {f"image_retrieval_recall@{k}": float(t2i[:, j].double().mean()) for j, k in enumerate(ks)}
    out.update({f"text_retrieval_recall@{k}": float(i2t[:, j].double().mean()) for j, k in enumerate(ks)})
    return out


def _single(outputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(len(outputs["text_features"]), 1), torch.ones(len(outputs["image_features"]), 1)


def metrics(outputs: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The metrics of one model's outputs."""
    yield from retrieval_metrics([outputs], *_single(outputs)).items()


def combined_metrics(outputs_list: Sequence[dict[str, Any]], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics with per-query weights ``{"text": [Nt, E], "image": [Ni, E]}``."""
    return retrieval_metrics(outputs_list, weights["text"], weights["image"])
