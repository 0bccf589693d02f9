"""The whole chain on a tiny generated dataset: demo-data → prep → embed → cluster → assign →
seed → experts → ensemble, through the CLI, then a rerun that does no work."""

from __future__ import annotations

import csv
import json

from pipeline import cli
from tests.tiny import tiny_overrides

TINY = tiny_overrides()


def test_whole_chain_and_noop_rerun(tmp_path, capsys):
    sets = [
        *TINY,
        f"run.root={tmp_path / 'runs'}",
        f"demo_data.out={tmp_path / 'data'}",
        f"data.train={tmp_path / 'data'}/train/{{0..3}}.tar",
        f"data.eval_root={tmp_path / 'data'}/eval",
    ]
    argv = ["--config", "configs/demo.yaml", "--quiet", *sum((["--set", s] for s in sets), [])]
    assert cli.main(["demo-data", *argv]) == 0
    assert cli.main(["run", *argv]) == 0
    run = tmp_path / "runs" / "demo"
    for stage in ("prep", "embed", "cluster", "assign", "ensemble"):
        assert (run / stage / "manifest.json").is_file(), stage
    assert json.loads((run / "prep" / "manifest.json").read_text())["num_pairs"] == 240
    assert sum(json.loads((run / "assign" / "manifest.json").read_text())["expert_sizes"]) == 240
    for model in ("seed", "expert_0", "expert_1", "dense", "random_split_0", "random_split_1"):
        assert (run / "train" / model / "final.pt").is_file(), model
    with open(run / "ensemble" / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:2] == ["dataset", "num_classes"]
    assert list(rows[0])[2:] == [
        "expert-0", "expert-1", "expert-max", "all_unit", "ensemble", "seed", "dense", "random_split",
    ]
    with open(run / "ensemble" / "report_paired.csv") as fh:
        verdicts = {r["baseline"]: r["verdict"] for r in csv.DictReader(fh) if r["dataset"] == "average"}
    assert set(verdicts) == {"dense", "random_split", "all_unit", "seed"}
    assert rows[-1]["dataset"] == "average"
    assert {r["dataset"] for r in rows} >= {"digits", "shapes", "textures", "words"}
    assert (run / "ensemble" / "report.md").is_file()

    outputs = sorted(run.glob("*/manifest.json")) + sorted(run.glob("train/*/final.pt"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    assert cli.main(["run", *argv]) == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert cli.main(["status", *argv[:2], *sum((["--set", s] for s in sets), [])]) == 0
    status = capsys.readouterr().out
    assert "stale" not in status.split("run:")[1].replace("stale=", "")


def test_every_make_target_command_parses():
    """The Makefile passes --config/--launcher/--set to every sub-command."""
    parser = cli.build_parser()
    for command in ("demo-data", "prep", "embed", "cluster", "assign", "train", "ensemble", "run", "status"):
        args = parser.parse_args([command, "--config", "configs/demo.yaml", "--launcher", "local", "--set", "run.seed=1"])
        assert args.command == command and args.launcher == "local"


def _tars_to_csv(train_dir, out):
    """OpenCLIP's CSV form of the demo tars: images/<key>.jpg and ``filepath,caption`` (first text)."""
    import tarfile

    (out / "images").mkdir(parents=True)
    rows = []
    for tar_path in sorted(train_dir.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            key = name[: -len(".jpg")]
            (out / "images" / name).write_bytes(members[name])
            rows.append([f"images/{name}", json.loads(members[f"{key}.json"])["texts"][0]])
    with open(out / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["filepath", "caption"], *rows])
    return out / "train.csv", len(rows)


def test_whole_chain_on_a_csv_source(tmp_path):
    """A `filepath,caption` CSV through prep, embed, cluster, assign, seed, experts and ensemble."""
    data = tmp_path / "data"
    sets = [*TINY, f"run.root={tmp_path / 'runs'}", f"demo_data.out={data}", f"data.eval_root={data}/eval"]
    argv = ["--config", "configs/demo.yaml", "--quiet", *sum((["--set", s] for s in sets), [])]
    assert cli.main(["demo-data", *argv]) == 0
    source, rows = _tars_to_csv(data / "train", tmp_path / "csv")
    argv += ["--set", f"data.train={source}"]
    assert cli.main(["run", *argv]) == 0
    run = tmp_path / "runs" / "demo"
    assert json.loads((run / "prep" / "manifest.json").read_text())["num_pairs"] == rows == 240
    for model in ("seed", "expert_0", "expert_1"):
        manifest = json.loads((run / "train" / model / "manifest.json").read_text())
        assert (run / "train" / model / "final.pt").is_file() and manifest["step"] == (4 if model == "seed" else 6), model
    assert (run / "ensemble" / "report.md").is_file()
