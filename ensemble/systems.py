"""The systems the report compares, what each cost to train, and how converged the seed was.

A *system* is a list of trained models and how their outputs are combined: one model alone
(``single``), the uniform average (``uniform``) or the task's routing weights (``routed``).

| system | models | combination | training compute (samples, seed included) |
|---|---|---|---|
| ``expert-k`` | expert k | single | seed + expert k |
| ``all_unit`` | every expert | uniform | seed + all experts |
| ``ensemble`` | every expert | routed | seed + all experts |
| ``seed`` | the seed | single | seed |
| ``dense`` | the seed continued on all pairs | single | seed + one expert's budget |
| ``dense_equal_compute`` | one model, the experts' total steps | single | seed + all experts |
| ``random_split`` | E experts on a random partition | uniform | seed + all experts |
| ``full_ensemble`` | ``dense`` + E-1 dense continuations | uniform | seed + all experts |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training import runs

EXTRA_COLUMNS = ("seed", "dense", "dense_equal_compute", "random_split", "full_ensemble")
"""Report columns after MoDE's, in this order, for the systems that are present."""
COMPARED = ("dense", "dense_equal_compute", "random_split", "full_ensemble", "all_unit", "seed")
"""Baselines the routed ensemble is compared with (paired bootstrap), in report order."""
DESCRIPTIONS = {
    "dense": "one dense model with the same steps and schedule as each expert (the seed continued on all pairs)",
    "dense_equal_compute": "one dense model given the experts' total training compute",
    "random_split": "experts trained on a random partition with the cluster sizes, averaged uniformly",
    "full_ensemble": "E dense continuations with different data orders, averaged uniformly",
    "all_unit": "the same experts averaged uniformly (what routing adds)",
    "seed": "the seed model the experts branch from",
}


@dataclass(frozen=True)
class System:
    """Models (run names) and how their outputs are combined."""

    members: tuple[str, ...]
    combine: str
    """``single``, ``uniform`` or ``routed``."""


def systems_of(num_experts: int, baselines: dict[str, list[str]], has_seed: bool) -> dict[str, System]:
    """Every system of the report, keyed by its column name."""
    experts = tuple(runs.expert_name(k) for k in range(num_experts))
    out = {f"expert-{k}": System((name,), "single") for k, name in enumerate(experts)}
    out["all_unit"] = System(experts, "uniform")
    out["ensemble"] = System(experts, "routed")
    if has_seed:
        out[runs.SEED] = System((runs.SEED,), "single")
    for name, members in baselines.items():
        out[name] = System(tuple(members), "single" if len(members) == 1 else "uniform")
    return out


def system_weights(system: System, routed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights dict of ``system`` in the layout of the task's routing weights."""
    if system.combine == "routed":
        return routed
    m = len(system.members)
    return {key: torch.full((*w.shape[:-1], m), 1.0 / m, dtype=torch.float64) for key, w in routed.items()}


def extra_columns(systems: dict[str, System]) -> list[str]:
    """The report columns after MoDE's that this run has."""
    return [c for c in EXTRA_COLUMNS if c in systems]


# --------------------------------------------------------------------------- training compute


def _manifest(train_dir: Path, run: str) -> dict[str, Any]:
    path = train_dir / run / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_samples(train_dir: Path, run: str) -> int:
    """Training samples a run saw itself (its manifest's ``samples_seen``; 0 when unknown)."""
    return int(_manifest(train_dir, run).get("samples_seen", 0) or 0)


def training_compute(train_dir: Path, systems: dict[str, System]) -> dict[str, dict[str, int]]:
    """``{system: {"samples": n, "models": m}}``: samples seen in training (the seed's included
    for every system that starts from it) and models run per query at inference."""
    seed = run_samples(train_dir, runs.SEED)
    out = {}
    for name, system in systems.items():
        own = sum(run_samples(train_dir, m) for m in system.members)
        from_seed = name != "dense_equal_compute" and "seed" not in system.members
        out[name] = {"samples": own + (seed if from_seed else 0), "models": len(system.members)}
    if "expert-max" not in out and "ensemble" in out:
        out["expert-max"] = out["ensemble"]
    return out


# --------------------------------------------------------------------------- the seed's convergence


def seed_convergence(seed_dir: Path, tail: float = 0.1) -> dict[str, Any] | None:
    """How far from converged the seed was when the experts branched.

    Returns ``loss_first`` / ``loss_before`` / ``loss_last`` (mean training loss over the first,
    second-to-last and last ``tail`` of the seed's logged steps), ``tail_share`` (the share of the
    whole loss drop made in the last ``tail`` of the steps: about ``tail`` on a straight line,
    near 0 when flat) and the last two zero-shot evaluations; None without a metrics.jsonl.
    """
    path = seed_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["zeroshot/mean_top1"]) for r in rows if "zeroshot/mean_top1" in r]
    if len(losses) < 10:
        return None
    last_step = losses[-1][0]
    width = max(1, int(round(tail * last_step)))

    def window(lo: float, hi: float) -> float:
        values = [v for s, v in losses if lo < s <= hi]
        return sum(values) / len(values) if values else math.nan

    first = window(0, width)
    before = window(last_step - 2 * width, last_step - width)
    last = window(last_step - width, last_step)
    drop = first - last
    return {
        "steps": last_step,
        "loss_first": first,
        "loss_before": before,
        "loss_last": last,
        "tail_share": (before - last) / drop if drop > 0 else math.nan,
        "zeroshot": evals[-2:],
    }
