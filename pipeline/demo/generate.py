"""The demo-data driver: :func:`generate_demo_data` validates the parameters, reuses data already
generated with them, or plans, renders and writes everything with its manifest."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json, write_text
from pipeline.demo.common import ALL_DOMAINS, FORMAT_VERSION, MANIFEST_NAME, MNIST_HELDOUT_PER_CLASS
from pipeline.demo.plan import eval_jobs, has_train_splits, train_jobs, train_split_jobs
from pipeline.demo.samples import DOMAINS, Job, execute


def _write_train_splits(out_root: Path, p: dict[str, Any], workers: int, progress: bool) -> dict[str, Any]:
    """Render the train splits and write their ``task.json``; returns ``{task: info}``."""
    tasks = train_split_jobs(out_root, p)
    execute([job for jobs in tasks.values() for job in jobs], workers, progress)
    infos = {}
    for task, jobs in tasks.items():
        infos[task] = {**_task_json(task, p, jobs), "split": "train"}
        write_json(out_root / "eval" / task / "train" / "task.json", infos[task])
    return {task: {"dir": f"eval/{task}/train", **info} for task, info in infos.items()}


def _validate(p: dict[str, Any], workers: int) -> None:
    unknown = sorted(set(p["domains"]) - set(ALL_DOMAINS))
    if unknown or not p["domains"] or len(set(p["domains"])) != len(p["domains"]):
        raise ValueError(f"domains must be distinct names from {ALL_DOMAINS}, got {p['domains']}")
    minimum = {
        "num_pairs": 1,
        "pairs_per_shard": 1,
        "eval_per_class": 1,
        "image_size": 16,
        "retrieval_pairs": 0,
        "seed": 0,
    }
    for name, low in [*minimum.items(), ("workers", 1)]:
        value = workers if name == "workers" else p[name]
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if p["pairs_per_shard"] > 99999 or math.ceil(p["num_pairs"] / p["pairs_per_shard"]) > 999999:
        raise ValueError("keys allow at most 99999 pairs per shard and 999999 shards")
    if "digits" in p["domains"] and p["eval_per_class"] > MNIST_HELDOUT_PER_CLASS:
        raise ValueError(
            f"eval_per_class must be <= {MNIST_HELDOUT_PER_CLASS} (held-out MNIST digits per class)"
        )


def _existing(manifest: Path, params: dict[str, Any]) -> dict | None:
    """The previous summary if it was made with ``params``; error if made with others."""
    if not manifest.is_file():
        return None
    summary = json.loads(manifest.read_text())
    if summary.get("parameters") != params:
        old = summary.get("parameters", {})
        diff = sorted(k for k in params.keys() | old.keys() if params.get(k) != old.get(k))
        raise FileExistsError(
            f"{manifest} was generated with different {diff}; use a new out_root or delete it"
        )
    return summary


def _task_json(task: str, p: dict[str, Any], jobs: list[Job]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "shards": [Path(j.path).name for j in jobs],
        "num_samples": sum(len(j.keys) for j in jobs),
    }
    if task == "retrieval":
        return {"type": "retrieval", "domains": list(p["domains"]), **info}
    spec = DOMAINS[task]
    return {
        "type": "classification",
        "domain": task,
        "classnames": list(spec.classnames),
        "templates": list(spec.prompts),
        **info,
    }


def _write_tasks(out_root: Path, p: dict[str, Any], tasks: dict[str, list[Job]]) -> dict[str, Any]:
    """Write every ``eval/<task>/task.json``; return them keyed by task."""
    infos = {}
    for task, jobs in tasks.items():
        infos[task] = _task_json(task, p, jobs)
        write_json(out_root / "eval" / task / "task.json", infos[task])
    return infos


def _summary(p: dict[str, Any], num_shards: int, counts: Counter, tasks: dict[str, Any]) -> dict[str, Any]:
    labels = {d: {c: counts[(d, c)] for c in DOMAINS[d].classnames} for d in p["domains"]}
    return {
        "format_version": FORMAT_VERSION,
        "parameters": p,
        "train": {
            "dir": "train",
            "shards": f"0..{num_shards - 1}",
            "num_shards": num_shards,
            "num_pairs": p["num_pairs"],
            "pairs_per_domain": {d: sum(v.values()) for d, v in labels.items()},
            "pairs_per_label": labels,
        },
        "eval": {task: {"dir": f"eval/{task}", **info} for task, info in tasks.items()},
        "mnist_heldout_per_class": MNIST_HELDOUT_PER_CLASS,
    }


def generate_demo_data(
    out_root: Path,
    *,
    num_pairs: int = 20000,
    image_size: int = 64,
    pairs_per_shard: int = 1000,
    eval_per_class: int = 40,
    retrieval_pairs: int = 500,
    seed: int = 0,
    workers: int = 2,
    domains: Sequence[str] = ALL_DOMAINS,
    progress: bool = True,
) -> dict:
    """Generate the deterministic demo dataset (training shards and evaluation tasks).

    Args:
        out_root: Output folder; gets ``train/``, ``eval/`` and ``demo_manifest.json``.
        num_pairs: Number of training image-text pairs, split evenly over ``domains``.
        image_size: Side of the square RGB JPEG images in pixels (>= 16).
        pairs_per_shard: Pairs per training tar (also the maximum size of an eval tar).
        eval_per_class: Held-out images per class in each zero-shot classification task.
        retrieval_pairs: Pairs in the ``retrieval`` eval task (0: no retrieval task).
        seed: Seed from which every random stream is derived.
        workers: Processes rendering shards; the output does not depend on it.
        domains: Subset of ``ALL_DOMAINS`` to generate.
        progress: Show a tqdm progress bar.

    Returns:
        The summary that is also written to ``<out_root>/demo_manifest.json``: parameters,
        training shard range and per-domain/per-label counts, and the evaluation tasks.

    Raises:
        ValueError: An argument is out of range.
        FileExistsError: ``out_root`` holds a manifest generated with other parameters.
    """
    out_root = Path(out_root)
    params = {
        "num_pairs": num_pairs,
        "image_size": image_size,
        "pairs_per_shard": pairs_per_shard,
        "eval_per_class": eval_per_class,
        "retrieval_pairs": retrieval_pairs,
        "seed": seed,
        "domains": list(domains),
        "format_version": FORMAT_VERSION,
    }
    _validate(params, workers)
    previous = _existing(out_root / MANIFEST_NAME, params)
    if previous is None:
        return _generate(out_root, params, workers, progress)
    if not has_train_splits(out_root, params):  # data generated before the train splits existed
        previous["eval_train"] = _write_train_splits(out_root, params, workers, progress)
        write_json(out_root / MANIFEST_NAME, previous)
    return previous


def _generate(out_root: Path, params: dict[str, Any], workers: int, progress: bool) -> dict:
    """Render every tar, write the task files, the shard list and the manifest; returns the summary."""
    train = train_jobs(out_root, params)
    tasks = eval_jobs(out_root, params)
    counts = execute(train + [job for jobs in tasks.values() for job in jobs], workers, progress)
    summary = _summary(
        params, len(train), sum(counts[: len(train)], Counter()), _write_tasks(out_root, params, tasks)
    )
    summary["eval_train"] = _write_train_splits(out_root, params, workers, progress)
    write_text(out_root / "train" / "shards.txt", summary["train"]["shards"] + "\n")
    write_json(out_root / MANIFEST_NAME, summary)
    return summary
