"""The random_split baseline's partition: exactly the cluster sizes, disjoint, complete, seeded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import write_json
from pipeline.config import load_config
from training.partition import ensure_random_partition, random_labels


def _fake_assign(cfg, sizes_per_shard):
    adir = cfg.run_dir / "assign"
    (adir / "assign").mkdir(parents=True)
    rng = np.random.default_rng(0)
    outputs, pid = [], 0
    for i, n in enumerate(sizes_per_shard):
        coarse = rng.integers(0, 3, n).astype(np.int16)
        table = pa.table({"pair_id": np.arange(pid, pid + n), "key": [f"k{j}" for j in range(n)],
                          "fine": coarse.astype(np.int32), "coarse": coarse, "dist": np.zeros(n, np.float32)})
        pq.write_table(table, adir / "assign" / f"s{i}.parquet")
        outputs.append(f"assign/s{i}.parquet")
        pid += n
    write_json(adir / "manifest.json", {"stage": "assign", "config_hash": "h", "num_experts": 3, "outputs": outputs})
    return adir


def test_parts_have_the_cluster_sizes_and_are_disjoint_and_complete(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    adir = _fake_assign(cfg, [40, 25, 35])
    tables = ensure_random_partition(cfg)
    assert sorted(tables) == ["s0", "s1", "s2"]
    original = pa.concat_tables([pq.read_table(adir / "assign" / f"s{i}.parquet") for i in range(3)])
    random = pa.concat_tables([pq.read_table(tables[f"s{i}"]) for i in range(3)])
    assert random.column("pair_id").to_pylist() == original.column("pair_id").to_pylist()  # complete, each once
    assert random.column("key").to_pylist() == original.column("key").to_pylist()
    sizes = np.bincount(original.column("coarse").to_numpy(), minlength=3)
    assert np.bincount(random.column("coarse").to_numpy(), minlength=3).tolist() == sizes.tolist()
    parts = [set(np.flatnonzero(random.column("coarse").to_numpy() == k)) for k in range(3)]
    assert sum(len(p) for p in parts) == 100 and not (parts[0] & parts[1] or parts[1] & parts[2])
    assert (random.column("coarse").to_numpy() != original.column("coarse").to_numpy()).mean() > 0.3
    mtime = (cfg.run_dir / "train" / "random_split" / "partition" / "s0.parquet").stat().st_mtime_ns
    assert ensure_random_partition(cfg) == tables
    assert (cfg.run_dir / "train" / "random_split" / "partition" / "s0.parquet").stat().st_mtime_ns == mtime


def test_labels_are_a_seeded_permutation():
    coarse = np.array([0, 0, 1, 2, 2, 2])
    a, b = random_labels(coarse, 0), random_labels(coarse, 0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == sorted(coarse.tolist())
    assert not np.array_equal(random_labels(np.arange(50), 0), random_labels(np.arange(50), 1))
