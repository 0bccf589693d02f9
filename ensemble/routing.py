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

* ``calibrated`` (this project's default; docs/ensemble.md has the measurements)::

      D_lk     = min over the fine centres s of expert k of |e_l - c_s|^2
      p_l      = softmax_k(-D_lk / tau)                  soft vote of item l
      w        = (sum over items l of p_l + prior / E) / (n + prior)

  ``tau`` is calibrated on the run's own training captions (never on eval data): with ``m`` the
  median, over a sample of captions, of the margin between the squared distance to the second
  nearest expert and to the nearest one, ``tau = m / ln(c (E - 1) / (1 - c))``, so that a caption
  with the median margin votes with confidence at least ``c`` (``ensemble.calibrated_confidence``,
  0.9) for its own expert. ``w`` is the posterior mean of a symmetric Dirichlet prior of total mass
  ``prior`` (``ensemble.calibrated_prior``, 1) updated with the soft votes: a metadata set whose
  items all vote clearly for one expert routes most weight there (more items, more weight),
  ambiguous items split their vote, and a set of one item stays soft.

Items are grouped: one group is one routing decision (a whole classification task, one query
text, or the captions of one image), and ``n`` is the size of the item's group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Formula = Literal["code", "paper", "calibrated"]
FORMULAS: tuple[str, ...] = ("code", "paper", "calibrated")
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
    temperature: float | None = None
    """``calibrated``: the temperature ``tau`` (from :func:`calibrate_temperature`)."""
    prior: float = 1.0
    """``calibrated``: total mass of the uniform Dirichlet prior."""


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
    if params.formula not in ("code", "paper"):
        raise ValueError(f"ensemble.routing: {params.formula!r} is not code or paper here (calibrated: use route())")
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


def expert_sq_distances(
    features: torch.Tensor, fine_centers: torch.Tensor, fine_to_coarse: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """``[n, E]`` float64: squared L2 distance of every row to the nearest fine centre of each expert.

    An expert that owns no fine centre gets ``inf``.
    """
    if features.shape[1] != fine_centers.shape[1]:
        raise ValueError(
            f"routing: features are {features.shape[1]}-d but the fine centres are {fine_centers.shape[1]}-d"
        )
    d2 = torch.cdist(features.double()[None], fine_centers.double()[None])[0] ** 2
    out = torch.full((d2.shape[0], num_experts), math.inf, dtype=torch.float64)
    owner = fine_to_coarse.long()
    for k in range(num_experts):
        mine = owner == k
        if bool(mine.any()):
            out[:, k] = d2[:, mine].min(dim=1).values
    return out


def median_margin(sample_d2: torch.Tensor) -> float:
    """Median over rows of (second smallest − smallest) squared expert distance (0 without rows)."""
    if sample_d2.shape[0] == 0 or sample_d2.shape[1] < 2:
        return 0.0
    two = sample_d2.double().topk(2, dim=1, largest=False).values
    margins = (two[:, 1] - two[:, 0])[torch.isfinite(two[:, 1])]
    return float(margins.median()) if len(margins) else 0.0


def calibrate_temperature(sample_d2: torch.Tensor, confidence: float = 0.9) -> float:
    """Temperature ``tau`` of the calibrated routing from training captions' expert distances.

    Args:
        sample_d2: ``[N, E]`` squared distances of N training captions (:func:`expert_sq_distances`).
        confidence: the lower bound on the soft vote a caption with the median margin gives its
            own expert (in (1/E, 1)).

    Returns:
        ``median margin / ln(confidence * (E - 1) / (1 - confidence))`` (margin: second smallest
        minus smallest distance of a row); 1.0 for a single expert.
    """
    num_experts = sample_d2.shape[1]
    if num_experts < 2 or sample_d2.shape[0] == 0:
        return 1.0
    if not 1.0 / num_experts < confidence < 1.0:
        raise ValueError(f"ensemble.calibrated_confidence: {confidence} not in (1/E, 1) = ({1 / num_experts:.3f}, 1)")
    return max(median_margin(sample_d2), 1e-12) / math.log(confidence * (num_experts - 1) / (1.0 - confidence))


def calibrated_weights(
    d2: torch.Tensor,
    temperature: float,
    prior: float = 1.0,
    group: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> torch.Tensor:
    """Weights ``[G, E]`` of the calibrated routing (pure; see the module docstring).

    Args:
        d2: ``[M, E]`` squared distance of each metadata item to each expert's nearest fine centre.
        temperature: ``tau`` from :func:`calibrate_temperature`.
        prior: total mass of the uniform Dirichlet prior (> 0).
        group: ``[M]`` group of each item (default: one group).
        num_groups: number of groups.
    """
    if temperature <= 0:
        raise ValueError(f"routing: calibrated temperature must be > 0, got {temperature}")
    if group is None:
        group = torch.zeros(d2.shape[0], dtype=torch.long)
    groups = int(num_groups if num_groups is not None else (int(group.max()) + 1 if len(group) else 0))
    num_experts = d2.shape[1]
    votes = torch.softmax(-d2.double() / temperature, dim=1)
    sums = torch.zeros(groups, num_experts, dtype=torch.float64).index_add_(0, group, votes)
    counts = torch.bincount(group, minlength=groups).double()[:, None]
    return (sums + prior / num_experts) / (counts + prior)


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
    temperature: float | None = None
    """Temperature of the ``calibrated`` routing, fitted on the run's training captions."""


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
    groups = num_groups if group is not None else 1
    if params.formula == "calibrated":
        if params.temperature is None:
            raise ValueError("routing: the calibrated formula needs a temperature (calibrate_temperature)")
        d2 = expert_sq_distances(features, fine_centers, fine_to_coarse, num_experts)
        weights = calibrated_weights(d2, params.temperature, params.prior, group, groups)
    else:
        weights = grouped_weights(dist, expert, num_experts, params, group, groups)
    return Routing(weights, dist, fine, expert)


def _entropy_rows(rows: torch.Tensor) -> torch.Tensor:
    p = rows.double().clamp_min(1e-300)
    return -(p * torch.log2(p)).sum(dim=-1)


def entropy_bits(weights: torch.Tensor) -> float:
    """Entropy of one weight vector in bits (0 = one expert, log2(E) = uniform)."""
    return float(_entropy_rows(weights))


def mean_entropy_bits(weights: dict[str, torch.Tensor]) -> float:
    """Mean entropy (bits) over every weight vector of a task's weights dict."""
    rows = torch.cat([w.double().reshape(-1, w.shape[-1]) for w in weights.values()])
    return float(_entropy_rows(rows).mean())
