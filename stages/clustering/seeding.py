"""Seeding of the k-means fit: a uniform sample, the sample's variance and k-means++ on it."""

from __future__ import annotations

import math

import torch

from stages.clustering.common import Setup, one_cpu_thread, prepare, row_sq_norms, subchunks


def sample_pass(
    x: torch.Tensor, sample_size: int, gen: torch.Generator, setup: Setup
) -> tuple[torch.Tensor, int, float]:
    """A uniform sample of prepared rows (those with the smallest random keys), N and variance.

    The sample is sorted by key, so any prefix of it is itself a uniform random sample. The
    variance is the mean squared distance of the (prepared) rows to their mean.
    """
    if x.shape[0] == 0:
        raise ValueError("x has no points")
    keys = torch.rand(x.shape[0], generator=gen)
    picked = keys.topk(min(sample_size, keys.numel()), largest=False, sorted=True).indices
    sample = prepare(x[picked.to(x.device)], setup.metric, torch.device("cpu"))
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=setup.device)
    total_sq = 0.0
    for _, xc in subchunks(x, setup):
        total += xc.sum(0, dtype=torch.float64)
        total_sq += row_sq_norms(xc).sum(dtype=torch.float64).item()
    count = x.shape[0]
    variance = total_sq / count - (total / count).pow(2).sum().item()
    return sample, count, variance


def initial_centers(sample: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    """``k`` starting centres from the sample: its first ``k`` rows, or k-means++."""
    if init == "random":
        return sample[:k].clone()
    with one_cpu_thread():
        return kmeans_plus_plus(sample, k, gen)


def kmeans_plus_plus(sample: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy D^2 seeding on the CPU sample; loops over centres only, never over points.

    As in scikit-learn, each step draws ``2 + ln(k)`` candidates with probability proportional
    to squared distance and keeps the one that most lowers the total, which avoids the poor
    local optima plain k-means++ often lands in.
    """
    sq_norms = sample.pow(2).sum(1)
    num_trials = 2 + int(math.log(k))
    chosen = torch.empty(k, dtype=torch.int64)
    chosen[0] = torch.randint(sample.shape[0], (1,), generator=gen)
    closest = _sq_dist_to(sample, sq_norms, chosen[:1])[:, 0]
    for j in range(1, k):
        weights = closest.double()
        # Only when every point coincides with a chosen centre; duplicates are re-seeded later.
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        trials = torch.multinomial(weights, num_trials, replacement=True, generator=gen)
        trial_closest = torch.minimum(closest[:, None], _sq_dist_to(sample, sq_norms, trials))
        best = int(trial_closest.sum(0).argmin())
        chosen[j] = trials[best]
        closest = trial_closest[:, best]
    return sample[chosen].clone()


def _sq_dist_to(sample: torch.Tensor, sq_norms: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[M, len(ids)]`` from every sample row to the rows ``ids``."""
    centers = sample[ids]
    partial = torch.addmm(sq_norms[ids], sample, centers.T, alpha=-2.0)
    return partial.add_(sq_norms[:, None]).clamp_(min=0)
