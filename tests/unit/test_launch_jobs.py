"""SLURM job states for status and failure reports, and SLURM's own requeue (fake squeue/sacct)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.slurm import SUBMISSIONS, _latest_jobs, failed_jobs, job_states, slurm_jobs
from training.launch import TrainTask


def record(folder: Path, *entries: tuple[list[str], list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / SUBMISSIONS).open("a") as f:
        for ids, labels in entries:
            f.write(json.dumps({"time": "t", "what": folder.name, "job_ids": ids, "labels": labels}) + "\n")


@pytest.fixture
def fake_queue(tmp_path: Path, monkeypatch) -> Path:
    """``squeue`` prints ``queue``, ``sacct`` prints ``acct`` (both ``|``-separated)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, source in (("squeue", "queue"), ("sacct", "acct")):
        (bin_dir / name).write_text(f'#!/bin/bash\ncat "{tmp_path}/{source}" 2>/dev/null || true\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_latest_jobs_last_submission_of_a_stage_and_last_job_of_each_training_run(tmp_path):
    record(tmp_path / "prep", (["7_0", "7_1"], ["shards (0, 2)", "shards (2, 4)"]), (["9"], ["shards (2, 4)"]))
    assert _latest_jobs(tmp_path / "prep") == [("9", "shards (2, 4)")]
    record(tmp_path / "train", (["10", "11_0", "11_1"], ["seed", "0", "1"]), (["12"], ["1"]))
    assert _latest_jobs(tmp_path / "train") == [("10", "seed"), ("11_0", "0"), ("12", "1")]
    assert _latest_jobs(tmp_path / "nothing") == []


def test_states_from_squeue_then_sacct_and_failures_with_log(tmp_path, fake_queue):
    (fake_queue / "queue").write_text("5_1|PENDING|Dependency\n6|RUNNING|None\n")
    (fake_queue / "acct").write_text("5_0|CANCELLED by 0|0:0\n5_1|PENDING|0:0\n7|FAILED|1:0\n")
    states = job_states(["5_0", "5_1", "6", "7", "8"])
    assert states == {
        "5_0": ("CANCELLED", "0:0"),
        "5_1": ("PENDING", "Dependency"),
        "6": ("RUNNING", "None"),
        "7": ("FAILED", "1:0"),
    }
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}"])
    folder = cfg.run_dir / "_slurm" / "embed"
    record(folder, (["5_0", "5_1"], ["shards (0, 2)", "shards (2, 4)"]))
    record(cfg.run_dir / "_slurm" / "train", (["6", "7"], ["seed", "0"]))
    failed = failed_jobs(folder)
    assert [(j["job_id"], j["state"], j["label"]) for j in failed] == [("5_0", "CANCELLED", "shards (0, 2)")]
    assert failed[0]["log"] == str(folder / "5_0_0_log.err")
    rows = slurm_jobs(cfg)
    assert [(r["stage"], r["job_id"], r["state"], r["reason"]) for r in rows] == [
        ("embed", "5_0", "CANCELLED", "0:0"),
        ("embed", "5_1", "PENDING", "Dependency"),
        ("train", "6", "RUNNING", "None"),
        ("train", "7", "FAILED", "1:0"),
    ]


def test_no_slurm_no_job_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}"])
    record(cfg.run_dir / "_slurm" / "prep", (["5_0"], ["shards (0, 2)"]))
    assert job_states(["5_0"]) == {} and slurm_jobs(cfg) == []


def test_a_job_requeued_by_slurm_resumes_even_if_submitted_with_resume_none(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(train_experts=lambda cfg, expert, resume, progress: calls.append(resume))
    monkeypatch.setitem(sys.modules, "training.main", fake)
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}"])
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    TrainTask(cfg, "seed", resume="none")()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    TrainTask(cfg, "seed", resume="none")()
    assert calls == ["none", "latest"]
