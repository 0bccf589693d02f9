"""Planning the demo data: which tars to write and what each holds (training shards, evaluation tasks
and their labelled train splits). Nothing is rendered here; :mod:`pipeline.demo.samples` runs the jobs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.demo.common import (
    ALL_DOMAINS,
    RNG_EVAL,
    RNG_PLAN,
    RNG_RETRIEVAL,
    RNG_RETRIEVAL_PLAN,
    RNG_TRAIN,
    RNG_TRAIN_SPLIT,
    TRAIN_SPLIT_FACTOR,
)
from pipeline.demo.digits import mnist, mnist_split
from pipeline.demo.samples import DOMAINS, Job


def _interleave(per_class: Sequence[Sequence[int]]) -> list[int]:
    """Round-robin over classes so every eval shard mixes labels."""
    return [int(group[i]) for i in range(len(per_class[0])) for group in per_class]


def _chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def train_jobs(out_root: Path, p: dict[str, Any]) -> list[Job]:
    domains = p["domains"]
    plan_rng = np.random.default_rng([p["seed"], RNG_PLAN])
    order = plan_rng.permutation(np.resize(np.arange(len(domains)), p["num_pairs"]))
    jobs = []
    for shard, span in enumerate(_chunks(p["num_pairs"], p["pairs_per_shard"])):
        folder = out_root / "train" / str(shard % 100)
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append(
            Job(
                kind="train",
                path=str(folder / f"{shard}.tar"),
                keys=tuple(f"{shard:06d}_{i:05d}" for i in range(len(span))),
                domains=tuple(domains[int(order[j])] for j in span),
                items=(None,) * len(span),
                rng_key=(p["seed"], RNG_TRAIN, shard),
                image_size=p["image_size"],
            )
        )
    return jobs


def _eval_items(domain: str, per_class: int) -> list[int]:
    if domain == "digits":
        return _interleave([rows[:per_class] for rows in mnist_split()[1]])
    classes = len(DOMAINS[domain].classnames)
    return _interleave([[c] * per_class for c in range(classes)])


def _shard_jobs(
    task_dir: Path,
    kind: str,
    domains: Sequence[str],
    items: Sequence[int | None],
    rng_key: tuple[int, ...],
    p: dict[str, Any],
    prefix: str = "test",
) -> list[Job]:
    """Split one evaluation task into ``<prefix>-%06d.tar`` shards of ``pairs_per_shard``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    return [
        Job(
            kind=kind,
            path=str(task_dir / f"{prefix}-{k:06d}.tar"),
            keys=tuple(f"{task_dir.name}_{i:06d}" for i in span),
            domains=tuple(domains[i] for i in span),
            items=tuple(items[i] for i in span),
            rng_key=(*rng_key, k),
            image_size=p["image_size"],
        )
        for k, span in enumerate(_chunks(len(items), p["pairs_per_shard"]))
    ]


def _retrieval_plan(p: dict[str, Any]) -> tuple[list[str], list[int | None]]:
    domains = p["domains"]
    rng = np.random.default_rng([p["seed"], RNG_RETRIEVAL_PLAN])
    order = [
        domains[int(d)] for d in rng.permutation(np.resize(np.arange(len(domains)), p["retrieval_pairs"]))
    ]
    items: list[int | None] = [None] * len(order)
    digit_slots = [i for i, d in enumerate(order) if d == "digits"]
    if digit_slots:
        pool = np.concatenate(mnist_split()[1])
        rows = rng.choice(pool, size=len(digit_slots), replace=len(digit_slots) > len(pool))
        for slot, row in zip(digit_slots, rows, strict=True):
            items[slot] = int(row)
    return order, items


def eval_jobs(out_root: Path, p: dict[str, Any]) -> dict[str, list[Job]]:
    tasks: dict[str, list[Job]] = {}
    for domain in p["domains"]:
        items = _eval_items(domain, p["eval_per_class"])
        # Keyed by the domain's fixed index, so a task's content does not depend on `domains`.
        rng_key = (p["seed"], RNG_EVAL, ALL_DOMAINS.index(domain))
        tasks[domain] = _shard_jobs(
            out_root / "eval" / domain, "classification", [domain] * len(items), items, rng_key, p
        )
    if p["retrieval_pairs"] > 0:
        order, items = _retrieval_plan(p)
        tasks["retrieval"] = _shard_jobs(
            out_root / "eval" / "retrieval", "retrieval", order, items, (p["seed"], RNG_RETRIEVAL), p
        )
    return tasks


def _train_split_items(domain: str, per_class: int, seed: int) -> list[int]:
    if domain != "digits":
        return _eval_items(domain, per_class)
    train_rows = mnist_split()[0]
    labels = mnist()[1][train_rows]
    rng = np.random.default_rng([seed, RNG_TRAIN_SPLIT, 0])
    return _interleave(
        [rng.choice(train_rows[labels == c], size=per_class, replace=False) for c in range(10)]
    )


def train_split_jobs(out_root: Path, p: dict[str, Any]) -> dict[str, list[Job]]:
    """``eval/<domain>/train/train-%06d.tar``: the labelled train split of each classification task."""
    tasks: dict[str, list[Job]] = {}
    per_class = TRAIN_SPLIT_FACTOR * p["eval_per_class"]
    for domain in p["domains"]:
        items = _train_split_items(domain, per_class, p["seed"])
        rng_key = (p["seed"], RNG_TRAIN_SPLIT, ALL_DOMAINS.index(domain))
        tasks[domain] = _shard_jobs(
            out_root / "eval" / domain / "train", "classification", [domain] * len(items), items, rng_key, p,
            prefix="train",
        )
    return tasks


def has_train_splits(out_root: Path, p: dict[str, Any]) -> bool:
    return all((out_root / "eval" / d / "train" / "task.json").is_file() for d in p["domains"])
