"""``python -m pipeline eval``: every task layout, the JSON it prints, and the same scores as
training-time evaluation and the ensemble report for a checkpoint the tiny training run made."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.artifacts import read_json
from pipeline.runner import run_stage
from tests.conftest import jpeg_bytes, write_shard
from tests.integration.test_ensemble import COLORS, MODEL, _register_tiny_model, _write_run
from training.main import train_experts
from training.synthetic import make_synthetic_run

CLASSES = ["zero", "one", "two"]
TEMPLATES = ["a handwritten digit {c}.", "the number {c}."]
LABELS = [i % 3 for i in range(len(COLORS))]
CLS_KEYS = {"acc1", "acc5", "mean_per_class_recall"}
RET_KEYS = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def _write_layouts(root: Path) -> None:
    """The same six images and labels as webdataset, clip_benchmark wds, image folders and CSV; plus a
    retrieval task."""
    info = {"type": "classification", "classnames": CLASSES, "templates": TEMPLATES}
    (root / "wds").mkdir(parents=True)
    (root / "wds" / "task.json").write_text(json.dumps(info))
    members = [m for i, c in enumerate(COLORS) for m in ((f"d{i}.jpg", jpeg_bytes(c, 32)), (f"d{i}.cls", b"%d" % LABELS[i]))]
    write_shard(root / "wds" / "test-000000.tar", members)
    (root / "clip_bench" / "test").mkdir(parents=True)
    (root / "clip_bench" / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "clip_bench" / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    write_shard(root / "clip_bench" / "test" / "0.tar", members)
    for i, color in enumerate(COLORS):
        folder = root / "folders" / CLASSES[LABELS[i]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(color, 32))
    (root / "folders" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "csv" / "images").mkdir(parents=True)
    rows = ["filepath,label"]
    for i, color in enumerate(COLORS):
        (root / "csv" / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(color, 32))
        rows.append(f"images/{i}.jpg,{CLASSES[LABELS[i]]}")
    (root / "csv" / "test.csv").write_text("\n".join(rows) + "\n")
    (root / "csv" / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "csv" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "ret").mkdir()
    (root / "ret" / "task.json").write_text('{"type": "retrieval"}')
    texts = [[f"a circle of colour {i}", f"a shape drawn in colour {i}"] for i in range(4)]
    ret = [m for i in range(4) for m in ((f"r{i}.jpg", jpeg_bytes(COLORS[i], 32)), (f"r{i}.json", json.dumps({"texts": texts[i]}).encode()))]
    write_shard(root / "ret" / "test-000000.tar", ret)


def _eval(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["eval", "--set", "ensemble.device=cpu", "--set", "ensemble.batch_size=4", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_every_layout_scores_the_same_and_prints_clip_benchmark_json(tmp_path, capsys):
    _register_tiny_model(tmp_path)
    _write_layouts(tmp_path / "tasks")
    torch.manual_seed(7)
    import open_clip

    torch.save(open_clip.create_model(MODEL).state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "out" / "results.json"
    rows = _eval(capsys, "--model", MODEL, "--pretrained", str(tmp_path / "tiny.pt"),
                 "--tasks", str(tmp_path / "tasks"), "--output", str(out))
    assert json.loads(out.read_text()) == rows
    by_task = {r["dataset"]: r for r in rows}
    assert sorted(by_task) == ["clip_bench", "csv", "folders", "ret", "wds"]
    for row in rows:
        assert set(row) == {"dataset", "model", "pretrained", "task", "language", "metrics"}
        assert row["model"] == MODEL and row["pretrained"] == str(tmp_path / "tiny.pt")
    cls = [by_task[name] for name in ("wds", "clip_bench", "folders", "csv")]
    for row in cls:
        assert row["task"] == "zeroshot_classification" and set(row["metrics"]) == CLS_KEYS
        assert row["metrics"]["acc5"] is None  # 3 classes
        for key in ("acc1", "mean_per_class_recall"):
            assert row["metrics"][key] == pytest.approx(cls[0]["metrics"][key], abs=1e-9)
    assert by_task["ret"]["task"] == "zeroshot_retrieval" and set(by_task["ret"]["metrics"]) == RET_KEYS
    assert by_task["ret"]["metrics"]["image_retrieval_recall@10"] == 1.0  # 4 images
    single = _eval(capsys, "--model", MODEL, "--pretrained", str(tmp_path / "tiny.pt"), "--tasks", str(tmp_path / "tasks" / "csv"))
    assert single == [by_task["csv"]]


def test_missing_inputs_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["eval", "--model", "mode-micro-vit", "--pretrained", str(tmp_path / "nope.pt")]) == 2
    assert cli.main(["eval", "--model", "mode-micro-vit", "--tasks", str(tmp_path / "none")]) == 2
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[:2] for line in err] == [["error", " eval"]] * 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """seed + 2 experts of the tiny synthetic run, evaluated while training (train.eval_every)."""
    root = tmp_path_factory.mktemp("eval_trained")
    sets = ["train.eval_every=4", "train.baselines=[]", "ensemble.device=cpu", "ensemble.batch_size=16"]
    run = make_synthetic_run(root, num_shards=2, per_shard=32, eval_per_class=4, overrides=sets)
    train_experts(run.cfg, "all", progress=False)
    return run.cfg


def test_run_scores_equal_training_time_and_the_ensemble_report(trained, capsys):
    cfg = trained
    rows = _eval(capsys, "--run", str(cfg.run_dir))
    assert [Path(r["pretrained"]).parent.name for r in rows] == ["seed", "expert_0", "expert_1"]
    assert {r["model"] for r in rows} == {"mode-micro-vit"} and {r["dataset"] for r in rows} == {"shapes"}
    acc = {Path(r["pretrained"]).parent.name: r["metrics"]["acc1"] for r in rows}
    for name, value in acc.items():
        during = read_json(cfg.run_dir / "train" / name / "manifest.json")["zeroshot"]["zeroshot/shapes/top1"]
        assert value == pytest.approx(during, abs=1e-9)
    seed = str(cfg.run_dir / "train" / "seed" / "final.pt")
    alone = _eval(capsys, "--model", "mode-micro-vit", "--pretrained", seed, "--tasks", str(cfg.data.eval_root))
    assert alone[0]["metrics"] == rows[0]["metrics"]
    # The ensemble report on the same run (fake embed/cluster artifacts, real trained models).
    ens_root = cfg.run_dir.parent / "ens"
    _register_tiny_model(cfg.run_dir.parent)
    _write_run(ens_root)
    for stage in ("embed", "cluster"):
        shutil.copytree(ens_root / stage, cfg.run_dir / stage)
    run_stage(cfg, "ensemble", progress=False)
    with (cfg.run_dir / "ensemble" / "report.csv").open() as fh:
        report = {r["dataset"]: r for r in csv.DictReader(fh)}["shapes"]
    for name, column in (("seed", "seed"), ("expert_0", "expert-0"), ("expert_1", "expert-1")):
        assert float(report[column]) == pytest.approx(100 * acc[name], abs=1e-3)
