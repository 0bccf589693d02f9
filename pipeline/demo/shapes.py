"""Demo domain ``shapes``: one to three geometric shapes of a class, coloured, sized and placed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from pipeline.demo.common import Domain, Drawn, color_pair, jitter

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


def _draw_shape(rng: np.random.Generator, size: int, item: int) -> Drawn:
    shape = _SHAPES[item]
    count = int(rng.choice(3, p=[0.6, 0.25, 0.15])) + 1
    size_name = "small" if count > 1 else ("small", "medium", "large")[int(rng.integers(3))]
    position = "center" if size_name == "large" else list(_POSITIONS)[int(rng.integers(5))]
    color, bg = color_pair(rng)
    image = Image.new("RGB", (size, size), jitter(bg, rng))
    draw = ImageDraw.Draw(image)
    radius = _SHAPE_RADIUS[size_name] * size * rng.uniform(0.85, 1.15)
    fill = jitter(color, rng)
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
    return Drawn(image, item, attributes, fields)


DOMAIN = Domain(
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
)
