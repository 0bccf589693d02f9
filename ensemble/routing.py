"""MoDE routing: expert weights from task metadata and the fine cluster centres (pure functions).

Every piece of metadata (a class name, a query text, a caption) is embedded with the caption text
model, its nearest *fine* centre (L2 distance, not squared, ``torch.cdist``) is found, and it votes
for that centre's coarse cluster, i.e. its data expert. Votes become weights by one of two formulas
(see docs/ensemble.md), for a metadata set of ``n`` items:

* ``code`` (MoDE ``post_report_ensemble.py``, the default)::

      alpha(n) = s0 * log10(max(10, n - too_many_class))
      beta(n)  = exp(0.5 - sqrt(n))  if n < 10 else 0
      score_k  = sum over items l voting k of exp(alpha * (beta - d_l))
      w        = softmax(score / s1)                     (s0, s1) = smooth_weight = (5, 8)

* ``paper`` (§3.4 Eq. 5-6 and App. E)::

      lam'     = lam / ln(n)  if n > 200 else lam        lam = 0.2
      A_l      = exp(-d_l**2 / lam')  (nearest centre only; the others are 0)
      A_l     *= exp(0.5 - sqrt(n))   if n < 10
      w        = softmax(sum over items l voting k of A_l)

Items are grouped: one group is one routing decision (a whole classification task, one query
text, or the captions of one image), and ``n`` is the size of the item's group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Formula = Literal["code", "paper"]
FORMULAS: tuple[str, ...] = ("code", "paper")
PAPER_FEW_CLASSES = 10
"""Below this many items the paper softens ``A`` (App. E)."""
PAPER_MANY_CLASSES = 200
"""Above this many items the paper divides ``lam`` by ``ln(n)`` (App. E)."""


@dataclass(frozen=True)
class RoutingParams:
    """Constants of the two formulas (``ensemble.*`` config values)."""

    formula: Formula = "code"
    smooth_weight: tuple[float, float] = (5.0, 8.0)
    too_many_class: int = 200
    paper_lambda: float = 0.2


def nearest_fine(features: torch.Tensor, fine_centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest fine centre of every row (L2, not squared).

    Args:
        features: ``[n, D]`` metadata embeddings.
        fine_centers: ``[K, D]`` fine cluster centres.

    Returns:
        ``(dist [n] float32, index [n] long)``.
    """
    if features.shape[1] != fine_centers.shape[1]:
        raise ValueError(
            f"routing: metadata features are {features.shape[1]}-d but the fine centres are "
            f"{fine_centers.shape[1]}-d (embedded with another text model?)"
        )
    dist = torch.cdist(features.float()[None], fine_centers.float()[None])[0]
    d, idx = dist.min(dim=1)
    return d, idx


def code_item_scores(
    dist: torch.Tensor, n: torch.Tensor, smooth_weight: tuple[float, float], too_many_class: int
) -> torch.Tensor:
    """Per-item contributions ``exp(alpha(n) * (beta(n) - d))`` of MoDE's code formula."""
    n = n.double()
    alpha = smooth_weight[0] * torch.log10(torch.clamp(n - too_many_class, min=10.0))
    beta = torch.where(n < 10, torch.exp(0.5 - torch.sqrt(n)), torch.zeros_like(n))
    return torch.exp(alpha * (beta - dist.double()))


def paper_item_scores(dist: torch.Tensor, n: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-item similarities ``A_l`` of the paper's formula (nearest centre only)."""
    n = n.double()
    lam_eff = torch.where(n > PAPER_MANY_CLASSES, lam / torch.log(n), torch.full_like(n, lam))
    a = torch.exp(-dist.double() ** 2 / lam_eff)
    soften = torch.where(n < PAPER_FEW_CLASSES, torch.exp(0.5 - torch.sqrt(n)), torch.ones_like(n))
    return a * soften


def grouped_weights(
    dist: torch.Tensor,
    expert: torch.Tensor,
    num_experts: int,
    params: RoutingParams,
    group: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> torch.Tensor:
    """Expert weights of every group of metadata items.

    Args:
        dist: ``[M]`` distance of each item to its nearest fine centre.
        expert: ``[M]`` the coarse expert of that centre (the item's vote).
        num_experts: number of experts ``E``.
        params: formula and constants.
        group: ``[M]`` group id of each item (default: all in group 0).
        num_groups: number of groups ``G`` (default ``group.max() + 1``).

    Returns:
        float64 ``[G, E]`` weights, each row summing to 1. An expert without votes keeps a score
        of 0 before the softmax, so it still gets a non-zero weight (as in MoDE).
    """
    if params.formula not in FORMULAS:
        raise ValueError(f"ensemble.routing: {params.formula!r} is not one of {list(FORMULAS)}")
    if group is None:
        group = torch.zeros(len(dist), dtype=torch.long)
    groups = int(num_groups if num_groups is not None else (int(group.max()) + 1 if len(group) else 0))
    n = torch.bincount(group, minlength=groups)[group]
    if params.formula == "code":
        items = code_item_scores(dist, n, params.smooth_weight, params.too_many_class)
        temperature = params.smooth_weight[1]
    else:
        items = paper_item_scores(dist, n, params.paper_lambda)
        temperature = 1.0
    scores = torch.zeros(groups, num_experts, dtype=torch.float64)
    scores.index_put_((group, expert.long()), items, accumulate=True)
    return torch.softmax(scores / temperature, dim=1)


def task_weights(
    dist: torch.Tensor, expert: torch.Tensor, num_experts: int, params: RoutingParams
) -> torch.Tensor:
    """Weights ``[E]`` of one task whose metadata set is every item (e.g. its class names)."""
    return grouped_weights(dist, expert, num_experts, params, num_groups=1)[0]


@dataclass(frozen=True)
class Centers:
    """What routing needs from the cluster stage."""

    fine: torch.Tensor
    """``[K, D]`` fine centres."""
    fine_to_coarse: torch.Tensor
    """``[K]`` expert of every fine centre."""
    num_experts: int


@dataclass
class Routing:
    """Where a metadata set was routed."""

    weights: torch.Tensor
    """``[G, E]`` float64."""
    dist: torch.Tensor
    """``[M]`` distance of each item to its nearest fine centre."""
    fine: torch.Tensor
    """``[M]`` index of that centre."""
    expert: torch.Tensor
    """``[M]`` the expert each item voted for."""


def route(
    features: torch.Tensor,
    fine_centers: torch.Tensor,
    fine_to_coarse: torch.Tensor,
    params: RoutingParams,
    group: torch.Tensor | None = None,
    num_groups: int | None = None,
    num_experts: int | None = None,
) -> Routing:
    """Nearest fine centre of every item, its vote, and the weights of every group.

    Args:
        features: ``[M, D]`` metadata embeddings (same text model as the caption features).
        fine_centers: ``[K, D]``.
        fine_to_coarse: ``[K]`` expert of every fine centre.
        params: formula and constants.
        group: ``[M]`` group of each item (default: one group).
        num_groups: number of groups.
        num_experts: number of experts (default ``fine_to_coarse.max() + 1``).
    """
    num_experts = num_experts if num_experts is not None else int(fine_to_coarse.max()) + 1
    dist, fine = nearest_fine(features, fine_centers)
    expert = fine_to_coarse.long()[fine]
    weights = grouped_weights(dist, expert, num_experts, params, group, num_groups if group is not None else 1)
    return Routing(weights, dist, fine, expert)


def entropy_bits(weights: torch.Tensor) -> float:
    """Entropy of one weight vector in bits (0 = one expert, log2(E) = uniform)."""
    w = weights.double().clamp_min(1e-300)
    return float(-(w * torch.log2(w)).sum())


def uniform_entropy_bits(num_experts: int) -> float:
    """Entropy of uniform weights over ``num_experts`` experts."""
    return math.log2(num_experts) if num_experts > 0 else 0.0
