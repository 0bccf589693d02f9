"""Clustering math for MoDE-style data experts: balanced k-means, coarse grouping, assignment.

A pure library (torch, numpy, optional faiss); the ``cluster`` and ``assign`` stages wrap it.

Conventions:

* Distances are computed chunk by chunk as ``||x||^2 - 2 x c^T + ||c||^2`` in fp32, so memory is
  bounded by ``chunk_size x K`` floats and no ``N x K x D`` tensor is ever built.
* ``metric="cosine"`` is spherical k-means: points and centres are L2-normalised, assignment is by
  largest dot product and centres are re-normalised after each update. Internally it runs the
  euclidean code on the normalised vectors, because ``||x - c||^2 = 2 - 2 cos(x, c)`` there.
* All randomness comes from one CPU ``torch.Generator`` seeded with ``seed``: on CPU the same
  data, chunking and seed give bit-identical centres and labels.
* A sample is either a float tensor ``[N, D]`` (a CPU tensor is moved to ``device`` one chunk at
  a time, so it may exceed device memory) or a callable returning a fresh iterator of
  ``[n_i, D]`` chunks (streaming, for samples too large for host memory); every pass over the
  sample calls it once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import faiss
except ImportError:  # faiss is optional: the torch backend covers every operation.
    faiss = None

METRICS = ("euclidean", "cosine")
INITS = ("kmeans++", "random")
BACKENDS = ("auto", "torch", "faiss")

# Nearest clusters kept per point for the balanced assignment. Points whose candidates are all
# full get fresh candidates among the clusters with room, so this only trades speed for passes.
_NUM_CANDIDATES = 8

ChunkSource = Callable[[], Iterable[torch.Tensor]]


@dataclass
class KMeansResult:
    """Outcome of a k-means fit.

    Attributes:
        centers: ``[K, D]`` float32 centres on CPU (unit norm for ``metric="cosine"``).
        labels: ``[N]`` int64 labels of the fit sample under the final centres (the balanced
            labels when balanced); empty in streaming mode, where the sample is never held.
        inertia: Sum over the sample of the squared euclidean distance to the assigned centre
            under the final labels (for cosine, between the normalised point and its centre,
            i.e. ``2 * (1 - cos)``).
        n_iter: Number of centre updates performed.
        converged: Whether the relative centre shift fell to ``tol`` before ``max_iter``.
        sizes: ``[K]`` int64 cluster sizes under the final labels.
        history: One dict per iteration with ``iter``, ``inertia`` (of that iteration's
            assignment), ``shift`` (relative centre shift of its update), ``max_size`` and
            ``min_size``.
    """

    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    converged: bool
    sizes: torch.Tensor
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Setup:
    metric: str
    device: torch.device
    chunk_size: int
    balanced: bool
    balance_slack: float


@dataclass
class _PassStats:
    sums: torch.Tensor
    counts: torch.Tensor
    inertia: float = 0.0
    labels: list[torch.Tensor] = field(default_factory=list)
    far_sq: torch.Tensor | None = None
    far_x: torch.Tensor | None = None


def balanced_bounds(num_points: int, num_clusters: int, balance_slack: float) -> tuple[int, int]:
    """Cluster size bounds of the balanced assignment.

    Args:
        num_points: Points assigned together (the whole sample, or one streamed chunk).
        num_clusters: Number of clusters K.
        balance_slack: Allowed relative deviation from the mean size N / K.

    Returns:
        ``(floor(N / K * (1 - slack)), ceil(N / K * (1 + slack)))``, clipped to ``>= 0``; the
        upper bound is at least ``ceil(N / K)`` and the lower at most ``floor(N / K)``, so a
        feasible assignment always exists.
    """
    mean = num_points / num_clusters
    # Rounding first keeps e.g. 1000 / 10 * 1.1 = 110.00000000000001 from becoming 111.
    low = math.floor(round(mean * (1.0 - balance_slack), 9))
    high = math.ceil(round(mean * (1.0 + balance_slack), 9))
    return max(0, min(low, num_points // num_clusters)), max(high, -(-num_points // num_clusters))


def fit_kmeans(
    x: torch.Tensor | ChunkSource,
    num_clusters: int,
    *,
    balanced: bool = True,
    metric: str = "euclidean",
    init: str = "kmeans++",
    max_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    chunk_size: int = 65536,
    balance_slack: float = 0.1,
    init_sample_size: int | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Lloyd's k-means, optionally with size-balanced assignments, on CPU or GPU.

    Each iteration makes one pass over the sample, assigning points in chunks and accumulating
    running per-cluster sums and counts, then sets every centre to the mean of its points. A
    final pass assigns the sample to the final centres to produce ``labels``, ``sizes`` and
    ``inertia``. Empty clusters are re-seeded from far points (the K points farthest from their
    centre in that pass, drawn with probability proportional to squared distance, seeded).

    Balanced assignment is a two-sided capacity-constrained greedy (``balanced_bounds`` gives
    ``low = floor(N / K * (1 - slack))`` and ``high = ceil(N / K * (1 + slack))``). Each point
    keeps its few nearest clusters as candidates. Phase one fills every cluster to exactly
    ``low``: in rounds, every unplaced point proposes to its nearest candidate with room, and a
    cluster with more proposers than room admits those with the largest regret (the extra cost
    of their next choice); the rest propose again, and points whose candidates all fill up get
    new candidates among the clusters with room. Phase two places the remaining points the same
    way with ``high - low`` more room per cluster. In memory the bounds are global, which
    **guarantees low <= every cluster size <= high = ceil(N / K * (1 + balance_slack))**, so
    ``max / min <= (1 + slack) / (1 - slack)`` up to rounding. In streaming mode the bounds
    apply per chunk, with ``n_i`` in place of N: sizes lie between the sums over chunks of the
    chunk bounds, which differ from the global ones by at most one per chunk. Per-chunk bounds
    also force each chunk to be balanced on its own, so streamed chunks should hold many points
    per cluster (chunk-to-chunk fluctuations of the natural cluster sizes bend the labels).

    Args:
        x: Float tensor ``[N, D]``, or a callable returning a fresh iterable of ``[n, D]``
            chunks. Streaming mode never holds the sample, so ``labels`` comes back empty.
        num_clusters: Number of clusters K (at most N).
        balanced: Use the capacity-constrained assignment instead of plain nearest centre.
        metric: ``"euclidean"`` or ``"cosine"`` (spherical k-means).
        init: ``"kmeans++"`` (D^2 seeding on a uniform sample) or ``"random"`` (K distinct
            points of that sample).
        max_iter: Maximum number of Lloyd iterations.
        tol: Stop when the mean squared centre shift divided by the sample's total variance
            (mean squared distance to its mean) is at most ``tol``; 0 runs to a fixed point.
        seed: Seed for the sample, the seeding and empty-cluster re-seeding.
        device: Where distances and sums are computed (e.g. ``"cuda"``); results return on CPU.
        chunk_size: Rows per distance block; peak memory is about ``chunk_size * K`` floats,
            plus, when balanced, 8 candidate ids and distances (96 bytes) per point of a block.
        balance_slack: Relative deviation from N / K allowed either way when balanced (>= 0).
        init_sample_size: Size of the uniform sample used for seeding; default
            ``max(8 * K, 4096)`` capped at N. It is drawn by random keys over a full pass, so
            streamed chunks need no shuffling.
        progress: Show a tqdm bar over iterations.

    Returns:
        The fitted ``KMeansResult``.

    Raises:
        ValueError: On an invalid argument or a sample with fewer than K points.
    """
    _check_fit_args(num_clusters, metric, init, max_iter, tol, chunk_size, balance_slack)
    setup = _Setup(metric, torch.device(device), chunk_size, balanced, balance_slack)
    blocks, in_memory = _block_source(x)
    gen = torch.Generator().manual_seed(seed)
    sample_size = init_sample_size or max(8 * num_clusters, 4096)
    sample, num_points, variance = _sample_pass(blocks, max(sample_size, num_clusters), gen, setup)
    if num_points < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {num_points} sample points")
    centers = _initial_centers(sample, num_clusters, init, gen).to(setup.device)
    history: list[dict] = []
    converged = False
    bar = tqdm(range(1, max_iter + 1), desc="kmeans", disable=not progress)
    for it in bar:
        stats = _lloyd_pass(blocks, centers, setup, keep_labels=False)
        new_centers = _updated_centers(stats, gen, setup)
        shift = (new_centers - centers).pow(2).sum(1).mean().item() / max(variance, 1e-30)
        history.append(_history_entry(it, stats, shift))
        bar.set_postfix(inertia=f"{stats.inertia:.4g}", shift=f"{shift:.2e}")
        centers = new_centers
        if shift <= tol:
            converged = True
            break
    final = _lloyd_pass(blocks, centers, setup, keep_labels=in_memory)
    labels = torch.cat(final.labels).cpu() if in_memory else torch.empty(0, dtype=torch.int64)
    return KMeansResult(
        centers=centers.cpu(),
        labels=labels,
        inertia=final.inertia,
        n_iter=len(history),
        converged=converged,
        sizes=final.counts.cpu(),
        history=history,
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
    _check_choice("metric", metric, METRICS)
    _check_choice("backend", backend, BACKENDS)
    _check_positive("chunk_size", chunk_size)
    _check_matrix("x", x)
    _check_matrix("centers", centers)
    if x.shape[1] != centers.shape[1]:
        raise ValueError(f"x has dim {x.shape[1]} but centers have dim {centers.shape[1]}")
    run_device = torch.device(device) if device is not None else x.device
    if backend == "auto":
        backend = auto_backend(run_device)
    if backend == "faiss":
        return _assign_faiss(x, centers, metric, chunk_size)
    return _assign_torch(x, centers, metric, chunk_size, run_device)


def auto_backend(device: str | torch.device) -> str:
    """What ``backend="auto"`` means on ``device``: ``"faiss"`` on CPU, ``"torch"`` elsewhere.

    Not a fixed speed claim: on CPU, paired runs of bare faiss ``IndexFlatL2.search`` against
    the torch matmul path ranged from 0.7x to 1.3x of each other across machines and loads
    (benchmarks/bench_cluster.py prints the ratio on the machine it runs on), and faiss is the
    reference CPU search, so CPU uses it whenever it is installed; on a GPU the torch matmul
    runs where the data is (faiss-cpu cannot) and the GPU faiss build is optional.
    """
    if torch.device(device).type == "cpu" and faiss is not None:
        return "faiss"
    return "torch"


def assign_capacity(
    x: torch.Tensor,
    centers: torch.Tensor,
    *,
    metric: str = "euclidean",
    balance_slack: float = 0.1,
    chunk_size: int = 65536,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity-aware assignment: the fit's balanced greedy applied to ``x`` as one block.

    Every cluster size lies within ``balanced_bounds(len(x), K, balance_slack)``, the bounds the
    balanced fit kept, and each row gets exactly one cluster. Applied shard by shard (as the
    assign stage does), sizes lie within the sums of the per-shard bounds. Costs about 1.5-3x a
    nearest search (8 candidates per row plus greedy rounds) and moves the points it must to
    their 2nd, 3rd... nearest centre.

    Returns:
        ``(ids, distances)`` as ``assign_nearest``: int64 ids, float32 L2 distance (euclidean)
        or ``1 - cos`` (cosine), on CPU.
    """
    _check_choice("metric", metric, METRICS)
    _check_positive("chunk_size", chunk_size)
    _check_matrix("x", x)
    _check_matrix("centers", centers)
    if x.shape[1] != centers.shape[1]:
        raise ValueError(f"x has dim {x.shape[1]} but centers have dim {centers.shape[1]}")
    if balance_slack < 0:
        raise ValueError(f"balance_slack={balance_slack} must be >= 0")
    run_device = torch.device(device) if device is not None else x.device
    setup = _Setup(metric, run_device, chunk_size, True, balance_slack)
    prepared = _prepare(centers, metric, run_device)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    labels, sq = _BalancedBlock(x, prepared, setup).solve()
    dist = sq / 2 if metric == "cosine" else sq.sqrt()
    return labels.cpu(), dist.cpu()


def fit_faiss_kmeans(
    x: torch.Tensor | ChunkSource,
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
        x: Float tensor ``[N, D]`` or a chunk callable (materialised in memory).
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
    _require_faiss()
    _check_positive("num_clusters", num_clusters)
    _check_positive("niter", niter)
    data = _to_numpy(x if isinstance(x, torch.Tensor) else torch.cat([c.float() for c in x()]))
    num_points, dim = data.shape
    if num_points < num_clusters:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {num_points} sample points")
    use_gpu = gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if gpu and not use_gpu:
        warnings.warn("fit_faiss_kmeans: gpu=True but faiss sees no GPU; running on CPU", stacklevel=2)
    kmeans = faiss.Kmeans(
        dim,
        num_clusters,
        niter=niter,
        seed=seed,
        spherical=spherical,
        gpu=use_gpu,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max_points_per_centroid or num_points // num_clusters + 1,
    )
    kmeans.train(data)
    sq_dist, ids = kmeans.index.search(data, 1)
    labels = torch.from_numpy(ids[:, 0].astype(np.int64))
    history = [
        {
            "iter": i + 1,
            "inertia": float(s["obj"]),
            "shift": math.nan,
            "max_size": math.nan,
            "min_size": math.nan,
        }
        for i, s in enumerate(kmeans.iteration_stats)
    ]
    return KMeansResult(
        centers=torch.from_numpy(np.array(kmeans.centroids, dtype=np.float32)),
        labels=labels,
        inertia=float(sq_dist.astype(np.float64).sum()),
        n_iter=len(history),
        converged=len(history) < niter,
        sizes=torch.bincount(labels, minlength=num_clusters),
        history=history,
    )


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
    a single fit).

    Lloyd runs with ``tol=0``, i.e. to a fixed point. Unbalanced, the map is each fine centre's
    nearest coarse centre (MoDE's greedy ``predict``); balanced, it is the balanced labels, so
    each expert's number of fine clusters lies within ``balanced_bounds(K, num_experts,
    balance_slack)``. Coarse centres are always recomputed as the mean of their fine centres
    (re-normalised for cosine), so they match the map; when the fit converged, the unbalanced
    map is also the argmin to the returned centres. MoDE itself fits balanced and maps greedily,
    which leaves centres and map inconsistent; ``balanced=False`` is its consistent version.

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
    _check_positive("n_init", n_init)
    fits = [
        fit_kmeans(
            fine_centers,
            num_experts,
            balanced=balanced,
            metric=metric,
            max_iter=max_iter,
            tol=0.0,
            seed=seed + i,
            chunk_size=max(1, fine_centers.shape[0]),
            balance_slack=balance_slack,
        )
        for i in range(n_init)
    ]
    result = min(fits, key=lambda r: r.inertia)
    points = _prepare(fine_centers, metric, torch.device("cpu"))
    sums = torch.zeros_like(result.centers).index_add_(0, result.labels, points)
    counts = torch.bincount(result.labels, minlength=num_experts)
    coarse = torch.where(
        (counts > 0)[:, None], sums / counts.clamp_min(1)[:, None].to(sums.dtype), result.centers
    )
    if metric == "cosine":
        coarse = F.normalize(coarse, dim=1)
    return coarse, result.labels


# --- argument checks -------------------------------------------------------------------------


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")


def _check_matrix(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, D], got {_describe(value)}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_fit_args(
    num_clusters: int,
    metric: str,
    init: str,
    max_iter: int,
    tol: float,
    chunk_size: int,
    balance_slack: float,
) -> None:
    _check_positive("num_clusters", num_clusters)
    _check_choice("metric", metric, METRICS)
    _check_choice("init", init, INITS)
    _check_positive("max_iter", max_iter)
    _check_positive("chunk_size", chunk_size)
    if tol < 0:
        raise ValueError(f"tol={tol} must be >= 0")
    if balance_slack < 0:
        raise ValueError(f"balance_slack={balance_slack} must be >= 0")


def _require_faiss() -> None:
    if faiss is None:
        raise ImportError("faiss is not installed (pip install faiss-cpu)")


# --- sample access ---------------------------------------------------------------------------


def _block_source(x: torch.Tensor | ChunkSource) -> tuple[Callable[[], Iterator[torch.Tensor]], bool]:
    """Returns a callable yielding the sample's blocks, and whether the sample is in memory.

    An in-memory tensor is one block, so balanced capacities are global; a stream's blocks are
    its chunks.
    """
    if isinstance(x, torch.Tensor):
        _check_matrix("x", x)
        return (lambda: iter((x,))), True
    if not callable(x):
        raise ValueError(f"x must be a tensor or a callable returning chunks, got {_describe(x)}")

    def stream() -> Iterator[torch.Tensor]:
        dim = None
        for chunk in x():
            _check_matrix("chunk", chunk)
            if dim is not None and chunk.shape[1] != dim:
                raise ValueError(f"chunk has dim {chunk.shape[1]}, earlier chunks had {dim}")
            dim = chunk.shape[1]
            if chunk.shape[0]:
                yield chunk

    return stream, False


def _prepare(x: torch.Tensor, metric: str, device: torch.device) -> torch.Tensor:
    """Moves rows to ``device`` as float32, normalised for cosine."""
    x = x.to(device=device, dtype=torch.float32)
    return F.normalize(x, dim=1) if metric == "cosine" else x


def _subchunks(block: torch.Tensor, setup: _Setup) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, block.shape[0], setup.chunk_size):
        yield start, _prepare(block[start : start + setup.chunk_size], setup.metric, setup.device)


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Runs the enclosed code on one intra-op thread, then restores the previous count.

    Used around loops of many small ops (seeding, greedy rounds): their parallel regions gain
    nothing, and on shared CPUs each one waits for a descheduled thread (measured on 2 busy
    cores: k-means++ for K=512, 12 s with two threads vs 0.44 s with one).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    # One fused pass, without materialising x ** 2.
    return torch.linalg.vector_norm(x, dim=1).square_()


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


# --- seeding ---------------------------------------------------------------------------------


def _sample_pass(
    blocks: Callable[[], Iterator[torch.Tensor]],
    sample_size: int,
    gen: torch.Generator,
    setup: _Setup,
) -> tuple[torch.Tensor, int, float]:
    """One pass: a uniform sample (rows with the smallest random keys), N and total variance.

    The sample is sorted by key, so any prefix of it is itself a uniform random sample.
    """
    keys = torch.empty(0)
    rows: torch.Tensor | None = None
    count, total, total_sq = 0, None, 0.0
    for block in blocks():
        if rows is None:
            rows = torch.empty(0, block.shape[1])
        keys, rows = _merge_sample(keys, rows, block, sample_size, gen, setup.metric)
        for _, xc in _subchunks(block, setup):
            count += xc.shape[0]
            chunk_sum = xc.sum(0, dtype=torch.float64)
            total = chunk_sum if total is None else total + chunk_sum
            total_sq += _row_sq_norms(xc).sum(dtype=torch.float64).item()
    if total is None:
        raise ValueError("x yielded no points")
    variance = total_sq / count - (total / count).pow(2).sum().item()
    return rows, count, variance


def _merge_sample(
    keys: torch.Tensor,
    rows: torch.Tensor,
    block: torch.Tensor,
    sample_size: int,
    gen: torch.Generator,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the ``sample_size`` rows with the smallest keys among the sample and a new block."""
    held = keys.numel()
    all_keys = torch.cat([keys, torch.rand(block.shape[0], generator=gen)])
    picked = all_keys.topk(min(sample_size, all_keys.numel()), largest=False, sorted=True).indices
    merged = torch.empty(picked.numel(), block.shape[1])
    old = picked < held
    merged[old] = rows[picked[old]]
    merged[~old] = _prepare(block[(picked[~old] - held).to(block.device)], metric, merged.device)
    return all_keys[picked], merged


def _initial_centers(sample: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "random":
        return sample[:k].clone()
    with _one_cpu_thread():
        return _kmeans_plus_plus(sample, k, gen)


def _kmeans_plus_plus(sample: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
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


# --- Lloyd iterations ------------------------------------------------------------------------


def _lloyd_pass(
    blocks: Callable[[], Iterator[torch.Tensor]],
    centers: torch.Tensor,
    setup: _Setup,
    keep_labels: bool,
) -> _PassStats:
    """Assigns every block to ``centers`` and accumulates per-cluster sums, counts and inertia."""
    k, dim = centers.shape
    stats = _PassStats(
        sums=torch.zeros(k, dim, device=setup.device),
        counts=torch.zeros(k, dtype=torch.int64, device=setup.device),
    )
    for block in blocks():
        if setup.balanced:
            labels, sq_dist = _BalancedBlock(block, centers, setup).solve()
        else:
            labels, sq_dist = _nearest_block(block, centers, setup)
        # One thread: CPU index_add_ contends on the shared rows with more (measured on 2 busy
        # cores, 50k x 384 into 256 rows: 0.28 s with two threads, 0.05 s with one).
        with _one_cpu_thread():
            for start, xc in _subchunks(block, setup):
                stats.sums.index_add_(0, labels[start : start + xc.shape[0]], xc)
            stats.counts += torch.bincount(labels, minlength=k)
            stats.inertia += sq_dist.sum(dtype=torch.float64).item()
            _keep_farthest(stats, block, sq_dist, k, setup)
        if keep_labels:
            stats.labels.append(labels)
    return stats


def _keep_farthest(
    stats: _PassStats, block: torch.Tensor, sq_dist: torch.Tensor, size: int, setup: _Setup
) -> None:
    """Keeps the ``size`` points farthest from their centre so far: the re-seeding pool."""
    far = sq_dist.topk(min(size, sq_dist.numel())).indices
    far_x = _prepare(block[far.to(block.device)], setup.metric, setup.device)
    far_sq = sq_dist[far]
    if stats.far_sq is not None:
        far_sq = torch.cat([stats.far_sq, far_sq])
        far_x = torch.cat([stats.far_x, far_x])
        keep = far_sq.topk(min(size, far_sq.numel())).indices
        far_sq, far_x = far_sq[keep], far_x[keep]
    stats.far_sq, stats.far_x = far_sq, far_x


def _updated_centers(stats: _PassStats, gen: torch.Generator, setup: _Setup) -> torch.Tensor:
    """Cluster means; empty clusters are re-seeded from the pass's far points."""
    new = stats.sums / stats.counts.clamp_min(1)[:, None].to(stats.sums.dtype)
    empty = (stats.counts == 0).nonzero().flatten()
    if empty.numel():
        weights = stats.far_sq.double().cpu().clamp_min(1e-30)
        picks = torch.multinomial(weights, empty.numel(), replacement=False, generator=gen)
        new[empty] = stats.far_x[picks.to(setup.device)]
    return F.normalize(new, dim=1) if setup.metric == "cosine" else new


def _history_entry(it: int, stats: _PassStats, shift: float) -> dict:
    return {
        "iter": it,
        "inertia": stats.inertia,
        "shift": shift,
        "max_size": int(stats.counts.max()),
        "min_size": int(stats.counts.min()),
    }


# --- assignment ------------------------------------------------------------------------------


def _candidates(
    x: torch.Tensor,
    centers: torch.Tensor,
    bias: torch.Tensor,
    num: int,
    closed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num`` best centres of prepared rows ``x`` by ``||x||^2 - 2 x c + bias[c]``.

    With ``bias = ||c||^2`` the scores are squared distances (unclamped). ``closed`` is a
    boolean ``[K]`` mask of centres to skip. Returns ``(ids, scores)``, scores ascending.
    """
    partial = torch.addmm(bias, x, centers.T, alpha=-2.0)
    if closed is not None:
        partial[:, closed] = math.inf
    if num == 1:
        values, ids = partial.min(1, keepdim=True)
    else:
        values, ids = partial.topk(num, dim=1, largest=False, sorted=True)
    # ||x||^2 is constant per row, so it is added only to the selected entries.
    return ids, values.add_(_row_sq_norms(x)[:, None])


def _block_candidates(
    block: torch.Tensor,
    centers: torch.Tensor,
    bias: torch.Tensor,
    num: int,
    setup: _Setup,
    closed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_candidates(xc, centers, bias, num, closed) for _, xc in _subchunks(block, setup)]
    if len(parts) == 1:  # one chunk: no copy
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _nearest_block(
    block: torch.Tensor, centers: torch.Tensor, setup: _Setup
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, sq_dist = _block_candidates(block, centers, centers.pow(2).sum(1), 1, setup)
    return ids[:, 0], sq_dist[:, 0].clamp_(min=0)


class _BalancedBlock:
    """Balanced assignment of one block by a two-sided capacity-constrained greedy.

    Phase one fills every cluster to exactly ``low`` points, phase two places the rest with at
    most ``high - low`` more per cluster, which enforces ``low <= size <= high``. Each phase runs
    greedy rounds over the points' nearest candidate clusters; points whose candidates all fill
    up get fresh candidates among the clusters with room.
    """

    def __init__(self, block: torch.Tensor, centers: torch.Tensor, setup: _Setup) -> None:
        self.block, self.centers, self.setup = block, centers, setup
        self.c_sq = centers.pow(2).sum(1)
        n = block.shape[0]
        self.labels = torch.full((n,), -1, dtype=torch.int64, device=setup.device)
        self.label_sq = torch.zeros(n, device=setup.device)

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block's labels and squared distances to their centres."""
        k, n = self.centers.shape[0], self.block.shape[0]
        ids, sq = _block_candidates(self.block, self.centers, self.c_sq, min(k, _NUM_CANDIDATES), self.setup)
        low, high = balanced_bounds(n, k, self.setup.balance_slack)
        pending = torch.arange(n, device=ids.device)
        for phase, room_size in enumerate((low, high - low)):
            room = torch.full((k,), room_size, dtype=torch.int64, device=ids.device)
            if phase == 0:  # every row is pending: no gather
                pending = self._fill(ids, sq, pending, room)
            else:
                pending = self._fill(ids[pending], sq[pending], pending, room)
        return self.labels, self.label_sq.clamp_(min=0)

    def _fill(
        self, ids: torch.Tensor, sq: torch.Tensor, pending: torch.Tensor, room: torch.Tensor
    ) -> torch.Tensor:
        """Places ``pending`` rows (with their candidates) into ``room``; returns the rest.

        The bookkeeping (many small gathers, masks and scatters) runs on one CPU thread; only the
        candidate searches get the caller's threads back (see ``_one_cpu_thread``).
        """
        threads = torch.get_num_threads()
        with _one_cpu_thread():
            while pending.numel() and room.any():
                got, slot = _greedy_rounds(ids, sq, room)
                placed = got >= 0
                self.labels[pending[placed]] = got[placed]
                self.label_sq[pending[placed]] = sq[placed].gather(1, slot[placed, None])[:, 0]
                pending = pending[~placed]
                if pending.numel() and room.any():
                    # Every candidate of these rows filled up: look again among clusters with room.
                    # Only the open clusters are scored: late in a phase few remain, so this costs
                    # a fraction of a full pass, and more candidates per row cut the rounds left.
                    open_ids = (room > 0).nonzero()[:, 0]
                    num = min(2 * _NUM_CANDIDATES, open_ids.numel())
                    rows = self.block[pending.to(self.block.device)]
                    torch.set_num_threads(threads)
                    try:
                        ids, sq = _block_candidates(
                            rows, self.centers[open_ids], self.c_sq[open_ids], num, self.setup
                        )
                    finally:
                        torch.set_num_threads(1)
                    ids = open_ids[ids]
        return pending


def _greedy_rounds(
    cand_ids: torch.Tensor, cand_cost: torch.Tensor, room: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity-constrained greedy over ascending candidate lists; decrements ``room`` in place.

    Each round, every unplaced point proposes to its first candidate with room; a cluster admits
    proposers up to its room, largest regret first. Rounds end when every point is placed or has
    no candidate with room left. A point's next proposal is always further down its list,
    because the cluster that refused it is now full, so there are at most ``m`` rounds.

    Returns:
        ``(labels, slots)``: the cluster and candidate column of each point, -1 if unplaced.
    """
    n = cand_ids.shape[0]
    labels = torch.full((n,), -1, dtype=torch.int64, device=cand_ids.device)
    slots = torch.full((n,), -1, dtype=torch.int64, device=cand_ids.device)
    active = torch.arange(n, device=cand_ids.device)
    while active.numel():
        is_open = room[cand_ids[active]] > 0
        active, is_open = active[is_open.any(1)], is_open[is_open.any(1)]
        if not active.numel():
            break
        ids, cost = cand_ids[active], cand_cost[active]
        first = is_open.to(torch.uint8).argmax(1, keepdim=True)
        cluster, chosen = ids.gather(1, first)[:, 0], cost.gather(1, first)[:, 0]
        admitted = _admit(cluster, -_regret(is_open, cost, first, chosen), room)
        labels[active[admitted]] = cluster[admitted]
        slots[active[admitted]] = first[admitted, 0]
        room -= torch.bincount(cluster[admitted], minlength=room.numel())
        active = active[~admitted]
    return labels, slots


def _regret(
    is_open: torch.Tensor, cost: torch.Tensor, first: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """Extra cost of each point's next open candidate (inf when it has none)."""
    rest = is_open.scatter(1, first, False)
    second = rest.to(torch.uint8).argmax(1, keepdim=True)
    return torch.where(rest.any(1), cost.gather(1, second)[:, 0] - chosen, math.inf)


def _admit(cluster: torch.Tensor, priority: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Marks, per cluster, the ``room`` proposers with the smallest ``priority`` value."""
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(cluster[order], stable=True)]
    grouped = cluster[order]
    counts = torch.bincount(grouped, minlength=room.numel())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(grouped.numel(), device=grouped.device) - starts[grouped]
    admitted = torch.zeros_like(cluster, dtype=torch.bool)
    admitted[order] = rank < room[grouped]
    return admitted


def _assign_torch(
    x: torch.Tensor, centers: torch.Tensor, metric: str, chunk_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    centers = _prepare(centers, metric, device)
    c_sq = centers.pow(2).sum(1)
    ids, dists = [], []
    for start in range(0, x.shape[0], chunk_size):
        xc = _prepare(x[start : start + chunk_size], metric, device)
        if metric == "cosine":
            best, idx = (xc @ centers.T).max(1)
            dist = 1.0 - best
        else:
            idx, sq = _candidates(xc, centers, c_sq, 1)
            idx, dist = idx[:, 0], sq[:, 0].clamp_(min=0).sqrt()
        ids.append(idx.cpu())
        dists.append(dist.cpu())
    return torch.cat(ids), torch.cat(dists)


def _assign_faiss(
    x: torch.Tensor, centers: torch.Tensor, metric: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_faiss()
    cpu = torch.device("cpu")
    index_type = faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2
    index = index_type(centers.shape[1])
    index.add(_to_numpy(_prepare(centers, metric, cpu)))
    ids, dists = [], []
    for start in range(0, x.shape[0], chunk_size):
        scores, idx = index.search(_to_numpy(_prepare(x[start : start + chunk_size], metric, cpu)), 1)
        scores = scores[:, 0]
        # numpy: single-threaded element-wise ops, no OpenMP hand-off for a vector this small.
        dists.append(torch.from_numpy(1.0 - scores if metric == "cosine" else np.sqrt(np.maximum(scores, 0))))
        ids.append(torch.from_numpy(idx[:, 0].astype(np.int64)))
    return torch.cat(ids), torch.cat(dists)
