"""Deterministic, offline demo data for the MoDE pipeline.

Four visually and textually distinct domains (real MNIST digits, drawn shapes, textures and
rendered words) are written as MoDE-style sharded webdataset tars, plus held-out zero-shot
classification and retrieval sets. Captions of different domains share almost no vocabulary,
so caption-embedding clustering into four experts recovers the domains. The formats are
documented in ``docs/data_formats.md``.

Modules: :mod:`~pipeline.demo.common` (format constants, RNG stream ids, colours),
one module per domain (:mod:`~pipeline.demo.digits`, :mod:`~pipeline.demo.shapes`,
:mod:`~pipeline.demo.textures`, :mod:`~pipeline.demo.words`: renderer, class names, caption
templates, zero-shot prompts), :mod:`~pipeline.demo.samples` (the domain table, rendering a tar's
samples, writing it through :mod:`pipeline.wds`, the worker pool), :mod:`~pipeline.demo.plan`
(which tars hold what) and :mod:`~pipeline.demo.generate` (the driver).

Determinism: every shard draws from its own ``numpy`` Generator seeded by
``(seed, stream, shard)``, tar headers are fixed and JPEG settings are pinned, so the same
arguments give byte-identical files whatever the number of workers.
"""

from pipeline.demo.common import (
    ALL_DOMAINS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MNIST_HELDOUT_PER_CLASS,
    TRAIN_SPLIT_FACTOR,
)
from pipeline.demo.generate import generate_demo_data

__all__ = [
    "ALL_DOMAINS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MNIST_HELDOUT_PER_CLASS",
    "TRAIN_SPLIT_FACTOR",
    "generate_demo_data",
]
