"""Linear probe of the experts (MoDE Table 9): experts' concatenated features vs the dense model,
on eval tasks with a train/ split; dense falls back to the seed model and says so."""

from __future__ import annotations

import csv
import json

from pipeline.cli import main as cli
from pipeline.config import load_config
from tests.conftest import jpeg_bytes, write_shard
from tests.integration.test_ensemble import COLORS, MODEL, _register_tiny_model, _save_model


def write_task(root, name, per_class=4, classes=3):
    for split, prefix in (("", "test"), ("train", "train")):
        folder = root / name / split if split else root / name
        members = []
        for i in range(per_class * classes):
            c = i % classes
            members += [(f"{prefix}_{i:04d}.jpg", jpeg_bytes(COLORS[c], 32)), (f"{prefix}_{i:04d}.cls", str(c).encode())]
        write_shard(folder / f"{prefix}-000000.tar", members)
        info = {"type": "classification", "classnames": ["red", "green", "blue"], "templates": ["a {c} image."],
                "shards": [f"{prefix}-000000.tar"]}
        (folder / "task.json").write_text(json.dumps(info))


def test_linear_probe_experts_vs_dense(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster on a shared CPU
    try:
        _probe(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _probe(tmp_path, capsys):
    _register_tiny_model(tmp_path)
    eval_root = tmp_path / "eval"
    write_task(eval_root, "colors")
    write_shard(eval_root / "retr" / "test-000000.tar", [("a.jpg", jpeg_bytes()), ("a.txt", b"red")])
    (eval_root / "retr" / "task.json").write_text(json.dumps({"type": "retrieval"}))
    run = tmp_path / "runs" / "p"
    for k in range(2):
        _save_model(run / "train" / f"expert_{k}" / "final.pt", k)
    _save_model(run / "train" / "seed" / "final.pt", 7)
    sets = [f"run.root={tmp_path / 'runs'}", "run.name=p", f"train.model={MODEL}", f"data.eval_root={eval_root}",
            "linear_eval.epochs=10"]
    args = [x for s in sets for x in ("--set", s)]
    assert cli(["linear-probe", *args]) == 0
    rows = list(csv.DictReader((run / "ensemble" / "linear_probe.csv").open()))
    models = {r["model"] for r in rows}
    assert models == {"experts-concat", "dense", "expert-0", "expert-1"}
    concat = next(r for r in rows if r["model"] == "experts-concat" and r["task"] == "colors")
    dense = next(r for r in rows if r["model"] == "dense" and r["task"] == "colors")
    assert int(concat["dim"]) == 2 * int(dense["dim"]) and dense["dense_source"] == "seed"
    assert len((run / "ensemble" / "linear_probe.jsonl").read_text().splitlines()) == len(rows)
    assert "experts-concat" in capsys.readouterr().out
    # A dense continuation model is preferred when it exists.
    _save_model(run / "train" / "dense" / "final.pt", 9)
    from ensemble.linear_probe import probe_models

    assert probe_models(load_config(None, sets))[1][0] == "dense"
