"""Webdataset I/O: the one grouping rule, the image extensions, a sample reader and a tar writer.

Readers and writers of webdataset tars go through this module: prep, the trainer (member keys, and
streaming of shards that are not local tars), the ``shard`` command, the demo and synthetic data,
tests and benchmarks; the evaluation task readers are to call :func:`iter_samples`.

* **Grouping rule** (webdataset's, :func:`webdataset.tariterators.base_plus_ext`): a member's key is
  its path up to the first dot of its basename, folder prefix kept (``a/b.c/x.y.jpg`` → key
  ``a/b.c/x``, extension ``y.jpg``); extensions are lower-cased; members without a dot in the
  basename, directories and webdataset meta members (``__*__``) are ignored; a sample is a run of
  *consecutive* members with the same key (a key seen again later starts a new sample).
* **Sources** (:func:`open_source`, :func:`iter_members`): a local uncompressed tar is read by a
  fast path that parses plain ustar/GNU headers exactly as ``tarfile``'s stream mode does (and
  hands pax / GNU long-name / sparse headers to ``tarfile``); the trainer indexes such tars for
  ``pread`` instead (``training/data.py``). A shard URL as webdataset accepts it (``pipe:<command>``,
  ``http(s)://`` via curl, ``file:``) is opened with :func:`webdataset.gopen.gopen`, and it and a
  gzip-compressed ``.tar.gz`` / ``.tgz`` are read by ``tarfile`` as a stream. Every path ends in
  the same grouping, so a shard gives the same samples however it is reached.
* **Bad input**: a damaged member header is skipped block by block up to the next valid header
  (``ignore_zeros``), so it costs its own pair, not the rest of the shard. A shard that cannot be
  read (or a pipe that fails) ends that shard's samples: counted as ``corrupt_tar`` and logged
  when the caller passes a ``skipped`` counter, else raised as one-line :class:`ShardReadError`.
* **Writer** (:class:`TarWriter`, :func:`write_tar`): deterministic bytes (USTAR headers, fixed
  mtime, uid/gid 0, empty user/group names, mode 0644), written via ``<path>.tmp`` and renamed.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger("pipeline.wds")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions the readers look for, in order of preference."""
FIXED_MTIME = 1704067200
"""2024-01-01T00:00:00Z: the tar header time of every generated shard (byte-identical output)."""
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")
_URL = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://|file:)")
_META = re.compile(r"__[^/]*__($|/)")
# webdataset.tariterators.base_plus_ext's pattern (tests/unit/test_wds.py checks they agree); the
# package itself is imported only to open URLs, since importing it costs ~2 s (it imports torch).
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

Sample = tuple[str, dict[str, bytes]]


class ShardReadError(ValueError):
    """A shard could not be read (one line: the shard and the cause)."""


# --------------------------------------------------------------------------- the grouping rule


def split_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name by webdataset's rule; None when it has no key."""
    match = _KEY.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[Sample]:
    """Group ``(name, bytes)`` members into ``(key, {ext: bytes})`` samples of consecutive members."""
    current, group = None, {}
    for name, data in members:
        parsed = split_key(name)
        if parsed is None or (name.startswith("__") and _META.match(name)):
            continue
        key, ext = parsed
        if key != current and group:
            yield current, group
            group = {}
        current = key
        group[ext] = data
    if group:
        yield current, group


# --------------------------------------------------------------------------- sources


def is_url(source: str | Path) -> bool:
    """True for a shard URL (``pipe:``, ``scheme://``, ``file:``) rather than a plain path."""
    return bool(_URL.match(str(source)))


def is_compressed(source: str | Path) -> bool:
    """True for a gzip-compressed shard name (``.tar.gz`` / ``.tgz``)."""
    return str(source).lower().endswith(COMPRESSED_SUFFIXES)


def is_local_tar(source: str | Path) -> bool:
    """True when ``source`` is an existing, uncompressed local tar file (random access possible)."""
    return not is_url(source) and not is_compressed(source) and os.path.isfile(source)


def open_source(source: str | Path) -> IO[bytes]:
    """A binary stream of a shard: a local file, or webdataset's ``gopen`` for URLs."""
    if not is_url(source):
        return open(source, "rb")
    from webdataset.gopen import gopen

    return gopen(str(source), "rb")


_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def iter_members(source: str | Path, errors: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every regular member of a shard, in tar order.

    Args:
        source: Local path or shard URL (see :func:`open_source`).
        errors: When given, an unreadable shard (or a failing pipe) ends the members and its
            one-line cause is appended here; when None the error is raised.
    """
    try:
        stream = open_source(source)
        try:
            local = not is_url(source) and not is_compressed(source)
            yield from (_local_members(stream) if local else _tarfile_members(stream))
        finally:
            stream.close()  # a pipe reports its exit status here
    except _READ_ERRORS as exc:
        if errors is None:
            raise
        errors.append(_reason(exc))


def _tarfile_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """The members of a tar stream (any compression ``tarfile`` detects), with ``tarfile``."""
    # ignore_zeros: a corrupt header is skipped block by block up to the next valid one, so one
    # damaged member costs its own pair, not every pair after it.
    with tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True) as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()
            tar.members = []  # a stream needs no member list: constant memory per shard


# The local fast path: tarfile's reading rules (``r|*`` with ``ignore_zeros``) for plain ustar/GNU
# headers, without building a TarInfo per member (tarfile's per-member cost is most of a bare read
# of small members). Extension headers (pax, GNU long names, sparse) and compressed content are
# handed to tarfile at the header where they start.
_BLOCK = 512
_FILE_TYPES = frozenset((b"0", b"\0", b"7"))  # regular members: yielded
_NO_DATA_TYPES = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))  # links, dirs, devices: no data blocks
_EXTENDED_TYPES = frozenset((b"L", b"K", b"S", b"x", b"g", b"X"))  # left to tarfile
_GNU_TYPES = frozenset((b"L", b"K", b"S"))
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))
# The usual spelling of the number fields (octal digits ended by NUL or space; empty device numbers):
# checked with one match instead of field by field.
_USUAL_NUMBERS = re.compile(rb"(?:[0-7]{7}[\0 ]){3}(?:[0-7]{11}[\0 ]){2}")
_USUAL_DEVICES = re.compile(rb"(?:[0-7]{7}[\0 ]|\0{8}){2}")
_USUAL_CHKSUM = re.compile(rb"[0-7]{6}\0 ")


def _compressed(head: bytes) -> bool:
    """What ``tarfile``'s ``r|*`` detects as gzip, bz2 or xz."""
    return head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")) or (
        head[0:3] == b"BZh" and head[4:10] == b"1AY&SY"
    )


def _number(field: bytes) -> int:
    """tarfile's ``nti`` (octal, or GNU base-256); ValueError where tarfile finds the header invalid."""
    if field[0] in (0o200, 0o377):
        return tarfile.nti(field)
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).decode("ascii")
    return int(text.strip() or "0", 8)


def _text(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _header(buf: bytes) -> tuple[str, bytes, int] | None:
    """(name, type, size) of a header block; None for one ``ignore_zeros`` skips (zeros, bad checksum, bad number)."""
    if buf.count(0) == _BLOCK:
        return None
    try:
        chksum = int(buf[148:154], 8) if _USUAL_CHKSUM.fullmatch(buf, 148, 156) else _number(buf[148:156])
        if chksum != 256 + sum(buf) - sum(buf[148:156]) and chksum not in tarfile.calc_chksums(buf):
            return None
        if not (_USUAL_NUMBERS.fullmatch(buf, 100, 148) and _USUAL_DEVICES.fullmatch(buf, 329, 345)):
            for lo, hi in _NUMBER_FIELDS:  # anything else: tarfile's exact rule
                _number(buf[lo:hi])
        size = int(buf[124:135], 8) if buf[124:135].isdigit() else _number(buf[124:136])
    except ValueError:
        return None
    name, kind, prefix = _text(buf[0:100]), buf[156:157], _text(buf[345:500]) if buf[345] else ""
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"
    if prefix and kind not in _GNU_TYPES:
        name = prefix + "/" + name
    return name, kind, size


def _local_members(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """The regular members of an uncompressed local tar, read as tarfile's stream mode reads them."""
    file_size, offset = os.fstat(f.fileno()).st_size, 0
    while True:
        buf = f.read(_BLOCK)
        if offset == 0 and _compressed(buf):
            f.seek(0)
            yield from _tarfile_members(f)
            return
        if len(buf) < _BLOCK:
            if offset == 0:
                raise tarfile.ReadError("empty file" if not buf else "truncated header")
            return
        head = _header(buf)
        if head is not None and head[1] in _EXTENDED_TYPES:
            f.seek(offset)
            yield from _tarfile_members(f)
            return
        offset += _BLOCK
        if head is None:
            continue
        name, kind, size = head
        if kind in _NO_DATA_TYPES:
            continue
        if kind in _FILE_TYPES:
            data = f.read(size)
            if len(data) != size:
                raise tarfile.ReadError("unexpected end of data")
            yield name, data
        offset += -(-size // _BLOCK) * _BLOCK
        if offset > file_size:
            raise tarfile.ReadError("unexpected end of data")
        f.seek(offset)


def iter_samples(source: str | Path, skipped: Counter | None = None) -> Iterator[Sample]:
    """Grouped samples ``(key, {ext: bytes})`` of one shard path or URL, in tar order.

    The one sample reader: prep and the evaluation task readers call it.

    Args:
        source: Local tar, ``.tar.gz``/``.tgz``, or a webdataset URL (``pipe:cmd``, ``http(s)://``).
        skipped: When given, an unreadable shard ends its samples (those read before the damage
            are kept) and counts ``corrupt_tar`` (logged); when None it raises :class:`ShardReadError`.
    """
    errors: list[str] = []
    yield from group_members(iter_members(source, errors))
    if errors:
        if skipped is None:
            raise ShardReadError(f"{source}: cannot read tar ({errors[0]})")
        skipped["corrupt_tar"] += 1
        log.warning("%s: corrupt or unreadable tar, rest of the shard skipped (%s)", source, errors[0])


def image_ext(sample: dict[str, bytes], exts: Iterable[str] = IMAGE_EXTS) -> str | None:
    """The first of ``exts`` the sample has (its image member), or None."""
    return next((e for e in exts if e in sample), None)


def shard_stem(source: str | Path) -> str:
    """A shard's path or URL without its tar suffix (``.tar``, ``.tar.gz``, ``.tgz``)."""
    text = str(source)
    for suffix in (*COMPRESSED_SUFFIXES, ".tar"):
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


# --------------------------------------------------------------------------- writing


class TarWriter:
    """Write a tar with deterministic headers via ``<path>.tmp``, renamed on a clean close.

    Args:
        path: The tar to write (its folder is created).
        mtime: Header time of every member (default :data:`FIXED_MTIME`).
    """

    def __init__(self, path: str | Path, mtime: int = FIXED_MTIME) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.mtime = mtime
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.size = 0

    def add(self, name: str, data: bytes) -> None:
        """Append one member."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
        info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
        self.tar.addfile(info, io.BytesIO(data))
        self.size += 512 + -(-len(data) // 512) * 512

    def add_sample(self, key: str, sample: dict[str, bytes | str]) -> None:
        """Append the members ``<key>.<ext>`` of one sample, in the dict's order (str is utf-8)."""
        for ext, data in sample.items():
            self.add(f"{key}.{ext}", data.encode("utf-8") if isinstance(data, str) else data)

    def close(self, keep: bool = True) -> None:
        """Finish the tar and move it into place (``keep=False``: discard it)."""
        self.tar.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, etype, value, traceback) -> None:
        self.close(keep=etype is None)


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]], mtime: int = FIXED_MTIME) -> Path:
    """Write ``(name, bytes)`` members, in order, to a deterministic tar; returns ``path``."""
    with TarWriter(path, mtime) as writer:
        for name, data in members:
            writer.add(name, data)
    return Path(path)


class ShardSeries:
    """Samples into numbered tars (``pattern % i``: ``000000.tar``, ...), each a :class:`TarWriter`.

    A tar is opened at its first sample and closed (renamed from ``.tmp``) once it holds
    ``max_count`` samples or ``max_bytes`` bytes; the next sample starts the next tar.

    Args:
        pattern: ``%``-pattern of the tar paths, e.g. ``out/%06d.tar``.
        max_count: Samples per tar (> 0).
        max_bytes: Size target per tar in bytes (> 0).
        mtime: Header time of every member.
    """

    def __init__(self, pattern: str, max_count: int, max_bytes: float, mtime: int = FIXED_MTIME) -> None:
        self.pattern, self.max_count, self.max_bytes, self.mtime = pattern, max_count, max_bytes, mtime
        self.written: list[Path] = []
        self._writer: TarWriter | None = None
        self._count = 0

    def write(self, key: str, sample: dict[str, bytes | str]) -> None:
        """Append one sample, starting a new tar when the current one is full."""
        if self._writer is not None and (self._count >= self.max_count or self._writer.size >= self.max_bytes):
            self._finish()
        if self._writer is None:
            self._writer = TarWriter(self.pattern % len(self.written), self.mtime)
            self._count = 0
        self._writer.add_sample(key, sample)
        self._count += 1

    def _finish(self, keep: bool = True) -> None:
        if self._writer is not None:
            self._writer.close(keep)
            if keep:
                self.written.append(self._writer.path)
            self._writer = None

    def close(self, keep: bool = True) -> None:
        """Close the last tar (``keep=False``: discard it, e.g. after an error)."""
        self._finish(keep)

    def __enter__(self) -> ShardSeries:
        return self

    def __exit__(self, etype, value, traceback) -> None:
        self.close(keep=etype is None)
