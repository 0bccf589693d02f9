"""Data-parallel training: 2 gloo processes (torchrun) equal 1 process at the same global batch.

With ``train.data_split: samples`` global batch ``t`` is the same pairs, in the same order, for any
number of ranks (rank r takes rows [r*b, (r+1)*b)), and every pair visit decodes to the same tensors
(caption and augmentation are seeded by epoch and pair id). OpenCLIP's local loss with
gather_with_grad, averaged by DDP, is the global-batch loss, so 2 x 8 and 1 x 16 must give the same
parameters up to float reduction order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import dump_yaml, load_config
from pipeline.errors import StageError
from training import checkpoint as ckpt
from training.main import train_experts
from training.metrics import read_metrics
from training.synthetic import make_synthetic_run

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = [
    "train.data_split=samples",
    "train.seed_steps=0",
    "train.steps=4",
    "train.save_every=2",
    "train.workers=1",
    "train.lr=2e-3",
    "train.warmup=1",
]


def _copy_run(src: Path, root: Path) -> None:
    for stage in ("prep", "assign"):
        shutil.copytree(src / stage, root / src.name / stage)


def test_two_processes_match_one_at_the_same_global_batch_and_refuse_another_world_size(tmp_path):
    run = make_synthetic_run(tmp_path / "base", num_shards=3, per_shard=32, overrides=COMMON)
    config = tmp_path / "config.yaml"
    config.write_text(dump_yaml(run.cfg))
    _copy_run(run.cfg.run_dir, tmp_path / "ddp")
    _copy_run(run.cfg.run_dir, tmp_path / "single")

    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "training.main",
        "--config",
        str(config),
        "--expert",
        "0",
        "--quiet",
        "--set",
        f"run.root={tmp_path / 'ddp'}",
        "--set",
        "train.batch_size=8",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = load_config(config, [f"run.root={tmp_path / 'single'}", "train.batch_size=16"])
    train_experts(single, 0, progress=False)

    ddp_dir = tmp_path / "ddp" / "synthetic" / "train" / "expert_0"
    one_dir = single.run_dir / "train" / "expert_0"
    a, b = torch.load(ddp_dir / "final.pt"), torch.load(one_dir / "final.pt")
    start = ckpt.load_checkpoint(ckpt.checkpoint_path(one_dir, 2))["model"]
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and diff < 2e-5, (moved, diff)
    losses = [
        [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (ddp_dir, one_dir)
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(ddp_dir, 4))["world_size"] == 2

    resumed = load_config(config, [f"run.root={tmp_path / 'ddp'}", "train.batch_size=8"])
    with pytest.raises(StageError, match=r"written by 2 process\(es\), this job has 1"):
        train_experts(resumed, 0, resume=str(ckpt.checkpoint_path(ddp_dir, 2)), progress=False)
