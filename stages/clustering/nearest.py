"""Exact nearest-centre assignment (MoDE's greedy inference), with a torch or a faiss backend."""

from __future__ import annotations

import torch

from stages.clustering import faiss_backend
from stages.clustering.common import (
    BACKENDS,
    candidates,
    check_choice,
    check_points_and_centers,
    prepare,
)


def assign_nearest(
    x: torch.Tensor,
    centers: torch.Tensor,
    *,
    metric: str = "euclidean",
    chunk_size: int = 65536,
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest-centre assignment in chunks.

    Args:
        x: Points ``[N, D]``.
        centers: Centres ``[K, D]``.
        metric: ``"euclidean"`` or ``"cosine"`` (largest dot product with normalised centres).
        chunk_size: Rows per distance block.
        backend: ``"torch"`` (chunked matmul), ``"faiss"`` (exact ``IndexFlatL2`` /
            ``IndexFlatIP``) or ``"auto"`` (``auto_backend``: faiss on CPU when installed,
            torch on a GPU device).
        device: Device for the torch backend; default ``x``'s device.

    Returns:
        ``(ids, distances)`` on CPU: int64 ``[N]`` nearest-centre ids and float32 ``[N]``
        distances, the (unsquared) L2 distance for euclidean and ``1 - cos`` for cosine.

    Raises:
        ValueError: On an invalid metric, backend, chunk size or shape.
        ImportError: If ``backend="faiss"`` and faiss is not installed.
    """
    check_choice("backend", backend, BACKENDS)
    check_points_and_centers(x, centers, metric, chunk_size)
    run_device = torch.device(device) if device is not None else x.device
    if backend == "auto":
        backend = auto_backend(run_device)
    if backend == "faiss":
        faiss_backend.require_faiss()
        return faiss_backend.assign_faiss(x, centers, metric, chunk_size)
    return assign_torch(x, centers, metric, chunk_size, run_device)


def auto_backend(device: str | torch.device) -> str:
    """What ``backend="auto"`` means on ``device``: ``"faiss"`` on CPU, ``"torch"`` elsewhere.

    Not a speed claim: on CPU, faiss is the reference exact search and paired runs put it
    level with or ahead of the torch matmul path (benchmarks/bench_cluster.py prints the ratio
    on the machine it runs on), so CPU uses it whenever it is installed; on a GPU the torch
    matmul runs where the data is (faiss-cpu cannot) and the GPU faiss build is optional.
    """
    if torch.device(device).type == "cpu" and faiss_backend.available():
        return "faiss"
    return "torch"


def assign_torch(
    x: torch.Tensor, centers: torch.Tensor, metric: str, chunk_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of ``assign_nearest``: chunked matmul on ``device``."""
    centers = prepare(centers, metric, device)
    c_sq = centers.pow(2).sum(1)
    ids, dists = [], []
    for start in range(0, x.shape[0], chunk_size):
        xc = prepare(x[start : start + chunk_size], metric, device)
        if metric == "cosine":
            best, idx = (xc @ centers.T).max(1)
            dist = 1.0 - best
        else:
            idx, sq = candidates(xc, centers, c_sq, 1)
            idx, dist = idx[:, 0], sq[:, 0].clamp_(min=0).sqrt()
        ids.append(idx.cpu())
        dists.append(dist.cpu())
    return torch.cat(ids), torch.cat(dists)
