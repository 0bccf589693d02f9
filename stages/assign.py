"""``assign`` stage: nearest fine centre for every pair (MoDE ``prep_inference.py``), exact.

With ``assign.capacity: fit_bounds`` it is capacity-aware instead: within each shard every fine
cluster's size lies within ``clustering.balanced_bounds(shard pairs, K, cluster.balance_slack)`` (the
balanced fit's bounds), so over all shards within the sums of those bounds; MoDE itself assigned
greedily to the nearest centre at inference, which is the default (``none``).

One output per embed shard, ``<run>/assign/assign/<shard>.parquet`` with columns ``pair_id``
int64, ``key`` str, ``fine`` int32, ``coarse`` int16 (via the fine→coarse map) and ``dist``
float32 (L2 distance between the normalised feature and its fine centre for ``euclidean``,
``1 - cos`` for ``cosine``). Memory is bounded by ``assign.chunk_size`` rows at a time; time is
linear in the number of pairs. The manifest records expert sizes and, when prep kept a label
column (``prep.label_field``), the purity of experts with respect to it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import artifacts
from pipeline.config import PipelineConfig, to_jsonable
from pipeline.errors import UnreadableFileError
from pipeline.runner import Shard
from pipeline.runtime import Runtime
from pipeline.safeload import load_npy, read_parquet
from stages import clustering, generations
from stages.cluster import embed_outputs, load_centers

SCHEMA = pa.schema(
    [
        ("pair_id", pa.int64()),
        ("key", pa.string()),
        ("fine", pa.int32()),
        ("coarse", pa.int16()),
        ("dist", pa.float32()),
    ]
)


UPSTREAM = ("prep", "embed", "cluster")
"""Stages whose manifests this stage consumes (captions' pair ids, features, centres)."""


def hash_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """Nearest assignment is exact, so the backend is not hashed; a capacity-aware one is."""
    out = {"metric": cfg.cluster.metric, "num_fine": cfg.cluster.num_fine, "num_experts": cfg.cluster.num_experts}
    if cfg.assign.capacity != "none":
        out.update(capacity=cfg.assign.capacity, balance_slack=cfg.cluster.balance_slack)
    return out


def list_shards(cfg: PipelineConfig, stage_dir: Path) -> list[Shard]:
    """One shard per feature file; the fingerprint covers the features and the centres."""
    _, files = embed_outputs(cfg)
    cdir = cfg.run_dir / "cluster"
    artifacts.read_manifest(cdir, "cluster")
    centres = [cdir / "fine_centers.pth", cdir / "coarse.pth"]
    gens, fitted = generations.generations(cfg), generations.fitted_shards(cfg)  # new experts (growth)
    digests = artifacts.DigestCache(stage_dir)
    shards = [
        Shard(f.stem, digests.fingerprint(f, *centres, *generations.fingerprint_files(cfg, f.stem, gens, fitted)),
              {"features": str(f)})
        for f in files
    ]
    digests.save()
    return shards


def output_path(stage_dir: Path, shard: str) -> Path:
    """Assignment Parquet of one shard."""
    return stage_dir / "assign" / f"{shard}.parquet"


def process_shard(cfg: PipelineConfig, shard: Shard, stage_dir: Path, runtime: Runtime) -> dict[str, Any]:
    """Assign one shard's pairs to their nearest fine centre (or capacity-aware, see module doc)."""
    fine, _, fine_to_coarse, _ = _centers(cfg)
    fine, fine_to_coarse = generations.shard_centers(cfg, shard.name, fine, fine_to_coarse)
    feats = torch.from_numpy(read_features(shard.inputs["features"], fine.shape[1]))
    captions = read_parquet(cfg.run_dir / "prep" / "captions" / f"{shard.name}.parquet", "assign", ["pair_id", "key"])
    if captions.num_rows != feats.shape[0]:
        raise ValueError(f"{shard.name}: {feats.shape[0]} feature rows but {captions.num_rows} captions")
    ids, dist = _assign(cfg, feats, fine, runtime.device)
    ids_np = ids.numpy()
    table = pa.table(
        {
            "pair_id": captions.column("pair_id"),
            "key": captions.column("key"),
            "fine": pa.array(ids_np.astype(np.int32)),
            "coarse": pa.array(fine_to_coarse.numpy()[ids_np].astype(np.int16)),
            "dist": pa.array(dist.numpy().astype(np.float32, copy=False)),
        },
        schema=SCHEMA,
    )
    with artifacts.atomic_path(output_path(stage_dir, shard.name)) as tmp:
        # Dictionary pages only where values repeat (ids, experts): unique keys, pair ids and
        # distances would be dictionary-encoded in vain first and then fall back to plain.
        pq.write_table(table, tmp, use_dictionary=["fine", "coarse"])
    return {"in": feats.shape[0], "out": table.num_rows, "skipped": {}}


def read_features(path: str | Path, dim: int) -> np.ndarray:
    """A shard's features as L2-normalised float32 ``[N, dim]``, in one copy.

    The fp16 → fp32 conversion is the only copy; the squared norms come from ``einsum`` (no
    ``[N, D]`` temporary, unlike ``np.linalg.norm``) and rows are scaled in place by the
    reciprocal norm (what ``F.normalize`` computes). numpy element-wise work runs on one thread,
    which does not wait on descheduled threads of a busy CPU.
    """
    array = load_npy(path, "assign", ndim=2)
    if array.shape[1] != dim:
        raise UnreadableFileError(f"assign: {path} has {array.shape[1]} columns, the centres {dim}")
    array = array.astype(np.float32)  # a copy even when float32 already: the file stays untouched
    norms = np.sqrt(np.einsum("ij,ij->i", array, array))
    array *= (1.0 / np.maximum(norms, 1e-12))[:, None]
    return array


def _assign(
    cfg: PipelineConfig, feats: torch.Tensor, fine: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not len(feats):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    if cfg.assign.capacity == "fit_bounds":
        return clustering.assign_capacity(
            feats, fine, metric=cfg.cluster.metric, balance_slack=cfg.cluster.balance_slack,
            chunk_size=cfg.assign.chunk_size, device=device,
        )
    return clustering.assign_nearest(
        feats, fine, metric=cfg.cluster.metric, chunk_size=cfg.assign.chunk_size,
        backend=cfg.assign.backend, device=device,
    )


_CENTERS_CACHE: dict[tuple, tuple] = {}


def _centers(cfg: PipelineConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``load_centers`` once per process while the centre files stay the same (not per shard)."""
    cdir = cfg.run_dir / "cluster"
    files = [cdir / "fine_centers.pth", cdir / "coarse.pth", cdir / "manifest.json"]
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())
    if key not in _CENTERS_CACHE:
        _CENTERS_CACHE.clear()
        _CENTERS_CACHE[key] = load_centers(cfg)
    return _CENTERS_CACHE[key]


def finalize(cfg: PipelineConfig, stage_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Expert and fine-cluster sizes over all pairs (and purity against prep labels, if any)."""
    shards = [rec["shard"] for rec in records]
    k, e = generations.totals(cfg)  # every generation's centres and experts
    fine_sizes, expert_sizes = np.zeros(k, np.int64), np.zeros(e, np.int64)
    label_counts: Counter = Counter()
    for shard in shards:
        table = pq.read_table(output_path(stage_dir, shard), columns=["fine", "coarse"])
        fine_sizes += np.bincount(table.column("fine").to_numpy(), minlength=k)
        coarse = table.column("coarse").to_numpy()
        expert_sizes += np.bincount(coarse, minlength=e)
        labels = _labels(cfg, shard)
        if labels is not None:
            label_counts.update(zip(coarse.tolist(), labels, strict=True))
    extra: dict[str, Any] = {}
    if label_counts:
        extra["purity"] = _purity(label_counts, e)
    nz = fine_sizes[fine_sizes > 0]
    return {
        "outputs": [str(output_path(stage_dir, s).relative_to(stage_dir)) for s in shards],
        "num_experts": e,
        "num_fine": k,
        "expert_sizes": expert_sizes.tolist(),
        "fine_size_min": int(fine_sizes.min()),
        "fine_size_max": int(fine_sizes.max()),
        "fine_max_over_min_nonempty": float(nz.max() / nz.min()) if len(nz) else 0.0,
        "config_used": to_jsonable(cfg.assign),
        **extra,
    }


def _labels(cfg: PipelineConfig, shard: str) -> list[str] | None:
    path = cfg.run_dir / "prep" / "captions" / f"{shard}.parquet"
    if "label" not in pq.read_schema(path).names:
        return None
    return pq.read_table(path, columns=["label"]).column("label").to_pylist()


def _purity(counts: Counter, num_experts: int) -> dict[str, Any]:
    """Share of pairs whose expert's majority label is their own label, plus the majorities."""
    per_expert: dict[int, Counter] = {i: Counter() for i in range(num_experts)}
    for (expert, label), n in counts.items():
        per_expert[expert][label] += n
    total = sum(counts.values())
    majority = {i: c.most_common(1)[0] for i, c in per_expert.items() if c}
    return {
        "overall": sum(n for _, n in majority.values()) / total,
        "majority_label": {str(i): lab for i, (lab, _) in majority.items()},
        "per_expert": {str(i): n / sum(per_expert[i].values()) for i, (_, n) in majority.items()},
    }


if __name__ == "__main__":
    import sys

    from pipeline.distributed import torchrun_stage

    sys.exit(torchrun_stage("assign"))
