"""Zero-shot image↔text retrieval (clip_benchmark semantics) and its routed ensemble.

Per model the normalised image and caption embeddings are saved; the similarity of caption ``t``
and image ``i`` is their dot product. Every caption belongs to one image (``text_image``) and an
image may have several captions. Metrics, for k in 1, 5, 10:

* ``image_retrieval_recall@k``: a caption query hits if its image is among the k most similar
  images (text→image);
* ``text_retrieval_recall@k``: an image query hits if at least one of its captions is among the k
  most similar captions (image→text).

Ensembles combine similarity rows per query: ``s(q, ·) = Σ_k w_k(q) s_k(q, ·)``. Routing (the paper
defines it; MoDE's code has none): a caption query is its own metadata set of one item (n = 1);
an image query is routed either by the whole caption corpus (``corpus``, paper Eq. 7: one weight
vector for every image) or by the image's own captions (``captions``, n = its number of captions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ensemble.datasets import EvalTask, iter_retrieval, retrieval_texts
from ensemble.evaluators import Embed, ReportRow, routing_params
from ensemble.models import ClipBundle
from ensemble.routing import Centers, grouped_weights, nearest_fine
from pipeline.config import EnsembleConfig

NAME = "retrieval"
TASK_KIND = "retrieval"
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


def _recalls(
    queries: Sequence[torch.Tensor],
    gallery: Sequence[torch.Tensor],
    weights: torch.Tensor,
    positive: torch.Tensor,
    query_is_text: bool,
    ks: Sequence[int],
) -> dict[int, float]:
    """Recall@k of weighted similarity rows, computed ``CHUNK`` queries at a time.

    ``positive`` is ``text_image``: for text queries the positive of query ``t`` is image
    ``positive[t]``; for image queries the positives of image ``i`` are the captions ``t`` with
    ``positive[t] == i``.
    """
    num_queries, num_gallery = queries[0].shape[0], gallery[0].shape[0]
    if num_queries == 0 or num_gallery == 0:
        raise ValueError("retrieval: no images or captions to score")
    kmax = min(max(ks), num_gallery)
    hits = torch.zeros(len(ks), dtype=torch.long)
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
            hits[j] += int(hit[:, :k].any(dim=1).sum())
    return {k: float(hits[j]) / num_queries for j, k in enumerate(ks)}


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
    text_image = outputs_list[0]["text_image"]
    for out in outputs_list[1:]:
        if not torch.equal(out["text_image"], text_image):
            raise ValueError("retrieval: models were scored on different samples; rerun the ensemble with --force")
    texts = [o["text_features"] for o in outputs_list]
    images = [o["image_features"] for o in outputs_list]
    t2i = _recalls(texts, images, text_weights, text_image, True, ks)
    i2t = _recalls(images, texts, image_weights, text_image, False, ks)
    out = {f"image_retrieval_recall@{k}": v for k, v in t2i.items()}
    out.update({f"text_retrieval_recall@{k}": v for k, v in i2t.items()})
    return out


def _single(outputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(len(outputs["text_features"]), 1), torch.ones(len(outputs["image_features"]), 1)


def metrics(outputs: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The metrics of one model's outputs."""
    yield from retrieval_metrics([outputs], *_single(outputs)).items()


def combined_metrics(outputs_list: Sequence[dict[str, Any]], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics with per-query weights ``{"text": [Nt, E], "image": [Ni, E]}``."""
    return retrieval_metrics(outputs_list, weights["text"], weights["image"])


def route(
    task: EvalTask, embed: Embed, centers: Centers, ecfg: EnsembleConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-query weights: each caption alone (n = 1); images by the corpus or their own captions."""
    per_image = retrieval_texts(task)
    texts = [t for captions in per_image for t in captions]
    text_image = torch.tensor([i for i, caps in enumerate(per_image) for _ in caps], dtype=torch.long)
    dist, fine = nearest_fine(torch.from_numpy(embed(texts)), centers.fine)
    expert = centers.fine_to_coarse.long()[fine]
    params = routing_params(ecfg)
    e, num_texts, num_images = centers.num_experts, len(texts), len(per_image)
    text_w = grouped_weights(dist, expert, e, params, torch.arange(num_texts), num_texts)
    if ecfg.retrieval_image_routing == "captions":
        image_w = grouped_weights(dist, expert, e, params, text_image, num_images)
    else:
        image_w = grouped_weights(dist, expert, e, params, None, 1).expand(num_images, e).contiguous()
    summary = {
        "kind": TASK_KIND,
        "formula": ecfg.routing,
        "image_routing": ecfg.retrieval_image_routing,
        "num_items": num_texts,
        "num_images": num_images,
        "weights": image_w.mean(dim=0).tolist(),
        "text_query_weights_mean": text_w.mean(dim=0).tolist(),
        "image_query_weights_mean": image_w.mean(dim=0).tolist(),
        "votes": torch.bincount(expert, minlength=e).tolist(),
        "mean_dist": float(dist.mean()),
    }
    return {"text": text_w, "image": image_w}, summary


def report_rows(task: EvalTask) -> list[ReportRow]:
    """Two rows: text→image (``image_r@1``) and image→text (``text_r@1``) recall@1."""
    return [
        ReportRow(f"{task.name}/image_r@1", "image_retrieval_recall@1", None),
        ReportRow(f"{task.name}/text_r@1", "text_retrieval_recall@1", None),
    ]
