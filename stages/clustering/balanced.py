"""Balanced (capacity-constrained) assignment: the greedy behind the balanced fit and
``assign.capacity: fit_bounds``.

Two-sided bounds (``balanced_bounds``): ``low = floor(N / K * (1 - slack))`` and
``high = ceil(N / K * (1 + slack))``. Each point keeps its few nearest clusters as candidates.
Phase one fills every cluster to exactly ``low``: in rounds, every unplaced point proposes to its
nearest candidate with room, and a cluster with more proposers than room admits those with the
largest regret (the extra cost of their next choice); the rest propose again, and points whose
candidates all fill up get new candidates among the clusters with room. Phase two places the
remaining points the same way with ``high - low`` more room per cluster, so
**low <= every cluster size <= high**.
"""

from __future__ import annotations

import math

import torch

from stages.clustering.common import (
    RowSearch,
    Setup,
    check_points_and_centers,
    check_slack,
    one_cpu_thread,
    prepare,
    sq_to_distance,
)

# Nearest clusters kept per point. Points whose candidates are all full get fresh candidates
# among the clusters with room, so this only trades speed for passes.
NUM_CANDIDATES = 8
# Candidates per point when every earlier candidate filled up (among the clusters with room).
OPEN_CANDIDATES = 16

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
    check_points_and_centers(x, centers, metric, chunk_size)
    check_slack(balance_slack)
    run_device = torch.device(device) if device is not None else x.device
    setup = Setup(metric, run_device, chunk_size, True, balance_slack)
    prepared = prepare(centers, metric, run_device)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    labels, sq = BalancedBlock(RowSearch(x, setup), prepared, setup).solve()
    return labels.cpu(), sq_to_distance(sq, metric).cpu()


class BalancedBlock:
    """Balanced assignment of all rows of a ``RowSearch`` by a two-sided capacity-constrained greedy.

    Phase one fills every cluster to exactly ``low`` points, phase two places the rest with at
    most ``high - low`` more per cluster, which enforces ``low <= size <= high``. Each phase runs
    greedy rounds over the points' nearest candidate clusters; points whose candidates all fill
    up get fresh candidates among the clusters with room.
    """

    def __init__(self, search: RowSearch, centers: torch.Tensor, setup: Setup) -> None:
        self.search, self.centers, self.setup = search, centers, setup
        self.c_sq = centers.pow(2).sum(1)
        n = search.n
        self.labels = torch.full((n,), -1, dtype=torch.int64, device=setup.device)
        self.label_sq = torch.zeros(n, device=setup.device)

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the rows' labels and squared distances to their centres."""
        k, n = self.centers.shape[0], self.search.n
        ids, sq = self.search.top(self.centers, self.c_sq, min(k, NUM_CANDIDATES))
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
        candidate searches get the caller's threads back (see ``one_cpu_thread``).
        """
        threads = torch.get_num_threads()
        with one_cpu_thread():
            while pending.numel() and room.any():
                got, slot = _greedy_rounds(ids, sq, room)
                placed = got >= 0
                self.labels[pending[placed]] = got[placed]
                self.label_sq[pending[placed]] = sq[placed].gather(1, slot[placed, None])[:, 0]
                pending = pending[~placed]
                if pending.numel() and room.any():
                    torch.set_num_threads(threads)
                    try:
                        ids, sq = self._open_candidates(pending, room)
                    finally:
                        torch.set_num_threads(1)
        return pending

    def _open_candidates(self, pending: torch.Tensor, room: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh candidates of ``pending`` rows among the clusters with room.

        Only the open clusters are scored: late in a phase few remain, so this costs a fraction
        of a full pass, and more candidates per row cut the rounds left.
        """
        open_ids = (room > 0).nonzero()[:, 0]
        num = min(OPEN_CANDIDATES, open_ids.numel())
        ids, sq = self.search.top(self.centers[open_ids], self.c_sq[open_ids], num, pending)
        return open_ids[ids], sq


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
    ids, cost = cand_ids, cand_cost  # the active rows' candidates
    while active.numel():
        is_open = room[ids] > 0
        has_open = is_open.any(1)
        if not bool(has_open.all()):
            active, is_open, ids, cost = active[has_open], is_open[has_open], ids[has_open], cost[has_open]
            if not active.numel():
                break
        first = is_open.to(torch.uint8).argmax(1, keepdim=True)
        cluster, chosen = ids.gather(1, first)[:, 0], cost.gather(1, first)[:, 0]
        admitted = _admit(cluster, is_open, cost, first, chosen, room)
        labels[active[admitted]] = cluster[admitted]
        slots[active[admitted]] = first[admitted, 0]
        room -= torch.bincount(cluster[admitted], minlength=room.numel())
        rejected = ~admitted
        active, ids, cost = active[rejected], ids[rejected], cost[rejected]
    return labels, slots


def _regret(
    is_open: torch.Tensor, cost: torch.Tensor, first: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """Extra cost of each point's next open candidate (inf when it has none)."""
    rest = is_open.scatter(1, first, False)
    second = rest.to(torch.uint8).argmax(1, keepdim=True)
    return torch.where(rest.any(1), cost.gather(1, second)[:, 0] - chosen, math.inf)


def _admit(
    cluster: torch.Tensor,
    is_open: torch.Tensor,
    cost: torch.Tensor,
    first: torch.Tensor,
    chosen: torch.Tensor,
    room: torch.Tensor,
) -> torch.Tensor:
    """Marks the admitted proposers: per cluster, up to ``room`` of them, largest regret first.

    Proposers to a cluster with room for all of them are admitted without ranking; only those of
    over-subscribed clusters are sorted (by cluster, then by decreasing regret, ties by row).
    """
    proposals = torch.bincount(cluster, minlength=room.numel())
    crowded = (proposals > room)[cluster]
    admitted = ~crowded
    rows = crowded.nonzero()[:, 0]
    if rows.numel():
        sub = cluster[rows]
        priority = -_regret(is_open[rows], cost[rows], first[rows], chosen[rows])
        order = torch.argsort(priority, stable=True)
        order = order[torch.argsort(sub[order], stable=True)]
        grouped = sub[order]
        counts = torch.bincount(grouped, minlength=room.numel())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(grouped.numel(), device=grouped.device) - starts[grouped]
        admitted[rows[order]] = rank < room[grouped]
    return admitted
