"""Unit tests for ``stages.clustering``: every check compares against brute force or a known truth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from stages.clustering import (
    assign_nearest,
    balanced_bounds,
    coarse_cluster,
    fit_faiss_kmeans,
    fit_kmeans,
)
from stages.clustering.faiss_backend import available as faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def blobs(sizes: list[int], dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Well separated unit-scale Gaussian blobs, shuffled: (points [N, D], true labels [N])."""
    gen = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(len(sizes), dim, generator=gen), dim=1) * 3.0
    truth = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = means[truth] + spread * torch.randn(len(truth), dim, generator=gen)
    order = torch.randperm(len(truth), generator=gen)
    return x[order], truth[order]


def ari(a: torch.Tensor, b: torch.Tensor) -> float:
    return adjusted_rand_score(a.numpy(), b.numpy())


def brute_inertia(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> float:
    return float((x.double() - centers.double()[labels]).pow(2).sum())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("balanced", [True, False])
def test_blobs_are_recovered(balanced: bool, metric: str) -> None:
    x, truth = blobs([150] * 6)
    result = fit_kmeans(x, 6, balanced=balanced, metric=metric, chunk_size=128, seed=1)
    assert ari(result.labels, truth) >= 0.95
    assert torch.equal(result.sizes, torch.bincount(result.labels, minlength=6))
    points = F.normalize(x, dim=1) if metric == "cosine" else x
    assert result.inertia == pytest.approx(brute_inertia(points, result.centers, result.labels), rel=1e-4)
    assert result.converged and result.n_iter == len(result.history)
    if metric == "cosine":
        assert torch.allclose(result.centers.norm(dim=1), torch.ones(6), atol=1e-5)


@pytest.mark.parametrize("slack", [0.0, 0.1, 0.3])
def test_balance_bounds_hold_on_skewed_blobs(slack: float) -> None:
    x, _ = blobs([700, 250, 120, 60, 40, 20, 10])
    k = 12
    result = fit_kmeans(x, k, balanced=True, balance_slack=slack, chunk_size=97, seed=3)
    low, high = balanced_bounds(x.shape[0], k, slack)
    assert low <= int(result.sizes.min()) and int(result.sizes.max()) <= high
    assert torch.equal(result.sizes, torch.bincount(result.labels, minlength=k))
    # The plain fit on the same data is far from balanced, so the bound is doing the work.
    plain = fit_kmeans(x, k, balanced=False, seed=3)
    assert int(plain.sizes.max()) > high


def test_balanced_bounds_values() -> None:
    assert balanced_bounds(1000, 10, 0.1) == (90, 110)
    assert balanced_bounds(1001, 10, 0.0) == (100, 101)
    assert balanced_bounds(5, 10, 0.05) == (0, 1)


def test_balanced_labels_are_nearest_when_bounds_allow() -> None:
    """With slack this large the greedy is unconstrained and must match plain nearest."""
    x, _ = blobs([100, 100, 100], spread=1.0, seed=5)
    result = fit_kmeans(x, 7, balanced=True, balance_slack=10.0, max_iter=2, seed=0)
    ids, _ = assign_nearest(x, result.centers, backend="torch")
    assert torch.equal(result.labels, ids)


@pytest.mark.parametrize("balanced", [True, False])
def test_same_seed_is_bit_identical(balanced: bool) -> None:
    x, _ = blobs([300, 200, 100, 50], spread=0.8, seed=2)
    first = fit_kmeans(x, 9, balanced=balanced, chunk_size=100, max_iter=8, seed=7)
    second = fit_kmeans(x, 9, balanced=balanced, chunk_size=100, max_iter=8, seed=7)
    other = fit_kmeans(x, 9, balanced=balanced, chunk_size=100, max_iter=8, seed=8)
    assert torch.equal(first.centers, second.centers)
    assert torch.equal(first.labels, second.labels)
    assert first.history == second.history
    assert not torch.equal(first.centers, other.centers)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss), "auto"])
def test_assign_nearest_matches_brute_force(backend: str, metric: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(777, 24, generator=gen)
    centers = torch.randn(37, 24, generator=gen)
    ids, dist = assign_nearest(x, centers, metric=metric, chunk_size=100, backend=backend)
    if metric == "euclidean":
        full = torch.cdist(x.double(), centers.double())
    else:
        full = 1.0 - F.normalize(x.double(), dim=1) @ F.normalize(centers.double(), dim=1).T
    best, expected = full.min(1)
    assert ids.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(ids, expected)
    assert torch.allclose(dist.double(), best, atol=1e-4)


def test_small_chunks_give_the_same_clustering() -> None:
    x, _ = blobs([200, 150, 100, 50], spread=0.5, seed=6)
    whole = fit_kmeans(x, 6, balanced=True, seed=2, max_iter=15, chunk_size=10_000)
    small = fit_kmeans(x, 6, balanced=True, seed=2, max_iter=15, chunk_size=33)
    assert ari(whole.labels, small.labels) == 1.0
    assert torch.allclose(whole.centers, small.centers, atol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_coarse_map_is_nearest_and_centres_are_group_means(metric: str) -> None:
    x, _ = blobs([60] * 4, spread=0.3, seed=8)
    fine = fit_kmeans(x, 24, balanced=True, seed=0).centers
    coarse, fine_to_coarse = coarse_cluster(fine, 4, balanced=False, metric=metric, seed=0)
    points = F.normalize(fine, dim=1) if metric == "cosine" else fine
    nearest = torch.cdist(points.double(), coarse.double()).argmin(1)
    assert torch.equal(fine_to_coarse, nearest)
    _assert_group_means(points, coarse, fine_to_coarse, metric)


def test_balanced_coarse_map_respects_bounds() -> None:
    x, _ = blobs([300, 60, 30, 30], spread=0.3, seed=9)
    fine = fit_kmeans(x, 30, balanced=False, seed=0).centers
    coarse, fine_to_coarse = coarse_cluster(fine, 4, balanced=True, balance_slack=0.0, seed=0)
    sizes = torch.bincount(fine_to_coarse, minlength=4)
    low, high = balanced_bounds(30, 4, 0.0)
    assert low <= int(sizes.min()) and int(sizes.max()) <= high
    _assert_group_means(fine, coarse, fine_to_coarse, "euclidean")


def _assert_group_means(points, coarse, mapping, metric) -> None:
    for e in range(coarse.shape[0]):
        mean = points[mapping == e].mean(0)
        mean = F.normalize(mean, dim=0) if metric == "cosine" else mean
        assert torch.allclose(coarse[e], mean, atol=1e-5)


@needs_faiss
def test_faiss_baseline_recovers_blobs_and_reports_exact_inertia() -> None:
    x, truth = blobs([150] * 4, seed=10)
    result = fit_faiss_kmeans(x, 4, niter=20, seed=1)
    assert ari(result.labels, truth) >= 0.95
    assert result.inertia == pytest.approx(brute_inertia(x, result.centers, result.labels), rel=1e-4)
    assert result.n_iter == len(result.history) <= 20
    assert torch.equal(result.sizes, torch.bincount(result.labels, minlength=4))


def test_duplicate_points_do_not_break_the_fit() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(50, 1)
    for balanced in (False, True):
        result = fit_kmeans(x, 3, balanced=balanced, seed=0, init="random")
        assert torch.isfinite(result.centers).all()
        assert int(result.sizes.sum()) == 100
        assert result.inertia == pytest.approx(brute_inertia(x, result.centers, result.labels), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "manhattan"}, "metric"),
        ({"init": "zeros"}, "init"),
        ({"balance_slack": -0.1}, "balance_slack"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_kmeans(torch.randn(20, 3), 2, **kwargs)


def test_too_many_clusters_and_dim_mismatch_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_clusters=30"):
        fit_kmeans(torch.randn(20, 3), 30)
    with pytest.raises(ValueError, match="dim"):
        assign_nearest(torch.randn(5, 3), torch.randn(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fit_matches_cpu_clustering() -> None:
    x, truth = blobs([200] * 5, seed=11)
    result = fit_kmeans(x, 5, device="cuda", seed=0)
    assert result.centers.device.type == "cpu"
    assert ari(result.labels, truth) == 1.0
