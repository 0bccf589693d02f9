"""Shared parts of the demo data: format constants, RNG stream ids, colours and the domain record.

Determinism: every shard draws from its own ``numpy`` Generator seeded by ``(seed, stream, shard)``
(the stream ids below), tar headers are fixed (``pipeline.wds``) and JPEG settings are pinned, so
the same arguments give byte-identical files whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
MANIFEST_NAME = "demo_manifest.json"
ALL_DOMAINS = ("digits", "shapes", "textures", "words")
MNIST_HELDOUT_PER_CLASS = 100
JPEG_QUALITY = 90
RNG_PLAN, RNG_TRAIN, RNG_EVAL, RNG_RETRIEVAL_PLAN, RNG_RETRIEVAL, RNG_TRAIN_SPLIT = range(6)  # RNG stream ids
TRAIN_SPLIT_FACTOR = 5
"""Each classification task also gets ``eval/<task>/train/`` with this many times ``eval_per_class``
labelled images per class (drawn like training images: MNIST digits from the training rows), for
linear evaluation / linear probes. Its own ``task.json`` lists its shards, so the test split's files
and the zero-shot readers are unchanged."""
COLORS: dict[str, tuple[int, int, int]] = {
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
COLOR_PAIRS = tuple(
    (a, b) for a in COLORS for b in COLORS if a != b and abs(_luma(COLORS[a]) - _luma(COLORS[b])) >= 60
)


@dataclass(frozen=True)
class Drawn:
    """One rendered image with its label, recorded attributes and caption fields."""

    image: Image.Image
    label_id: int
    attributes: dict[str, Any]
    fields: dict[str, str]


@dataclass(frozen=True)
class Domain:
    """A demo domain: class names, caption templates, zero-shot prompts and a renderer."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    prompts: tuple[str, ...]
    # (rng, image_size, item) -> Drawn; item is an MNIST row for digits, else a label id.
    draw: Callable[[np.random.Generator, int, int], Drawn]


def color_pair(rng: np.random.Generator) -> tuple[str, str]:
    return COLOR_PAIRS[int(rng.integers(len(COLOR_PAIRS)))]


def jitter(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (
        min(255, max(0, c + int(d)))
        for c, d in zip(COLORS[name], rng.integers(-15, 16, size=3), strict=True)
    )
    return (r, g, b)


def blend(mask: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> Image.Image:
    """Composite colour ``fg`` over ``bg`` with coverage ``mask`` in [0, 1]."""
    fg_arr, bg_arr = np.array(fg, np.float32), np.array(bg, np.float32)
    pixels = bg_arr + (fg_arr - bg_arr) * mask[..., None]
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


