"""``shard`` command: a CSV file or an image folder → webdataset tars (the custom-data guide's conversion step).

Training reads CSV sources directly (one image file per visit), which is fine for thousands of
pairs; for datasets too large to read file by file, convert them once::

    python -m pipeline shard --input data/my.csv --out data/my_tars --max-size-mb 1000

Inputs:

* ``*.csv`` / ``*.tsv``: OpenCLIP's CSV (``--csv-separator``, ``--csv-img-key``, ``--csv-caption-key``;
  defaults from ``prep.csv_*`` of the config); image paths relative to the CSV or absolute;
* a folder: every image below it (sorted) with a caption in a sidecar of the same stem: ``<stem>.txt``
  (the caption) or ``<stem>.json`` (its ``caption`` field, or one of ``texts``).

Output: ``<out>/000000.tar, 000001.tar, ...`` (``pipeline.wds.ShardSeries``), one pair per key
``<9-digit ordinal>`` with members ``jpg`` (a JPEG is copied byte for byte, other formats are
re-encoded to JPEG at quality 95), ``txt`` (the caption) and ``json``
(``{"caption", "source"}``, source = the image path as the input named it). A shard is closed when
it reaches ``max_count`` pairs or ``max_size_mb``; each is written as ``.tar.tmp`` and renamed when
complete. ``<out>/shards.json`` is written last: counts, skipped rows by reason (``bad_csv_row``,
``missing_caption``, ``caption_not_utf8``, ``empty_caption``, ``missing_image``, ``bad_image``) and the ``data.train``
pattern of the result.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import wds
from pipeline.artifacts import write_json
from pipeline.errors import ConfigError
from stages.sources import clean_caption

IMAGE_SUFFIXES = tuple(f".{e}" for e in (*wds.IMAGE_EXTS, "bmp", "gif", "tif", "tiff"))
_MTIME = 1704067200  # fixed tar header time: the same input gives the same bytes


def _csv_items(path: Path, separator: str, img_key: str, caption_key: str, skipped: Counter) -> Iterator[tuple[str, Path, str]]:
    sep = "\t" if path.suffix.lower() == ".tsv" and separator == "," else separator
    base = path.parent
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=sep)
        fields = reader.fieldnames or []
        if img_key not in fields or caption_key not in fields:
            raise ConfigError(
                f"shard: {path} needs columns '{img_key}' and '{caption_key}' "
                f"(--csv-img-key / --csv-caption-key), has {fields}"
            )
        for row in reader:
            image, caption = row.get(img_key), row.get(caption_key)
            if None in row or image is None:
                skipped["bad_csv_row"] += 1
                continue
            if caption is None:
                skipped["missing_caption"] += 1
                continue
            yield image, Path(image) if Path(image).is_absolute() else base / image, caption


def _folder_items(root: Path, skipped: Counter) -> Iterator[tuple[str, Path, str]]:
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = str(image.relative_to(root))
        txt, js = image.with_suffix(".txt"), image.with_suffix(".json")
        try:
            if txt.is_file():
                caption = txt.read_text(encoding="utf-8")
            elif js.is_file():
                obj = json.loads(js.read_text(encoding="utf-8"))
                caption = obj.get("caption") if isinstance(obj, dict) else None
                texts = obj.get("texts") if isinstance(obj, dict) else None
                if not isinstance(caption, str) and isinstance(texts, list) and texts:
                    caption = str(texts[0])
                if not isinstance(caption, str):
                    skipped["missing_caption"] += 1
                    continue
            else:
                skipped["missing_caption"] += 1
                continue
        except (OSError, UnicodeDecodeError, ValueError):
            skipped["missing_caption"] += 1
            continue
        yield rel, image, caption


def _jpeg(data: bytes) -> bytes | None:
    """The image as JPEG bytes: a valid JPEG unchanged, anything else re-encoded; None when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.verify()
                return data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


def write_shards(
    source: str | Path,
    out: str | Path,
    *,
    max_size_mb: float = 1000.0,
    max_count: int = 10000,
    csv_separator: str = ",",
    csv_img_key: str = "filepath",
    csv_caption_key: str = "caption",
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a CSV file or an image folder into webdataset tars.

    Args:
        source: ``.csv``/``.tsv`` file or a folder of images with ``.txt``/``.json`` sidecars.
        out: Output folder (created).
        max_size_mb: Size target per shard: a shard is closed once it holds this many MB.
        max_count: At most this many pairs per shard.
        csv_separator, csv_img_key, csv_caption_key: OpenCLIP's CSV options.
        force: Overwrite tars already in ``out``.
        progress: tqdm progress bar.

    Returns:
        The summary also written to ``<out>/shards.json``.

    Raises:
        ConfigError: the input is missing or not a CSV/folder, the CSV lacks the columns, the
            limits are not positive, or ``out`` already holds tars (without ``force``).
    """
    source, out = Path(source), Path(out)
    if max_size_mb <= 0 or max_count <= 0:
        raise ConfigError(f"shard: --max-size-mb ({max_size_mb}) and --max-count ({max_count}) must be > 0")
    skipped: Counter = Counter()
    items = _items(source, csv_separator, csv_img_key, csv_caption_key, skipped)
    _clear_out(out, force)
    series = wds.ShardSeries(str(out / "%06d.tar"), max_count, max_size_mb * 1e6, mtime=_MTIME)
    with series:
        count = _write_pairs(items, series, skipped, progress)
    written = [p.name for p in series.written]
    summary = {
        "input": str(source),
        "num_pairs": count,
        "num_shards": len(written),
        "shards": written,
        "skipped": dict(sorted(skipped.items())),
        "max_size_mb": max_size_mb,
        "max_count": max_count,
        "data_train": f"{out}/{{{0:06d}..{len(written) - 1:06d}}}.tar" if written else "",
    }
    write_json(out / "shards.json", summary)
    return summary


def _items(source: Path, separator: str, img_key: str, caption_key: str, skipped: Counter) -> Iterator[tuple[str, Path, str]]:
    """(name as the input gives it, image file, caption) of every input pair."""
    if source.is_file() and source.suffix.lower() in (".csv", ".tsv"):
        return _csv_items(source, separator, img_key, caption_key, skipped)
    if source.is_dir():
        return _folder_items(source, skipped)
    raise ConfigError(f"shard: --input {source} is neither a .csv/.tsv file nor a folder")


def _clear_out(out: Path, force: bool) -> None:
    """Create ``out``; refuse (or, with ``force``, remove) tars already there."""
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.tar"))
    if old and not force:
        raise ConfigError(f"shard: {out} already holds {len(old)} tar(s); use another --out or --force")
    for path in [*old, *out.glob("*.tar.tmp"), out / "shards.json"]:
        path.unlink(missing_ok=True)


def _pair(image: Path, caption: str, skipped: Counter) -> tuple[bytes, str] | None:
    """(JPEG bytes, stripped caption) of one input pair, or None (counted in ``skipped``)."""
    caption = clean_caption(caption, skipped)
    if caption is None:
        return None
    try:
        data = image.read_bytes()
    except OSError:
        skipped["missing_image"] += 1
        return None
    jpeg = _jpeg(data)
    if jpeg is None:
        skipped["bad_image"] += 1
        return None
    return jpeg, caption


def _write_pairs(items: Iterator[tuple[str, Path, str]], series: wds.ShardSeries, skipped: Counter, progress: bool) -> int:
    """Write every good pair as ``<9-digit ordinal>.{jpg,txt,json}``; returns the pairs written."""
    from tqdm import tqdm

    count = 0
    with tqdm(desc="shard", unit="pair", disable=not progress) as bar:
        for named, image, caption in items:
            pair = _pair(image, caption, skipped)
            if pair is None:
                continue
            jpeg, caption = pair
            meta = json.dumps({"caption": caption, "source": named}, sort_keys=True, ensure_ascii=False)
            series.write(f"{count:09d}", {"jpg": jpeg, "json": meta.encode("utf-8"), "txt": caption})
            count += 1
            bar.update(1)
            bar.set_postfix(shards=len(series.written) + 1, skipped=sum(skipped.values()), refresh=False)
    return count
