"""The ensemble stage on tiny fake artifacts: random-init tiny open_clip experts, centres made with
the real MiniLM text model, a 3-class zero-shot task and a 4-image retrieval task."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.runner import run_stage
from tests.conftest import jpeg_bytes, write_shard

MODEL = "ens-test-tiny"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
EMBED_MANIFEST = {"model": "all-MiniLM-L6-v2", "dim": 384, "normalize": True, "pooling": "model"}
FINE_PHRASES = ["a handwritten digit", "the number seven written by hand", "a geometric shape", "a drawing of a circle"]
FINE_TO_COARSE = [0, 0, 1, 1]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 120, 120)]


def _register_tiny_model(folder: Path) -> None:
    import open_clip

    if MODEL not in open_clip.list_models():
        path = folder / f"{MODEL}.json"
        path.write_text(json.dumps(TINY))
        open_clip.add_model_config(path)


def _save_model(path: Path, seed: int) -> None:
    import open_clip

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model(MODEL).state_dict(), path)


def _write_run(run: Path) -> None:
    from stages.text_encoder import embed_texts

    (run / "embed").mkdir(parents=True)
    (run / "embed" / "manifest.json").write_text(json.dumps({"stage": "embed", **EMBED_MANIFEST}))
    fine = torch.from_numpy(embed_texts(FINE_PHRASES, model_manifest=EMBED_MANIFEST, device="cpu"))
    assign = torch.tensor(FINE_TO_COARSE)
    coarse = torch.stack([fine[assign == k].mean(0) for k in range(2)])
    cdir = run / "cluster"
    cdir.mkdir()
    torch.save({"center": fine}, cdir / "fine_centers.pth")
    torch.save({"coarse": coarse, "assign": assign}, cdir / "coarse.pth")
    (cdir / "manifest.json").write_text(json.dumps({"stage": "cluster", "centers_digest": "fake", "num_experts": 2}))
    for name, seed in (("expert_0", 0), ("expert_1", 1), ("seed", 2), ("dense", 3)):
        _save_model(run / "train" / name / "final.pt", seed)


def _write_tasks(root: Path) -> None:
    digits = root / "digits"
    digits.mkdir(parents=True)
    info = {"type": "classification", "classnames": ["zero", "one", "two"],
            "templates": ["a handwritten digit {c}.", "the number {c}."]}
    (digits / "task.json").write_text(json.dumps(info))
    members = []
    for i, color in enumerate(COLORS):
        members += [(f"d{i}.jpg", jpeg_bytes(color, 32)), (f"d{i}.cls", str(i % 3).encode())]
    write_shard(digits / "test-000000.tar", members)
    ret = root / "retrieval"
    ret.mkdir()
    (ret / "task.json").write_text('{"type": "retrieval"}')
    members = []
    for i, color in enumerate(COLORS[:4]):
        texts = [f"a circle of colour {i}", f"a shape drawn in colour {i}"]
        members += [(f"r{i}.jpg", jpeg_bytes(color, 32)), (f"r{i}.json", json.dumps({"texts": texts}).encode())]
    write_shard(ret / "test-000000.tar", members)


@pytest.fixture
def run_cfg(tmp_path):
    _register_tiny_model(tmp_path)
    _write_tasks(tmp_path / "eval")
    sets = [
        f"run.root={tmp_path / 'runs'}", "run.name=t", "run.workers=1", f"data.eval_root={tmp_path / 'eval'}",
        f"train.model={MODEL}", "ensemble.batch_size=4", "ensemble.device=cpu",
    ]
    cfg = load_config(None, sets)
    _write_run(cfg.run_dir)
    return cfg, sets


def _report(cfg) -> list[dict]:
    with (cfg.run_dir / "ensemble" / "report.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_stage_end_to_end_rerun_and_routing_change(run_cfg):
    cfg, sets = run_cfg
    first = run_stage(cfg, "ensemble", progress=False)
    assert first["ran"] == 2
    manifest = first["manifest"]
    assert manifest["tasks"] == ["digits", "retrieval"]
    assert manifest["models"] == ["expert_0", "expert_1", "dense", "seed"]
    sdir = cfg.run_dir / "ensemble"
    for model in manifest["models"]:
        saved = torch.load(sdir / "outputs" / "digits" / f"{model}.pt", weights_only=True)
        assert saved["logits"].shape == (6, 3) and saved["targets"].tolist() == [0, 1, 2, 0, 1, 2]
        ret = torch.load(sdir / "outputs" / "retrieval" / f"{model}.pt", weights_only=True)
        assert ret["image_features"].shape == (4, 32) and ret["text_image"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        # raw cosine logits (no logit scale)
        assert saved["logits"].abs().max() <= 1.0 + 1e-5

    rows = _report(cfg)
    assert list(rows[0]) == [
        "dataset", "num_classes", "expert-0", "expert-1", "expert-max", "all_unit", "ensemble", "seed", "dense",
    ]
    assert [r["dataset"] for r in rows] == ["digits", "retrieval/image_r@1", "retrieval/text_r@1", "average"]
    assert rows[0]["num_classes"] == "3" and rows[1]["num_classes"] == ""
    for r in rows[:-1]:
        assert float(r["expert-max"]) == max(float(r["expert-0"]), float(r["expert-1"]))
    assert float(rows[-1]["ensemble"]) == pytest.approx(sum(float(r["ensemble"]) for r in rows[:-1]) / 3, abs=1e-3)

    routing = json.loads((sdir / "routing.json").read_text())
    # digit class names sit next to the digit centres (expert 0); retrieval captions next to the shapes (expert 1)
    assert routing["digits"]["votes"] == [3, 0] and routing["digits"]["weights"][0] > routing["digits"]["weights"][1]
    assert routing["retrieval"]["votes"] == [0, 8]
    lines = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines()]
    assert {"task": "digits", "system": "ensemble", "metric": "acc5", "value": None} in lines
    for name in ("report.md", "routing_weights.png", "scores.png"):
        assert (sdir / name).is_file()
    with (sdir / "report_ci.csv").open() as fh:
        ci = {(r["dataset"], r["system"]): r for r in csv.DictReader(fh)}
    for system in ("ensemble", "dense", "seed", "all_unit", "ensemble@code", "ensemble@paper", "ensemble@calibrated"):
        row = ci[("average", system)]
        assert float(row["ci_low"]) <= float(row["score"]) <= float(row["ci_high"])
    assert ci[("digits", "ensemble")]["items"] == "6" and ci[("retrieval/image_r@1", "dense")]["items"] == "8"
    with (sdir / "report_paired.csv").open() as fh:
        paired = {(r["dataset"], r["baseline"]): r for r in csv.DictReader(fh)}
    assert {b for d, b in paired if d == "average"} == {"dense", "all_unit", "seed"}
    assert paired[("average", "dense")]["verdict"] in ("better", "worse", "indistinguishable")
    text = (sdir / "report.md").read_text()
    assert text.count("- The routed ensemble is **") == 3 and "Training compute" in text

    again = run_stage(cfg, "ensemble", progress=False)
    assert again["ran"] == 0

    paper = load_config(None, [*sets, "ensemble.routing=paper"])
    with pytest.raises(StageError, match="ensemble.routing"):
        run_stage(paper, "ensemble", progress=False)
    redo = run_stage(paper, "ensemble", progress=False, force=True)
    assert redo["ran"] == 2
    records = [json.loads(p.read_text()) for p in sorted((sdir / "_done").glob("*.json"))]
    assert all(r["evaluated"] == 0 and r["skipped"]["cached_outputs"] == 4 for r in records)
    assert json.loads((sdir / "routing.json").read_text())["digits"]["formula"] == "paper"


def test_identical_experts_give_the_single_expert(run_cfg):
    cfg, _ = run_cfg
    train = cfg.run_dir / "train"
    shutil.copyfile(train / "expert_0" / "final.pt", train / "expert_1" / "final.pt")
    shutil.rmtree(train / "seed")
    run_stage(cfg, "ensemble", progress=False)
    rows = _report(cfg)
    assert "seed" not in rows[0] and "dense" in rows[0]
    for r in rows:
        assert float(r["ensemble"]) == pytest.approx(float(r["expert-0"]))
        assert float(r["all_unit"]) == pytest.approx(float(r["expert-1"]))


def test_missing_expert_is_refused_in_one_line(run_cfg):
    cfg, _ = run_cfg
    (cfg.run_dir / "train" / "expert_1" / "final.pt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        run_stage(cfg, "ensemble", progress=False)
    assert "train it with `make train EXPERT=1`" in str(err.value) and "\n" not in str(err.value)
