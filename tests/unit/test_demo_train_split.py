"""The demo's labelled train splits (eval/<task>/train/) for linear evaluation: present, labelled,
disjoint from the held-out digits, invisible to the zero-shot readers, and added to old data in place."""

from __future__ import annotations

import json
import shutil

from pipeline.demo import TRAIN_SPLIT_FACTOR, generate_demo_data
from tests.unit.test_demo_data import SMALL, members
from training.evaluation.tasks import classification_tasks, discover_tasks, load_task


def test_train_splits(tmp_path):
    root = tmp_path / "demo"
    generate_demo_data(root, workers=1, progress=False, **SMALL)
    tests = {t.name: t for t in discover_tasks(root / "eval")}
    for task in ("digits", "shapes", "textures", "words"):
        info = json.loads((root / "eval" / task / "train" / "task.json").read_text())
        assert info["split"] == "train" and info["classnames"] == list(tests[task].classnames)
        assert info["num_samples"] == TRAIN_SPLIT_FACTOR * SMALL["eval_per_class"] * len(info["classnames"])
        train = load_task(root / "eval" / task / "train", task)
        assert all(f.parent.name == "train" for f in train.files)
        assert all(f.parent.name != "train" for f in tests[task].files)
    zs = {t.name: t.files for t in classification_tasks(root / "eval")}
    assert all(s.parent.name != "train" for shards in zs.values() for s in shards)
    held = {json.loads(d)["attributes"]["mnist_index"] for p in (root / "eval" / "digits").glob("test-*.tar")
            for n, d in members(p) if n.endswith(".json")}
    used = {json.loads(d)["attributes"]["mnist_index"] for p in (root / "eval" / "digits" / "train").glob("*.tar")
            for n, d in members(p) if n.endswith(".json")}
    assert used and not used & held
    # Data generated before the train splits existed is completed in place.
    before = (root / "eval" / "shapes" / "train" / "train-000000.tar").read_bytes()
    shutil.rmtree(root / "eval" / "shapes" / "train")
    summary = generate_demo_data(root, workers=1, progress=False, **SMALL)
    assert (root / "eval" / "shapes" / "train" / "train-000000.tar").read_bytes() == before
    assert "shapes" in summary["eval_train"]
