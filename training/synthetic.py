"""A tiny synthetic image-caption run for tests, benchmarks and smoke checks of the trainer.

:func:`make_synthetic_run` writes webdataset tars of a few visually distinct classes (coloured
shapes) whose captions name their class, runs the real ``prep`` stage on them, hand-writes the
``assign`` artifacts (expert = class id modulo the number of experts) and a zero-shot
classification eval task. It stands in for the embed/cluster/assign stages, which are not needed
to exercise training.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline import wds
from pipeline.artifacts import write_json
from pipeline.config import PipelineConfig, load_config

CLASSES = ("red circle", "green square", "blue triangle", "yellow cross")
_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
_CAPTIONS = ("a photo of a {}.", "a {} on a plain background", "an image showing a {}")
TEMPLATES = ("a photo of a {c}.", "a {c}.")


@dataclass(frozen=True)
class SyntheticRun:
    """Where the synthetic run lives and what it holds."""

    cfg: PipelineConfig
    labels: dict[str, int]
    """Member key → class id of every training pair."""
    num_experts: int


def draw(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of class ``label``: a jittered coloured shape on a grey, noisy background."""
    colour, shape = CLASSES[label].split()
    bg = tuple(int(v) for v in rng.integers(90, 160, size=3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.28, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in _RGB[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    noise = rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_train_tars(
    folder: Path,
    num_shards: int,
    per_shard: int,
    size: int,
    seed: int,
    num_classes: int = len(CLASSES),
    with_txt: bool = False,
) -> dict[str, int]:
    """Write ``<folder>/<i>.tar`` (json, [txt,] jpg per pair); returns key → class id.

    ``with_txt`` adds a ``.txt`` caption (the first of ``texts``), which is what OpenCLIP's loader reads.
    """
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for shard in range(num_shards):
        rng = np.random.default_rng([seed, shard])
        with wds.TarWriter(folder / f"{shard}.tar") as tar:
            for i in range(per_shard):
                key, label = f"{shard:03d}_{i:05d}", int(rng.integers(num_classes))
                texts = [t.format(CLASSES[label]) for t in _CAPTIONS]
                meta = {"texts": texts, "label": CLASSES[label], "label_id": label}
                tar.add_sample(key, {"json": json.dumps(meta)} | ({"txt": texts[0]} if with_txt else {}))
                tar.add(f"{key}.jpg", _jpeg(draw(label, rng, size)))
                labels[key] = label
    return labels


def write_train_csv(folder: Path, num_rows: int, size: int, seed: int, num_classes: int = len(CLASSES)) -> dict[str, int]:
    """Write ``<folder>/train.csv`` (OpenCLIP's ``filepath,caption``) and ``<folder>/images/<i>.jpg``.

    Paths in the CSV are relative to it. Returns key → class id, key = the row index (prep's key of a CSV row).
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    labels, lines = {}, ["filepath,caption"]
    for i in range(num_rows):
        label = int(rng.integers(num_classes))
        (folder / "images" / f"{i:05d}.jpg").write_bytes(_jpeg(draw(label, rng, size)))
        caption = _CAPTIONS[i % len(_CAPTIONS)].format(CLASSES[label])
        lines.append(f'images/{i:05d}.jpg,"{caption}"')
        labels[str(i)] = label
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return labels


def write_eval_task(
    root: Path, per_class: int, size: int, seed: int, num_classes: int = len(CLASSES)
) -> Path:
    """Write ``<root>/shapes/{task.json,test-0.tar}`` (zero-shot classification of the classes)."""
    folder = root / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 999])
    with wds.TarWriter(folder / "test-0.tar") as tar:
        for i in range(per_class * num_classes):
            label = i % num_classes
            tar.add_sample(f"e{i:05d}", {"jpg": _jpeg(draw(label, rng, size)), "cls": str(label)})
    write_json(
        folder / "task.json",
        {
            "type": "classification",
            "classnames": list(CLASSES[:num_classes]),
            "templates": list(TEMPLATES),
            "shards": ["test-0.tar"],
        },
    )
    return folder


def write_assign(cfg: PipelineConfig, labels: dict[str, int], num_experts: int) -> None:
    """Hand-made ``assign`` artifacts: expert = class id % num_experts, fine cluster = class id."""
    prep_dir, assign_dir = cfg.run_dir / "prep", cfg.run_dir / "assign"
    outputs, sizes = [], [0] * num_experts
    for caption_file in sorted((prep_dir / "captions").glob("*.parquet")):
        table = pq.read_table(caption_file, columns=["pair_id", "key"])
        keys = table.column("key").to_pylist()
        fine = np.array([labels[k] for k in keys], dtype=np.int32)
        coarse = (fine % num_experts).astype(np.int16)
        for k in coarse:
            sizes[int(k)] += 1
        rel = f"assign/{caption_file.stem}.parquet"
        (assign_dir / "assign").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "pair_id": table.column("pair_id"),
                    "key": table.column("key"),
                    "fine": pa.array(fine),
                    "coarse": pa.array(coarse),
                    "dist": pa.array(np.zeros(len(keys), dtype=np.float32)),
                }
            ),
            assign_dir / rel,
        )
        outputs.append(rel)
    write_json(
        assign_dir / "manifest.json",
        {
            "stage": "assign",
            "config_hash": "synthetic",
            "outputs": outputs,
            "num_experts": num_experts,
            "expert_sizes": sizes,
        },
    )


def make_synthetic_run(
    root: Path,
    *,
    num_shards: int = 4,
    per_shard: int = 64,
    image_size: int = 32,
    num_experts: int = 2,
    eval_per_class: int = 16,
    seed: int = 0,
    with_txt: bool = False,
    csv: bool = False,
    overrides: list[str] | None = None,
) -> SyntheticRun:
    """Build data, prep and assign artifacts of a tiny run under ``root``.

    Args:
        root: Folder for ``data/`` and ``runs/``.
        num_shards: Training tars.
        per_shard: Pairs per tar.
        image_size: Image side in pixels.
        num_experts: Coarse clusters of the hand-made assignment.
        eval_per_class: Images per class in the eval task.
        seed: Data seed (and ``run.seed``).
        with_txt: Also write ``.txt`` captions (for OpenCLIP's loader).
        csv: One CSV source of ``num_shards * per_shard`` rows (image files) instead of tars.
        overrides: Extra ``--set`` style overrides applied to the config.

    Returns:
        The config (``run.root`` under ``root``), the key → class map and the number of experts.
    """
    from pipeline.runner import run_stage

    labels, train = _write_train_data(root, num_shards, per_shard, image_size, seed, with_txt, csv)
    write_eval_task(root / "data" / "eval", eval_per_class, image_size, seed)
    cfg = load_config(None, _run_overrides(root, train, seed, num_experts) + list(overrides or []))
    run_stage(cfg, "prep", progress=False)
    write_assign(cfg, labels, num_experts)
    return SyntheticRun(cfg, labels, num_experts)


def _write_train_data(
    root: Path, num_shards: int, per_shard: int, image_size: int, seed: int, with_txt: bool, csv: bool
) -> tuple[dict[str, int], str]:
    """The training pairs (tars, or one CSV) under ``root/data``: (key → class id, ``data.train``)."""
    if csv:
        labels = write_train_csv(root / "data" / "csv", num_shards * per_shard, image_size, seed)
        return labels, str(root / "data" / "csv" / "train.csv")
    labels = write_train_tars(root / "data" / "train", num_shards, per_shard, image_size, seed, with_txt=with_txt)
    return labels, f"{root / 'data' / 'train'}/{{0..{num_shards - 1}}}.tar"


def _run_overrides(root: Path, train: str, seed: int, num_experts: int) -> list[str]:
    """The config of the tiny run: micro ViT, fp32, in-process reading, a few steps."""
    return [
        f"run.root={root / 'runs'}",
        "run.name=synthetic",
        f"run.seed={seed}",
        "run.workers=1",
        f"data.train={train}",
        "data.layout=flat",
        f"data.eval_root={root / 'data' / 'eval'}",
        f"cluster.num_experts={num_experts}",
        "train.model=mode-micro-vit",
        "train.precision=fp32",
        "train.workers=0",
        "train.batch_size=16",
        "train.steps=8",
        "train.seed_steps=4",
        "train.warmup=2",
        "train.save_every=4",
        "train.log_every=1",
        "train.eval_every=0",
    ]
