"""The prep stage and the runner's resume/stale contract on tiny generated shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.runner import run_stage
from stages import prep
from tests.conftest import jpeg_bytes, overrides, pair_members, write_shard


def captions(run_dir: Path) -> list[dict]:
    manifest = json.loads((run_dir / "prep" / "manifest.json").read_text())
    rows = []
    for rel in manifest["outputs"]:
        rows += pq.read_table(run_dir / "prep" / rel).to_pylist()
    return rows


def test_prep_mode_layout_dense_ids_and_noop_rerun(tmp_path, mode_shards):
    cfg = load_config(None, overrides(tmp_path, f"{mode_shards}/{{0..3}}.tar"))
    first = run_stage(cfg, "prep", progress=False)
    assert first["ran"] == 3
    manifest = first["manifest"]
    assert manifest["num_pairs"] == 12 and manifest["missing_input_files"] == 1
    rows = captions(cfg.run_dir)
    assert [r["pair_id"] for r in rows] == list(range(12))
    assert rows[5]["key"] == "001_001" and rows[5]["caption"] == "caption 1 1"
    index = prep.read_index(cfg.run_dir / "prep").to_pylist()
    assert [(r["offset"], r["count"]) for r in index] == [(0, 4), (4, 4), (8, 4)]
    second = run_stage(cfg, "prep", progress=False)
    assert second["ran"] == 0 and second["skipped"] == 3


def test_bad_inputs_are_counted_and_good_pairs_kept(tmp_path):
    root = tmp_path / "flat"
    good = pair_members("g0", "a red square") + pair_members("g1", "plain text caption", as_json=False)
    write_shard(root / "000.tar", good)
    # bad JPEG, missing caption, non-UTF-8 caption, empty caption, then a good pair
    write_shard(
        root / "001.tar",
        [("b0.json", b'{"texts": ["bad image"]}'), ("b0.jpg", b"not a jpeg at all")]
        + [("b1.jpg", jpeg_bytes())]
        + [("b2.txt", b"caf\xe9 latin-1"), ("b2.jpg", jpeg_bytes())]
        + [("b3.json", b'{"texts": ["   "]}'), ("b3.jpg", jpeg_bytes())]
        + pair_members("b4", "survivor"),
    )
    write_shard(root / "002.tar", [])  # empty shard
    full = write_shard(root / "003.tar", pair_members("t0", "kept before the cut") + pair_members("t1", "lost"))
    with tarfile.open(full) as tar:
        last = tar.getmembers()[-1]
    cut = last.offset_data + last.size // 2
    full.write_bytes(full.read_bytes()[:cut])  # truncated in the middle of the last member
    cfg = load_config(None, overrides(tmp_path, f"{root}/{{000..003}}.tar"))
    manifest = run_stage(cfg, "prep", progress=False)["manifest"]
    skipped = manifest["counts"]["skipped"]
    assert skipped["bad_image"] == 1
    assert skipped["missing_caption"] == 1
    assert skipped["caption_not_utf8"] == 1
    assert skipped["empty_caption"] == 1
    assert skipped["empty_shard"] == 1
    assert skipped["corrupt_tar"] == 1
    kept = {r["caption"] for r in captions(cfg.run_dir)}
    assert {"a red square", "plain text caption", "survivor", "kept before the cut"} <= kept
    assert "lost" not in kept
    assert manifest["num_pairs"] == len(kept)


def test_csv_source_and_joined_sources(tmp_path, mode_shards):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes(jpeg_bytes())
    (img_dir / "bad.jpg").write_bytes(b"garbage")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("filepath,caption\nimgs/a.jpg,a csv caption\nimgs/missing.jpg,gone\nimgs/bad.jpg,bad\nimgs/a.jpg,\n")
    train = f"{mode_shards}/{{0..1}}.tar::{csv_path}"
    cfg = load_config(None, overrides(tmp_path, train))
    manifest = run_stage(cfg, "prep", progress=False)["manifest"]
    assert manifest["num_pairs"] == 9
    assert manifest["counts"]["skipped"] == {"bad_image": 1, "empty_caption": 1, "missing_image": 1}
    rows = captions(cfg.run_dir)
    assert rows[-1]["caption"] == "a csv caption" and rows[-1]["source"] == 1


def test_changed_config_is_refused_until_force(tmp_path, mode_shards):
    base = overrides(tmp_path, f"{mode_shards}/{{0..2}}.tar")
    run_stage(load_config(None, base), "prep", progress=False)
    changed = load_config(None, base + ["prep.verify_images=decode"])
    with pytest.raises(StageError, match="changed: prep.verify_images"):
        run_stage(changed, "prep", progress=False)
    assert run_stage(changed, "prep", force=True, progress=False)["ran"] == 3


def test_changed_input_is_detected(tmp_path, mode_shards):
    base = overrides(tmp_path, f"{mode_shards}/{{0..2}}.tar")
    run_stage(load_config(None, base), "prep", progress=False)
    write_shard(mode_shards / "1" / "1.tar", pair_members("new", "a new caption"))
    with pytest.raises(StageError, match="1 shard"):
        run_stage(load_config(None, base), "prep", progress=False)


def test_failure_mid_run_redoes_only_that_shard(tmp_path, mode_shards, monkeypatch):
    train = f"{mode_shards}/{{0..2}}.tar"
    clean = load_config(None, overrides(tmp_path / "clean", train))
    run_stage(clean, "prep", progress=False)

    cfg = load_config(None, overrides(tmp_path / "faulty", train))
    real = prep._read_tar

    def flaky(c, src, skipped):
        if src.name.endswith("_1"):
            raise RuntimeError("injected failure")
        return real(c, src, skipped)

    monkeypatch.setattr(prep, "_read_tar", flaky)
    with pytest.raises(StageError, match="1 shard\\(s\\) failed"):
        run_stage(cfg, "prep", progress=False)
    assert not (cfg.run_dir / "prep" / "manifest.json").exists()
    assert not (cfg.run_dir / "prep" / "captions" / "s0_1.parquet").exists()
    monkeypatch.setattr(prep, "_read_tar", real)
    again = run_stage(cfg, "prep", progress=False)
    assert again["ran"] == 1 and again["skipped"] == 2
    assert captions(cfg.run_dir) == captions(clean.run_dir)


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = cli.main(["prep", "--quiet", "--set", f"run.root={tmp_path}", "--set", f"data.train={tmp_path}/none/{{0..3}}.tar"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: data.train: no input shards") and "\n" not in err
    assert cli.main(["prep", "--set", "prep.verify_image=none"]) == 2
    assert "did you mean 'verify_images'" in capsys.readouterr().err


def test_cli_prep_twice_says_nothing_to_do(tmp_path, mode_shards, capsys):
    argv = ["prep", "--quiet", *sum((["--set", o] for o in overrides(tmp_path, f"{mode_shards}/{{0..2}}.tar")), [])]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_piped_and_gzipped_shards_give_the_same_rows_as_plain_tars(tmp_path):
    import gzip

    root = tmp_path / "flat"
    for s in range(3):
        members = []
        for i in range(4):
            members += pair_members(f"d{s}/{i:03d}", f"caption {s} {i}", as_json=bool(i % 2))
        write_shard(root / f"{s}.tar", members)
        (root / f"{s}.tar.gz").write_bytes(gzip.compress((root / f"{s}.tar").read_bytes()))
    rows = {}
    for name, train in [
        ("plain", f"{root}/{{0..2}}.tar"),
        ("pipe", f"pipe:cat {root}/{{0..2}}.tar"),
        ("gzip", f"{root}/{{0..2}}.tar.gz"),
    ]:
        cfg = load_config(None, overrides(tmp_path, train, f"run.name={name}", "prep.verify_images=decode"))
        assert run_stage(cfg, "prep", progress=False)["ran"] == 3
        rows[name] = captions(cfg.run_dir)
    assert len(rows["plain"]) == 12 and rows["plain"][5]["key"] == "d1/001"
    assert rows["pipe"] == rows["plain"] and rows["gzip"] == rows["plain"]


def test_a_failing_shard_url_is_counted_not_fatal(tmp_path, mode_shards):
    train = f"{mode_shards}/0/0.tar::pipe:cat {tmp_path}/absent/{{7..8}}.tar"
    cfg = load_config(None, overrides(tmp_path, train))
    manifest = run_stage(cfg, "prep", progress=False)["manifest"]
    assert manifest["num_pairs"] == 4 and manifest["counts"]["skipped"]["corrupt_tar"] == 2
