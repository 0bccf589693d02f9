"""Demo domain ``words``: an animal name rendered on a coloured sign."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.demo.common import COLORS, Domain, Drawn, color_pair, jitter

_WORDS = ("cat", "dog", "bird", "fish", "horse", "cow", "frog", "lion", "bear", "duck")


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _draw_word(rng: np.random.Generator, size: int, item: int) -> Drawn:
    word = _WORDS[item]
    case = ("lower", "upper", "title")[int(rng.integers(3))]
    text = {"lower": word, "upper": word.upper(), "title": word.title()}[case]
    ink, sign = color_pair(rng)
    scene = list(COLORS)[int(rng.integers(len(COLORS)))]
    image = Image.new("RGB", (size, size), jitter(scene, rng))
    draw = ImageDraw.Draw(image)
    w, h = size * rng.uniform(0.78, 0.98), size * rng.uniform(0.4, 0.7)
    cx, cy = size / 2 + rng.uniform(-1, 1) * (size - w) / 2, size / 2 + rng.uniform(-1, 1) * (size - h) / 2
    draw.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=jitter(sign, rng))
    px = int(rng.integers(round(0.24 * size), round(0.36 * size) + 1))
    while px > 6 and draw.textlength(text, font=_font(px)) > w - 4:
        px -= 1
    draw.text((cx, cy), text, fill=jitter(ink, rng), font=_font(px), anchor="mm")
    attributes = {"text": text, "case": case, "ink": ink, "sign": sign, "font_px": px}
    fields = {
        "w": text,
        "wl": word,
        "wu": word.upper(),
        "ink": ink,
        "sign": sign,
        "spelled": "-".join(word.upper()),
    }
    return Drawn(image, item, attributes, fields)


DOMAIN = Domain(
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
)
