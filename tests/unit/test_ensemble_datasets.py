"""Eval-task readers: webdataset shards, image folders and CSV + classnames.txt."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes, write_shard
from training.evaluation.tasks import (
    DEFAULT_TEMPLATES,
    discover_tasks,
    fill_template,
    iter_classification,
    iter_retrieval,
    load_task,
    retrieval_texts,
)


def _cls_task(root: Path) -> Path:
    task = root / "digits"
    task.mkdir(parents=True)
    info = {"type": "classification", "classnames": ["zero", "one"], "templates": ["a digit {c}."]}
    (task / "task.json").write_text(json.dumps(info))
    members = []
    for i, label in enumerate([1, 0, 1]):
        members += [(f"k{i}.jpg", jpeg_bytes()), (f"k{i}.cls", str(label).encode()), (f"k{i}.json", b"{}")]
    members += [("bad.json", b"{}")]  # no image, no label: counted, not yielded
    write_shard(task / "test-000000.tar", members)
    return task


def test_webdataset_classification(tmp_path):
    task = load_task(_cls_task(tmp_path))
    assert (task.kind, task.source, task.classnames, task.templates) == (
        "classification", "wds", ("zero", "one"), ("a digit {c}.",)
    )
    skipped: Counter = Counter()
    items = list(iter_classification(task, skipped))
    assert [label for _, label in items] == [1, 0, 1]
    assert items[0][0].mode == "RGB" and skipped == {"no_image_or_cls": 1}


def test_task_shards_as_urls_and_gzip_read_the_same(tmp_path):
    """task.json may list webdataset URLs (``pipe:``) and the folder may hold ``.tar.gz`` shards."""
    plain = load_task(_cls_task(tmp_path / "plain"))
    tar = tmp_path / "plain" / "digits" / "test-000000.tar"
    piped = tmp_path / "piped" / "digits"
    piped.mkdir(parents=True)
    info = json.loads((tar.parent / "task.json").read_text())
    (piped / "task.json").write_text(json.dumps({**info, "shards": [f"pipe:cat {tar}"]}))
    zipped = tmp_path / "zipped" / "digits"
    zipped.mkdir(parents=True)
    (zipped / "task.json").write_text(json.dumps(info))
    (zipped / "test-000000.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))

    def read(task):
        skipped: Counter = Counter()
        return [(image.tobytes(), label) for image, label in iter_classification(task, skipped)], skipped

    expected = read(plain)
    for root in (piped, zipped):
        task = load_task(root)
        assert read(task) == expected
        assert task.fingerprint() != plain.fingerprint()
    assert load_task(piped).files == (f"pipe:cat {tar}",)


def test_webdataset_retrieval_keeps_all_captions(tmp_path):
    task_dir = tmp_path / "retrieval"
    task_dir.mkdir()
    (task_dir / "task.json").write_text('{"type": "retrieval"}')
    members = [
        ("a.jpg", jpeg_bytes()), ("a.json", json.dumps({"texts": ["red one", "a red square"]}).encode()),
        ("b.jpg", jpeg_bytes()), ("b.txt", b"blue circle"),
        ("c.jpg", jpeg_bytes()), ("c.json", b'{"texts": []}'),
    ]
    write_shard(task_dir / "test-000000.tar", members)
    task = load_task(task_dir)
    assert task.kind == "retrieval"
    assert [texts for _, texts in iter_retrieval(task)] == [["red one", "a red square"], ["blue circle"]]
    assert retrieval_texts(task) == [["red one", "a red square"], ["blue circle"]]


def test_folder_tree(tmp_path):
    for cls, n in (("golden_retriever", 2), ("cat", 1)):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "pets" / cls / f"{i}.jpg").write_bytes(jpeg_bytes())
    task = load_task(tmp_path / "pets")
    assert task.source == "folder" and task.classnames == ("cat", "golden retriever")
    assert task.templates == DEFAULT_TEMPLATES
    assert [label for _, label in iter_classification(task)] == [0, 1, 1]


def test_csv_with_classnames(tmp_path):
    root = tmp_path / "flowers"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.jpg").write_bytes(jpeg_bytes())
    (root / "classnames.txt").write_text("rose\ntulip\n")
    (root / "templates.txt").write_text("a {} flower.\n")
    (root / "test.csv").write_text("filepath,label\nimg/0.jpg,1\nimg/1.jpg,rose\nimg/2.jpg,0\n")
    task = load_task(root)
    assert (task.source, task.classnames, task.templates) == ("csv", ("rose", "tulip"), ("a {} flower.",))
    assert [label for _, label in iter_classification(task)] == [1, 0, 0]
    (root / "test.csv").write_text("filepath,label\nimg/0.jpg,lily\n")
    with pytest.raises(ValueError, match=r"test.csv:2: label 'lily' is not in classnames.txt"):
        load_task(root)


def test_discovery_and_templates(tmp_path):
    _cls_task(tmp_path)
    (tmp_path / "notes").mkdir()  # not a task
    assert [t.name for t in discover_tasks(tmp_path)] == ["digits"]
    with pytest.raises(FileNotFoundError, match="eval task 'nope'"):
        discover_tasks(tmp_path, ["nope"])
    with pytest.raises(FileNotFoundError, match="data.eval_root"):
        discover_tasks(tmp_path / "missing")
    assert fill_template("a photo of a {c}.", "cat") == "a photo of a cat."
    assert fill_template("a {} photo.", "cat") == "a cat photo."
    with pytest.raises(ValueError, match="has no"):
        fill_template("a photo.", "cat")
