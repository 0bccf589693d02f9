"""The ``random_split`` baseline's partition (MoDE Table 5 "Random-E").

Every pair gets a random coarse label such that each label is used exactly as often as the
corresponding coarse cluster of the assign stage: the coarse labels of all pairs (in pair-id
order) are permuted with a seeded generator. The parts are therefore disjoint, complete and have
the cluster sizes; only *which* pairs go together is random. Written once per run, atomically, as
tables with assign's columns (``pair_id``, ``key``, ``coarse``) in
``<run>/train/random_split/partition/<shard>.parquet`` plus ``manifest.json``; the experts of the
baseline select their pairs from these tables exactly as the data experts do from assign's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, atomic_path, read_json, read_manifest, write_json
from pipeline.config import PipelineConfig
from training import runs

PARTITION_SALT = 0x5EED5
"""Mixed into ``run.seed`` for the permutation (independent of every other stream)."""


def partition_dir(cfg: PipelineConfig) -> Path:
    """``<run>/train/random_split/partition``."""
    return runs.run_dir(cfg, "random_split") / "partition"


def _assign_tables(cfg: PipelineConfig) -> tuple[dict[str, Path], dict]:
    assign_dir = cfg.run_dir / "assign"
    manifest = read_manifest(assign_dir, "assign")
    return {Path(rel).stem: assign_dir / rel for rel in manifest["outputs"]}, manifest


def random_labels(coarse: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of ``coarse``: the same label counts, assigned to random pairs."""
    rng = np.random.default_rng([seed, PARTITION_SALT])
    return coarse[rng.permutation(len(coarse))]


def ensure_random_partition(cfg: PipelineConfig) -> dict[str, str]:
    """``{shard: table path}`` of the random partition, written first when missing or out of date.

    Deterministic (``run.seed`` and the assignment), so concurrent writers produce the same bytes.
    """
    tables, assign_manifest = _assign_tables(cfg)
    out_dir = partition_dir(cfg)
    identity = {"assign": assign_manifest["config_hash"], "seed": cfg.run.seed, "shards": sorted(tables)}
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file() and read_json(manifest_path).get("identity") == identity:
        return {shard: str(out_dir / f"{shard}.parquet") for shard in tables}
    names = sorted(tables)
    parts = [pq.read_table(tables[name], columns=["pair_id", "key", "coarse"]) for name in names]
    coarse = np.concatenate([p.column("coarse").to_numpy() for p in parts]) if parts else np.zeros(0, np.int16)
    labels = random_labels(coarse, cfg.run.seed)
    offset = 0
    for name, part in zip(names, parts, strict=True):
        n = part.num_rows
        table = part.set_column(2, "coarse", pa.array(labels[offset : offset + n], type=part.schema.field("coarse").type))
        offset += n
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    sizes = np.bincount(labels.astype(np.int64), minlength=int(assign_manifest["num_experts"])).tolist()
    write_json(manifest_path, {"stage": "random_split_partition", "identity": identity, "sizes": sizes})
    return {shard: str(out_dir / f"{shard}.parquet") for shard in names}
