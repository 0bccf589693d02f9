"""Training data of one run: the original tars or CSV files, filtered to an expert's pairs, as an endless stream.

What a run trains on (:class:`ExpertData`):

* the seed model: every pair prep kept (``prep/shards.parquet`` + ``prep/captions/<shard>.parquet``);
* expert ``k``: the pairs whose ``coarse`` id in ``assign/<shard>.parquet`` is ``k``, plus, per shard
  and epoch, a seeded sample of ``ooc_ratio`` of the shard's other pairs (MoDE's out-of-cluster
  mix; MoDE drew it with unseeded ``np.random``, here it is seeded by ``(seed, epoch, shard)``).

The stream (:class:`ExpertStream`) is a pure function of (seed, layout, position), which is what makes
resume exact and runs reproducible:

* each epoch, the shards are permuted (seed, epoch); a *stream* is a list of shards, and its pairs in
  tar order are shuffled in consecutive windows of ``shuffle_buffer`` pairs (seed, epoch, window);
* ``split="shards"``: reader ``rank * workers + slot`` owns every ``readers``-th shard of the
  epoch's order, so ranks and workers read disjoint shards; its batches are consecutive slices of
  its own stream, and rank batch ``j`` is built from slot ``j % workers`` (the DataLoader takes
  its workers round-robin, in order; after a resume worker ``w`` plays slot ``(start + w) % workers``);
* ``split="samples"`` (automatic when there are fewer shards with data than readers): one stream of
  all shards; global batch ``t`` is positions ``[t*B, (t+1)*B)``, rank ``r`` takes the slice
  ``[t*B + r*b, t*B + (r+1)*b)`` and slot ``t % workers`` builds it. This is disjoint and
  complete, and the global batches do not depend on the number of ranks or workers (so a 2-process
  run at per-rank batch b equals a 1-process run at batch 2b);
* the caption of a visit (one of ``texts``) and the augmentation are seeded by
  (seed, epoch, pair id), so the same pair visit gives the same tensors wherever it is decoded.

Resuming after ``n`` batches skips positions arithmetically (no reading). A shard is read through a
per-kind reader (:func:`open_shard`): a tar's members with ``os.pread`` from an index of the tar
(offsets of each member), so only the pairs a worker needs are read (a local uncompressed tar); a tar
that is not one (a ``pipe:``/``http(s)://`` URL or a ``.tar.gz``, see ``pipeline/wds.py``) is streamed
front to back keeping only the pairs selected for the epoch (:class:`StreamedShard`, the cluster filter
of MoDE's streaming loader) with the same keys, order and batches; a CSV shard (OpenCLIP's ``--dataset-type csv``) from the image files its
rows name, relative to the CSV, with the caption of the row. Both give the same keys prep recorded, so
order, selection, resume and splitting do not depend on the kind.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import os
import random
import struct
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import wds
from pipeline.artifacts import read_manifest
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, StageError
from training import models

log = logging.getLogger("training")

_SHARDS, _OOC, _WINDOW, _CAPTION, _AUGMENT = range(5)  # independent RNG streams
VARIANT_SEED_STRIDE = 1000
"""Data seed of order variant ``k`` (``full_ensemble_<k>``): ``run.seed + k * VARIANT_SEED_STRIDE``."""
_MAX_EMPTY_EPOCHS = 1000
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(images [b, 3, H, W] float, tokens [b, context] int64, pair ids [b] int64)."""


# --------------------------------------------------------------------------- what a run trains on


@dataclass(frozen=True)
class ShardInfo:
    """One training shard (a tar or a CSV file) and how many of its pairs the run uses."""

    name: str
    path: str
    table: str
    """Parquet with ``pair_id``, ``key`` (and ``coarse`` for experts) of the shard's pairs."""
    num_in: int
    """Pairs of the expert (all pairs for the seed model)."""
    num_out: int
    """Other pairs: the candidates of the out-of-cluster sample."""
    kind: str = "tar"
    """``tar`` or ``csv`` (prep's ``shards.parquet`` kind)."""


@dataclass(frozen=True)
class ExpertData:
    """The pairs one run trains on, and the rule that selects them per epoch."""

    shards: tuple[ShardInfo, ...]
    expert: int | None
    """Coarse cluster id; None = the dense seed model (all pairs)."""
    ooc_ratio: float
    seed: int
    num_pairs: int
    """Pairs in the whole dataset (prep's ``num_pairs``; the losses' ``data_size``)."""
    image_keys: tuple[str, ...] = wds.IMAGE_EXTS
    caption_keys: tuple[str, ...] = ("txt", "json")
    json_fields: tuple[str, ...] = ("caption", "texts")
    csv_options: tuple[str, str, str] = (",", "filepath", "caption")
    """(separator, image column, caption column) of CSV shards: ``prep.csv_separator``,
    ``prep.csv_img_key``, ``prep.csv_caption_key`` (OpenCLIP's ``--csv-*`` options)."""

    @property
    def epoch_size(self) -> float:
        """Expected pairs per epoch: the expert's pairs plus ``ooc_ratio`` of the others."""
        return float(sum(s.num_in + self.ooc_ratio * s.num_out for s in self.shards))

    def ooc_count(self, shard: int, epoch: int) -> int:
        """Out-of-cluster pairs drawn from ``shard`` in ``epoch`` (ratio x others, stochastically rounded)."""
        return self._ooc_draw(shard, epoch)[0]

    def _ooc_draw(self, shard: int, epoch: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, _OOC, epoch, shard])
        info = self.shards[shard]
        if self.expert is None or info.num_out == 0 or self.ooc_ratio == 0.0:
            return 0, rng
        exact = self.ooc_ratio * info.num_out
        return min(info.num_out, int(exact) + int(rng.random() < exact - int(exact))), rng

    def num_selected(self, shard: int, epoch: int) -> int:
        """Pairs of ``shard`` in the stream of ``epoch``."""
        return self.shards[shard].num_in + self.ooc_count(shard, epoch)

    def selected(self, shard: int, epoch: int) -> dict[str, int]:
        """``{member key: pair id}`` of the pairs of ``shard`` used in ``epoch``."""
        ids, keys, inside = _read_table(self.shards[shard].table, self.expert)
        chosen = inside.copy()
        count, rng = self._ooc_draw(shard, epoch)
        if count:
            chosen[rng.choice(np.flatnonzero(~inside), size=count, replace=False)] = True
        return {keys[i]: int(ids[i]) for i in np.flatnonzero(chosen)}

    def is_active(self, shard: int) -> bool:
        """True when the shard can contribute pairs."""
        info = self.shards[shard]
        return info.num_in > 0 or (self.expert is not None and self.ooc_ratio * info.num_out > 0)


@lru_cache(maxsize=64)
def _read_table(path: str, expert: int | None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(pair ids, keys, in-cluster mask) of one shard's table."""
    columns = ["pair_id", "key"] + ([] if expert is None else ["coarse"])
    table = pq.read_table(path, columns=columns)
    ids = table.column("pair_id").to_numpy()
    keys = table.column("key").to_pylist()
    if expert is None:
        return ids, keys, np.ones(len(keys), dtype=bool)
    return ids, keys, table.column("coarse").to_numpy() == expert


def load_expert_data(
    cfg: PipelineConfig, expert: int | None, partition: str = "assign", data_variant: int = 0
) -> ExpertData:
    """Read prep's pair-id index (and the coarse-label tables for an expert).

    Args:
        cfg: Pipeline config (run folder, seed, ``train.ooc_ratio``, prep member keys).
        expert: Coarse cluster id, or None for a dense run (every pair).
        partition: ``assign`` (the clusters) or ``random_split`` (the baseline's random partition).
        data_variant: > 0 gives another data order of the same pairs (``full_ensemble_<k>``).

    Raises:
        FileNotFoundError: prep (or assign) has not finished.
        ValueError: the expert id is out of range, or a shard is neither a tar nor a CSV file.
    """
    prep_dir = cfg.run_dir / "prep"
    num_pairs = int(read_manifest(prep_dir, "prep")["num_pairs"])
    index = pq.read_table(prep_dir / "shards.parquet").to_pylist()
    unknown = [row for row in index if row["kind"] not in SHARD_READERS]
    if unknown:
        raise StageError(
            f"train: cannot read shard {unknown[0]['shard']} of kind '{unknown[0]['kind']}' "
            f"(readers: {', '.join(SHARD_READERS)})"
        )
    tables = _expert_tables(cfg, expert, partition) if expert is not None else None
    shards = []
    for row in index:
        if row["count"] == 0:
            continue
        if tables is None:
            table = str(prep_dir / "captions" / f"{row['shard']}.parquet")
            shards.append(ShardInfo(row["shard"], row["path"], table, int(row["count"]), 0, row["kind"]))
            continue
        if row["shard"] not in tables:
            raise FileNotFoundError(
                f"assign: no output for shard {row['shard']}; rerun `python -m pipeline assign`"
            )
        num_in = int((_read_table(tables[row["shard"]], expert)[2]).sum())
        shards.append(
            ShardInfo(
                row["shard"], row["path"], tables[row["shard"]], num_in, int(row["count"]) - num_in, row["kind"]
            )
        )
    return ExpertData(
        tuple(shards),
        expert,
        cfg.train.ooc_ratio,
        cfg.run.seed + data_variant * VARIANT_SEED_STRIDE,
        num_pairs,
        tuple(cfg.prep.image_keys),
        tuple(cfg.prep.caption_keys),
        tuple(cfg.prep.json_fields),
        (cfg.prep.csv_separator, cfg.prep.csv_img_key, cfg.prep.csv_caption_key),
    )


def num_experts(cfg: PipelineConfig) -> int:
    """Experts of the run: assign's ``num_experts`` (or ``cluster.num_experts`` before assign ran),
    or the registry's when later generations added experts (``<run>/experts.json``)."""
    path = cfg.run_dir / "assign" / "manifest.json"
    num = int(read_manifest(path.parent, "assign")["num_experts"]) if path.is_file() else cfg.cluster.num_experts
    from pipeline import experts  # experts added by later generations (docs/growth.md)

    return max(num, len(experts.registry(cfg))) if experts.registry_path(cfg).is_file() else num


def _expert_tables(cfg: PipelineConfig, expert: int, partition: str = "assign") -> dict[str, str]:
    assign_dir = cfg.run_dir / "assign"
    manifest = read_manifest(assign_dir, "assign")
    if not 0 <= expert < int(manifest["num_experts"]):
        raise ConfigError(f"--expert {expert}: the run has experts 0..{int(manifest['num_experts']) - 1}")
    if partition == "random_split":
        from training.partition import ensure_random_partition

        return ensure_random_partition(cfg)
    return {Path(rel).stem: str(assign_dir / rel) for rel in manifest["outputs"]}


# --------------------------------------------------------------------------- the order of a stream


@dataclass(frozen=True)
class StreamLayout:
    """How the stream is cut between ranks and loader workers (a runtime fact, not config)."""

    split: Literal["shards", "samples"]
    rank: int
    world_size: int
    workers: int
    """Reader processes per rank (>= 1; ``train.workers: 0`` reads in the training process as one)."""
    batch_size: int
    """Per-rank batch size."""
    shuffle_buffer: int

    @property
    def readers(self) -> int:
        """Readers in the whole job."""
        return self.world_size * self.workers

    @property
    def global_batch(self) -> int:
        """Pairs per optimisation step over all ranks."""
        return self.world_size * self.batch_size


def resolve_split(requested: str, data: ExpertData, readers: int) -> Literal["shards", "samples"]:
    """``auto``: ``shards`` when every reader can own at least one shard with data, else ``samples``."""
    active = sum(data.is_active(i) for i in range(len(data.shards)))
    if requested == "auto":
        return "shards" if active >= readers else "samples"
    if requested == "shards" and active < readers:
        raise ConfigError(
            f"train.data_split: 'shards' needs >= ranks x workers = {readers} shards with data, "
            f"this run has {active}; use 'samples' or 'auto'"
        )
    return requested  # type: ignore[return-value]


class StreamOrder:
    """Deterministic endless order of one stream: shards per epoch, window-shuffled pairs.

    Args:
        data: The run's pairs.
        reader: This reader's index (``split="shards"``), or None for the stream of all shards.
        readers: Readers in the job.
        window: Shuffle window (pairs).
    """

    def __init__(self, data: ExpertData, reader: int | None, readers: int, window: int) -> None:
        self.data, self.reader, self.readers, self.window = data, reader, readers, max(1, window)
        self._pool = [i for i in range(len(data.shards)) if data.is_active(i)]
        self._starts = [0]  # stream position where each epoch starts
        self._cum: dict[int, list[int]] = {}
        self._shards: OrderedDict[int, list[int]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def epoch_shards(self, epoch: int) -> list[int]:
        """Shards of this stream in ``epoch``, in reading order."""
        if epoch not in self._shards:
            perm = np.random.default_rng([self.data.seed, _SHARDS, epoch]).permutation(len(self._pool))
            order = [self._pool[i] for i in perm]
            self._shards[epoch] = order if self.reader is None else order[self.reader :: self.readers]
            _trim(self._shards, 4)
        return self._shards[epoch]

    def cumulative(self, epoch: int) -> list[int]:
        """Running pair counts over ``epoch_shards(epoch)`` (first entry 0)."""
        if epoch not in self._cum:
            counts = [self.data.num_selected(s, epoch) for s in self.epoch_shards(epoch)]
            self._cum[epoch] = [0, *np.cumsum(counts, dtype=np.int64).tolist()]
            if len(self._cum) > 4:
                self._cum.pop(min(self._cum))
        return self._cum[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, position within the epoch) of a stream position."""
        while self._starts[-1] <= position:
            epoch = len(self._starts) - 1
            empty = 0
            while self.cumulative(epoch + empty)[-1] == 0:
                empty += 1
                self._starts.append(self._starts[-1])
                if empty > _MAX_EMPTY_EPOCHS:
                    raise RuntimeError(f"reader {self.reader}: no pairs in {_MAX_EMPTY_EPOCHS} epochs")
            self._starts.append(self._starts[-1] + self.cumulative(len(self._starts) - 1)[-1])
        epoch = bisect.bisect_right(self._starts, position) - 1
        return epoch, position - self._starts[epoch]

    def source(self, epoch: int, offset: int) -> tuple[int, int]:
        """(shard, ordinal among its selected pairs in tar order) read at ``offset`` of ``epoch``."""
        cum = self.cumulative(epoch)
        start = offset - offset % self.window
        if (epoch, start) not in self._perms:
            stream_id = 0 if self.reader is None else self.reader + 1
            rng = np.random.default_rng([self.data.seed, _WINDOW, stream_id, epoch, start])
            self._perms[(epoch, start)] = rng.permutation(min(self.window, cum[-1] - start))
            _trim(self._perms, 4)
        source = start + int(self._perms[(epoch, start)][offset - start])
        k = bisect.bisect_right(cum, source) - 1
        return self.epoch_shards(epoch)[k], source - cum[k]


def _trim(cache: OrderedDict, capacity: int) -> None:
    while len(cache) > capacity:
        cache.popitem(last=False)


# --------------------------------------------------------------------------- reading tars


def member_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member, by the webdataset rule prep uses (:mod:`pipeline.wds`)."""
    return wds.split_key(name)


@dataclass
class TarIndex:
    """Where each member's bytes are in one uncompressed tar: ``{key: {ext: (offset, size)}}``."""

    path: str
    members: dict[str, dict[str, tuple[int, int]]]
    order: list[str]
    fd: int = field(default=-1, repr=False)

    @classmethod
    def build(cls, path: str) -> TarIndex:
        """Scan the tar headers once."""
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for info in tar:
                    parsed = member_key(info.name) if info.isfile() else None
                    if parsed is not None:
                        members.setdefault(parsed[0], {})[parsed[1]] = (info.offset_data, info.size)
        except tarfile.ReadError as exc:
            raise ValueError(
                f"train: cannot index {path} ({exc}); the trainer needs uncompressed tars"
            ) from None
        return cls(path, members, list(members))

    def read(self, key: str) -> dict[str, bytes]:
        """Every member of ``key``."""
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)
        return {ext: os.pread(self.fd, size, offset) for ext, (offset, size) in self.members[key].items()}

    def close(self) -> None:
        """Close the file (reopened on the next read)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


CSV_IMAGE, CSV_CAPTION = "<csv image>", "<csv caption>"
"""Raw-member names a CSV row is read into (no tar member can be named so: they hold a space)."""


def csv_delimiter(path: str, separator: str) -> str:
    """The separator of a CSV shard: ``separator``, but tab for a ``.tsv`` left at the default ``,`` (as prep)."""
    return "\t" if path.endswith(".tsv") and separator == "," else separator


@dataclass
class CsvIndex:
    """The rows of one CSV shard: ``{key: (image path, caption)}``, key = the data row's index (as prep).

    Images are read from their files (paths relative to the CSV, or absolute) when a pair is visited.
    """

    path: str
    members: dict[str, tuple[str, str]]
    order: list[str]

    @classmethod
    def build(cls, path: str, separator: str = ",", img_key: str = "filepath", caption_key: str = "caption") -> CsvIndex:
        """Parse the CSV once (the same reading as prep: utf-8 with surrogate escapes, csv quoting)."""
        base = Path(path).parent
        members: dict[str, tuple[str, str]] = {}
        try:
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
                reader = csv.DictReader(handle, delimiter=csv_delimiter(path, separator))
                fields = reader.fieldnames or []
                if img_key not in fields or caption_key not in fields:
                    raise ValueError(
                        f"train: {path} needs columns '{img_key}' and '{caption_key}' "
                        f"(prep.csv_img_key / prep.csv_caption_key), has {fields}"
                    )
                for row_idx, row in enumerate(reader):
                    image, caption = row.get(img_key), row.get(caption_key)
                    if image is None or caption is None:
                        continue
                    members[str(row_idx)] = (str(Path(image) if Path(image).is_absolute() else base / image), caption)
        except OSError as exc:
            raise ValueError(f"train: cannot read CSV shard {path} ({exc})") from None
        return cls(path, members, list(members))

    def read(self, key: str) -> dict[str, bytes]:
        """The image bytes and caption of row ``key``."""
        image, caption = self.members[key]
        return {CSV_IMAGE: Path(image).read_bytes(), CSV_CAPTION: caption.encode("utf-8")}

    def close(self) -> None:
        """Nothing to close (each image is opened and closed on read)."""


@dataclass
class StreamedShard:
    """A tar that is not a local uncompressed file (a ``pipe:``/``http(s)://`` URL, a ``.tar.gz``).

    It cannot be indexed, so it is streamed front to back (:func:`pipeline.wds.iter_samples`) and
    only the pairs selected for the epoch are kept (the cluster filter, as MoDE's loader streams
    its shards): memory is the selected pairs of the shards a reader has open (``ShardCache``'s
    capacity), not the dataset. Selections of later epochs re-stream the shard.
    """

    path: str
    members: dict[str, dict[str, bytes]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    _held: list | None = field(default=None, repr=False)

    def select(self, keys: Collection[str]) -> None:
        """Make sure the members of ``keys`` are held (streams the shard when some are not)."""
        if all(k in self.members for k in keys):
            return
        wanted = set(keys) | set(self.members)
        self.members = {k: s for k, s in wds.iter_samples(self.path) if k in wanted}
        self.order = list(self.members)

    def hold(self, picks: list[tuple[str, int]]) -> None:
        """Make sure the pairs of ``picks`` (a selection's ``(key, pair id)`` list) are held."""
        if picks is not self._held:
            self.select([key for key, _ in picks])
            self._held = picks

    def read(self, key: str) -> dict[str, bytes]:
        """Every member of ``key`` (selected before)."""
        return self.members[key]

    def close(self) -> None:
        """Drop the held pairs."""
        self.members, self.order, self._held = {}, [], None


ShardReader = TarIndex | CsvIndex | StreamedShard
SHARD_READERS = ("tar", "csv")
"""Shard kinds the trainer reads (prep's ``shards.parquet`` ``kind``)."""


def open_shard(info: ShardInfo, data: ExpertData) -> ShardReader:
    """The reader of one shard, by its kind: a local tar is indexed, any other tar is streamed."""
    if info.kind == "csv":
        return CsvIndex.build(info.path, *data.csv_options)
    if wds.is_local_tar(info.path):
        return TarIndex.build(info.path)
    return StreamedShard(info.path)


class ShardCache:
    """The shard readers (tar indexes, CSV rows) and per-epoch selections a reader is using (a few at a time)."""

    def __init__(self, data: ExpertData, capacity: int = 4) -> None:
        self.data, self.capacity = data, capacity
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._picks: OrderedDict[tuple[int, int], list[tuple[str, int]]] = OrderedDict()

    def reader(self, shard: int) -> ShardReader:
        """Reader of ``shard`` (its tar index or its CSV rows)."""
        if shard in self._readers:
            self._readers.move_to_end(shard)
        else:
            self._readers[shard] = open_shard(self.data.shards[shard], self.data)
            if len(self._readers) > self.capacity:
                self._readers.popitem(last=False)[1].close()
        return self._readers[shard]

    tar = reader
    """Former name of :meth:`reader`."""

    def picks(self, shard: int, epoch: int) -> list[tuple[str, int]]:
        """(key, pair id) of the pairs of ``shard`` used in ``epoch``, in tar order."""
        if (shard, epoch) not in self._picks:
            chosen = self.data.selected(shard, epoch)
            reader = self.reader(shard)
            if isinstance(reader, StreamedShard):
                reader.select(chosen)
            missing = [k for k in chosen if k not in reader.members]
            if missing:
                raise ValueError(
                    f"train: {reader.path} lacks {'row' if isinstance(reader, CsvIndex) else 'member'} "
                    f"'{missing[0]}' listed by prep; the shard changed since prep ran (rerun prep)"
                )
            self._picks[(shard, epoch)] = [(k, chosen[k]) for k in reader.order if k in chosen]
            if len(self._picks) > self.capacity:
                self._picks.popitem(last=False)
        picks = self._picks[(shard, epoch)]
        reader = self.reader(shard)
        if isinstance(reader, StreamedShard):
            reader.hold(picks)  # a streamed shard evicted and reopened streams its pairs again
        return picks


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class SampleDecoder:
    """Raw members → (image tensor, caption) with per-visit seeded caption choice and augmentation."""

    transform: Callable
    seed: int
    image_keys: tuple[str, ...]
    caption_keys: tuple[str, ...]
    json_fields: tuple[str, ...]

    def __call__(self, raw: dict[str, bytes], epoch: int, pair_id: int) -> tuple[torch.Tensor, str]:
        """Decode one visit of a pair."""
        caption = self.caption(raw, epoch, pair_id)
        ext = next((e for e in (CSV_IMAGE, *self.image_keys) if e in raw), None)
        if ext is None:
            raise ValueError("no image member")
        with Image.open(io.BytesIO(raw[ext])) as img:
            image = img.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_seed_int(self.seed, _AUGMENT, epoch, pair_id))
            return self.transform(image), caption

    def caption(self, raw: dict[str, bytes], epoch: int, pair_id: int) -> str:
        """The caption of this visit: a string field, or one of a list drawn with a seeded RNG."""
        if CSV_CAPTION in raw:
            return raw[CSV_CAPTION].decode("utf-8").strip()
        for ext in self.caption_keys:
            if ext not in raw:
                continue
            text = raw[ext].decode("utf-8")
            if ext != "json":
                return text.strip()
            obj = json.loads(text)
            for name in self.json_fields:
                value = obj.get(name)
                if isinstance(value, str) and value.strip():
                    return value.strip()
                texts = (
                    [t for t in value if isinstance(t, str) and t.strip()] if isinstance(value, list) else []
                )
                if texts:
                    return random.Random(_seed_int(self.seed, _CAPTION, epoch, pair_id)).choice(texts).strip()
        raise ValueError("no caption member")


def _seed_int(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------- the iterable dataset


class ExpertStream(IterableDataset):
    """Endless batches of one rank (see the module docstring for the order).

    Args:
        data: The run's pairs.
        layout: Split, rank, world size, workers, per-rank batch size, shuffle window.
        decoder: Turns raw members into (image tensor, caption).
        tokenizer_name: open_clip model whose tokenizer encodes the captions (built in each worker).
        start_batch: Rank batches already consumed (resume): the stream starts after them.
    """

    def __init__(
        self,
        data: ExpertData,
        layout: StreamLayout,
        decoder: SampleDecoder,
        tokenizer_name: str,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.data, self.layout, self.decoder = data, layout, decoder
        self.tokenizer_name, self.start_batch = tokenizer_name, start_batch

    def order_for(self, slot: int) -> StreamOrder:
        """The stream read for rank batches ``j`` with ``j % workers == slot``."""
        lay = self.layout
        reader = lay.rank * lay.workers + slot if lay.split == "shards" else None
        return StreamOrder(self.data, reader, lay.readers, lay.shuffle_buffer)

    def positions(self, batch: int) -> range:
        """Stream positions of rank batch ``batch`` (in the stream of the worker that builds it)."""
        lay = self.layout
        if lay.split == "samples":
            start = batch * lay.global_batch + lay.rank * lay.batch_size
            return range(start, start + lay.batch_size)
        local = batch // lay.workers
        return range(local * lay.batch_size, (local + 1) * lay.batch_size)

    def batch_sources(self, batch: int, order: StreamOrder | None = None) -> list[tuple[int, int, int]]:
        """(epoch, shard, ordinal) of every pair of rank batch ``batch``, without reading anything."""
        order = order or self.order_for(batch % self.layout.workers)
        out = []
        for position in self.positions(batch):
            epoch, offset = order.locate(position)
            out.append((epoch, *order.source(epoch, offset)))
        return out

    def batch_pair_ids(self, batch: int, cache: ShardCache | None = None) -> list[int]:
        """Pair ids of rank batch ``batch`` (reads tar headers and tables, decodes nothing)."""
        cache = cache or ShardCache(self.data)
        return [cache.picks(s, e)[k][1] for e, s, k in self.batch_sources(batch)]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.layout.workers:
            raise RuntimeError(
                f"ExpertStream: layout says {self.layout.workers} workers, loader has {info.num_workers}"
            )
        lay = self.layout
        # The loader asks worker 0 first, so after a resume worker w builds the batches of slot
        # (start + w) % workers: batch j always comes from slot j % workers, resumed or not.
        batch = self.start_batch + worker
        order, cache = self.order_for(batch % lay.workers), ShardCache(self.data)
        tokenizer = _tokenizer(self.tokenizer_name)
        while True:
            yield self._build(batch, order, cache, tokenizer)
            batch += lay.workers

    def _build(self, batch: int, order: StreamOrder, cache: ShardCache, tokenizer: Callable) -> Batch:
        images, captions, ids = [], [], []
        for epoch, shard, ordinal in self.batch_sources(batch, order):
            key, pair_id = cache.picks(shard, epoch)[ordinal]
            try:
                image, caption = self.decoder(cache.reader(shard).read(key), epoch, pair_id)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                log.warning("skipping undecodable pair %d (%s/%s): %s", pair_id, shard, key, exc)
                continue
            images.append(image)
            captions.append(caption)
            ids.append(pair_id)
        if not images:
            raise RuntimeError(f"train: no decodable pair in batch {batch}")
        while len(images) < self.layout.batch_size:  # keep every rank's batch the same size
            images.append(images[0])
            captions.append(captions[0])
            ids.append(ids[0])
        return torch.stack(images), tokenizer(captions), torch.tensor(ids, dtype=torch.int64)


@lru_cache(maxsize=4)
def _tokenizer(name: str) -> Callable:
    import open_clip

    models.register_model_configs()
    with models.quiet_open_clip():
        return open_clip.get_tokenizer(name)


def build_loader(stream: ExpertStream, workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    """An iterator over the stream's batches, decoded in ``workers`` processes (0 = in-process)."""
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    return iter(loader)
