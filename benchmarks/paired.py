"""Shared rules for every benchmark here: paired, alternating, repeated, warmed up, equal threads.

* ``paired(ours, peer, repeats)`` runs one warm-up of each side, then ``repeats`` rounds; round
  ``r`` runs ``ours`` first when ``r`` is even and ``peer`` first when it is odd, so load drift on a
  shared machine hits both sides alike. The figure is the per-round ratio ``time(ours) /
  time(peer)`` (or its inverse as a speed ratio): its median with min and max, never a best-of.
* ``set_threads(n)`` gives torch, faiss and OpenMP children the same thread count.
* ``record(name, payload)`` appends one JSON line to ``benchmarks/results.jsonl`` (gitignored);
  ``benchmarks/make_docs.py`` regenerates ``docs/benchmarks.md`` from it.

Speed is never asserted in tests; these are measurements only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.jsonl"
MIN_REPEATS = 5


@dataclass
class Paired:
    """Seconds per round for both sides, in round order, plus what each side returned last."""

    ours: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    ours_out: Any = None
    peer_out: Any = None

    @property
    def time_ratios(self) -> list[float]:
        """``time(ours) / time(peer)`` per round (< 1: ours is faster)."""
        return [o / p for o, p in zip(self.ours, self.peer, strict=True)]

    def summary(self, work: float | None = None, unit: str = "items/s") -> dict[str, Any]:
        """Median and min–max of the per-round speed ratio (ours ÷ peer, > 1: ours faster).

        ``work`` (items per run) adds median throughputs of each side.
        """
        speed = [1.0 / r for r in self.time_ratios]
        out: dict[str, Any] = {
            "repeats": len(speed),
            "speed_ratio_median": statistics.median(speed),
            "speed_ratio_min": min(speed),
            "speed_ratio_max": max(speed),
            "ours_s_median": statistics.median(self.ours),
            "peer_s_median": statistics.median(self.peer),
        }
        if work is not None:
            out["unit"] = unit
            out["ours_rate_median"] = work / statistics.median(self.ours)
            out["peer_rate_median"] = work / statistics.median(self.peer)
        return out


def paired(
    ours: Callable[[], Any],
    peer: Callable[[], Any],
    repeats: int = MIN_REPEATS,
    warmup: bool = True,
    between: Callable[[], None] | None = None,
) -> Paired:
    """Times ``ours`` and ``peer`` alternately (see the module docstring).

    ``between`` (e.g. removing an output folder) runs untimed before every timed call.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    result = Paired()

    def run(fn: Callable[[], Any]) -> tuple[float, Any]:
        if between is not None:
            between()
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    if warmup:
        run(ours)
        run(peer)
    for r in range(repeats):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for side in order:
            seconds, out = run(ours if side == "ours" else peer)
            getattr(result, side).append(seconds)
            setattr(result, f"{side}_out", out)
    return result


def fmt(summary: dict[str, Any]) -> str:
    """``1.02× (0.95–1.10, n=5)``."""
    return (
        f"{summary['speed_ratio_median']:.2f}× ({summary['speed_ratio_min']:.2f}–"
        f"{summary['speed_ratio_max']:.2f}, n={summary['repeats']})"
    )


def set_threads(n: int) -> int:
    """Same CPU thread count for torch, faiss and (via the environment) subprocesses."""
    import torch

    if n <= 0:
        n = torch.get_num_threads()
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    return n


def host() -> dict[str, Any]:
    """Where a figure was measured."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def record(name: str, payload: dict[str, Any], command: str, path: Path = RESULTS) -> dict[str, Any]:
    """Appends one result line (also printed, last, as the benchmark's JSON line)."""
    line = {
        "bench": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": command,
        "host": host(),
        **payload,
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(json.dumps(line))
    return line
