"""Coarse step: group fine clusters into experts by k-means on the fine centres (MoDE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.clustering.common import check_positive, prepare
from stages.clustering.lloyd import fit_kmeans


def coarse_cluster(
    fine_centers: torch.Tensor,
    num_experts: int,
    *,
    balanced: bool = False,
    metric: str = "euclidean",
    seed: int = 0,
    max_iter: int = 100,
    balance_slack: float = 0.1,
    n_init: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group fine clusters into experts by k-means on the fine centres (MoDE's coarse step).

    The fit is restarted ``n_init`` times (seeds ``seed .. seed + n_init - 1``) and the lowest
    inertia kept: with only K points this costs little and avoids poor local optima (MoDE ran
    a single fit). Lloyd runs with ``tol=0``, i.e. to a fixed point. Unbalanced, the map is
    each fine centre's nearest coarse centre (MoDE's greedy ``predict``); balanced, it is the
    balanced labels, so each expert's number of fine clusters lies within
    ``balanced_bounds(K, num_experts, balance_slack)``. Coarse centres are always recomputed as
    the mean of their fine centres (re-normalised for cosine), so they match the map; when the
    fit converged, the unbalanced map is also the argmin to the returned centres. MoDE itself
    fits balanced and maps greedily, which leaves centres and map inconsistent;
    ``balanced=False`` is its consistent version.

    Args:
        fine_centers: Fine centres ``[K, D]``.
        num_experts: Number of coarse clusters E.
        balanced: Balanced k-means and balanced map instead of plain k-means and nearest map.
        metric: ``"euclidean"`` (MoDE default) or ``"cosine"``.
        seed: Seed for the fit.
        max_iter: Maximum Lloyd iterations (MoDE: 100).
        balance_slack: Slack of the balanced assignment.
        n_init: Number of restarts; the fit with the lowest inertia is kept.

    Returns:
        ``(coarse_centers [E, D] float32, fine_to_coarse int64 [K])`` on CPU. An expert left
        with no fine cluster keeps its fitted centre.
    """
    check_positive("n_init", n_init)
    fits = [
        fit_kmeans(fine_centers, num_experts, balanced=balanced, metric=metric, max_iter=max_iter,
                   tol=0.0, seed=seed + i, chunk_size=max(1, fine_centers.shape[0]),
                   balance_slack=balance_slack)
        for i in range(n_init)
    ]
    result = min(fits, key=lambda r: r.inertia)
    points = prepare(fine_centers, metric, torch.device("cpu"))
    sums = torch.zeros_like(result.centers).index_add_(0, result.labels, points)
    counts = torch.bincount(result.labels, minlength=num_experts)
    mean = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
    coarse = torch.where((counts > 0)[:, None], mean, result.centers)
    return (F.normalize(coarse, dim=1) if metric == "cosine" else coarse), result.labels
