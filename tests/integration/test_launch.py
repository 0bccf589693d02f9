"""SLURM launcher on tiny prep shards: submitit local/debug executors, fake sbatch, dry run, status."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from submitit.core.utils import DelayedSubmission

from pipeline import artifacts, cli
from pipeline.config import load_config
from pipeline.launch import plan_tasks, submit_stage
from pipeline.runner import run_stage, stage_status
from pipeline.slurm import LaunchError, render_sbatch
from tests.conftest import pair_members, write_shard
from training import runs
from training.launch import submit_train

REPO = Path(__file__).resolve().parents[2]
NUM_SHARDS, PAIRS = 6, 3


def make_tars(root: Path) -> str:
    """Six small tar shards of ``<key>.json`` + ``<key>.jpg`` pairs."""
    for s in range(NUM_SHARDS):
        members = []
        for i in range(PAIRS):
            members += pair_members(f"{s:02d}_{i:02d}", f"caption {s} {i}")
        write_shard(root / f"{s}.tar", members)
    return f"{root}/{{0..{NUM_SHARDS - 1}}}.tar"


@pytest.fixture
def tars(tmp_path: Path) -> str:
    return make_tars(tmp_path / "d")


def slurm_overrides(tmp_path: Path, train: str, *extra: str) -> list[str]:
    return [
        f"run.root={tmp_path / 'runs'}",
        f"data.train={train}",
        "run.workers=1",
        "launcher.kind=slurm",
        "launcher.slurm.shards_per_job=2",
        *extra,
    ]


def rows(run_dir: Path) -> list[tuple]:
    manifest = json.loads((run_dir / "prep" / "manifest.json").read_text())
    out = []
    for rel in manifest["outputs"]:
        table = pq.read_table(run_dir / "prep" / rel, columns=["pair_id", "shard", "key", "caption"])
        out += [tuple(r.values()) for r in table.to_pylist()]
    return out


def record_mtimes(run_dir: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (run_dir / "prep" / "_done").glob("*.json")}


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """``sbatch`` (copies the script, prints a new job id), ``srun``, ``squeue`` (lists ``active``)."""
    bin_dir, capture = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    capture.mkdir()
    scripts = {
        "sbatch": f'n=$(( $(cat "{capture}/count" 2>/dev/null || echo 4100) + 1 ))\n'
        f'echo $n > "{capture}/count"\ncp "$1" "{capture}/$n.sh"\necho "Submitted batch job $n"\n',
        "srun": "exit 0\n",
        "squeue": f'cat "{capture}/active" 2>/dev/null || true\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return capture


def test_local_array_gives_the_same_outputs_as_the_local_launcher(tmp_path, tars, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job subprocesses unpickle pipeline.launch
    local = load_config(None, [f"run.root={tmp_path / 'local'}", f"data.train={tars}", "run.workers=1"])
    expected = run_stage(local, "prep", progress=False)["manifest"]
    # two tasks of three shards: each job is a fresh process that imports torch, so keep it small
    cfg = load_config(None, [*slurm_overrides(tmp_path, tars), "launcher.slurm.shards_per_job=3"])
    jobs = submit_stage(cfg, "prep", cluster="local")
    assert len(jobs) == 2
    results = [job.result() for job in jobs]
    assert [r["ran"] for r in results] == [3, 3]
    manifest = artifacts.read_json(cfg.run_dir / "prep" / "manifest.json")
    for key in ("counts", "num_pairs", "num_shards", "outputs", "config_hash"):
        assert manifest[key] == expected[key], key
    assert manifest["num_pairs"] == NUM_SHARDS * PAIRS
    assert rows(cfg.run_dir) == rows(local.run_dir)
    out = capsys.readouterr().out
    assert "prep: submitted " in out and "2 task(s) over 6 unfinished of 6 shard(s), <= 3 per task" in out
    assert f"logs: {cfg.run_dir / '_slurm' / 'prep'}" in out and "python -m pipeline status" in out


def test_killed_array_shows_partial_status_and_resubmits_only_missing_shards(tmp_path, tars, capsys):
    cfg = load_config(None, slurm_overrides(tmp_path, tars))
    jobs = submit_stage(cfg, "prep", cluster="debug")
    assert len(jobs) == 3
    jobs[0].result()
    jobs[2].result()  # the array is "killed" here: task 1 (shards 2, 3) never runs
    status = stage_status(cfg, "prep")
    assert (status["state"], status["shards_done"], status["shards_total"]) == ("partial", 4, 6)
    assert not (cfg.run_dir / "prep" / "manifest.json").exists()
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{root: {tmp_path / 'runs'}}}\ndata: {{train: '{tars}'}}\n")
    capsys.readouterr()
    assert cli.main(["status", "--config", str(config)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("prep"))
    assert line.split()[1:3] == ["partial", "4/6"]

    before = record_mtimes(cfg.run_dir)
    assert [t.shard_range for t in plan_tasks(cfg, "prep")] == [(2, 4)]
    again = submit_stage(cfg, "prep", cluster="debug")
    assert len(again) == 1
    summary = again[0].result()
    assert (summary["ran"], summary["skipped"]) == (2, 4)
    after = record_mtimes(cfg.run_dir)
    assert {k: after[k] for k in before} == before  # finished shards were not redone
    assert len(after) == NUM_SHARDS
    assert stage_status(cfg, "prep")["state"] == "done"
    assert artifacts.read_json(cfg.run_dir / "prep" / "manifest.json")["num_pairs"] == NUM_SHARDS * PAIRS
    assert submit_stage(cfg, "prep", cluster="debug") == []
    assert "prep: nothing to do" in capsys.readouterr().out


def test_lost_records_are_redone_once_and_requeue_skips_finished_shards(tmp_path, tars):
    cfg = load_config(None, slurm_overrides(tmp_path, tars))
    for job in submit_stage(cfg, "prep", cluster="debug"):
        job.result()
    expected = rows(cfg.run_dir)
    done = cfg.run_dir / "prep" / "_done"
    (done / "s0_0.json").unlink()
    (done / "s0_5.json").unlink()
    kept = record_mtimes(cfg.run_dir)
    tasks = plan_tasks(cfg, "prep")
    assert [t.shard_range for t in tasks] == [(0, 6)]  # spans finished shards 1..4, which are skipped
    # a requeue mid-task: shard 0 finished before the signal, the checkpoint resubmits the range
    run_stage(cfg, "prep", shard_range=(0, 1), workers=1, progress=False, finalize=False)
    requeued = tasks[0].checkpoint()
    assert requeued.function.shard_range == (0, 6)
    summary = requeued.result()
    assert (summary["ran"], summary["skipped"]) == (1, 5)
    after = record_mtimes(cfg.run_dir)
    assert {k: after[k] for k in kept} == kept
    assert rows(cfg.run_dir) == expected
    assert plan_tasks(cfg, "prep") == []


def test_dry_run_without_sbatch_prints_the_scripts(tmp_path, tars, monkeypatch, capsys):
    config = tmp_path / "slurm.yaml"
    config.write_text(
        f"run: {{root: {tmp_path / 'runs'}, workers: 1}}\ndata: {{train: '{tars}'}}\n"
        "launcher: {kind: slurm, slurm: {shards_per_job: 2, partition: big, cpu_partition: cpu}}\n"
    )
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert cli.main(["prep", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "prep: dry run (no sbatch on PATH); nothing was submitted" in out
    assert "3 task(s) over 6 unfinished of 6 shard(s)" in out
    assert "task 1: --shards 2:4  s0_2 .. s0_3" in out
    lines = out.splitlines()
    assert "#SBATCH --array=0-2%3" in lines and "#SBATCH --partition=cpu" in lines
    assert any("-u -m submitit.core._submit" in line for line in lines)
    run_dir = tmp_path / "runs" / "demo"
    assert not run_dir.exists()  # a dry run writes nothing: no records, no logs, no pickles
    # launcher.dry_run forces a dry run; with --force it shows every shard redone but clears nothing
    run_stage(load_config(config), "prep", progress=False)
    records = record_mtimes(run_dir)
    assert cli.main(["prep", "--config", str(config), "--set", "launcher.dry_run=true", "--force"]) == 0
    out = capsys.readouterr().out
    assert "dry run (launcher.dry_run is set)" in out and "3 task(s) over 6 unfinished of 6" in out
    assert record_mtimes(run_dir) == records and (run_dir / "prep" / "manifest.json").is_file()


def test_fake_sbatch_submission_runs_like_a_slurm_array_task(tmp_path, tars, fake_slurm, capsys):
    cfg = load_config(None, slurm_overrides(tmp_path, tars))
    jobs = submit_stage(cfg, "prep", config_path="configs/x.yaml")
    assert [j.job_id for j in jobs] == ["4101_0", "4101_1", "4101_2"]
    script = (fake_slurm / "4101.sh").read_text()
    assert script == render_sbatch(cfg, "prep", array_size=3)
    out = capsys.readouterr().out
    assert "prep: submitted array 4101 (3 task(s))" in out
    assert "watch: python -m pipeline status --config configs/x.yaml" in out
    ranges = [DelayedSubmission.load(j.paths.submitted_pickle).function.shard_range for j in jobs]
    assert ranges == [(0, 2), (2, 4), (4, 6)]
    # run array task 1 the way srun would, in a fresh process
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4103",
        "SLURM_ARRAY_JOB_ID": "4101",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
    }
    folder = str(cfg.run_dir / "_slurm" / "prep")
    proc = subprocess.run(
        [sys.executable, "-m", "submitit.core._submit", folder], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(record_mtimes(cfg.run_dir)) == ["s0_2", "s0_3"]
    # the array is still queued: a second submission is refused
    (fake_slurm / "active").write_text("4101_0\n4101_2\n")
    with pytest.raises(LaunchError, match="job.s. 4101 of an earlier submission are still queued or running"):
        submit_stage(cfg, "prep")
    (fake_slurm / "active").unlink()
    again = submit_stage(cfg, "prep")
    assert [j.job_id for j in again] == ["4102_0", "4102_1"]
    assert "#SBATCH --array=0-1%2" in (fake_slurm / "4102.sh").read_text()


def fake_training(monkeypatch, states: dict[str, str], calls: list | None = None) -> None:
    """A stand-in ``training.main``: ``training_status`` rows from ``states``, recorded calls."""

    def training_status(cfg):
        rows = []
        for name, state in states.items():
            row = {"stage": f"train/{name if name == 'seed' else f'expert_{name}'}", "state": state}
            if state == "stale":
                row.update(state="done", stale="config changed")
            rows.append(row)
        return rows

    def train_experts(cfg, expert, resume="latest", progress=True):
        calls.append((expert, resume, progress, os.environ["RANK"], os.environ["WORLD_SIZE"]))
        return expert

    fake = types.SimpleNamespace(training_status=training_status, train_experts=train_experts)
    monkeypatch.setitem(sys.modules, "training.main", fake)


def test_train_all_is_an_expert_array_after_the_seed_job(tmp_path, fake_slurm, monkeypatch, capsys):
    states = {"seed": "not started", "0": "not started", "1": "not started", "2": "not started", "dense": "not started"}
    fake_training(monkeypatch, states)
    extra = ["launcher.slurm.nodes=2", "launcher.slurm.gpus_per_node=4"]
    cfg = load_config(None, slurm_overrides(tmp_path, "unused.tar", *extra))
    jobs = submit_train(cfg, "all", "configs/x.yaml", ["train.lr=1e-4"])
    assert [j.job_id for j in jobs] == ["4101", "4102_0", "4102_1", "4102_2", "4102_3"]
    seed = (fake_slurm / "4101.sh").read_text().splitlines()
    experts = (fake_slurm / "4102.sh").read_text().splitlines()
    for lines in (seed, experts):
        assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"} <= set(lines)
    assert not any(x.startswith(("#SBATCH --array", "#SBATCH --dependency")) for x in seed)
    assert "#SBATCH --array=0-3%4" in experts and "#SBATCH --dependency=afterok:4101" in experts
    tasks = [DelayedSubmission.load(j.paths.submitted_pickle).function for j in jobs]
    assert [(t.expert, t.resume) for t in tasks] == [(e, "latest") for e in ("seed", "0", "1", "2", "dense")]
    assert "after afterok:4101" in capsys.readouterr().out
    # seed and expert 1 done, expert 2 half way: experts 0 and 2 only, with no dependency
    states.update({"seed": "done", "1": "done", "2": "partial", "dense": "done"})
    again = submit_train(cfg, "all", "configs/x.yaml", [])
    assert [j.job_id for j in again] == ["4103_0", "4103_1"]
    assert "--dependency" not in (fake_slurm / "4103.sh").read_text()
    assert submit_train(cfg, "1", None, []) == []
    # --resume none retrains what was asked for; the seed keeps its finished model
    assert [j.job_id for j in submit_train(cfg, "1", None, [], resume="none")] == ["4104"]
    states["0"] = "stale"
    with pytest.raises(
        LaunchError, match="train: 0 finished under another config; resubmit with --resume none"
    ):
        submit_train(cfg, "0", None, [])


def test_experts_wait_for_a_seed_job_that_is_still_queued(tmp_path, fake_slurm, monkeypatch, capsys):
    extra = ["cluster.num_experts=2", "cluster.num_fine=8", "train.baselines=[]"]
    cfg = load_config(None, slurm_overrides(tmp_path, "unused.tar", *extra))

    def training_status(cfg):  # a run is done when it has a final.pt
        names = runs.run_names(cfg, 2)
        return [{"stage": f"train/{n}", "state": "done" if runs.final_path(cfg, n).is_file() else "not started"} for n in names]

    monkeypatch.setitem(sys.modules, "training.main", types.SimpleNamespace(training_status=training_status))
    assert [j.job_id for j in submit_train(cfg, "seed", None, [])] == ["4101"]
    (fake_slurm / "active").write_text("4101\n")
    jobs = submit_train(cfg, "all", None, [])
    assert [j.job_id for j in jobs] == ["4102_0", "4102_1"]  # no second seed job
    assert "#SBATCH --dependency=afterok:4101" in (fake_slurm / "4102.sh").read_text().splitlines()
    (fake_slurm / "active").write_text("4101\n4102_1\n")
    capsys.readouterr()
    # expert 0 left the queue without a final.pt (failed): only it is submitted again
    assert [j.job_id for j in submit_train(cfg, "all", None, [])] == ["4103"]
    out = capsys.readouterr().out
    assert "train expert 1: job 4102_1 is still queued or running; not submitted again" in out
    script = (fake_slurm / "4103.sh").read_text().splitlines()
    assert "#SBATCH --dependency=afterok:4101" in script and not any("--array" in x for x in script)
    (cfg.run_dir / "train" / "expert_0").mkdir(parents=True)
    (cfg.run_dir / "train" / "expert_0" / "final.pt").write_bytes(b"x")
    assert submit_train(cfg, "0", None, []) == []


def test_large_arrays_are_split_at_max_array_size(tmp_path, tars, fake_slurm, capsys):
    extra = ["launcher.slurm.shards_per_job=1", "launcher.slurm.max_array_size=4"]
    cfg = load_config(None, [*slurm_overrides(tmp_path, tars), *extra])
    jobs = submit_stage(cfg, "prep")
    assert [j.job_id for j in jobs] == ["4101_0", "4101_1", "4101_2", "4101_3", "4102_0", "4102_1"]
    assert "#SBATCH --array=0-1%2" in (fake_slurm / "4102.sh").read_text().splitlines()
    assert "submitted array 4101 (4 task(s)), array 4102 (2 task(s))" in capsys.readouterr().out


def test_train_task_sets_up_ddp_env_and_calls_the_training_entry(tmp_path, monkeypatch):
    calls: list = []
    fake_training(monkeypatch, {"seed": "not started", "0": "not started", "1": "not started"}, calls)
    cfg = load_config(None, slurm_overrides(tmp_path, "unused.tar"))
    jobs = submit_train(cfg, "1", None, [], cluster="debug", resume="none")
    assert [j.result() for j in jobs] == ["seed", "1"]
    # the seed, not asked for, resumes; the expert starts over as asked
    assert calls == [("seed", "latest", True, "0", "1"), ("1", "none", True, "0", "1")]


def test_forced_array_removes_nothing_before_its_replacements_are_written(tmp_path, tars):
    cfg = load_config(None, slurm_overrides(tmp_path, tars))
    for job in submit_stage(cfg, "prep", cluster="debug"):
        job.result()
    expected = rows(cfg.run_dir)
    manifest = cfg.run_dir / "prep" / "manifest.json"
    before = record_mtimes(cfg.run_dir)
    tasks = plan_tasks(cfg, "prep", force=True)
    assert [(t.shard_range, t.force) for t in tasks] == [((0, 2), True), ((2, 4), True), ((4, 6), True)]
    assert record_mtimes(cfg.run_dir) == before and manifest.is_file()  # planning removed nothing
    jobs = submit_stage(cfg, "prep", cluster="debug", force=True)
    jobs[0].result()
    jobs[1].result()  # the last task "fails" (never runs): its shards keep their earlier outputs
    after = record_mtimes(cfg.run_dir)
    redone = [f"s0_{i}" for i in range(4)]
    assert len(after) == NUM_SHARDS and all(after[k] != before[k] for k in redone)
    assert after["s0_4"] == before["s0_4"] and after["s0_5"] == before["s0_5"]
    assert rows(cfg.run_dir) == expected
    jobs[2].result()
    assert rows(cfg.run_dir) == expected and manifest.is_file()
    assert stage_status(cfg, "prep")["state"] == "done"


def test_make_train_with_nproc_launches_the_torchrun_command(tmp_path, monkeypatch, capsys):
    """``make train NPROC=4`` goes through the CLI's one torchrun command (``make -n`` shows the call)."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "train", "NPROC=4", "EXPERT=3", "FORCE=1", "SET=run.seed=5", "STAMP="],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},  # under `make test`
    ).stdout.strip().splitlines()[-1]
    argv = shlex.split(dry)
    assert argv[1:4] == ["-m", "pipeline", "train"]
    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    monkeypatch.chdir(REPO)
    assert cli.main([*argv[3:], "--set", f"run.root={tmp_path}"]) == 0
    cmd = seen["cmd"]
    assert cmd[1:4] == ["--nproc_per_node=4", "-m", "training.main"]
    assert cmd[cmd.index("--expert") + 1] == "3" and cmd[cmd.index("--resume") + 1] == "none"
    assert "run.seed=5" in cmd and "launching: " in capsys.readouterr().out
