"""Evaluation tasks: discovery under ``data.eval_root`` and small readers for three sources.

Shared by training-time evaluation, the ensemble stage and ``python -m pipeline eval``. A task is a
folder ``<eval_root>/<task>/`` in one of these forms (docs/ensemble.md):

* **webdataset** (what ``pipeline/demo`` writes): ``task.json`` with ``{"type":
  "classification", "classnames": [...], "templates": [...]}`` or ``{"type": "retrieval"}`` and
  shards ``test-*.tar`` (or the ``shards`` listed in task.json). Classification samples are
  ``<key>.jpg`` + ``<key>.cls`` (ascii int label); retrieval samples are ``<key>.jpg`` +
  ``<key>.json`` ``{"texts": [...]}`` (or ``<key>.txt``). A clip_benchmark ``wds_*`` copy
  (``classnames.txt``, ``zeroshot_classification_templates.txt``, ``test/*.tar``) also works.
* **image folders**: ``<task>/<class name>/*.jpg``; class names are the sorted folder names
  (``_`` read as a space), templates from ``templates.txt`` or the defaults.
* **CSV**: ``<task>/*.csv`` with columns ``filepath,label`` (path relative to the CSV, label an
  index into ``classnames.txt`` or a class name) plus ``classnames.txt``.

Templates hold the class name as ``{c}`` (clip_benchmark, the demo) or ``{}``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import artifacts, wds

IMAGE_EXTS = wds.IMAGE_EXTS
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of the {c}.",
    "a close-up photo of a {c}.",
    "a picture of a {c}.",
)
"""Used when a folder or CSV task ships no templates (a subset of OpenAI's ImageNet prompts)."""
KINDS = ("classification", "retrieval")
_TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task and the files it reads."""

    name: str
    kind: str
    """``classification`` or ``retrieval``."""
    root: Path
    source: str
    """``wds``, ``folder`` or ``csv``."""
    files: tuple[Path | str, ...]
    """Data files (tars, images or the CSV's images), in reading order; a task.json shard given
    as a webdataset URL stays a string."""
    meta_files: tuple[Path, ...] = ()
    """Description files (task.json, classnames.txt, the CSV, templates)."""
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    report_metric: str = ""
    """Metric of the report row (default: ``acc1`` / recall@1); task.json ``report_metric``."""
    labels: tuple[int, ...] = field(default=(), repr=False)
    """Labels of ``files`` for folder and CSV tasks."""

    def fingerprint(self) -> str:
        """Content identity of every file the task reads; URL shards by their URL."""
        local = [f for f in self.files if not wds.is_url(f)]
        urls = sorted(str(f) for f in self.files if wds.is_url(f))
        fp = artifacts.file_fingerprint(*self.meta_files, *local)
        return artifacts.object_digest([fp, urls]) if urls else fp


def fill_template(template: str, name: str) -> str:
    """``template`` with the class name put in place of ``{c}`` or ``{}``."""
    if "{c}" in template:
        return template.replace("{c}", name)
    if "{}" in template:
        return template.replace("{}", name)
    raise ValueError(f"template {template!r} has no '{{c}}' or '{{}}' for the class name")


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _templates(root: Path, info: dict[str, Any]) -> tuple[tuple[str, ...], list[Path]]:
    if info.get("templates"):
        return tuple(info["templates"]), []
    for name in _TEMPLATE_FILES:
        if (root / name).is_file():
            return tuple(_lines(root / name)), [root / name]
    return DEFAULT_TEMPLATES, []


def _tars(root: Path, info: dict[str, Any]) -> list[Path | str]:
    """task.json's ``shards`` (file names relative to the task folder, or webdataset URLs such as
    ``pipe:aws s3 cp s3://bucket/test-0.tar -``), else the tars found in the folder."""
    if info.get("shards"):
        return [s if wds.is_url(s) else root / s for s in info["shards"]]
    for pattern in ("test-*.tar", "*.tar", "test/*.tar", "*.tar.gz", "*.tgz"):
        found = sorted(root.glob(pattern), key=_natural_key)
        if found:
            return found
    return []


def _images(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS),
        key=_natural_key,
    )


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and _images(p))


def is_task_dir(path: Path) -> bool:
    """Whether a folder looks like an evaluation task of any supported form."""
    if not path.is_dir() or path.name.startswith((".", "_")):
        return False
    markers = ("task.json", "classnames.txt", "dataset_type.txt")
    return any((path / m).is_file() for m in markers) or any(path.glob("*.csv")) or bool(_class_dirs(path))


def load_task(root: str | Path, name: str | None = None) -> EvalTask:
    """Describe the task in ``root`` (any supported form).

    Raises:
        FileNotFoundError: the folder holds no recognisable task.
        ValueError: the task description is inconsistent (one line naming the file).
    """
    root = Path(root)
    name = name or root.name
    if not root.is_dir():
        raise FileNotFoundError(f"eval task '{name}': no folder {root}")
    info: dict[str, Any] = {}
    meta: list[Path] = []
    if (root / "task.json").is_file():
        info = json.loads((root / "task.json").read_text())
        meta.append(root / "task.json")
    elif (root / "dataset_type.txt").is_file():
        info = {"type": (root / "dataset_type.txt").read_text().strip() or "classification"}
        meta.append(root / "dataset_type.txt")
    kind = info.get("type", "classification")
    if kind not in KINDS:
        raise ValueError(f"eval task '{name}': type {kind!r} is not one of {list(KINDS)} ({root / 'task.json'})")
    tars = _tars(root, info)
    if tars:
        return _wds_task(name, root, kind, info, meta, tars)
    if kind == "retrieval":
        raise FileNotFoundError(f"eval task '{name}': retrieval needs webdataset shards (test-*.tar) in {root}")
    csvs = sorted(root.glob("*.csv"))
    if csvs:
        return _csv_task(name, root, info, meta, csvs[0])
    if _class_dirs(root):
        return _folder_task(name, root, info, meta)
    raise FileNotFoundError(f"eval task '{name}': no shards, CSV or class folders in {root}")


def _classnames(root: Path, info: dict[str, Any], meta: list[Path], name: str) -> tuple[str, ...]:
    if info.get("classnames"):
        return tuple(info["classnames"])
    path = root / "classnames.txt"
    if not path.is_file():
        raise FileNotFoundError(f"eval task '{name}': no classnames in task.json and no {path}")
    meta.append(path)
    return tuple(_lines(path))


def _wds_task(
    name: str, root: Path, kind: str, info: dict[str, Any], meta: list[Path], tars: list[Path]
) -> EvalTask:
    missing = [t for t in tars if not wds.is_url(t) and not Path(t).is_file()]
    if missing:
        raise FileNotFoundError(f"eval task '{name}': missing shard {missing[0]}")
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    if kind == "classification":
        classnames = _classnames(root, info, meta, name)
        templates, tmeta = _templates(root, info)
        meta += tmeta
    return EvalTask(
        name=name, kind=kind, root=root, source="wds", files=tuple(tars), meta_files=tuple(meta),
        classnames=classnames, templates=templates, report_metric=str(info.get("report_metric", "")),
    )


def _folder_task(name: str, root: Path, info: dict[str, Any], meta: list[Path]) -> EvalTask:
    dirs = _class_dirs(root)
    classnames = tuple(info.get("classnames") or [d.name.replace("_", " ") for d in dirs])
    if len(classnames) != len(dirs):
        raise ValueError(f"eval task '{name}': {len(classnames)} classnames for {len(dirs)} class folders")
    files, labels = [], []
    for label, folder in enumerate(dirs):
        images = _images(folder)
        files += images
        labels += [label] * len(images)
    templates, tmeta = _templates(root, info)
    return EvalTask(
        name=name, kind="classification", root=root, source="folder", files=tuple(files),
        meta_files=tuple(meta + tmeta), classnames=classnames, templates=templates,
        report_metric=str(info.get("report_metric", "")), labels=tuple(labels),
    )


def _csv_task(name: str, root: Path, info: dict[str, Any], meta: list[Path], path: Path) -> EvalTask:
    classnames = _classnames(root, info, meta, name)
    index = {c: i for i, c in enumerate(classnames)}
    files, labels = [], []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"filepath", "label"} <= set(reader.fieldnames):
            raise ValueError(f"eval task '{name}': {path} needs the columns filepath,label")
        for row_no, row in enumerate(reader, start=2):
            files.append(path.parent / row["filepath"])
            labels.append(_csv_label(row["label"], index, len(classnames), f"{path}:{row_no}"))
    templates, tmeta = _templates(root, info)
    return EvalTask(
        name=name, kind="classification", root=root, source="csv", files=tuple(files),
        meta_files=(*meta, path, *tmeta), classnames=classnames, templates=templates,
        report_metric=str(info.get("report_metric", "")), labels=tuple(labels),
    )


def _csv_label(value: str, index: dict[str, int], num_classes: int, where: str) -> int:
    value = value.strip()
    if value.lstrip("-").isdigit():
        label = int(value)
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: label {label} is not in [0, {num_classes})")
        return label
    if value not in index:
        raise ValueError(f"{where}: label {value!r} is not in classnames.txt")
    return index[value]


def discover_tasks(eval_root: str | Path, names: Sequence[str] = ()) -> list[EvalTask]:
    """The named tasks (or every task folder, sorted) under ``eval_root``.

    Raises:
        FileNotFoundError: ``eval_root`` or a named task is missing, or no task was found.
    """
    root = Path(eval_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.eval_root: no folder {root} (run `python -m pipeline demo-data` for the demo)")
    if names:
        return [load_task(root / n, n) for n in names]
    tasks = [load_task(p) for p in sorted(root.iterdir()) if is_task_dir(p)]
    if not tasks:
        raise FileNotFoundError(f"data.eval_root: no evaluation task folders in {root}")
    return tasks


def classification_tasks(eval_root: str | Path, names: Sequence[str] = (), owner: str = "train.eval_tasks") -> list[EvalTask]:
    """The classification tasks under ``eval_root`` (every one, or those named, in that order).

    Raises:
        FileNotFoundError: a named task does not exist.
        ValueError: a named task is not a classification task.
    """
    root = Path(eval_root)
    for name in names:
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{owner}: no task {name} (no folder {root / name})")
    if not names and not (root.is_dir() and any(is_task_dir(p) for p in root.iterdir())):
        return []
    tasks = discover_tasks(root, names)
    for task in tasks:
        if names and task.kind != "classification":
            raise ValueError(f"{owner}: {task.name} is a {task.kind} task, not classification")
    return [t for t in tasks if t.kind == "classification"]


# --------------------------------------------------------------------------- sample readers


def tar_samples(source: Path | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Grouped samples ``(key, {ext: bytes})`` of one task shard (a path or a webdataset URL),
    through :func:`pipeline.wds.iter_samples`: the one place task shards are read."""
    yield from wds.iter_samples(source)


def _image_bytes(sample: dict[str, bytes]) -> bytes | None:
    ext = wds.image_ext(sample)
    return sample[ext] if ext else None


def decode_image(data: bytes | Path) -> Image.Image:
    """An RGB PIL image from encoded bytes or a file."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as img:
        return img.convert("RGB")


def iter_classification(task: EvalTask, skipped: Counter | None = None) -> Iterator[tuple[Image.Image, int]]:
    """``(image, label)`` of every sample; malformed samples are counted in ``skipped``."""
    skipped = skipped if skipped is not None else Counter()
    if task.source != "wds":
        for path, label in zip(task.files, task.labels, strict=True):
            yield decode_image(path), label
        return
    for tar in task.files:
        for _, sample in tar_samples(tar):
            image = _image_bytes(sample)
            if image is None or "cls" not in sample:
                skipped["no_image_or_cls"] += 1
                continue
            yield decode_image(image), int(sample["cls"].decode().strip())


def _texts(sample: dict[str, bytes]) -> list[str]:
    if "json" in sample:
        meta = json.loads(sample["json"])
        texts = meta.get("texts") or ([meta["caption"]] if meta.get("caption") else [])
    elif "txt" in sample:
        texts = [sample["txt"].decode()]
    else:
        texts = []
    return [t.strip() for t in texts if t and t.strip()]


def iter_retrieval(task: EvalTask, skipped: Counter | None = None) -> Iterator[tuple[Image.Image, list[str]]]:
    """``(image, captions)`` of every image with at least one caption."""
    skipped = skipped if skipped is not None else Counter()
    for tar in task.files:
        for _, sample in tar_samples(tar):
            image, texts = _image_bytes(sample), _texts(sample)
            if image is None or not texts:
                skipped["no_image_or_text"] += 1
                continue
            yield decode_image(image), texts


def retrieval_texts(task: EvalTask) -> list[list[str]]:
    """The captions of every kept image, in the order :func:`iter_retrieval` yields them."""
    out = []
    for tar in task.files:
        for _, sample in tar_samples(tar):
            texts = _texts(sample)
            if _image_bytes(sample) is not None and texts:
                out.append(texts)
    return out
