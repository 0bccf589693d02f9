"""Self-supervised training (SogCLR dcl / SimCLR) end to end on a tiny ImageNet-layout folder:
exact resume (model, LARS state, u table), the run folder, linear evaluation and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main as cli
from pipeline.config import load_config
from training import checkpoint as ckpt
from training.evaluation.linear_probe import train_linear
from training.metrics import read_metrics
from training.ssl.linear import run_linear_eval
from training.ssl.main import run_dir, train_ssl

CLASSES = 3


def make_imagenet(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for c in range(CLASSES):
            folder = root / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((20, 20, 3), np.uint8)
                base[..., c] = 200
                noise = rng.integers(0, 60, size=(20, 20, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"img_{i}.JPEG", quality=90)
    return root


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny steps: one intra-op thread is several times faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


def config(tmp_path: Path, data: Path, **ssl):
    sets = {
        "run.root": str(tmp_path / "runs"), "run.name": "t", "ssl.data": str(data), "ssl.arch": "resnet18",
        "ssl.image_size": 16, "ssl.batch_size": 8, "ssl.epochs": 2, "ssl.mlp_dim": 32, "ssl.proj_dim": 16,
        "ssl.workers": 0, "ssl.print_freq": 1, "ssl.save_every": 100, "ssl.precision": "fp32",
        "ssl.warmup_epochs": 1, "ssl.device": "cpu", "linear_eval.epochs": 20, "linear_eval.batch_size": 16,
    }
    sets.update({f"ssl.{k}": v for k, v in ssl.items()})
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize("loss_type", ["dcl", "simclr"])
def test_resume_is_exact(tmp_path, data, loss_type):
    full = config(tmp_path / "a", data, loss_type=loss_type)
    train_ssl(full, progress=False)
    split = config(tmp_path / "b", data, loss_type=loss_type)
    assert train_ssl(split, progress=False, stop_at_step=4)["step"] == 4
    train_ssl(split, progress=False)
    a, b = (torch.load(ckpt.latest_checkpoint(run_dir(c)), weights_only=False) for c in (full, split))
    assert a["step"] == b["step"] == 6  # 24 images / batch 8 = 3 steps per epoch, 2 epochs
    for key in ("model", "loss"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    if loss_type == "dcl":
        assert (a["loss"]["tables.u"] > 0).all(), "every image visited: u set"
    rows_a, rows_b = read_metrics(run_dir(full) / "metrics.jsonl"), read_metrics(run_dir(split) / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    if loss_type == "dcl":
        assert {"u_mean", "u_q10", "u_q50", "u_q90", "lr"} <= rows_a[-1].keys()
    assert (run_dir(full) / "final.pt").is_file() and (run_dir(full) / "tensorboard").is_dir()
    assert json.loads((run_dir(full) / "manifest.json").read_text())["steps"] == 6
    assert train_ssl(full, progress=False).get("skipped")


def test_changed_config_refuses_resume(tmp_path, data):
    train_ssl(config(tmp_path, data), progress=False, stop_at_step=2)
    from pipeline.errors import StageError

    with pytest.raises(StageError, match="ssl.gamma"):
        train_ssl(config(tmp_path, data, gamma=0.5), progress=False)


def test_lr_scaling():
    cfg = load_config(None, ["ssl.batch_size=256"])
    assert cfg.ssl.scaled_lr() == pytest.approx(0.075 * 16)
    cfg = load_config(None, ["ssl.batch_size=512", "ssl.learning_rate_scaling=linear", "ssl.lr=0.3"])
    assert cfg.ssl.scaled_lr() == pytest.approx(0.6)


def test_linear_eval_and_cli(tmp_path, data, capsys):
    cfg = config(tmp_path, data)
    train_ssl(cfg, progress=False)
    rows = run_linear_eval(cfg, ["sogclr", "random"])
    assert {r["model"] for r in rows} == {"sogclr", "random-init"}
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in rows)
    stem = run_dir(cfg).parent / "linear_eval"
    assert stem.with_suffix(".csv").read_text().startswith("model,task,top1,top5")
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 2
    cached = sorted((stem / "features").rglob("*.pt"))
    assert len(cached) == 4  # (sogclr, random) x (train, val), reused on a rerun
    mtimes = [p.stat().st_mtime_ns for p in cached]
    run_linear_eval(cfg, ["sogclr", "random"])
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    args = ["--set", f"run.root={tmp_path / 'runs'}", "--set", "run.name=t", "--set", f"ssl.data={data}",
            "--set", "ssl.arch=resnet18", "--set", "ssl.image_size=16", "--set", "ssl.mlp_dim=32",
            "--set", "ssl.proj_dim=16", "--set", "linear_eval.epochs=5"]
    assert cli(["linear-eval", *args, "--runs", "random"]) == 0
    assert "random-init" in capsys.readouterr().out


def test_linear_classifier_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 8, generator=gen)
    cfg = load_config(None, ["linear_eval.epochs=30", "linear_eval.batch_size=64"]).linear_eval
    result = train_linear(x[:300], y[:300], x[300:], y[300:], cfg)
    assert result["top1"] > 90 and result["top5"] == 100


def test_slurm_dry_run_prints_the_job(tmp_path, capsys):
    from training.ssl.main import submit_ssl

    cfg = load_config("configs/sogclr_imagenet.yaml", [f"run.root={tmp_path}", "launcher.dry_run=true"])
    assert submit_ssl(cfg) is None
    out = capsys.readouterr().out
    assert "dry run" in out and "#SBATCH" in out and "--gpus-per-node=4" in out


def test_two_gloo_ranks_with_torchrun(tmp_path, data):
    """DDP smoke: 2 gloo ranks train one epoch (u table filled for every image), and a 1-process
    resume of that run is refused (the global batch split would change)."""
    import os
    import subprocess
    import sys

    from pipeline.errors import StageError

    sets = {
        "run.root": str(tmp_path / "runs"), "run.name": "t", "ssl.data": str(data), "ssl.arch": "resnet18",
        "ssl.image_size": 16, "ssl.batch_size": 8, "ssl.epochs": 1, "ssl.mlp_dim": 32, "ssl.proj_dim": 16,
        "ssl.workers": 0, "ssl.print_freq": 1, "ssl.precision": "fp32", "ssl.warmup_epochs": 0,
        "ssl.device": "cpu",
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run(
        [torchrun, "--nproc_per_node=2", "-m", "training.ssl.main", "--config", "configs/demo_sogclr.yaml",
         *args, "--quiet"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = load_config("configs/demo_sogclr.yaml", [f"{k}={v}" for k, v in sets.items()])
    state = torch.load(ckpt.latest_checkpoint(run_dir(cfg)), weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert (state["loss"]["tables.u"] > 0).all()
    with pytest.raises(StageError, match="2 process"):
        train_ssl(load_config("configs/demo_sogclr.yaml", [f"{k}={v}" for k, v in sets.items()] + ["ssl.epochs=2"]),
                  progress=False, resume=str(ckpt.latest_checkpoint(run_dir(cfg))))
