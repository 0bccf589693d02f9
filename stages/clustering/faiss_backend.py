"""faiss backend: the ``faiss.Kmeans`` baseline and exact nearest-centre search with faiss.

faiss is optional (``pip install faiss-cpu``): the torch code covers every operation, and
``available()`` says whether this module can be used.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from stages.clustering.common import KMeansResult, check_positive, prepare, to_numpy

try:
    import faiss
except ImportError:  # optional dependency
    faiss = None


def available() -> bool:
    """Whether faiss is installed."""
    return faiss is not None


def require_faiss() -> None:
    """Raises ``ImportError`` with the install hint when faiss is missing."""
    if faiss is None:
        raise ImportError("faiss is not installed (pip install faiss-cpu)")


def fit_faiss_kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = False,
    gpu: bool = False,
    max_points_per_centroid: int | None = None,
) -> KMeansResult:
    """Unbalanced baseline: ``faiss.Kmeans`` (random init, up to ``niter`` Lloyd iterations).

    Args:
        x: Float tensor ``[N, D]``.
        num_clusters: Number of clusters K.
        niter: Maximum Lloyd iterations; faiss stops early once the objective stops changing,
            which is reported as ``converged``.
        seed: faiss seed.
        spherical: Normalise centroids after each update (pass normalised points for cosine).
        gpu: Use the faiss GPU build when it is installed and sees a GPU (warns otherwise).
        max_points_per_centroid: faiss subsamples above ``K * this``; default None trains on
            every point.

    Returns:
        A ``KMeansResult`` whose labels, sizes and inertia come from an exact search of the
        sample against the centroids; ``history`` holds faiss's per-iteration objective, with
        NaN for ``shift``, ``max_size`` and ``min_size``, which faiss does not report.

    Raises:
        ImportError: If faiss is not installed.
        ValueError: On invalid sizes.
    """
    require_faiss()
    check_positive("num_clusters", num_clusters)
    check_positive("niter", niter)
    data = to_numpy(x)
    num_points, dim = data.shape
    if num_points < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {num_points} sample points")
    use_gpu = gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if gpu and not use_gpu:
        warnings.warn("fit_faiss_kmeans: gpu=True but faiss sees no GPU; running on CPU", stacklevel=2)
    kmeans = faiss.Kmeans(
        dim, num_clusters, niter=niter, seed=seed, spherical=spherical, gpu=use_gpu, verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max_points_per_centroid or num_points // num_clusters + 1,
    )
    kmeans.train(data)
    sq_dist, ids = kmeans.index.search(data, 1)
    labels = torch.from_numpy(ids[:, 0].astype(np.int64))
    history = _faiss_history(kmeans)
    return KMeansResult(
        centers=torch.from_numpy(np.array(kmeans.centroids, dtype=np.float32)),
        labels=labels,
        inertia=float(sq_dist.astype(np.float64).sum()),
        n_iter=len(history),
        converged=len(history) < niter,
        sizes=torch.bincount(labels, minlength=num_clusters),
        history=history,
    )


def _faiss_history(kmeans) -> list[dict]:
    nan = math.nan
    return [
        {"iter": i + 1, "inertia": float(s["obj"]), "shift": nan, "max_size": nan, "min_size": nan}
        for i, s in enumerate(kmeans.iteration_stats)
    ]


def flat_index(centers: np.ndarray, inner_product: bool = False):
    """Exact ``IndexFlatL2`` (or ``IndexFlatIP``) holding ``centers`` (float32 ``[K, D]``)."""
    require_faiss()
    index = (faiss.IndexFlatIP if inner_product else faiss.IndexFlatL2)(centers.shape[1])
    index.add(np.ascontiguousarray(centers, dtype=np.float32))
    return index


def assign_faiss(
    x: torch.Tensor, centers: torch.Tensor, metric: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre with one exact faiss index; ``(ids int64, distances float32)`` on CPU.

    Float32 CPU rows go to faiss as they are (a view, no copy) for euclidean; the index is
    built once per call. Distances: L2 (euclidean) or ``1 - cos`` (cosine).
    """
    cpu = torch.device("cpu")
    index = flat_index(to_numpy(prepare(centers, metric, cpu)), inner_product=metric == "cosine")
    n = x.shape[0]
    ids = np.empty((n, 1), dtype=np.int64)
    scores = np.empty((n, 1), dtype=np.float32)
    for start in range(0, n, chunk_size):
        rows = to_numpy(prepare(x[start : start + chunk_size], metric, cpu))
        stop = start + rows.shape[0]
        index.search(rows, 1, D=scores[start:stop], I=ids[start:stop])
    scores = scores[:, 0]
    # numpy: single-threaded element-wise ops, no OpenMP hand-off for a vector this small.
    dist = 1.0 - scores if metric == "cosine" else np.sqrt(np.maximum(scores, 0, out=scores), out=scores)
    return torch.from_numpy(ids[:, 0]), torch.from_numpy(dist)
