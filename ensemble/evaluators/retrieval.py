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

from collections.abc import Sequence
from typing import Any

import torch

from ensemble import routing
from ensemble.evaluators import Embed, ReportRow, routing_params
from ensemble.routing import Centers
from ensemble.stats import ItemScores
from pipeline.config import EnsembleConfig
from training.evaluation.retrieval import RECALL_KS, all_hits, combined_metrics, evaluate, metrics
from training.evaluation.tasks import EvalTask, retrieval_texts

__all__ = ["NAME", "TASK_KIND", "combined_metrics", "evaluate", "item_scores", "metrics", "report_rows", "route"]

NAME = "retrieval"
TASK_KIND = "retrieval"


def item_scores(outputs_list: Sequence[dict[str, Any]], weights: dict[str, torch.Tensor]) -> dict[str, ItemScores]:
    """Per-query hits (caption queries for ``image_retrieval_*``, image queries for ``text_retrieval_*``)."""
    t2i, i2t = all_hits(outputs_list, weights["text"], weights["image"], RECALL_KS)
    out = {f"image_retrieval_recall@{k}": ItemScores(t2i[:, j].double().numpy()) for j, k in enumerate(RECALL_KS)}
    out.update({f"text_retrieval_recall@{k}": ItemScores(i2t[:, j].double().numpy()) for j, k in enumerate(RECALL_KS)})
    return out


def route(
    task: EvalTask, embed: Embed, centers: Centers, ecfg: EnsembleConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-query weights: each caption alone (n = 1); images by the corpus or their own captions."""
    per_image = retrieval_texts(task)
    texts = [t for captions in per_image for t in captions]
    text_image = torch.tensor([i for i, caps in enumerate(per_image) for _ in caps], dtype=torch.long)
    features = torch.from_numpy(embed(texts))
    params = routing_params(ecfg, centers)
    e, num_texts, num_images = centers.num_experts, len(texts), len(per_image)

    def weights(group: torch.Tensor | None, groups: int | None) -> routing.Routing:
        return routing.route(features, centers.fine, centers.fine_to_coarse, params, group, groups, e)

    per_text = weights(torch.arange(num_texts), num_texts)
    text_w, dist, expert = per_text.weights, per_text.dist, per_text.expert
    if ecfg.retrieval_image_routing == "captions":
        image_w = weights(text_image, num_images).weights
    else:
        image_w = weights(None, None).weights.expand(num_images, e).contiguous()
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
