"""The SLURM launcher against a real (single-node) SLURM: sbatch arrays, afterok, scancel, requeue, sacct.

Run by ``make test-slurm`` (tools/test-slurm.sh starts the cluster). The tiny chain runs once with
the local launcher and once through ``--launcher slurm``; outputs must be byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import artifacts, cli
from pipeline.config import load_config
from pipeline.runner import stage_status
from pipeline.slurm import job_states
from tests.tiny import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")
SEED_STEPS, EXPERT_STEPS, SAVE_EVERY = 120, 8, 20
# About 3-6 minutes for the module on 2 cores; the limit leaves room for a machine that is busy
# with other work (setup, the local reference chain, counts towards the first test's limit).
pytestmark = pytest.mark.timeout(1500)

TINY = tiny_overrides(
    train__steps=SEED_STEPS + EXPERT_STEPS,
    train__seed_steps=SEED_STEPS,
    train__save_every=SAVE_EVERY,
    train__log_every=1,
    train__baselines="[dense]",
)

# A CPU-only cluster of 2 cores: one core per task, no GPU request (--gpus-per-node=0 overrides the
# launcher's one-GPU default for embed/cluster/assign/ensemble and the training jobs).
SLURM_YAML = """\
extends: {base}
launcher:
  kind: slurm
  slurm:
    cpus_per_task: 1
    gpus_per_node: 1
    shards_per_job: 2
    array_parallelism: 2
    time_min: 20
    extra_sbatch: ["--gpus-per-node=0"]
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo data, the chain run locally (the reference) and the config files of the SLURM runs."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        pytest.fail("no SLURM cluster reachable (sbatch/sinfo); run `make test-slurm`, which starts one")
    os.environ["PYTHONPATH"] = str(REPO)  # the jobs (sbatch exports this environment) import this tree
    tmp = tmp_path_factory.mktemp("slurm")
    sets = [
        *TINY,
        f"run.root={tmp / 'runs'}",
        f"demo_data.out={tmp / 'data'}",
        f"data.train={tmp / 'data'}/train/{{0..3}}.tar",
        f"data.eval_root={tmp / 'data'}/eval",
    ]
    base = tmp / "base.yaml"
    base.write_text(f"extends: {REPO / 'configs' / 'demo.yaml'}\n")
    slurm = tmp / "slurm.yaml"
    slurm.write_text(SLURM_YAML.format(base=base))
    args = sum((["--set", s] for s in sets), [])
    assert cli.main(["demo-data", "--config", str(base), "--quiet", *args]) == 0
    t0 = time.time()
    local = [*args, "--set", "run.name=local"]
    assert cli.main(["run", "--config", str(base), "--quiet", *local]) == 0
    print(f"local chain: {time.time() - t0:.0f} s")
    return {"tmp": tmp, "base": base, "slurm": slurm, "args": args}


def pipeline(world, *argv: str, name: str = "onslurm", extra: tuple[str, ...] = ()) -> int:
    sets = [*world["args"], "--set", f"run.name={name}", *sum((["--set", s] for s in extra), [])]
    return cli.main([argv[0], "--config", str(world["slurm"]), "--quiet", *argv[1:], *sets])


def cfg_of(world, name: str = "onslurm", extra: tuple[str, ...] = ()):
    sets = [s for s in world["args"] if s != "--set"]
    return load_config(world["slurm"], [*sets, f"run.name={name}", *extra])


def last_jobs(cfg, stage: str) -> list[str]:
    lines = (cfg.run_dir / "_slurm" / stage / "submissions.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["job_ids"]


def wait(job_ids: list[str], timeout: float = 300, until=None) -> dict[str, str]:
    """Poll until every job has left the queue (or ``until()`` is true); their final sacct states."""
    end = time.time() + timeout
    while time.time() < end:
        if until is not None and until():
            return {}
        states = job_states(job_ids)
        if all(j in states and states[j][0] not in ACTIVE for j in job_ids):
            return {j: s for j, (s, _) in states.items()}
        time.sleep(0.3)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout} s: {job_states(job_ids)}")


def run_stage_on_slurm(world, stage: str, capsys) -> str:
    assert pipeline(world, stage) == 0
    out = capsys.readouterr().out
    cfg = cfg_of(world)
    states = wait(last_jobs(cfg, stage))
    assert set(states.values()) == {"COMPLETED"}, (stage, states)
    assert (cfg.run_dir / stage / "manifest.json").is_file(), stage
    return out


# Where the two runs differ by construction, not by content: the saved config (run name, launcher
# settings), the commit, and the ensemble's fingerprint of the model file (its path and mtime).
IDENTITY_KEYS = {("config",), ("git_sha",), ("meta", "model"), ("identity",), ("identity_hash",)}
"""Run identity, not content: the config (run name, paths) and what is derived from it (a run's
identity holds the content digest of the seed checkpoint, which embeds the seed's config)."""


def _canonical(obj, h, parent: str = "") -> None:
    """Feed a loaded object into a hash by content: dict keys sorted, tensors as dtype, shape, bytes."""
    import numpy as np
    import torch

    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if (key,) in IDENTITY_KEYS or (parent, key) in IDENTITY_KEYS:
                continue
            h.update(repr(key).encode())
            _canonical(obj[key], h, str(key))
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _canonical(item, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode() + np.ascontiguousarray(obj).tobytes())
    else:
        h.update(repr(obj).encode())


def digest(path: Path, run_name: str) -> str:
    """sha256 of a file's bytes; of its content for torch files (pickle layout and identity aside)."""
    h = hashlib.sha256()
    if path.suffix in (".pt", ".pth"):
        import torch

        _canonical(torch.load(path, map_location="cpu", weights_only=False), h)
    else:
        h.update(path.read_bytes().replace(f"run `{run_name}`".encode(), b"run `<run>`"))
    return h.hexdigest()


def digests(run: Path) -> dict[str, str]:
    """Content digest of every output file (not logs, configs, records, manifests, plots, tensorboard)."""
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel.startswith("_slurm/") or "/tensorboard/" in rel or "/_done/" in rel:
            continue
        if path.suffix in (".yaml", ".png", ".log") or path.name in ("manifest.json", "metrics.jsonl", "_digests.json"):
            continue
        out[rel] = digest(path, run.name)
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_whole_chain_on_slurm_equals_the_local_chain(world, capsys):
    t0 = time.time()
    cfg = cfg_of(world)
    out = run_stage_on_slurm(world, "prep", capsys)
    assert "prep: submitted array" in out and "2 task(s) over 4 unfinished of 4 shard(s)" in out

    # embed: cancel array task 1 while it runs; the rerun submits only its shards
    assert pipeline(world, "embed") == 0
    capsys.readouterr()
    jobs = last_jobs(cfg, "embed")
    assert len(jobs) == 2 and jobs[0].split("_")[0] == jobs[1].split("_")[0]
    end = time.time() + 120
    while job_states([jobs[1]]).get(jobs[1], ("",))[0] != "RUNNING":
        assert time.time() < end, job_states(jobs)
        time.sleep(0.1)
    sh("scancel", jobs[1])
    states = wait(jobs)
    assert states == {jobs[0]: "COMPLETED", jobs[1]: "CANCELLED"}, states
    status = stage_status(cfg, "embed")
    assert (status["state"], status["shards_done"], status["shards_total"]) == ("partial", 2, 4)
    assert pipeline(world, "status") == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if jobs[1] in x)
    assert line.split()[:3] == ["embed", jobs[1], "CANCELLED"], text
    assert str(cfg.run_dir / "_slurm" / "embed" / f"{jobs[1]}_0_log.err") in text
    done = cfg.run_dir / "embed" / "_done"
    kept = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    assert pipeline(world, "embed") == 0
    out = capsys.readouterr().out
    assert f"embed: earlier job {jobs[1]} (shards (2, 4)) CANCELLED" in out, out
    assert "1 task(s) over 2 unfinished of 4 shard(s)" in out, out
    again = last_jobs(cfg, "embed")
    assert len(again) == 1 and wait(again) == {again[0]: "COMPLETED"}
    assert {k: v for k, v in ((p.name, p.stat().st_mtime_ns) for p in done.glob("*.json")) if k in kept} == kept
    assert stage_status(cfg, "embed")["state"] == "done"

    run_stage_on_slurm(world, "cluster", capsys)
    run_stage_on_slurm(world, "assign", capsys)

    # train: the seed job, then the experts + dense baseline array after it (afterok); the seed is requeued mid-run
    assert pipeline(world, "train", "--expert", "all") == 0
    out = capsys.readouterr().out
    train_jobs = last_jobs(cfg, "train")
    seed_job, expert_jobs = train_jobs[0], train_jobs[1:]
    assert len(expert_jobs) == 3 and f"after afterok:{seed_job}" in out, out  # expert 0, expert 1, dense
    seed_dir = cfg.run_dir / "train" / "seed"
    first = None
    end = time.time() + 180
    while first is None:
        found = sorted((seed_dir / "checkpoints").glob("step_*.pt")) if (seed_dir / "checkpoints").is_dir() else []
        first = found[0] if found else None
        assert time.time() < end and not (seed_dir / "final.pt").exists(), "no checkpoint before the end"
        time.sleep(0.05)
    assert pipeline(world, "status") == 0  # while the seed runs: experts wait on their dependency
    text = capsys.readouterr().out
    assert next(x for x in text.splitlines() if x.split()[1:2] == [seed_job]).split()[2] == "RUNNING", text
    for job in expert_jobs:
        assert next(x for x in text.splitlines() if x.split()[1:2] == [job]).split()[2:4] == ["PENDING", "Dependency"], text
    sh("scontrol", "requeue", seed_job)
    assert not (seed_dir / "final.pt").exists(), "the seed finished before it was requeued; make it longer"
    # a requeued job waits ~2 min (BeginTime) before it may start again: let it start now
    end = time.time() + 60
    while job_states([seed_job]).get(seed_job, ("", ""))[1] != "BeginTime":
        assert time.time() < end, job_states([seed_job])
        time.sleep(0.2)
    sh("scontrol", "update", f"JobId={seed_job}", "StartTime=now")
    states = wait(train_jobs, timeout=400)
    assert set(states.values()) == {"COMPLETED"}, states
    acct = sh("sacct", "-n", "-P", "-D", "-X", "-j", seed_job, "-o", "JobID,State")
    assert "REQUEUED" in acct and acct.strip().splitlines()[-1].endswith("COMPLETED"), acct
    log = (cfg.run_dir / "_slurm" / "train" / f"{seed_job}_0_log.err").read_text()
    assert "requeued by SLURM (restart 1); resuming from the latest checkpoint" in log, log[-3000:]
    local = world["tmp"] / "runs" / "local"
    assert losses(seed_dir) == losses(local / "train" / "seed")  # the same loss curve, step by step
    assert [s for s, _ in losses(seed_dir)] == list(range(1, SEED_STEPS + 1))

    run_stage_on_slurm(world, "ensemble", capsys)
    ours, theirs = digests(cfg.run_dir), digests(local)
    assert sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)) == []
    assert len(ours) > 20
    assert pipeline(world, "prep") == 0 and "prep: nothing to do" in capsys.readouterr().out
    print(f"slurm chain: {time.time() - t0:.0f} s, {len(ours)} identical outputs")


def test_a_failed_task_is_named_with_its_shard_and_log(world, capsys):
    """A planted fault fails an assign task; status and the next launch name job, shard, log.

    The fault is an output path blocked by a folder: a corrupt *input* (a damaged feature file) is
    now caught by the lineage check before any job is submitted (upstream content changed).
    """
    cfg = cfg_of(world)
    if not (cfg.run_dir / "ensemble" / "manifest.json").is_file():
        pytest.fail("needs the chain of test_whole_chain_on_slurm_equals_the_local_chain")
    shard = sorted(artifacts.read_json(cfg.run_dir / "assign" / "manifest.json")["inputs"])[-1]
    output = cfg.run_dir / "assign" / "assign" / f"{shard}.parquet"
    output.unlink()
    (output / "blocked").mkdir(parents=True)  # the shard's result cannot be renamed into place
    artifacts.done_path(cfg.run_dir / "assign", shard).unlink()  # so that assign redoes that shard
    (cfg.run_dir / "assign" / "manifest.json").unlink()
    capsys.readouterr()
    assert pipeline(world, "assign") == 0
    assert "1 task(s) over 1 unfinished of 4 shard(s)" in capsys.readouterr().out
    jobs = last_jobs(cfg, "assign")
    assert len(jobs) == 1 and wait(jobs) == {jobs[0]: "FAILED"}
    log = cfg.run_dir / "_slurm" / "assign" / f"{jobs[0]}_0_log.err"
    assert log.is_file() and shard in log.read_text()
    assert pipeline(world, "status") == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    i = next(i for i, x in enumerate(lines) if x.split()[1:2] == [jobs[0]])
    assert lines[i].split()[:3] == ["assign", jobs[0], "FAILED"], text
    assert "shard(s) failed" in lines[i + 1] and shard in lines[i + 1], text
    assert lines[i + 2].strip() == f"log: {log}", text
    # the fault is repaired; the launcher names the failure and reruns only that shard
    shutil.rmtree(output)
    assert pipeline(world, "assign") == 0
    out = capsys.readouterr().out
    assert f"assign: earlier job {jobs[0]} (shards (3, 4)) FAILED: " in out and shard in out, out
    assert f"  log: {log}" in out and "1 task(s) over 1 unfinished of 4 shard(s)" in out, out
    again = last_jobs(cfg, "assign")
    assert wait(again) == {again[0]: "COMPLETED"}
    assert stage_status(cfg, "assign")["state"] == "done"
    assert digests(cfg.run_dir)[f"assign/assign/{shard}.parquet"] == digests(world["tmp"] / "runs" / "local")[
        f"assign/assign/{shard}.parquet"
    ]
