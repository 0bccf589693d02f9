"""Bootstrap confidence intervals over eval items, and paired comparisons of systems.

A report row (one task metric) is the mean of per-item scores (a hit per image or per query), or
for ``mean_per_class_recall`` the mean over classes of the per-class mean. Its interval is the
percentile bootstrap: the items are resampled with replacement ``resamples`` times (seeded) and
the statistic recomputed. Every system of a row is scored on the *same* resamples, so the
difference of two systems is a paired bootstrap (items are the unit: the same image scored by both
systems). The average over rows resamples each row's items independently within one replicate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
CHUNK = 100
"""Resamples drawn at once (bounds memory to ``CHUNK x items``)."""


@dataclass(frozen=True)
class ItemScores:
    """Per-item scores of one system on one row; the statistic is their mean (or, with
    ``groups``, the mean over groups of the per-group mean: mean per-class recall)."""

    values: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)


def statistic(scores: ItemScores, idx: np.ndarray | None = None) -> np.ndarray | float:
    """The row statistic on all items (``idx`` None, a float) or on each resample (``idx`` [B, n])."""
    values = np.asarray(scores.values, dtype=np.float64)
    if idx is None:
        if scores.groups is None:
            return float(values.mean())
        classes = np.unique(scores.groups)
        return float(np.mean([values[scores.groups == c].mean() for c in classes]))
    picked = values[idx]
    if scores.groups is None:
        return picked.mean(axis=1)
    _, codes = np.unique(scores.groups, return_inverse=True)
    num = int(codes.max()) + 1
    flat = codes[idx] + num * np.arange(idx.shape[0])[:, None]
    sums = np.bincount(flat.ravel(), weights=picked.ravel(), minlength=idx.shape[0] * num).reshape(-1, num)
    counts = np.bincount(flat.ravel(), minlength=idx.shape[0] * num).reshape(-1, num)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = sums / counts
    return np.nanmean(per_class, axis=1)


def _resamples(n: int, resamples: int, seed: int, row: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([seed, row])
    done = 0
    while done < resamples:
        size = min(CHUNK, resamples - done)
        yield rng.integers(0, n, size=(size, n))
        done += size


def bootstrap_row(
    systems: Mapping[str, ItemScores], resamples: int, seed: int, row: int
) -> dict[str, np.ndarray]:
    """``{system: [resamples] statistic}`` with the same item resamples for every system.

    Args:
        systems: per-item scores of each system on one row (all the same items, same order).
        resamples: bootstrap draws.
        seed: base seed; ``row`` makes each row's draws independent.
        row: the row's index.
    """
    sizes = {len(s) for s in systems.values()}
    if len(sizes) != 1:
        raise ValueError(f"bootstrap: systems were scored on different numbers of items: {sorted(sizes)}")
    n = sizes.pop()
    out: dict[str, list[np.ndarray]] = {name: [] for name in systems}
    for idx in _resamples(n, resamples, seed, row):
        for name, scores in systems.items():
            out[name].append(np.atleast_1d(statistic(scores, idx)))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaNs ignored)."""
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1.0 - alpha))


def average_samples(rows: Sequence[Mapping[str, np.ndarray]], system: str) -> np.ndarray:
    """Bootstrap samples of the mean over rows of ``system``'s statistic."""
    return np.mean(np.stack([r[system] for r in rows]), axis=0)


def verdict(low: float, high: float) -> str:
    """``better`` / ``worse`` when the interval of a difference excludes 0, else ``indistinguishable``."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "indistinguishable"
