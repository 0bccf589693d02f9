"""Content digests (cached per path/size/mtime) and the pair-id order of grown listings."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import artifacts
from stages.prep import id_order


def test_fingerprint_follows_content_not_path_or_mtime(tmp_path):
    a = tmp_path / "a" / "x.bin"
    a.parent.mkdir()
    a.write_bytes(b"hello")
    b = tmp_path / "b" / "x.bin"
    b.parent.mkdir()
    shutil.copy(a, b)  # new mtime, new path
    os.utime(b, ns=(1, 1))
    assert artifacts.file_fingerprint(a) == artifacts.file_fingerprint(b)
    b.write_bytes(b"hellO")
    assert artifacts.file_fingerprint(a) != artifacts.file_fingerprint(b)


def test_digest_cache_reads_a_file_only_when_its_stat_changes(tmp_path, monkeypatch):
    f = tmp_path / "data.bin"
    f.write_bytes(b"x" * 100)
    cache = artifacts.DigestCache(tmp_path)
    first = cache.digest(f)
    cache.save()
    assert (tmp_path / artifacts.DIGEST_CACHE).is_file()
    calls = []
    monkeypatch.setattr(artifacts, "content_digest", lambda p: calls.append(p) or "other")
    monkeypatch.setattr(artifacts, "_MEMO", {})
    assert artifacts.DigestCache(tmp_path).digest(f) == first and calls == []
    f.write_bytes(b"y" * 100)
    assert artifacts.DigestCache(tmp_path).digest(f) == "other" and len(calls) == 1


def _index(tmp_path, rows):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shards.parquet")


def test_new_shards_get_ids_after_existing_ones_even_when_listed_in_the_middle(tmp_path):
    assert id_order(tmp_path, {"s0_0": 4, "s0_1": 4}, ["s0_0", "s0_1"]) == ["s0_0", "s0_1"]
    _index(tmp_path, [{"shard": "s0_0", "count": 4}, {"shard": "s0_3", "count": 5}])
    listing = ["s0_0", "s0_2", "s0_3"]  # s0_2 is new and sorts between the existing two
    assert id_order(tmp_path, {"s0_0": 4, "s0_2": 3, "s0_3": 5}, listing) == ["s0_0", "s0_3", "s0_2"]
    # a removed or re-counted shard renumbers in listing order
    assert id_order(tmp_path, {"s0_0": 4, "s0_2": 3}, ["s0_0", "s0_2"]) == ["s0_0", "s0_2"]
    assert id_order(tmp_path, {"s0_0": 3, "s0_2": 3, "s0_3": 5}, listing) == listing
