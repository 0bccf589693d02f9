"""Artifact helpers: atomic writes, fingerprints, completion records and stage manifests.

Layout of a stage folder ``<run>/<stage>/``::

    config.yaml          resolved config of the whole pipeline at the time the stage ran
    _done/<shard>.json   completion record of one shard (written after its outputs)
    manifest.json        written last, once every shard is done; downstream stages read only this
    ...                  the stage's outputs, named by input identity
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import CorruptArtifactError

MANIFEST = "manifest.json"
DONE_DIR = "_done"
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # ".<name>.<mkstemp's 8 characters>.tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Nothing is ever visible under the final name until it is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; artifacts follow the umask like any other file (shared storage).
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """This process's umask (read from /proc on Linux: setting it to read it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left under ``folder`` (a killed run's).

    Call it only where no other process writes into ``folder`` at the same time.
    """
    removed = []
    root = Path(folder)
    for path in root.rglob(f".*{TEMP_SUFFIX}") if root.is_dir() else []:
        if path.is_file() and _TEMP_RE.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def torch_save(obj: Any, tmp: str | Path) -> None:
    """``torch.save`` through a file handle, so the bytes do not depend on the file's (temporary)
    name: saved to a path, torch names the archive's top folder after the file, and a content
    digest of the artifact would then differ between two identical runs."""
    import torch

    with open(tmp, "wb") as handle:
        torch.save(obj, handle)


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write JSON (sorted keys, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


DIGEST_CACHE = "_digests.json"
"""Per-stage cache of content digests, keyed by (absolute path, size, mtime)."""
_DIGEST_CHARS = 32
_MEMO: dict[tuple[str, int, int], str] = {}


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 32 hex digits): its identity wherever it lives."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:_DIGEST_CHARS]


class DigestCache:
    """Content digests of files, cached per ``(path, size, mtime_ns)`` in ``<folder>/_digests.json``.

    A file whose path, size and mtime match its cache entry is not read again (one ``stat``); any
    change (an edit, a copy without ``-p``, a moved folder) falls back to hashing the content, so the
    digest, and with it the fingerprint, only changes when the bytes do.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.path = Path(folder) / DIGEST_CACHE if folder is not None else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                self.entries = read_json(self.path)
            except (OSError, ValueError):
                self.entries = {}

    def digest(self, path: str | Path) -> str:
        """The content digest of ``path`` (hashing it only when its stat changed)."""
        key = os.path.abspath(path)
        st = os.stat(key)
        stat = (key, st.st_size, st.st_mtime_ns)
        entry = self.entries.get(key)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        digest = _MEMO.get(stat) or content_digest(key)
        _MEMO[stat] = digest
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def prefetch(self, paths: list[str | Path], workers: int = 8) -> None:
        """Hash the files whose entries are missing or out of date, ``workers`` threads at a time."""
        from concurrent.futures import ThreadPoolExecutor

        if len(paths) > 1 and workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(self.digest, paths))

    def fingerprint(self, *paths: str | Path) -> str:
        """Identity of a group of files: the digests of their contents, in order (not their paths)."""
        h = hashlib.sha256()
        for p in paths:
            h.update(f"{self.digest(p)};".encode())
        return h.hexdigest()[:16]

    def save(self) -> None:
        """Write the cache back (only when something was hashed and the folder exists)."""
        if self.dirty and self.path is not None and self.path.parent.is_dir():
            write_json(self.path, self.entries)
            self.dirty = False


def file_fingerprint(*paths: str | Path, cache: str | Path | None = None) -> str:
    """Content identity of input files (see :class:`DigestCache`); ``cache``: a stage folder."""
    digests = DigestCache(cache)
    fp = digests.fingerprint(*paths)
    digests.save()
    return fp


def object_digest(obj: Any) -> str:
    """Short digest of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def done_path(stage_dir: Path, shard: str) -> Path:
    """Where the completion record of ``shard`` lives."""
    return stage_dir / DONE_DIR / f"{shard}.json"


def read_manifest(stage_dir: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read a stage manifest, with a clear error if the stage has not finished."""
    path = Path(stage_dir) / MANIFEST
    name = stage or Path(stage_dir).name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name}: no manifest at {path}; run `python -m pipeline {name}` first"
        )
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(
            f"{name}: {path} is not a readable manifest ({exc}); rerun `python -m pipeline {name} --force`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("stage", name) != name:
        raise CorruptArtifactError(f"{name}: {path} is not a {name} manifest; rerun `python -m pipeline {name} --force`")
    return manifest


@functools.cache
def git_sha() -> str:
    """Commit of the code that produced an artifact ('' outside a git checkout); once per process."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
