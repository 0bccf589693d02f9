"""Baseline training runs (train.baselines) on a tiny synthetic run: where each starts, how long it
runs, what data it sees; reruns do nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import read_json
from pipeline.errors import ConfigError
from training import checkpoint as ckpt
from training.main import train_experts, training_status
from training.metrics import read_metrics
from training.optim import cosine_lr
from training.partition import partition_dir
from training.synthetic import make_synthetic_run

BASE = ["train.workers=1", "train.batch_size=16", "train.steps=8", "train.seed_steps=4", "train.save_every=2",
        "train.eval_every=0",
        "train.baselines=[dense, dense_equal_compute, random_split, full_ensemble]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Seed, 2 experts and every baseline trained once."""
    run = make_synthetic_run(tmp_path_factory.mktemp("baselines"), num_shards=4, per_shard=48, overrides=BASE)
    results = train_experts(run.cfg, "all", progress=False)
    return run.cfg, results


def test_all_trains_seed_experts_then_every_baseline(trained):
    cfg, results = trained
    assert [(r["run"], r["state"], r["step"]) for r in results] == [
        ("seed", "done", 4), ("expert_0", "done", 8), ("expert_1", "done", 8),
        ("dense", "done", 8), ("dense_equal_compute", "done", 12),
        ("random_split_0", "done", 8), ("random_split_1", "done", 8), ("full_ensemble_1", "done", 8),
    ]
    rows = {r["stage"]: r for r in training_status(cfg)}
    assert {r["state"] for r in rows.values()} == {"done"} and len(rows) == 8


def test_dense_continues_the_seed_checkpoint_to_train_steps(trained):
    cfg, _ = trained
    dense = cfg.run_dir / "train" / "dense"
    manifest = read_json(dense / "manifest.json")
    assert manifest["start_step"] == 4 and manifest["step"] == 8
    assert manifest["branch_from"].endswith("seed/checkpoints/step_4.pt")
    seed_state = ckpt.load_checkpoint(cfg.run_dir / "train" / "seed" / "checkpoints" / "step_4.pt")
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(dense, 6))
    # Adam's step counts continue from the seed's (its optimizer state was loaded), after 2 own steps
    assert {int(s["step"]) for s in seed_state["optimizer"]["state"].values()} == {4}
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {6}
    rows = [r for r in read_metrics(dense / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    assert rows[0]["lr"] == pytest.approx(cosine_lr(4, cfg.train.lr, cfg.train.warmup, cfg.train.steps))
    assert manifest["samples_seen"] == 4 * 16


def test_dense_equal_compute_trains_the_experts_total_from_scratch(trained):
    cfg, _ = trained
    run = cfg.run_dir / "train" / "dense_equal_compute"
    manifest = read_json(run / "manifest.json")
    assert manifest["start_step"] == 0 and manifest["step"] == 4 + 2 * 4 and manifest["branch_from"] is None
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert rows[0]["step"] == 1
    assert rows[5]["lr"] == pytest.approx(cosine_lr(5, cfg.train.lr, cfg.train.warmup, 12))  # its own horizon
    assert manifest["samples_seen"] == 12 * 16


def test_random_split_parts_match_the_cluster_sizes(trained):
    cfg, _ = trained
    def read(folder):
        return pd.concat([pq.read_table(p).to_pandas() for p in sorted(folder.glob("*.parquet"))]).sort_values("pair_id")

    assign, parts = read(cfg.run_dir / "assign" / "assign"), read(partition_dir(cfg))
    assert parts["pair_id"].tolist() == assign["pair_id"].tolist()
    assert np.bincount(parts["coarse"]).tolist() == np.bincount(assign["coarse"]).tolist()
    assert (parts["coarse"].to_numpy() != assign["coarse"].to_numpy()).any()
    for k in range(2):
        assert read_json(cfg.run_dir / "train" / f"random_split_{k}" / "manifest.json")["identity"]["run"] == {
            "name": f"random_split_{k}", "partition": "random_split", "variant": 0,
        }


def test_full_ensemble_members_see_other_data_orders(trained):
    cfg, _ = trained
    member = read_json(cfg.run_dir / "train" / "full_ensemble_1" / "manifest.json")
    assert member["identity"]["run"]["variant"] == 1 and member["start_step"] == 4
    dense_loss = [r["loss"] for r in read_metrics(cfg.run_dir / "train" / "dense" / "metrics.jsonl") if "loss" in r]
    member_loss = [r["loss"] for r in read_metrics(cfg.run_dir / "train" / "full_ensemble_1" / "metrics.jsonl") if "loss" in r]
    assert dense_loss != member_loss


def test_rerun_does_nothing_and_names_are_checked_before_anything_runs(trained, capsys):
    cfg, _ = trained
    finals = sorted((cfg.run_dir / "train").glob("*/final.pt"))
    mtimes = [p.stat().st_mtime_ns for p in finals]
    again = train_experts(cfg, "all", progress=False)
    assert {r["state"] for r in again} == {"skipped"} and len(again) == 8
    assert [p.stat().st_mtime_ns for p in finals] == mtimes
    assert [r["run"] for r in train_experts(cfg, "random_split", progress=False)] == ["random_split_0", "random_split_1"]
    with pytest.raises(ConfigError, match="out of range"):
        train_experts(cfg, 7, progress=False)
    with pytest.raises(ConfigError, match="expected an expert index"):
        train_experts(cfg, "dens", progress=False)
    assert not (cfg.run_dir / "train" / "expert_7").exists()
