"""``cluster`` stage: balanced fine k-means of caption features, then coarse experts.

A global one-shard stage (MoDE ``prep_hrchy.py``). Reads the embed manifest, draws a seeded
sample of pair ids (``cluster.sample_fraction`` or ``cluster.sample_size``), L2-normalises the
features and fits ``num_fine`` balanced clusters (``stages.clustering``), then k-means of the fine
centres into ``num_experts`` coarse clusters.

Outputs in ``<run>/cluster/``:

* ``fine_centers.pth``: ``{"center": FloatTensor[K, D]}`` (MoDE's ``F{K}.pth``);
* ``coarse.pth``: ``{"coarse": FloatTensor[E, D], "assign": LongTensor[K]}`` (MoDE's
  ``F{K}-C{E}.pth``; ``assign`` is the fine→coarse map);
* ``sample_ids.npy``: the pair ids the centres were fitted on;
* ``cluster_sizes.png``; fit statistics in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import artifacts
from pipeline.config import PipelineConfig, to_jsonable
from pipeline.errors import ConfigError, UnreadableFileError
from pipeline.runner import Shard
from pipeline.runtime import Runtime
from pipeline.safeload import torch_load
from stages import clustering

UPSTREAM = ("embed",)
"""Stages whose manifests this stage consumes."""


def hash_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The cluster section without runtime-only fields, plus the seed."""
    section = {k: v for k, v in to_jsonable(cfg.cluster).items() if k != "device"}
    return {"cluster": section, "seed": cfg.run.seed}


def embed_outputs(cfg: PipelineConfig) -> tuple[dict[str, Any], list[Path]]:
    """The embed manifest and its feature files, in pair-id order."""
    edir = cfg.run_dir / "embed"
    manifest = artifacts.read_manifest(edir, "embed")
    return manifest, [edir / rel for rel in manifest["outputs"]]


def sample_count(cfg: PipelineConfig, total: int) -> int:
    """Pairs the fine centres are fitted on, out of ``total``.

    Raises:
        ConfigError: fewer than ``cluster.num_fine`` (a fine cluster would get no pair).
    """
    c = cfg.cluster
    n = min(total, c.sample_size) if c.sample_size > 0 else max(1, round(total * c.sample_fraction))
    if n < c.num_fine:
        raise ConfigError(
            f"cluster.num_fine: {c.num_fine} clusters need at least as many sampled pairs, got {n} "
            f"(of {total}; see cluster.sample_fraction / cluster.sample_size)"
        )
    return n


def list_shards(cfg: PipelineConfig, stage_dir: Path) -> list[Shard]:
    """One global shard whose fingerprint covers the feature files the centres were fitted on.

    Before the first fit that is every feature file. Afterwards it is the files named in the
    completion record (``fitted_shards``) while they are all still there: shards added since
    (growth) do not make the clustering stale; their pairs are assigned to the existing centres.
    """
    manifest, files = embed_outputs(cfg)
    if "num_pairs" in manifest:
        sample_count(cfg, int(manifest["num_pairs"]))
    record = artifacts.done_path(stage_dir, "all")
    fitted = artifacts.read_json(record).get("fitted_shards") if record.is_file() else None
    by_stem = {f.stem: f for f in files}
    if fitted and set(fitted) <= set(by_stem):
        files = [by_stem[name] for name in fitted]
    digests = artifacts.DigestCache(stage_dir)
    shard = Shard("all", digests.fingerprint(*files), {"fitted_shards": [f.stem for f in files]})
    digests.save()
    return [shard]


def load_sample(cfg: PipelineConfig, files: list[Path]) -> tuple[np.ndarray, torch.Tensor]:
    """Seeded sample of pair ids and their L2-normalised float32 features.

    Each feature file is memory-mapped only while its sampled rows are copied out, so the pages a
    sparse sample touches are unmapped again: peak memory is the sample plus one file's pages,
    whatever the number of pairs (mapping every file at once grew RSS by ~0.7 KiB per pair).
    """
    sizes = np.array([_rows(f) for f in files])
    total = int(sizes.sum())
    n = sample_count(cfg, total)
    rng = np.random.default_rng(cfg.run.seed)
    ids = np.sort(rng.choice(total, size=n, replace=False)) if n < total else np.arange(total)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for i, f in enumerate(files):
        lo, hi = np.searchsorted(ids, [offsets[i], offsets[i + 1]])
        if hi > lo:
            arr = np.load(f, mmap_mode="r")
            parts.append(np.asarray(arr[ids[lo:hi] - offsets[i]], dtype=np.float32))
            del arr  # unmap now: its touched pages leave this process's RSS
    x = torch.from_numpy(np.concatenate(parts))
    return ids, torch.nn.functional.normalize(x, dim=1)


def _rows(path: Path) -> int:
    """Rows of a ``.npy`` file, read from its header (the mapping is dropped at once)."""
    return int(np.load(path, mmap_mode="r").shape[0])


def process_shard(cfg: PipelineConfig, shard: Shard, stage_dir: Path, runtime: Runtime) -> dict[str, Any]:
    """Fit fine and coarse clusters; write centres, map, sample ids, plot and statistics."""
    c = cfg.cluster
    _, files = embed_outputs(cfg)
    ids, x = load_sample(cfg, files)
    device = runtime.device
    if c.backend == "faiss":
        fine = clustering.fit_faiss_kmeans(
            x, c.num_fine, niter=c.max_iter, seed=cfg.run.seed, spherical=c.metric == "cosine",
            gpu=device.type == "cuda",
        )
    else:
        fine = clustering.fit_kmeans(
            x, c.num_fine, balanced=c.balanced, metric=c.metric, init=c.init, max_iter=c.max_iter,
            tol=c.tol, seed=cfg.run.seed, device=device, chunk_size=c.chunk_size,
            balance_slack=c.balance_slack, progress=sys.stderr.isatty(),
        )
    coarse_centers, fine_to_coarse = clustering.coarse_cluster(
        fine.centers, c.num_experts, balanced=c.coarse_balanced, metric=c.metric, seed=cfg.run.seed,
        n_init=c.coarse_n_init, balance_slack=c.balance_slack,
    )
    _save(stage_dir, fine, coarse_centers, fine_to_coarse, ids)
    stats = _fit_stats(fine, fine_to_coarse, c.num_experts, len(ids))
    artifacts.write_json(stage_dir / "fit_stats.json", stats)
    _plot_sizes(stage_dir / "cluster_sizes.png", fine.sizes, stats["expert_sample_sizes"])
    # The record names (and fingerprints) the files this fit used: all current ones, which after
    # growth + ``--force`` are more than the listing fingerprinted; the next listing then matches.
    digests = artifacts.DigestCache(stage_dir)
    fingerprint = digests.fingerprint(*files)
    digests.save()
    return {
        "in": len(ids), "out": c.num_fine, "skipped": {}, "fitted_shards": [f.stem for f in files],
        "fingerprint": fingerprint,
    }


def _save(stage_dir: Path, fine, coarse_centers, fine_to_coarse, ids: np.ndarray) -> None:
    with artifacts.atomic_path(stage_dir / "fine_centers.pth") as tmp:
        artifacts.torch_save({"center": fine.centers.float()}, tmp)
    with artifacts.atomic_path(stage_dir / "coarse.pth") as tmp:
        artifacts.torch_save({"coarse": coarse_centers.float(), "assign": fine_to_coarse.long()}, tmp)
    with artifacts.atomic_path(stage_dir / "sample_ids.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, ids.astype(np.int64))


def _fit_stats(fine, fine_to_coarse: torch.Tensor, num_experts: int, n: int) -> dict[str, Any]:
    sizes = fine.sizes.long()
    expert = torch.zeros(num_experts, dtype=torch.long).index_add_(0, fine_to_coarse.long(), sizes)
    nonzero = sizes[sizes > 0]
    return {
        "sample_size": n,
        "inertia": float(fine.inertia),
        "iterations": int(fine.n_iter),
        "converged": bool(fine.converged),
        "fine_size_min": int(sizes.min()),
        "fine_size_max": int(sizes.max()),
        "fine_max_over_min": float(nonzero.max() / nonzero.min()) if len(nonzero) else 0.0,
        "fine_per_expert": torch.bincount(fine_to_coarse.long(), minlength=num_experts).tolist(),
        "expert_sample_sizes": expert.tolist(),
    }


def _plot_sizes(path: Path, fine_sizes: torch.Tensor, expert_sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    a.bar(range(len(fine_sizes)), sorted(fine_sizes.tolist(), reverse=True), width=1.0)
    a.set(title="fine cluster sizes (sample, sorted)", xlabel="fine cluster", ylabel="pairs")
    b.bar([str(i) for i in range(len(expert_sizes))], expert_sizes, color="tab:orange")
    b.set(title="expert sizes (sample)", xlabel="expert", ylabel="pairs")
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def finalize(cfg: PipelineConfig, stage_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Manifest fields: the files, the fit statistics and a digest of the centres."""
    stats = json.loads((stage_dir / "fit_stats.json").read_text())
    digest = hashlib.sha256((stage_dir / "fine_centers.pth").read_bytes()).hexdigest()[:16]
    coarse = artifacts.content_digest(stage_dir / "coarse.pth")
    return {
        "outputs_digest": f"{digest}:{coarse}",
        "fitted_shards": records[0].get("fitted_shards", []) if records else [],
        "outputs": ["fine_centers.pth", "coarse.pth", "sample_ids.npy", "cluster_sizes.png"],
        "num_fine": cfg.cluster.num_fine,
        "num_experts": cfg.cluster.num_experts,
        "metric": cfg.cluster.metric,
        "centers_digest": digest,
        "fit": stats,
    }


def load_centers(cfg: PipelineConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Fine centres, coarse centres, fine→coarse map and the cluster manifest of a run."""
    cdir = cfg.run_dir / "cluster"
    manifest = artifacts.read_manifest(cdir, "cluster")
    fine = torch_load(cdir / "fine_centers.pth", "cluster")
    coarse = torch_load(cdir / "coarse.pth", "cluster")
    try:
        return fine["center"], coarse["coarse"], coarse["assign"], manifest
    except (KeyError, TypeError, IndexError):
        raise UnreadableFileError(f"cluster: {cdir} holds centre files of another layout; rerun cluster --force") from None
