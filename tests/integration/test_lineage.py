"""Lineage and growth on the tiny demo chain: transitive staleness with reasons, content identity
(copied run and data folders are not stale), and adding shards without redoing the rest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import cli
from tests.integration.test_chain import TINY


def _argv(root: Path, data: Path, train: str = "{0..2}", *extra: str) -> list[str]:
    sets = [
        *TINY,
        f"run.root={root}",
        f"demo_data.out={data}",
        f"data.train={data}/train/{train}.tar",
        f"data.eval_root={data}/eval",
        *extra,
    ]
    return ["--config", "configs/demo.yaml", "--quiet", *sum((["--set", s] for s in sets), [])]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Demo data (4 shards) and a run over shards 0..2 up to trained experts."""
    base = tmp_path_factory.mktemp("lineage")
    data, root = base / "data", base / "runs"
    assert cli.main(["demo-data", *_argv(root, data)]) == 0
    assert cli.main(["run", "--until", "train", *_argv(root, data)]) == 0
    return base


@pytest.fixture
def run(chain, tmp_path):
    """A private copy of the run (copied without preserving mtimes) and the shared data."""
    shutil.copytree(chain / "runs", tmp_path / "runs", copy_function=shutil.copy)
    return tmp_path / "runs", chain / "data"


def _status(capsys, root, data, *extra, train: str = "{0..2}") -> dict[str, dict]:
    capsys.readouterr()
    assert cli.main(["status", "--json", *_argv(root, data, train, *extra)]) == 0
    return {row["stage"]: row for row in json.loads(capsys.readouterr().out)}


def _fails(capsys, command: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(command) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "stage", "upstream"),
    [
        ("prep.verify_images=decode", "embed", "prep"),
        ("embed.max_seq_length=16", "cluster", "embed"),
        ("cluster.max_iter=3", "assign", "cluster"),
        ("embed.max_seq_length=16", "assign", "embed"),  # two hops
    ],
)
def test_a_change_upstream_makes_every_downstream_stage_stale(run, capsys, change, stage, upstream):
    root, data = run
    err = _fails(capsys, [stage, *_argv(root, data, "{0..2}", change)])
    key = change.split("=")[0]
    assert f"upstream {upstream} is stale (changed: {key})" in err
    assert f"python -m pipeline {upstream} --force --config configs/demo.yaml" in err
    assert f"--set {change}" in err  # the user's --set travels into the suggested command
    status = _status(capsys, root, data, change)
    assert status[stage]["state"] == "stale" and f"upstream {upstream}" in status[stage]["detail"]
    assert status["train/expert_0"]["state"] == "stale"


def test_recluster_and_reassign_make_every_expert_stale_naming_assign(run, capsys):
    root, data = run
    recluster = ["cluster.max_iter=2", "cluster.init=random"]
    err = _fails(capsys, ["train", "--expert", "0", *_argv(root, data, "{0..2}", *recluster)])
    assert "upstream cluster is stale (changed: cluster.init, cluster.max_iter)" in err
    assert cli.main(["cluster", "--force", *_argv(root, data, "{0..2}", *recluster)]) == 0
    err = _fails(capsys, ["assign", *_argv(root, data, "{0..2}", *recluster)])
    assert "upstream cluster changed" in err and "--force" in err
    assert cli.main(["assign", "--force", *_argv(root, data, "{0..2}", *recluster)]) == 0
    status = _status(capsys, root, data, *recluster)
    for expert in ("train/expert_0", "train/expert_1"):
        assert status[expert]["state"] == "stale", status[expert]
        assert "upstream assign changed" in status[expert]["detail"]
    assert status["train/seed"]["state"] == "done" and not status["train/seed"].get("stale")
    err = _fails(capsys, ["train", "--expert", "0", *_argv(root, data, "{0..2}", *recluster)])
    assert "upstream assign changed" in err and "--resume none" in err


def test_retrained_seed_makes_experts_stale(run, capsys):
    root, data = run
    assert cli.main(["train", "--expert", "seed", "--force", *_argv(root, data, "{0..2}", "train.lr=0.002")]) == 0
    status = _status(capsys, root, data, "train.lr=0.002")
    assert "upstream seed changed" in status["train/expert_0"]["detail"]


def test_copied_run_folder_is_not_stale(run, capsys):
    root, data = run  # the fixture copied it with fresh mtimes
    status = _status(capsys, root, data)
    assert all(row["state"] in ("done", "not started") for row in status.values()), status
    capsys.readouterr()
    assert cli.main(["run", "--until", "train", *_argv(root, data)]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"\bran\b", out.replace("nothing to do", "")), out


def test_copied_data_folder_is_not_stale(run, capsys, tmp_path):
    root, data = run
    copy = tmp_path / "data_copy"
    shutil.copytree(data, copy, copy_function=shutil.copy)
    status = _status(capsys, root, copy)
    assert {row["state"] for row in status.values()} <= {"done", "not started"}, status
    capsys.readouterr()
    assert cli.main(["prep", *_argv(root, copy)]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out or "ran 0 shard(s)" in out
    paths = pq.read_table(root / "demo" / "prep" / "shards.parquet").column("path").to_pylist()
    assert all(p.startswith(str(copy)) for p in paths)  # training reads the new location


def _snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_adding_a_shard_redoes_only_the_new_shard(run, capsys):
    root, data = run
    rdir = root / "demo"
    kept = sorted(rdir.glob("prep/captions/*.parquet")) + sorted(rdir.glob("embed/features/*.npy"))
    kept += sorted(rdir.glob("assign/assign/*.parquet")) + sorted(rdir.glob("train/*/final.pt"))
    kept += [rdir / "cluster" / "fine_centers.pth", rdir / "cluster" / "coarse.pth"]
    before = _snapshot(kept)
    pairs = json.loads((rdir / "prep" / "manifest.json").read_text())["num_pairs"]
    grown = _argv(root, data, "{0..3}")
    capsys.readouterr()
    for stage in ("prep", "embed", "cluster", "assign"):
        assert cli.main([stage, *grown]) == 0
    out = capsys.readouterr().out
    assert "prep: ran 1 shard(s), skipped 3" in out and "embed: ran 1 shard(s), skipped 3" in out
    assert "cluster: nothing to do" in out and "assign: ran 1 shard(s), skipped 3" in out
    assert _snapshot(kept) == before  # ids, features, assignments, centres, checkpoints untouched
    new = pq.read_table(rdir / "prep" / "captions" / "s0_3.parquet").column("pair_id").to_pylist()
    assert new == list(range(pairs, pairs + len(new)))
    manifest = json.loads((rdir / "assign" / "manifest.json").read_text())
    assert sum(manifest["expert_sizes"]) == pairs + len(new)
    status = _status(capsys, root, data, train="{0..3}")
    for name in ("train/seed", "train/expert_0", "train/expert_1"):
        assert status[name]["state"] == "done", status[name]
    assert "grew by 1 shard(s)" in status["train/expert_0"].get("note", "")


def test_a_shard_listed_in_the_middle_gets_ids_after_the_existing_ones(tmp_path):
    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from tests.conftest import overrides, pair_members, write_shard

    root = tmp_path / "data"
    for s in range(4):
        write_shard(root / f"{s}.tar", sum((pair_members(f"{s}_{i}", f"caption {s} {i}") for i in range(3)), []))
    first = load_config(None, overrides(tmp_path, f"{root}/{{0,1,3}}.tar"))
    run_stage(first, "prep", progress=False)
    prep = first.run_dir / "prep"
    before = {p.name: p.read_bytes() for p in (prep / "captions").glob("*.parquet")}
    summary = run_stage(load_config(None, overrides(tmp_path, f"{root}/{{0..3}}.tar")), "prep", progress=False)
    assert summary["ran"] == 1
    assert {p.name: p.read_bytes() for p in (prep / "captions").glob("*.parquet") if p.name in before} == before
    index = pq.read_table(prep / "shards.parquet").to_pylist()
    assert [(r["shard"], r["offset"]) for r in index] == [("s0_0", 0), ("s0_1", 3), ("s0_3", 6), ("s0_2", 9)]
    ids = pq.read_table(prep / "captions" / "s0_2.parquet").column("pair_id").to_pylist()
    assert ids == [9, 10, 11]


def test_cluster_force_after_growth_refits_on_everything_and_stays_current(run, capsys):
    """docs/growth.md: ``cluster --force`` re-fits on every feature file; the clustering is then
    current (not stale against its own record) and assign redoes every shard on the new centres."""
    root, data = run
    grown = _argv(root, data, "{0..3}")
    for stage in ("prep", "embed"):
        assert cli.main([stage, *grown]) == 0
    assert cli.main(["cluster", *grown, "--force"]) == 0
    record = json.loads((root / "demo" / "cluster" / "_done" / "all.json").read_text())
    assert record["fitted_shards"] == ["s0_0", "s0_1", "s0_2", "s0_3"]
    capsys.readouterr()
    assert cli.main(["cluster", *grown]) == 0
    assert "cluster: nothing to do" in capsys.readouterr().out
    assert cli.main(["assign", *grown, "--force"]) == 0
    status = _status(capsys, root, data, train="{0..3}")
    assert status["cluster"]["state"] == "done" and status["assign"]["state"] == "done", status
