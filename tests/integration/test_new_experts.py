"""New experts (docs/growth.md, "New experts"): grow the data by a shard, add a generation-1 expert,
train it from the seed, and check the existing experts and earlier assignments are untouched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import cli
from tests.integration.test_chain import TINY


def _argv(root: Path, data: Path, train: str) -> list[str]:
    sets = [
        *TINY,
        "train.baselines=[]",
        f"run.root={root}",
        f"demo_data.out={data}",
        f"data.train={data}/train/{train}.tar",
        f"data.eval_root={data}/eval",
    ]
    return ["--config", "configs/demo.yaml", "--quiet", *sum((["--set", s] for s in sets), [])]


def _snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def _fails(capsys, command: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(command) == 2
    return capsys.readouterr().err


def test_adding_an_expert_keeps_existing_experts_and_the_report_shows_its_generation(tmp_path, capsys):
    data, root = tmp_path / "data", tmp_path / "runs"
    old, grown = _argv(root, data, "{0..2}"), _argv(root, data, "{0..3}")
    assert cli.main(["demo-data", *old]) == 0
    assert cli.main(["run", *old]) == 0  # experts 0 and 1 (generation 0) and a report
    rdir = root / "demo"
    err = _fails(capsys, ["add-experts", *old])
    assert err.count("\n") == 1 and "no new data" in err
    kept = sorted(rdir.glob("train/*/final.pt")) + sorted(rdir.glob("assign/assign/*.parquet"))
    kept += [rdir / "cluster" / "fine_centers.pth", rdir / "cluster" / "coarse.pth"]
    assert len(kept) == 3 + 3 + 2
    before = _snapshot(kept)

    for stage in ("prep", "embed", "cluster", "assign"):  # growth: shard 3 goes to the existing centres
        assert cli.main([stage, *grown]) == 0
    assert "--num-fine (1) must be >= --num-experts (2)" in _fails(
        capsys, ["add-experts", *grown, "--num-experts", "2", "--num-fine", "1"]
    )
    capsys.readouterr()
    assert cli.main(["add-experts", *grown, "--num-experts", "1", "--num-fine", "4"]) == 0
    assert "generation 1: expert(s) 2" in capsys.readouterr().out
    registry = json.loads((rdir / "experts.json").read_text())
    assert registry["experts"] == [{"expert": 2, "generation": 1, "fine": [8, 9, 10, 11]}]
    assert registry["generations"][0]["shards"] == ["s0_3"]
    assert (rdir / "cluster" / "generations" / "gen_1.pth").is_file()
    assert "no new data" in _fails(capsys, ["add-experts", *grown])  # the new shard is clustered now

    capsys.readouterr()
    assert cli.main(["assign", *grown]) == 0  # no --force: only the new shard is redone
    assert "assign: ran 1 shard(s), skipped 3" in capsys.readouterr().out
    new = pq.read_table(rdir / "assign" / "assign" / "s0_3.parquet")
    assert 2 in set(new.column("coarse").to_pylist())  # new pairs nearest a new centre go to the new expert
    assert all(c == 2 for c, f in zip(new.column("coarse").to_pylist(), new.column("fine").to_pylist(), strict=True) if f >= 8)
    manifest = json.loads((rdir / "assign" / "manifest.json").read_text())
    assert manifest["num_experts"] == 3 and len(manifest["expert_sizes"]) == 3

    capsys.readouterr()
    assert cli.main(["status", "--json", *grown]) == 0
    status = {row["stage"]: row for row in json.loads(capsys.readouterr().out)}
    for name in ("train/expert_0", "train/expert_1"):
        assert status[name]["state"] == "done", status[name]  # growth by a generation is a note
        assert "grew by 1 shard(s)" in status[name].get("note", "")
    assert status["train/expert_2"]["state"] == "not started"

    assert cli.main(["train", "--expert", "all", *grown]) == 0  # trains expert 2 only
    assert (rdir / "train" / "expert_2" / "final.pt").is_file()
    assert _snapshot(kept) == before  # old checkpoints, earlier assignments and centres untouched
    assert cli.main(["ensemble", *grown]) == 0
    rows = list(csv.DictReader((rdir / "ensemble" / "report.csv").open()))
    assert rows and all("expert-2" in row for row in rows) and rows[0]["expert-2"] != ""
    emanifest = json.loads((rdir / "ensemble" / "manifest.json").read_text())
    tasks = emanifest["num_shards"]  # only the new expert was evaluated; the others' outputs reused
    assert emanifest["counts"]["skipped"].get("cached_outputs") == 3 * tasks, emanifest["counts"]
    calibration = json.loads((rdir / "ensemble" / "calibration.json").read_text())
    assert "+" in calibration["key"]["centers"]  # the calibrated routing was refitted on the union
    report = (rdir / "ensemble" / "report.md").read_text()
    assert "| expert-2 | 1 | 4 |" in report and "| expert-0 | 0 |" in report

    rerun = _snapshot(sorted(rdir.glob("train/*/final.pt")) + [rdir / "ensemble" / "report.csv"])
    capsys.readouterr()
    assert cli.main(["run", *grown]) == 0  # a rerun does nothing
    out = capsys.readouterr().out
    assert "ran" not in out.replace("nothing to do", ""), out
    assert _snapshot(list(rerun)) == rerun


@pytest.mark.parametrize("bad", [["--num-experts", "0"], ["--num-fine", "0"]])
def test_add_experts_refuses_bad_counts_in_one_line(tmp_path, capsys, bad):
    from pipeline.config import load_config
    from stages.generations import add_experts

    cfg = load_config("configs/demo.yaml", [f"run.root={tmp_path}"])
    with pytest.raises(Exception, match="add-experts: ") as info:
        add_experts(cfg, int(bad[1]) if bad[0] == "--num-experts" else 1, int(bad[1]) if bad[0] == "--num-fine" else 4)
    assert "\n" not in str(info.value)
