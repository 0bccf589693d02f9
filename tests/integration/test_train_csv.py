"""CSV sources (OpenCLIP's ``--dataset-type csv``): training reads the files a CSV names, and the
``shard`` command converts a CSV or an image folder into webdataset tars."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.runner import run_stage
from stages.shard import write_shards
from training.data import ExpertStream, SampleDecoder, StreamLayout, load_expert_data
from training.models import create_model
from training.synthetic import make_synthetic_run, write_assign

ROWS = 48


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    return make_synthetic_run(tmp_path_factory.mktemp("csv"), num_shards=1, per_shard=ROWS, csv=True)


@pytest.fixture(scope="module")
def decoder():
    bundle = create_model("mode-micro-vit")
    return SampleDecoder(bundle.train_transform, 0, ("jpg",), ("txt", "json"), ("caption", "texts"))


def _batches(data, decoder, n, *, rank=0, world=1, batch=8, start=0):
    layout = StreamLayout("samples", rank, world, 1, batch, 16)
    stream = iter(ExpertStream(data, layout, decoder, "mode-micro-vit", start_batch=start))
    return [next(stream) for _ in range(n)]


def test_csv_source_trains_like_its_tar_conversion(csv_run, decoder, tmp_path):
    cfg = csv_run.cfg
    data = load_expert_data(cfg, None)
    assert [s.kind for s in data.shards] == ["csv"] and data.num_pairs == ROWS
    summary = write_shards(cfg.data.train, tmp_path / "tars", max_count=1000, progress=False)
    assert summary["num_pairs"] == ROWS and summary["num_shards"] == 1 and not summary["skipped"]
    tar_cfg = load_config(
        None,
        [f"run.root={tmp_path / 'runs'}", "run.name=tars", f"data.train={summary['data_train']}", "run.workers=1"],
    )
    run_stage(tar_cfg, "prep", progress=False)
    tar_data = load_expert_data(tar_cfg, None)
    assert [s.kind for s in tar_data.shards] == ["tar"]
    for (img_c, tok_c, ids_c), (img_t, tok_t, ids_t) in zip(
        _batches(data, decoder, 7), _batches(tar_data, decoder, 7), strict=True
    ):  # 7 batches of 8 > 48 pairs: crosses an epoch
        assert torch.equal(ids_c, ids_t) and torch.equal(tok_c, tok_t) and torch.equal(img_c, img_t)


def test_csv_stream_is_deterministic_resumable_and_split_between_ranks(csv_run, decoder):
    data = load_expert_data(csv_run.cfg, 0)
    assert {s.kind for s in data.shards} == {"csv"}
    whole = _batches(data, decoder, 6)
    again = _batches(data, decoder, 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(whole, again, strict=True))
    resumed = _batches(data, decoder, 2, start=4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(whole[4:], resumed, strict=True))
    halves = [_batches(data, decoder, 3, rank=r, world=2, batch=4) for r in range(2)]
    for t in range(3):  # a 2-rank job at batch 4 sees the 1-rank batches of 8
        assert torch.equal(torch.cat([halves[0][t][2], halves[1][t][2]]), whole[t][2])


def test_train_runs_on_a_csv_source(csv_run, tmp_path):
    from training.main import train_experts

    cfg = load_config(
        None,
        [*_overrides(csv_run.cfg), f"run.root={tmp_path / 'runs'}", "train.steps=3", "train.seed_steps=2"],
    )
    run_stage(cfg, "prep", progress=False)
    write_assign(cfg, csv_run.labels, 2)
    train_experts(cfg, "seed", progress=False)
    train_experts(cfg, 1, progress=False)
    assert (cfg.run_dir / "train" / "expert_1" / "final.pt").is_file()


def _overrides(cfg):
    return [
        f"run.name={cfg.run.name}", f"data.train={cfg.data.train}", f"data.eval_root={cfg.data.eval_root}",
        "run.workers=1", "train.model=mode-micro-vit", "train.precision=fp32", "train.workers=0",
        "train.batch_size=8", "train.warmup=1", "train.save_every=2", "train.eval_every=0",
    ]


def test_shard_counts_skipped_rows_and_cuts_by_count_and_size(tmp_path, csv_run):
    src = csv_run.cfg.data.train
    base = Path(src).parent
    (base / "broken.jpg").write_bytes(b"not an image")
    rows = open(src).read().splitlines()
    extra = [
        "images/missing.jpg,a missing file",
        "images/00000.jpg,   ",
        "broken.jpg,a broken image",
        "images/00001.jpg,too,many,fields",
    ]
    bad_csv = base / "with_bad_rows.csv"
    bad_csv.write_text("\n".join(rows[:11] + extra) + "\n")
    summary = write_shards(bad_csv, tmp_path / "a", max_count=4, progress=False)
    assert summary["num_pairs"] == 10 and summary["num_shards"] == 3
    assert summary["skipped"] == {"bad_csv_row": 1, "bad_image": 1, "empty_caption": 1, "missing_image": 1}
    assert summary["data_train"] == f"{tmp_path / 'a'}/{{000000..000002}}.tar"
    with tarfile.open(tmp_path / "a" / "000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert names[:3] == sorted(names[:3]) and {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
    assert meta["source"] == "images/00000.jpg" and meta["caption"].startswith("a photo of a ")
    small = write_shards(bad_csv, tmp_path / "b", max_size_mb=0.002, progress=False)
    assert small["num_shards"] > 3 and small["num_pairs"] == 10  # ~2 kB per shard
    with pytest.raises(ConfigError, match="already holds"):
        write_shards(bad_csv, tmp_path / "b", progress=False)


def test_shard_command_reads_an_image_folder_with_sidecars(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a red square\n")
    (folder / "1.json").write_text(json.dumps({"texts": ["a dark square", "another"]}))
    argv = ["shard", "--input", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 pairs in 1 tar(s); skipped: missing_caption=1" in out and "data.train=" in out
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        assert tar.extractfile("000000001.txt").read() == b"a dark square"
        assert tar.extractfile("000000000.jpg").read()[:2] == b"\xff\xd8"  # png re-encoded as JPEG
    assert cli.main(["shard", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")]) == 2
