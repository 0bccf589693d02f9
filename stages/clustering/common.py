"""Shared pieces of the clustering library: result type, argument checks, row helpers.

Conventions of the whole package:

* Distances are computed block by block as ``||x||^2 - 2 x c^T + ||c||^2`` in fp32, so memory is
  bounded by ``chunk_size x K`` floats and no ``N x K x D`` tensor is ever built.
* ``metric="cosine"`` is spherical k-means: points and centres are L2-normalised, assignment is by
  largest dot product and centres are re-normalised after each update. Internally it runs the
  euclidean code on the normalised vectors, because ``||x - c||^2 = 2 - 2 cos(x, c)`` there.
* All randomness comes from one CPU ``torch.Generator`` seeded with ``seed``: on CPU the same
  data and seed give bit-identical centres and labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")
INITS = ("kmeans++", "random")
BACKENDS = ("auto", "torch", "faiss")


@dataclass
class KMeansResult:
    """Outcome of a k-means fit.

    Attributes:
        centers: ``[K, D]`` float32 centres on CPU (unit norm for ``metric="cosine"``).
        labels: ``[N]`` int64 labels of the fit sample under the final centres (the balanced
            labels when balanced).
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
class Setup:
    """How a fit or an assignment runs: metric, device, rows per distance block, balance."""

    metric: str
    device: torch.device
    chunk_size: int
    balanced: bool
    balance_slack: float


# --- argument checks -------------------------------------------------------------------------


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")


def check_slack(balance_slack: float) -> None:
    if balance_slack < 0:
        raise ValueError(f"balance_slack={balance_slack} must be >= 0")


def check_matrix(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, D], got {describe(value)}")


def check_points_and_centers(x: object, centers: object, metric: str, chunk_size: int) -> None:
    """The checks every assignment makes: metric, chunk size, two float matrices of one width."""
    check_choice("metric", metric, METRICS)
    check_positive("chunk_size", chunk_size)
    check_matrix("x", x)
    check_matrix("centers", centers)
    if x.shape[1] != centers.shape[1]:
        raise ValueError(f"x has dim {x.shape[1]} but centers have dim {centers.shape[1]}")


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# --- rows ------------------------------------------------------------------------------------


def prepare(x: torch.Tensor, metric: str, device: torch.device) -> torch.Tensor:
    """Moves rows to ``device`` as float32, normalised for cosine."""
    x = x.to(device=device, dtype=torch.float32)
    return F.normalize(x, dim=1) if metric == "cosine" else x


def subchunks(block: torch.Tensor, setup: Setup) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, prepared rows)`` of ``block`` in pieces of ``setup.chunk_size`` rows."""
    for start in range(0, block.shape[0], setup.chunk_size):
        yield start, prepare(block[start : start + setup.chunk_size], setup.metric, setup.device)


def row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every row, in one fused pass without materialising ``x ** 2``."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """C-contiguous float32 numpy view (or copy) of a tensor, on CPU."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Runs the enclosed code on one torch intra-op thread, then restores the previous count.

    For loops of many small ops (seeding, greedy rounds, tiny classifiers): their parallel
    regions gain nothing, and on shared CPUs each one waits for a descheduled thread (measured
    on 2 busy cores: k-means++ for K=512, 12 s with two threads vs 0.44 s with one).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- candidate search (torch) ----------------------------------------------------------------


def candidates(
    x: torch.Tensor,
    centers: torch.Tensor,
    bias: torch.Tensor,
    num: int,
    x_sq: torch.Tensor | None = None,
    buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num`` best centres of prepared rows ``x`` by ``||x||^2 - 2 x c + bias[c]``.

    With ``bias = ||c||^2`` the scores are squared distances (unclamped). ``x_sq`` are the rows'
    squared norms when already known; ``buffer`` an ``[len(x), K]`` float32 scratch tensor to
    reuse (a fresh block of that size costs page faults on every call). Returns
    ``(ids, scores)``, scores ascending.
    """
    partial = torch.addmm(bias, x, centers.T, alpha=-2.0, out=buffer)
    if num == 1:
        values, ids = partial.min(1, keepdim=True)
    else:
        values, ids = partial.topk(num, dim=1, largest=False, sorted=True)
    # ||x||^2 is constant per row, so it is added only to the selected entries.
    return ids, values.add_((row_sq_norms(x) if x_sq is None else x_sq)[:, None])


class RowSearch:
    """Candidate searches over a fixed set of rows ``x`` against changing centres.

    On CPU the rows are prepared (float32, normalised for cosine) and their squared norms
    computed once, and the ``[chunk_size, K]`` distance block is reused by every search, so the
    Lloyd iterations allocate nothing of size N x K. On another device rows move there one
    chunk at a time (``x`` may exceed device memory) and nothing is cached.
    """

    def __init__(self, x: torch.Tensor, setup: Setup) -> None:
        self.setup, self.n = setup, x.shape[0]
        self.cached = setup.device.type == "cpu"
        self.x = prepare(x, setup.metric, setup.device) if self.cached else x
        self.x_sq = row_sq_norms(self.x) if self.cached else None
        self._buffer: torch.Tensor | None = None

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, prepared rows)`` in pieces of ``chunk_size`` rows."""
        if not self.cached:
            yield from subchunks(self.x, self.setup)
            return
        for start in range(0, self.n, self.setup.chunk_size):
            yield start, self.x[start : start + self.setup.chunk_size]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepared rows ``index`` (on the search device) and their squared norms if cached."""
        if self.cached:
            return self.x[index], self.x_sq[index]
        return prepare(self.x[index.to(self.x.device)], self.setup.metric, self.setup.device), None

    def top(
        self, centers: torch.Tensor, bias: torch.Tensor, num: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``candidates`` of every row (or of rows ``index``): ids ``[n, num]``, squared distances."""
        n = self.n if index is None else index.numel()
        ids = torch.empty(n, num, dtype=torch.int64, device=self.setup.device)
        sq = torch.empty(n, num, device=self.setup.device)
        step = self.setup.chunk_size
        for start in range(0, n, step):
            stop = min(start + step, n)
            if index is None:
                xc = self.x[start:stop] if self.cached else prepare(self.x[start:stop], self.setup.metric, self.setup.device)
                x_sq = self.x_sq[start:stop] if self.cached else None
            else:
                xc, x_sq = self.rows(index[start:stop])
            scratch = self._scratch(stop - start, centers.shape[0])
            ids[start:stop], sq[start:stop] = candidates(xc, centers, bias, num, x_sq, scratch)
        return ids, sq

    def _scratch(self, rows: int, k: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.shape[1] != k or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(min(self.n, self.setup.chunk_size), k, device=self.setup.device)
        return self._buffer[:rows]


def sq_to_distance(sq: torch.Tensor, metric: str) -> torch.Tensor:
    """Reported distance from a squared L2 one: ``sqrt`` (euclidean) or ``1 - cos`` (cosine)."""
    return sq / 2 if metric == "cosine" else sq.sqrt()

