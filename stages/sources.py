"""Expanding ``data.train`` into input shards.

Forms accepted (several joined with ``::``):

* ``dir/{00000..00331}.tar``: brace-expanded flat shard list;
* ``root/{0..200000}.tar`` in MoDE's sharded-folder layout, where shard ``i`` lives at
  ``root/<i % 100>/<i>.tar`` (used when ``data.layout`` is ``mode``, or ``auto`` and the flat file
  is missing);
* a folder: every ``*.tar`` below it, sorted;
* ``file.csv`` / ``file.tsv``: one shard of ``filepath,caption`` rows (paths relative to the CSV);
* gzip-compressed shards (``dir/{0..9}.tar.gz``, ``.tgz``) and shard URLs as webdataset accepts
  them, brace patterns included: ``pipe:<command>`` (e.g. ``pipe:aws s3 cp s3://b/{0..9}.tar -``,
  ``pipe:cat dir/{0..9}.tar``) and ``http(s)://host/dir/{0..9}.tar``. These are read as streams
  (``pipeline/wds.py``); a URL's shard is named like the same file listed as a path (``s0_3`` for
  ``.../3.tar``), so a dataset moved to an object store keeps its pair ids; a URL that fails is
  counted as ``corrupt_tar`` when prep reads it (its existence cannot be checked when listing).

Missing shards of a source are not an error here (MoDE ranges often have gaps); they are reported
by count. A source that matches no file at all is an error (raised when prep lists its inputs,
before anything is written).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from pipeline import wds

_NUMERIC_TAR = re.compile(r"^(\d+)\.tar$")


@dataclass(frozen=True)
class InputShard:
    """One input file and the name its outputs are given."""

    name: str
    path: str
    kind: str  # "tar" | "csv"
    source: int


def _mode_path(flat: Path) -> Path:
    match = _NUMERIC_TAR.match(flat.name)
    if not match:
        return flat
    idx = int(match.group(1))
    return flat.parent / str(idx % 100) / flat.name


def _shard_name(source: int, path: Path, root: Path) -> str:
    """Output name of a shard: its path below the source root, plus the source index."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    return _name(source, str(rel))


def _name(source: int, rel: str) -> str:
    stem = wds.shard_stem(rel)
    if stem == rel:
        stem = str(Path(rel).with_suffix(""))
    stem = stem.replace("/", "_").replace("\\", "_")
    return f"s{source}_{stem}"


def _url_token(text: str) -> str:
    """The word of a URL spec that names the shard (``pipe:cat dir/3.tar`` → ``dir/3.tar``)."""
    words = text.split()
    return next((w for w in reversed(words) if wds.shard_stem(w) != w or "{" in w), words[-1])


def _expand_url(spec: str, source: int) -> list[InputShard]:
    """Shard URLs of a (brace) pattern; named by their path below the pattern's folder."""
    token = _url_token(spec)
    root = token.split("{", 1)[0].rsplit("/", 1)[0] if "{" in token else token.rsplit("/", 1)[0]
    shards = []
    for item in braceexpand.braceexpand(spec):
        path = _url_token(item)
        rel = path[len(root) + 1 :] if root and path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        shards.append(InputShard(_name(source, rel), item, "tar", source))
    return shards


def _expand_one(spec: str, source: int, layout: str) -> tuple[list[InputShard], int]:
    spec = spec.strip()
    if wds.is_url(spec):
        return _expand_url(spec, source), 0
    p = Path(spec)
    if p.suffix.lower() in (".csv", ".tsv"):
        if not p.is_file():
            raise FileNotFoundError(f"data.train: CSV source {spec} does not exist")
        return [InputShard(_shard_name(source, p, p.parent), str(p), "csv", source)], 0
    if p.is_dir():
        tars = sorted(p.rglob("*.tar"))
        return [InputShard(_shard_name(source, t, p), str(t), "tar", source) for t in tars], 0
    shards, missing = [], 0
    root = Path(spec.split("{", 1)[0].rsplit("/", 1)[0] or ".") if "{" in spec else p.parent
    for item in braceexpand.braceexpand(spec):
        flat = Path(item)
        path = flat
        if layout == "mode" or (layout == "auto" and not flat.exists()):
            path = _mode_path(flat)
        if not path.exists():
            missing += 1
            continue
        shards.append(InputShard(_shard_name(source, flat, root), str(path), "tar", source))
    return shards, missing


def expand_sources(train: str, layout: str = "auto") -> tuple[list[InputShard], int]:
    """All input shards of ``data.train`` and the number of listed-but-missing shard files."""
    shards: list[InputShard] = []
    missing = 0
    for source, spec in enumerate(s for s in train.split("::") if s.strip()):
        found, miss = _expand_one(spec, source, layout)
        if not found:
            raise FileNotFoundError(f"data.train: no input shards: source {source + 1} '{spec.strip()}' matches no file")
        shards += found
        missing += miss
    if not shards:
        raise FileNotFoundError(f"data.train: no input shards found for '{train}'")
    return shards, missing


def clean_caption(caption: str, skipped: Counter) -> str | None:
    """``caption`` stripped, or None when it cannot be stored (counted in ``skipped`` as
    ``caption_not_utf8`` or ``empty_caption``): the one caption check of prep and shard."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        skipped["caption_not_utf8"] += 1
        return None
    caption = caption.strip()
    if not caption:
        skipped["empty_caption"] += 1
        return None
    return caption
