"""Shared fixtures: tiny generated webdataset shards and configs pointing at temp folders."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def jpeg_bytes(color=(200, 30, 30), size: int = 16) -> bytes:
    """A small valid JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a tar with the given (name, bytes) members, in order (``pipeline.wds`` writer, mtime 0)."""
    from pipeline import wds

    return wds.write_tar(path, members, mtime=0)


def pair_members(key: str, caption: str, *, as_json: bool = True, color=(200, 30, 30)) -> list[tuple[str, bytes]]:
    """Members of one good image-caption pair."""
    text = json.dumps({"texts": [caption]}).encode() if as_json else caption.encode()
    return [(f"{key}.{'json' if as_json else 'txt'}", text), (f"{key}.jpg", jpeg_bytes(color))]


@pytest.fixture
def mode_shards(tmp_path: Path) -> Path:
    """Three good shards of 4 pairs each in MoDE's sharded-folder layout under tmp/data."""
    root = tmp_path / "data"
    for s in range(3):
        members = []
        for i in range(4):
            members += pair_members(f"{s:03d}_{i:03d}", f"caption {s} {i}")
        write_shard(root / str(s % 100) / f"{s}.tar", members)
    return root


def overrides(tmp_path: Path, train: str, *extra: str) -> list[str]:
    """Config overrides that keep a test inside tmp_path."""
    return [f"run.root={tmp_path / 'runs'}", f"data.train={train}", "run.workers=1", *extra]
