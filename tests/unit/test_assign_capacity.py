"""Capacity-aware assignment and the choice behind ``backend="auto"``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages import clustering as kmeans
from stages.clustering import faiss_backend, nearest


def _skewed(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(6, dim, generator=gen) * 3
    comp = torch.multinomial(torch.tensor([20.0, 5, 2, 1, 1, 1]), n, replacement=True, generator=gen)
    return means[comp] + torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("slack", [0.0, 0.1, 0.3])
def test_capacity_sizes_within_fit_bounds_and_every_row_once(metric, slack):
    x = _skewed(1003, 8)
    centers = x[torch.randperm(1003, generator=torch.Generator().manual_seed(1))[:16]]
    ids, dist = kmeans.assign_capacity(x, centers, metric=metric, balance_slack=slack, chunk_size=100)
    assert ids.shape == (1003,) and dist.shape == (1003,)
    assert ids.min() >= 0 and ids.max() < 16
    low, high = kmeans.balanced_bounds(1003, 16, slack)
    sizes = torch.bincount(ids, minlength=16)
    assert int(sizes.sum()) == 1003
    assert low <= int(sizes.min()) and int(sizes.max()) <= high
    # nearest assignment on this skewed data is far outside the bounds
    near, near_dist = kmeans.assign_nearest(x, centers, metric=metric)
    assert int(torch.bincount(near, minlength=16).max()) > high
    # distances are reported like assign_nearest's, and never better than the nearest
    xp = F.normalize(x, dim=1) if metric == "cosine" else x
    cp = F.normalize(centers, dim=1) if metric == "cosine" else centers
    expect = (1 - (xp * cp[ids]).sum(1)) if metric == "cosine" else (xp - cp[ids]).norm(dim=1)
    # (expanded-form squared distances: about 1e-5 * ||x||^2 absolute error before the sqrt)
    torch.testing.assert_close(dist, expect, rtol=1e-3, atol=1e-2)
    assert (dist >= near_dist - 1e-2).all()


def test_capacity_is_deterministic_and_empty_input():
    x = _skewed(500, 4)
    c = x[:10].clone()
    a = kmeans.assign_capacity(x, c)
    b = kmeans.assign_capacity(x, c)
    assert torch.equal(a[0], b[0])
    ids, dist = kmeans.assign_capacity(x[:0], c)
    assert ids.numel() == 0 and dist.numel() == 0


def test_auto_backend_is_faiss_on_cpu_and_torch_on_gpu(monkeypatch):
    assert kmeans.auto_backend("cuda") == "torch"
    assert kmeans.auto_backend(torch.device("cuda", 1)) == "torch"
    if faiss_backend.available():
        assert kmeans.auto_backend("cpu") == "faiss"
    monkeypatch.setattr(faiss_backend, "faiss", None)
    assert kmeans.auto_backend("cpu") == "torch"


def test_assign_nearest_auto_dispatches_on_the_choice(monkeypatch):
    calls = []
    monkeypatch.setattr(faiss_backend, "assign_faiss", lambda *a: calls.append("faiss") or (None, None))
    monkeypatch.setattr(nearest, "assign_torch", lambda *a: calls.append("torch") or (None, None))
    x, c = torch.randn(10, 4), torch.randn(3, 4)
    monkeypatch.setattr(nearest, "auto_backend", lambda device: "faiss")
    kmeans.assign_nearest(x, c, backend="auto")
    monkeypatch.setattr(nearest, "auto_backend", lambda device: "torch")
    kmeans.assign_nearest(x, c, backend="auto")
    assert calls == ["faiss", "torch"]
