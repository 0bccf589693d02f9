"""Artifact helpers: atomic writes, fingerprints, completion records and stage manifests.

Layout of a stage folder ``<run>/<stage>/``::

    config.yaml          resolved config of the whole pipeline at the time the stage ran
    _done/<shard>.json   completion record of one shard (written after its outputs)
    manifest.json        written last, once every shard is done; downstream stages read only this
    ...                  the stage's outputs, named by input identity
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class CorruptArtifactError(ValueError):
    """An artifact (manifest, record) exists but cannot be read back; the message says which."""


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


def file_fingerprint(*paths: str | Path) -> str:
    """Cheap identity of input files: path, size and modification time (ns)."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


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


def git_sha() -> str:
    """Commit of the code that produced an artifact ('' outside a git checkout)."""
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
