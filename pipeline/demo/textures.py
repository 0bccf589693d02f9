"""Demo domain ``textures``: two-colour repeating patterns (stripes, checks, dots, grids, noise)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from pipeline.demo.common import Domain, Drawn, blend, color_pair, jitter

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


def _draw_texture(rng: np.random.Generator, size: int, item: int) -> Drawn:
    name = _TEXTURES[item]
    coarse = bool(rng.random() < 0.5)
    fg, bg = color_pair(rng)
    mask = _texture_mask(name, rng, size, coarse).astype(np.float32)
    image = blend(mask, jitter(fg, rng), jitter(bg, rng))
    scale = _SCALE_WORDS[name][int(coarse)]
    attributes = {"pattern": name, "scale": scale, "color": fg, "background": bg}
    fields = {"cls": name, "scale": scale, "fg": fg, "bg": bg}
    return Drawn(image, item, attributes, fields)


DOMAIN = Domain(
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
)
