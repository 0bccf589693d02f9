"""``prep`` stage: image-caption shards → caption Parquet with dense global pair ids.

Outputs in ``<run>/prep/``:

* ``captions/<shard>.parquet``: one file per input shard with columns ``pair_id`` (int64),
  ``shard`` (str), ``key`` (member key), ``caption`` (str), ``source`` (int16, index of the
  ``::``-joined source), plus ``label`` when ``prep.label_field`` names a JSON field to keep for
  diagnostics (the demo keeps ``domain``, so cluster purity can be measured).
* ``shards.parquet``: the pair-id index, one row per shard: ``shard``, ``path``, ``kind``,
  ``source``, ``offset``, ``count``. Pair ``i`` lives in the last shard with ``offset <= i``; its
  member is the ``key`` column of that shard's caption file.

Pair ids are dense (0..N-1) and stable: shards are ordered as listed in ``data.train`` and pairs
in member order within a shard, so the same inputs always give the same ids. They index the
per-sample tables of the GCL losses (``loss.data_size`` = N).

Bad input never stops the stage: each skipped pair or file is counted by reason in the shard's
completion record (``corrupt_tar``, ``empty_shard``, ``missing_caption``, ``empty_caption``,
``caption_not_utf8``, ``bad_json``, ``missing_image``, ``bad_image``, ``bad_csv_row``).
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import artifacts, wds
from pipeline.config import PipelineConfig
from pipeline.runner import Shard
from pipeline.runtime import Runtime
from stages.sources import InputShard, clean_caption, expand_sources

SCHEMA = pa.schema(
    [
        ("pair_id", pa.int64()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("source", pa.int16()),
    ]
)
_OFFSET_META = b"pair_id_offset"


UPSTREAM: tuple[str, ...] = ()
"""Stages whose manifests this stage consumes (none: prep reads the raw data)."""


def hash_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """Prep outputs depend on the prep section and the seed (caption choice).

    Not on the ``data.train`` listing: each shard is identified by the content digest of its file,
    so adding shards only adds work (docs/growth.md) and a removed shard shows up as no longer listed.
    """
    return {
        "layout": cfg.data.layout,
        "prep": cfg.prep,
        "seed": cfg.run.seed,
    }


def list_shards(cfg: PipelineConfig, stage_dir: Path) -> list[Shard]:
    """One shard per input tar / CSV file, fingerprinted by its content (cached per path/size/mtime)."""
    inputs, _missing = expand_sources(cfg.data.train, cfg.data.layout)
    digests = artifacts.DigestCache(stage_dir)
    digests.prefetch([s.path for s in inputs if not wds.is_url(s.path)], workers=max(1, cfg.run.workers) * 2)
    shards = [
        Shard(s.name, _fingerprint(digests, s.path), {"path": s.path, "kind": s.kind, "source": s.source})
        for s in inputs
    ]
    digests.save()
    return shards


def _fingerprint(digests: artifacts.DigestCache, path: str) -> str:
    """A local file by its content; a URL by itself (reading a remote shard twice to hash it is
    what streaming avoids: a changed object behind the same URL needs ``--force``)."""
    return artifacts.object_digest({"url": path}) if wds.is_url(path) else digests.fingerprint(path)


def caption_path(stage_dir: Path, shard: str) -> Path:
    """Output Parquet of one shard."""
    return stage_dir / "captions" / f"{shard}.parquet"


def process_shard(cfg: PipelineConfig, shard: Shard, stage_dir: Path, runtime: Runtime) -> dict[str, Any]:
    """Extract captions of one shard (on the CPU, whatever ``runtime`` says); pair ids are filled in by
    :func:`finalize`."""
    src = InputShard(shard.name, shard.inputs["path"], shard.inputs["kind"], shard.inputs["source"])
    skipped: Counter = Counter()
    reader = _read_csv if src.kind == "csv" else _read_tar
    rows = list(reader(cfg, src, skipped))
    columns = {
        "pair_id": pa.array([-1] * len(rows), pa.int64()),
        "shard": pa.array([shard.name] * len(rows), pa.string()),
        "key": pa.array([r[0] for r in rows], pa.string()),
        "caption": pa.array([r[1] for r in rows], pa.string()),
        "source": pa.array([src.source] * len(rows), pa.int16()),
    }
    schema = SCHEMA
    if cfg.prep.label_field:
        columns["label"] = pa.array([r[2] for r in rows], pa.string())
        schema = SCHEMA.append(pa.field("label", pa.string()))
    seen = len(rows) + sum(v for k, v in skipped.items() if k not in ("corrupt_tar", "empty_shard"))
    if not rows and not skipped:
        skipped["empty_shard"] += 1
    table = pa.table(columns, schema=schema)
    with artifacts.atomic_path(caption_path(stage_dir, shard.name)) as tmp:
        pq.write_table(table, tmp)
    return {"in": seen, "out": len(rows), "skipped": dict(skipped)}


# --------------------------------------------------------------------------- tar reading


def _read_tar(cfg: PipelineConfig, src: InputShard, skipped: Counter) -> Iterator[tuple[str, str, str | None]]:
    for key, group in wds.iter_samples(src.path, skipped):
        parsed: dict[str, Any] = {}  # the JSON member, parsed once for the caption and the label
        caption = _caption_from_group(cfg, key, group, skipped, parsed)
        if caption is None:
            continue
        image_ext = next((e for e in cfg.prep.image_keys if e in group), None)
        if image_ext is None:
            skipped["missing_image"] += 1
            continue
        if not _image_ok(group[image_ext], cfg.prep.verify_images):
            skipped["bad_image"] += 1
            continue
        yield key, caption, _label(group, cfg.prep.label_field, parsed)


def _label(group: dict[str, bytes], field_name: str, parsed: dict[str, Any]) -> str | None:
    """Optional diagnostic label from the JSON member (e.g. the demo's ``domain``)."""
    if not field_name or "json" not in group:
        return None
    try:
        obj = parsed["json"] if "json" in parsed else json.loads(group["json"])
        value = obj.get(field_name)
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def _caption_from_group(cfg, key: str, group: dict[str, bytes], skipped: Counter, parsed: dict) -> str | None:
    ext = next((e for e in cfg.prep.caption_keys if e in group), None)
    if ext is None:
        skipped["missing_caption"] += 1
        return None
    try:
        text = group[ext].decode("utf-8")
    except UnicodeDecodeError:
        skipped["caption_not_utf8"] += 1
        return None
    if ext == "json":
        try:
            parsed["json"] = json.loads(text)
            text = _caption_from_json(parsed["json"], cfg, key)
        except (json.JSONDecodeError, TypeError, ValueError):
            skipped["bad_json"] += 1
            return None
        if text is None:
            skipped["missing_caption"] += 1
            return None
    text = text.strip()
    if not text or text == '"':
        skipped["empty_caption"] += 1
        return None
    return text


def _caption_from_json(obj: Any, cfg: PipelineConfig, key: str) -> str | None:
    """The caption in a JSON member: a string field, or one of a list picked with a seeded RNG."""
    if not isinstance(obj, dict):
        raise ValueError("json member is not an object")
    for field_name in cfg.prep.json_fields:
        value = obj.get(field_name)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and any(isinstance(t, str) for t in value):
            texts = [t for t in value if isinstance(t, str) and t.strip()]
            if not texts:
                return ""
            # Seeded by (seed, key): the same caption whatever order shards run in.
            return texts[zlib.crc32(f"{cfg.run.seed}:{key}".encode()) % len(texts)]
    return None


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _image_ok(data: bytes, mode: str) -> bool:
    """``none``: non-empty; ``header``: a known image signature (and a JPEG end marker, which
    catches truncated JPEGs) without decoding; ``decode``: PIL decodes the whole image."""
    if mode == "none":
        return bool(data)
    if mode == "header":
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return True
        if not data.startswith(_SIGNATURES):
            return False
        return not data.startswith(b"\xff\xd8") or b"\xff\xd9" in data[-64:]
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return False


# --------------------------------------------------------------------------- CSV reading


def _read_csv(cfg: PipelineConfig, src: InputShard, skipped: Counter) -> Iterator[tuple[str, str, None]]:
    base = Path(src.path).parent
    sep = "\t" if src.path.endswith(".tsv") and cfg.prep.csv_separator == "," else cfg.prep.csv_separator
    try:
        handle = open(src.path, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError:
        skipped["corrupt_csv"] += 1
        return
    with handle:
        reader = csv.DictReader(handle, delimiter=sep)
        fields = reader.fieldnames or []
        if cfg.prep.csv_img_key not in fields or cfg.prep.csv_caption_key not in fields:
            raise ValueError(
                f"{src.path}: CSV needs columns '{cfg.prep.csv_img_key}' and "
                f"'{cfg.prep.csv_caption_key}' (prep.csv_img_key / prep.csv_caption_key), has {fields}"
            )
        for row_idx, row in enumerate(reader):
            item = _csv_row(cfg, row, base, skipped)
            if item is not None:
                yield str(row_idx), item, None


def _csv_row(cfg, row: dict, base: Path, skipped: Counter) -> str | None:
    path, caption = row.get(cfg.prep.csv_img_key), row.get(cfg.prep.csv_caption_key)
    if None in row or path is None:
        skipped["bad_csv_row"] += 1
        return None
    if caption is None:
        skipped["missing_caption"] += 1
        return None
    caption = clean_caption(caption, skipped)
    if caption is None:
        return None
    image = Path(path) if Path(path).is_absolute() else base / path
    try:
        data = image.read_bytes()
    except OSError:
        skipped["missing_image"] += 1
        return None
    if not _image_ok(data, cfg.prep.verify_images):
        skipped["bad_image"] += 1
        return None
    return caption


# --------------------------------------------------------------------------- finalize


def finalize(cfg: PipelineConfig, stage_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Assign dense pair ids and write the pair-id index ``shards.parquet`` (rows in id order)."""
    shards, missing = expand_sources(cfg.data.train, cfg.data.layout)
    counts = {shard.name: rec["out"] for shard, rec in zip(shards, records, strict=True)}
    by_name = {shard.name: shard for shard in shards}
    offset, rows = 0, []
    for name in id_order(stage_dir, counts, [s.name for s in shards]):
        shard = by_name[name]
        _stamp_pair_ids(caption_path(stage_dir, name), offset)
        rows.append(
            {
                "shard": name,
                "path": shard.path,
                "kind": shard.kind,
                "source": shard.source,
                "offset": offset,
                "count": counts[name],
            }
        )
        offset += counts[name]
    index = pa.Table.from_pylist(rows)
    with artifacts.atomic_path(stage_dir / "shards.parquet") as tmp:
        pq.write_table(index, tmp)
    return {
        "num_pairs": offset,
        "missing_input_files": missing,
        "outputs": [str(caption_path(stage_dir, r["shard"]).relative_to(stage_dir)) for r in rows],
        "index": "shards.parquet",
    }


def id_order(stage_dir: Path, counts: dict[str, int], listing: list[str]) -> list[str]:
    """The order in which shards get pair ids: the order they were first seen.

    Shards already in ``shards.parquet`` keep their place (and so their ids) as long as every one of
    them is still listed with the same pair count; shards seen for the first time follow, in listing
    order, so a new shard whose name sorts in the middle of a brace list still gets the ids after
    the existing ones. A removed or re-counted shard renumbers everything in listing order (its
    downstream outputs are redone anyway).
    """
    path = stage_dir / "shards.parquet"
    if not path.is_file():
        return listing
    previous = pq.read_table(path, columns=["shard", "count"]).to_pylist()
    if any(counts.get(row["shard"]) != row["count"] for row in previous):
        return listing
    seen = [row["shard"] for row in previous]
    known = set(seen)
    return seen + [name for name in listing if name not in known]


def _stamp_pair_ids(path: Path, offset: int) -> None:
    """Write ``pair_id = offset + row`` into a caption file, unless already stamped so."""
    meta = pq.read_schema(path).metadata or {}
    if meta.get(_OFFSET_META) == str(offset).encode():
        return
    table = pq.read_table(path)
    ids = pa.array(range(offset, offset + table.num_rows), pa.int64())
    table = table.set_column(0, "pair_id", ids).replace_schema_metadata({_OFFSET_META: str(offset)})
    with artifacts.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_index(stage_dir: Path) -> pa.Table:
    """The pair-id index written by :func:`finalize`."""
    return pq.read_table(Path(stage_dir) / "shards.parquet")
