"""pipeline/wds.py: the grouping rule, readers of local/compressed/piped shards, the writer."""

from __future__ import annotations

import gzip
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline import wds
from tests.conftest import jpeg_bytes, pair_members, write_shard


@pytest.mark.parametrize(
    "name, expected",
    [
        ("k.jpg", ("k", "jpg")),
        ("k.JPG", ("k", "jpg")),
        ("k.seg.png", ("k", "seg.png")),  # multi-dot: key ends at the first dot of the basename
        ("a/b.c/x.y.jpg", ("a/b.c/x", "y.jpg")),  # folder prefix kept, dots in folders are not split
        ("dir/k.txt", ("dir/k", "txt")),
        ("noext", None),
        ("dir/noext", None),
        (".hidden", None),
    ],
)
def test_split_key_is_webdatasets_rule(name, expected):
    from webdataset.tariterators import base_plus_ext

    assert wds.split_key(name) == expected
    base, ext = base_plus_ext(name)
    assert (None if base is None else (base, ext.lower())) == expected


def test_grouping_is_consecutive_and_keeps_folder_prefixes():
    members = [
        ("a.jpg", b"1"), ("a.txt", b"2"),
        ("b.jpg", b"3"),
        ("a.json", b"4"),  # a again, not consecutive: a new sample
        ("d1/k.jpg", b"5"), ("d2/k.txt", b"6"),  # same basename, other folders: two samples
        ("__index__/k.json", b"m"), ("noext", b"x"),  # webdataset meta folder, no extension
        ("x.y.z.jpg", b"7"), ("x.y.z.TXT", b"8"),
    ]
    assert list(wds.group_members(members)) == [
        ("a", {"jpg": b"1", "txt": b"2"}),
        ("b", {"jpg": b"3"}),
        ("a", {"json": b"4"}),
        ("d1/k", {"jpg": b"5"}),
        ("d2/k", {"txt": b"6"}),
        ("x", {"y.z.jpg": b"7", "y.z.txt": b"8"}),
    ]


@pytest.fixture
def shard(tmp_path) -> Path:
    members = pair_members("s/0", "first") + pair_members("s/1", "second", as_json=False)
    members += [("s/2.jpg", jpeg_bytes()), ("s/2.seg.png", b"png"), ("s/1.cls", b"3")]
    return write_shard(tmp_path / "data" / "0.tar", members)


def _gz(path: Path, suffix: str) -> Path:
    out = path.with_name(path.name.removesuffix(".tar") + suffix)
    out.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    return out


def test_local_piped_and_gzipped_shards_give_the_same_samples(shard):
    local = list(wds.iter_samples(shard))
    assert [k for k, _ in local] == ["s/0", "s/1", "s/2", "s/1"]
    for source in (f"pipe:cat {shard}", _gz(shard, ".tar.gz"), _gz(shard, ".tgz"), f"file:{shard}"):
        assert list(wds.iter_samples(source)) == local, source
    assert wds.is_local_tar(shard) and not wds.is_local_tar(_gz(shard, ".tgz"))
    assert not wds.is_local_tar(f"pipe:cat {shard}") and wds.is_url("https://h/x.tar")


def test_samples_match_webdatasets_own_reader(shard):
    import webdataset as wdsp

    ours = list(wds.iter_samples(f"pipe:cat {shard}"))
    theirs = list(wdsp.tariterators.tarfile_samples([{"url": f"pipe:cat {shard}"}]))
    assert [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in theirs] == ours


def test_unreadable_shards_are_counted_or_raise_one_line(tmp_path, shard):
    cut = tmp_path / "cut.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])
    skipped: Counter = Counter()
    assert [k for k, _ in wds.iter_samples(cut, skipped)] == ["s/0", "s/1", "s/2"]
    assert skipped == {"corrupt_tar": 1}
    for bad in (cut, f"pipe:cat {tmp_path}/missing.tar", "pipe:exit 3", tmp_path / "nope.tar.gz"):
        skipped = Counter()
        list(wds.iter_samples(bad, skipped))
        assert skipped == {"corrupt_tar": 1}, bad
        with pytest.raises(wds.ShardReadError, match=r"cannot read tar") as err:
            list(wds.iter_samples(bad))
        assert "\n" not in str(err.value)


def test_writer_is_deterministic_and_atomic(tmp_path):
    members = [("k.jpg", jpeg_bytes()), ("k.json", b"{}")]
    a, b = wds.write_tar(tmp_path / "a.tar", members), wds.write_tar(tmp_path / "sub" / "b.tar", members)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        infos = tar.getmembers()
    assert [(i.name, i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos] == [
        (n, wds.FIXED_MTIME, 0, 0, "", "", 0o644) for n, _ in members
    ]
    with pytest.raises(RuntimeError), wds.TarWriter(tmp_path / "c.tar") as writer:
        writer.add("k.txt", b"x")
        raise RuntimeError
    assert not list(tmp_path.glob("c.tar*"))


def test_shard_series_cuts_by_count_and_size(tmp_path):
    with wds.ShardSeries(str(tmp_path / "%06d.tar"), max_count=2, max_bytes=1e9) as series:
        for i in range(5):
            series.write(f"{i:03d}", {"txt": f"caption {i}"})
    assert [p.name for p in series.written] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [k for p in series.written for k, _ in wds.iter_samples(p)] == [f"{i:03d}" for i in range(5)]
    with wds.ShardSeries(str(tmp_path / "s%d.tar"), max_count=100, max_bytes=1500) as small:
        for i in range(4):
            small.write(f"{i}", {"txt": "x", "json": "{}"})  # 2 KiB per sample
    assert len(small.written) == 4 and not list(tmp_path.glob("*.tmp"))


def _both_readers(path: Path) -> tuple[list, list]:
    """(members, error) from the local fast path and from tarfile's stream reader."""
    out = []
    for reader in (wds._local_members, wds._tarfile_members):
        members, error = [], None
        with open(path, "rb") as fh:
            try:
                members.extend(reader(fh))
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                error = type(exc).__name__
        out.append((members, error))
    return out[0], out[1]


def _fuzz_source(tmp_path: Path) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("a.jpg", jpeg_bytes()), ("a.json", b"{}" * 300), ("d/", None), ("zero.txt", b""),
                           ("p" * 120 + "/long.txt", b"gnu long name"), ("b.txt", b"x" * 512)]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    plain = wds.write_tar(tmp_path / "u.tar", [("x/y.z.jpg", b"1" * 700), ("q" * 90 + "/" + "r" * 50 + ".txt", b"ustar prefix")])
    return plain.read_bytes() + buf.getvalue()  # ustar (prefix names), then GNU ending in a long name


def test_local_fast_path_reads_exactly_as_tarfile_does(tmp_path):
    import random

    original = _fuzz_source(tmp_path)
    rng = random.Random(1)
    victim = tmp_path / "v.tar"
    for case in range(400):
        buf = bytearray(original)
        if case % 4 == 0:
            buf = buf[: rng.randrange(len(buf) + 1)]
        elif case % 4 == 1:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif case % 4 == 2:  # damage inside a header block
            block = rng.randrange(len(buf) // 512)
            buf[block * 512 + rng.randrange(512)] ^= 0xFF
        else:
            pos = rng.randrange(len(buf) // 512) * 512
            buf[pos:pos] = bytes(512 * rng.randint(1, 2))
        victim.write_bytes(bytes(buf))
        fast, slow = _both_readers(victim)
        assert fast == slow, case
    for lo, hi in [(100, 108), (116, 124), (124, 136), (337, 345)]:  # a bad number, a valid checksum
        buf = bytearray(original)
        buf[lo:hi] = b"9z\xff" + bytes(hi - lo - 3)
        buf[148:156] = b"%06o\0 " % (256 + sum(buf[:148]) + sum(buf[156:512]))
        victim.write_bytes(bytes(buf))
        fast, slow = _both_readers(victim)
        assert fast == slow and len(fast[0]) == 6, (lo, hi)
    victim.write_bytes(original)
    fast, slow = _both_readers(victim)
    assert fast == slow and len(fast[0]) == 7 and fast[1] is None
