"""cluster + assign stages on fake embed outputs (well-separated blobs)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import artifacts
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.runner import run_stage
from tests.conftest import overrides, pair_members, write_shard

PAIRS_PER_SHARD, SHARDS, DIM = 40, 4, 16


@pytest.fixture
def embedded(tmp_path):
    """Prep on real tiny shards, then hand-written embed outputs: 4 blobs, blob = pair_id % 4."""
    root = tmp_path / "data"
    for s in range(SHARDS):
        members = []
        for i in range(PAIRS_PER_SHARD):
            members += pair_members(f"{s:03d}_{i:03d}", f"caption {s} {i}")
        write_shard(root / f"{s}.tar", members)
    cfg = load_config(
        None,
        overrides(tmp_path, f"{root}/{{0..{SHARDS - 1}}}.tar", "cluster.num_fine=8", "cluster.num_experts=4",
                  "cluster.max_iter=30"),
    )
    run_stage(cfg, "prep", progress=False)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, DIM)) * 5
    edir = cfg.run_dir / "embed"
    outputs = []
    for s in range(SHARDS):
        ids = pq.read_table(cfg.run_dir / "prep" / "captions" / f"s0_{s}.parquet").column("pair_id").to_numpy()
        feats = means[ids % 4] + rng.normal(size=(len(ids), DIM)) * 0.1
        path = edir / "features" / f"s0_{s}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, feats.astype(np.float16))
        outputs.append(f"features/s0_{s}.npy")
    artifacts.write_json(edir / "manifest.json", {"stage": "embed", "outputs": outputs, "dim": DIM})
    return cfg


def read_assign(cfg) -> dict[str, np.ndarray]:
    manifest = json.loads((cfg.run_dir / "assign" / "manifest.json").read_text())
    tables = [pq.read_table(cfg.run_dir / "assign" / rel) for rel in manifest["outputs"]]
    return {c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in ("pair_id", "fine", "coarse", "dist")}


def test_cluster_then_assign_recovers_blobs_exactly(embedded):
    cfg = embedded
    run_stage(cfg, "cluster", progress=False)
    manifest = run_stage(cfg, "assign", progress=False)["manifest"]
    out = read_assign(cfg)
    assert (out["pair_id"] == np.arange(SHARDS * PAIRS_PER_SHARD)).all()
    # experts = blobs (up to a permutation)
    blob = out["pair_id"] % 4
    for b in range(4):
        assert len(set(out["coarse"][blob == b].tolist())) == 1
    assert len(set(out["coarse"].tolist())) == 4
    assert sum(manifest["expert_sizes"]) == SHARDS * PAIRS_PER_SHARD
    # assignment equals brute force on normalised features
    fine = torch.load(cfg.run_dir / "cluster" / "fine_centers.pth")["center"]
    coarse = torch.load(cfg.run_dir / "cluster" / "coarse.pth")
    feats = torch.cat([torch.from_numpy(np.load(cfg.run_dir / "embed" / "features" / f"s0_{s}.npy").astype(np.float32))
                       for s in range(SHARDS)])
    feats = torch.nn.functional.normalize(feats, dim=1)
    d = torch.cdist(feats, fine)
    assert (d.argmin(1).numpy() == out["fine"]).all()
    np.testing.assert_allclose(d.min(1).values.numpy(), out["dist"], rtol=1e-4, atol=1e-5)
    assert (coarse["assign"][d.argmin(1)].numpy() == out["coarse"]).all()
    # fine→coarse map consistent with the coarse centres
    assert (torch.cdist(fine, coarse["coarse"]).argmin(1) == coarse["assign"]).all()
    assert (cfg.run_dir / "cluster" / "cluster_sizes.png").stat().st_size > 1000


def test_cluster_is_deterministic_and_reruns_are_noops(embedded, tmp_path):
    cfg = embedded
    run_stage(cfg, "cluster", progress=False)
    first = torch.load(cfg.run_dir / "cluster" / "fine_centers.pth")["center"]
    assert run_stage(cfg, "cluster", progress=False)["ran"] == 0
    run_stage(cfg, "cluster", force=True, progress=False)
    assert torch.equal(first, torch.load(cfg.run_dir / "cluster" / "fine_centers.pth")["center"])
    changed = load_config(None, [*overrides(tmp_path, cfg.data.train), "cluster.num_fine=6", "cluster.num_experts=4"])
    with pytest.raises(StageError, match="cluster.num_fine"):
        run_stage(changed, "cluster", progress=False)


def test_assign_capacity_fit_bounds_keeps_sizes_within_per_shard_bounds(embedded, tmp_path):
    from stages.clustering import balanced_bounds

    cfg = load_config(None, [*overrides(tmp_path, f"{tmp_path}/data/{{0..{SHARDS - 1}}}.tar", "cluster.num_fine=8",
                                        "cluster.num_experts=4", "cluster.max_iter=30"), "assign.capacity=fit_bounds"])
    run_stage(cfg, "cluster", progress=False)
    manifest = run_stage(cfg, "assign", progress=False)["manifest"]
    out = read_assign(cfg)
    assert sorted(out["pair_id"].tolist()) == list(range(SHARDS * PAIRS_PER_SHARD))  # each pair once
    low, high = balanced_bounds(PAIRS_PER_SHARD, 8, cfg.cluster.balance_slack)
    sizes = np.bincount(out["fine"], minlength=8)
    assert SHARDS * low <= sizes.min() and sizes.max() <= SHARDS * high
    assert manifest["config_used"]["capacity"] == "fit_bounds"
