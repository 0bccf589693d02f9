"""A failing stage never leaves the run worse: --force keeps good outputs, no stray files, quoted commands."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from pipeline import artifacts
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.errors import ConfigError, StageError
from pipeline.runner import run_stage
from tests.conftest import overrides, pair_members, write_shard
from tests.integration.test_cluster_assign import embedded  # noqa: F401 - fixture


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_keeps_the_good_cluster_until_its_replacement_is_complete(embedded):  # noqa: F811
    cfg = embedded
    run_stage(cfg, "cluster", progress=False)
    cdir = cfg.run_dir / "cluster"
    before = _snapshot(cdir)
    too_many = load_config(None, [*_overrides_of(cfg), "cluster.num_fine=500"])
    # the shard fails (more clusters than sampled pairs): the old outputs and manifest stay
    with pytest.raises(StageError) as err:
        run_stage(too_many, "cluster", force=True, progress=False)
    assert "cluster.num_fine: 500 clusters need at least as many sampled pairs" in str(err.value)
    assert "\n" not in str(err.value)
    after = _snapshot(cdir)
    for name in ("manifest.json", "fine_centers.pth", "coarse.pth", "sample_ids.npy", "_done/all.json"):
        assert after[Path(name)] == before[Path(name)], name
    run_stage(cfg, "assign", progress=False)  # the run still works from the kept manifest
    # with the pair count in the embed manifest the same mistake is refused before anything runs
    manifest = artifacts.read_json(cfg.run_dir / "embed" / "manifest.json")
    artifacts.write_json(cfg.run_dir / "embed" / "manifest.json", {**manifest, "num_pairs": 160})
    with pytest.raises(ConfigError, match=r"^cluster\.num_fine: 500 clusters"):
        run_stage(too_many, "cluster", force=True, progress=False)
    assert (cdir / "manifest.json").read_bytes() == before[Path("manifest.json")]


def _overrides_of(cfg):
    return [f"run.root={cfg.run.root}", f"data.train={cfg.data.train}", "run.workers=1",
            "cluster.num_experts=4", "cluster.max_iter=30"]


def test_a_source_matching_no_file_fails_before_prep_writes(tmp_path, mode_shards):
    spec = f"{mode_shards}/{{0..2}}.tar::{tmp_path}/nothing/{{0..3}}.tar"
    cfg = load_config(None, overrides(tmp_path, spec))
    with pytest.raises(FileNotFoundError, match=r"data.train: no input shards: source 2 .* matches no file"):
        run_stage(cfg, "prep", progress=False)
    assert not (cfg.run_dir / "prep").exists()


def test_an_invalid_expert_writes_nothing(tmp_path, capsys):
    from training.main import train_experts

    cfg = load_config(None, [f"run.root={tmp_path}", "cluster.num_experts=2"])
    for expert in ("99", "-1", "2"):
        with pytest.raises(ConfigError, match=rf"--expert {expert}: out of range; the run has experts 0..1"):
            train_experts(cfg, expert, progress=False)
    assert cli_main(["train", "--set", f"run.root={tmp_path}", "--expert", "99", "--quiet"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*"))


def test_a_rerun_removes_the_temporary_files_of_a_killed_run(tmp_path):
    data = tmp_path / "data"
    for s in range(2):
        write_shard(data / f"{s}.tar", pair_members(f"{s}_0", "a caption") + pair_members(f"{s}_1", "another"))
    cfg = load_config(None, overrides(tmp_path, f"{data}/{{0..1}}.tar"))
    run_stage(cfg, "prep", progress=False)
    pdir = cfg.run_dir / "prep"
    leftovers = [pdir / "captions" / ".s0_6.parquet.k1ll3d_x.tmp", pdir / ".manifest.json.abcdefgh.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    keep = pdir / "captions" / "notes.tmp"  # not one of ours
    keep.write_text("x")
    assert run_stage(cfg, "prep", progress=False)["ran"] == 0
    assert not any(p.exists() for p in leftovers) and keep.exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artifacts_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        artifacts.write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


def test_printed_commands_are_quoted_and_keep_resume(tmp_path, capsys):
    asked = "run.name=dry$(touch pwned)"
    code = cli_main([
        "train", "--launcher", "slurm", "--set", "launcher.dry_run=true", "--set", f"run.root={tmp_path}",
        "--set", asked, "--expert", "seed", "--resume", "none", "--quiet",
    ])
    out = capsys.readouterr().out
    assert code == 0
    line = next(x for x in out.splitlines() if "torchrun equivalent" in x)
    args = shlex.split(line.split("torchrun equivalent:", 1)[1])
    assert args[args.index("--set", args.index(f"run.root={tmp_path}")) + 1] == asked
    assert args[args.index("--resume") + 1] == "none"
    assert "#SBATCH" in out and not (tmp_path / "pwned").exists()


def test_torchrun_launch_line_is_shell_quoted(tmp_path, monkeypatch, capsys):
    import subprocess

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    asked = "run.name=x y;$(id)"
    assert cli_main(["train", "--launcher", "torchrun", "--set", asked, "--resume", "none", "--expert", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("launching: ")
    assert shlex.split(line)[1:] == seen["cmd"][1:]
    assert seen["cmd"][seen["cmd"].index("--resume") + 1] == "none"
