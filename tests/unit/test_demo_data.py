"""Tests for the deterministic demo-data generator (the pipeline/demo package)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.demo import (
    ALL_DOMAINS,
    MANIFEST_NAME,
    MNIST_HELDOUT_PER_CLASS,
    digits,
    generate,
    generate_demo_data,
)

SMALL = {"num_pairs": 400, "pairs_per_shard": 100, "eval_per_class": 3, "retrieval_pairs": 40}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_a")
    return root, generate_demo_data(root, workers=2, progress=False, **SMALL)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_b")
    generate_demo_data(root, workers=1, progress=False, **SMALL)
    return root


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def train_samples(root: Path) -> list[dict]:
    """Training JSONs with the jpg bytes attached under ``_jpg``."""
    samples = []
    for shard in range(4):
        items = members(root / "train" / str(shard % 100) / f"{shard}.tar")
        for (_, meta), (_, jpg) in zip(items[::2], items[1::2], strict=True):
            samples.append({**json.loads(meta), "_jpg": jpg, "_shard": shard})
    return samples


def eval_samples(root: Path, task: str) -> list[dict]:
    """Eval JSONs with their jpg bytes (and cls text, if any) attached."""
    grouped: dict[str, dict] = {}
    for name, data in members(root / "eval" / task / "test-000000.tar"):
        key, ext = name.split(".", 1)
        grouped.setdefault(key, {})[ext] = data
    return [{**json.loads(g["json"]), "_jpg": g["jpg"], "_cls": g.get("cls")} for g in grouped.values()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_member_order(run_a: tuple[Path, dict]) -> None:
    root, summary = run_a
    assert (root / "train" / "shards.txt").read_text() == "0..3\n"
    assert summary["train"]["shards"] == "0..3" and summary["train"]["num_shards"] == 4
    for shard in range(4):
        names = [name for name, _ in members(root / "train" / str(shard) / f"{shard}.tar")]
        keys = [f"{shard:06d}_{i:05d}" for i in range(100)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("json", "jpg")]
    assert not list(root.rglob("*.tmp")) and not list(root.rglob(".*"))
    assert json.loads((root / MANIFEST_NAME).read_text()) == summary


def test_training_json_schema(run_a: tuple[Path, dict]) -> None:
    root, _ = run_a
    for sample in train_samples(root):
        assert set(sample) - {"_jpg", "_shard"} == {"texts", "domain", "label", "label_id", "attributes"}
        assert 2 <= len(sample["texts"]) <= 3 and len(set(sample["texts"])) == len(sample["texts"])
        assert all(isinstance(t, str) and t.strip() for t in sample["texts"])
        classnames = json.loads((root / "eval" / sample["domain"] / "task.json").read_text())["classnames"]
        assert classnames[sample["label_id"]] == sample["label"]
        assert isinstance(sample["attributes"], dict) and sample["attributes"]


def test_same_bytes_across_dirs_and_worker_counts(run_a: tuple[Path, dict], run_b: Path) -> None:
    a, b = tree_bytes(run_a[0]), tree_bytes(run_b)
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []


def test_seed_changes_the_data(tmp_path: Path, run_a: tuple[Path, dict]) -> None:
    generate_demo_data(tmp_path, seed=1, workers=1, progress=False, **SMALL)
    shard = Path("train/0/0.tar")
    assert (tmp_path / shard).read_bytes() != (run_a[0] / shard).read_bytes()


def test_domains_balanced_and_mixed_in_every_shard(run_a: tuple[Path, dict]) -> None:
    root, summary = run_a
    samples = train_samples(root)
    counts = Counter(s["domain"] for s in samples)
    assert counts == {d: 100 for d in ALL_DOMAINS} == summary["train"]["pairs_per_domain"]
    for shard in range(4):
        per_shard = Counter(s["domain"] for s in samples if s["_shard"] == shard)
        assert set(per_shard) == set(ALL_DOMAINS) and min(per_shard.values()) >= 10
    labels = Counter((s["domain"], s["label"]) for s in samples)
    assert all(
        labels[(d, c)] == n for d, v in summary["train"]["pairs_per_label"].items() for c, n in v.items()
    )


def test_captions_describe_the_image(run_a: tuple[Path, dict]) -> None:
    for sample in train_samples(run_a[0]):
        if sample["domain"] == "words":
            assert all(sample["label"] in t.lower().replace("-", "") for t in sample["texts"])
        if sample["domain"] == "shapes":
            assert all(sample["label"] in t for t in sample["texts"])


def test_eval_never_overlaps_training(run_a: tuple[Path, dict]) -> None:
    root, _ = run_a
    train = train_samples(root)
    train_mnist = {s["attributes"]["mnist_index"] for s in train if s["domain"] == "digits"}
    heldout = {int(row) for rows in digits.mnist_split()[1] for row in rows}
    assert len(heldout) == 10 * MNIST_HELDOUT_PER_CLASS and not train_mnist & heldout
    train_jpgs = {hashlib.sha256(s["_jpg"]).digest() for s in train}
    for task in [*ALL_DOMAINS, "retrieval"]:
        for sample in eval_samples(root, task):
            assert hashlib.sha256(sample["_jpg"]).digest() not in train_jpgs
            if sample["domain"] == "digits":
                assert sample["attributes"]["mnist_index"] not in train_mnist


def test_classification_task_format(run_a: tuple[Path, dict]) -> None:
    root, summary = run_a
    for domain in ALL_DOMAINS:
        task = json.loads((root / "eval" / domain / "task.json").read_text())
        assert task["type"] == "classification" and task["domain"] == domain
        assert task["shards"] == ["test-000000.tar"] and summary["eval"][domain]["shards"] == task["shards"]
        assert len(task["templates"]) >= 3 and all("{c}" in t for t in task["templates"])
        names = [n for n, _ in members(root / "eval" / domain / "test-000000.tar")]
        assert [n.split(".", 1)[1] for n in names[:3]] == ["jpg", "cls", "json"]
        samples = eval_samples(root, domain)
        assert Counter(s["label"] for s in samples) == {i: 3 for i in range(len(task["classnames"]))}
        for s in samples:
            assert int(s["_cls"].decode("ascii")) == s["label"]
            assert task["classnames"][s["label"]] == s["classname"] and s["caption"]


def test_retrieval_task_format(run_a: tuple[Path, dict]) -> None:
    root, _ = run_a
    task = json.loads((root / "eval" / "retrieval" / "task.json").read_text())
    assert task["type"] == "retrieval" and task["num_samples"] == 40
    samples = eval_samples(root, "retrieval")
    assert len(samples) == 40 and Counter(s["domain"] for s in samples) == {d: 10 for d in ALL_DOMAINS}
    assert all(s["texts"] and s["_cls"] is None for s in samples)


@pytest.mark.parametrize("size", [32, 96])
def test_jpg_decodes_to_image_size(tmp_path: Path, size: int) -> None:
    generate_demo_data(
        tmp_path,
        image_size=size,
        num_pairs=40,
        pairs_per_shard=20,
        eval_per_class=1,
        retrieval_pairs=4,
        workers=1,
        progress=False,
    )
    for path in [*tmp_path.glob("train/*/*.tar"), *tmp_path.glob("eval/*/*.tar")]:
        for name, data in members(path):
            if name.endswith(".jpg"):
                image = Image.open(io.BytesIO(data))
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (size, size)


def test_second_call_is_idempotent(run_a: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, summary = run_a

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("regenerated although the manifest matches")

    monkeypatch.setattr(generate, "execute", fail)
    assert generate_demo_data(root, workers=1, progress=False, **SMALL) == summary
    with pytest.raises(FileExistsError, match="seed"):
        generate_demo_data(root, seed=5, progress=False, **SMALL)


def test_subset_of_domains(tmp_path: Path) -> None:
    summary = generate_demo_data(
        tmp_path,
        num_pairs=30,
        pairs_per_shard=30,
        eval_per_class=2,
        retrieval_pairs=0,
        domains=["shapes", "words"],
        workers=1,
        progress=False,
    )
    assert summary["train"]["pairs_per_domain"] == {"shapes": 15, "words": 15}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["shapes", "words"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domains": ["digits", "faces"]}, "domains"),
        ({"eval_per_class": 101}, "eval_per_class"),
        ({"pairs_per_shard": 0}, "pairs_per_shard"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo_data(tmp_path, progress=False, **kwargs)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_readable_with_webdataset(run_a: tuple[Path, dict]) -> None:
    wds = pytest.importorskip("webdataset")
    root, _ = run_a
    urls = [str(root / "train" / str(s) / f"{s}.tar") for s in range(4)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "json"))
    assert len(samples) == 400
    assert samples[0][0].size == (64, 64) and len(samples[0][1]["texts"]) >= 2
