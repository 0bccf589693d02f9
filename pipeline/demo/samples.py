"""Rendering demo samples and writing their tars: the domain table, one job per tar, the worker pool."""

from __future__ import annotations

import io
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import wds
from pipeline.demo import digits, shapes, textures, words
from pipeline.demo.common import JPEG_QUALITY, Domain, Drawn
from pipeline.demo.digits import init_worker, mnist, mnist_split

DOMAINS: dict[str, Domain] = {
    "digits": digits.DOMAIN,
    "shapes": shapes.DOMAIN,
    "textures": textures.DOMAIN,
    "words": words.DOMAIN,
}
"""Every demo domain by name (``ALL_DOMAINS`` order)."""


@dataclass(frozen=True)
class Job:
    """One tar to write: a training shard, or a shard of an evaluation task."""

    kind: str  # "train" | "classification" | "retrieval"
    path: str
    keys: tuple[str, ...]
    domains: tuple[str, ...]
    items: tuple[int | None, ...]  # None: the worker draws the item from its own RNG
    rng_key: tuple[int, ...]
    image_size: int


def _captions(domain: str, rng: np.random.Generator, fields: dict[str, str], n: int) -> list[str]:
    templates = DOMAINS[domain].templates
    picks = rng.choice(len(templates), size=n, replace=False)
    return [templates[int(i)].format(**fields) for i in picks]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _render(job: Job, rng: np.random.Generator, index: int) -> tuple[Drawn, list[str]]:
    """Draw sample ``index`` of ``job`` and 2-3 distinct captions of it."""
    domain, item = job.domains[index], job.items[index]
    spec = DOMAINS[domain]
    if item is None and domain == "digits":
        item = int(rng.choice(mnist_split()[0]))
    elif item is None:
        item = int(rng.integers(len(spec.classnames)))
    drawn = spec.draw(rng, job.image_size, item)
    return drawn, _captions(domain, rng, drawn.fields, int(rng.integers(2, 4)))


def _members(kind: str, key: str, domain: str, drawn: Drawn, texts: list[str]) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in the order its format prescribes."""
    label = DOMAINS[domain].classnames[drawn.label_id]
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


def run_job(job: Job) -> Counter:
    """Render and write one tar; return sample counts per ``(domain, classname)``."""
    rng = np.random.default_rng(list(job.rng_key))
    members: list[tuple[str, bytes]] = []
    counts: Counter = Counter()
    for index, (key, domain) in enumerate(zip(job.keys, job.domains, strict=True)):
        drawn, texts = _render(job, rng, index)
        members.extend(_members(job.kind, key, domain, drawn, texts))
        counts[(domain, DOMAINS[domain].classnames[drawn.label_id])] += 1
    wds.write_tar(job.path, members)
    return counts


def execute(jobs: list[Job], workers: int, progress: bool) -> list[Counter]:
    """Run jobs, in a process pool when ``workers > 1``; results in job order."""
    bar = tqdm(total=len(jobs), desc="demo-data", unit="tar", disable=not progress)
    results: list[Counter] = [Counter() for _ in jobs]
    with bar:
        if workers == 1:
            for i, job in enumerate(jobs):
                results[i] = run_job(job)
                bar.update()
            return results
        digits_data = mnist() if any("digits" in job.domains for job in jobs) else None
        with ProcessPoolExecutor(workers, initializer=init_worker, initargs=(digits_data,)) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    return results
