"""``embed`` stage: caption Parquet → caption features, one ``.npy`` per prep shard.

Outputs in ``<run>/embed/``:

* ``features/<shard>.npy``: ``[n, dim]`` float16 (or float32, ``embed.dtype``); row ``i`` is the
  caption in row ``i`` of ``<run>/prep/captions/<shard>.parquet``, so pair ids align.
* ``manifest.json``: ``model``, ``model_path``, ``dim``, ``normalize`` (whether rows are unit-norm),
  ``dtype``, ``pooling``, ``precision``, ``max_seq_length``, ``outputs`` (in prep order), ``num_pairs``,
  ``empty_captions``, ``truncated``.

Empty captions still get a row (the embedding of ``""``) and are counted; captions longer than the
model's token limit are cut and counted. Device and batch size are runtime choices, not part of the
config hash: they do not change what the features mean.

Multi-GPU (or multi-process CPU)::

    torchrun --nproc_per_node=N -m stages.embed --config configs/demo.yaml [--set k=v ...]

Each rank takes every N-th shard on ``cuda:<local_rank>`` (CPU when there is no GPU); after a
barrier rank 0 writes the manifest. The features do not depend on N. Device, precision and progress
bars come as a :class:`pipeline.runtime.Runtime` argument (built once by the entry point).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts
from pipeline.config import PipelineConfig, to_jsonable
from pipeline.distributed import torchrun_stage
from pipeline.errors import StageError
from pipeline.runner import Shard
from pipeline.runtime import Runtime, local_world_size
from pipeline.safeload import read_parquet
from stages import text_encoder

log = logging.getLogger("pipeline")

_RUNTIME_KEYS = ("device", "batch_size")
"""Embed settings that do not change the features' meaning, so are kept out of the config hash."""


# --------------------------------------------------------------------------- stage contract


UPSTREAM = ("prep",)
"""Stages whose manifests this stage consumes."""


def hash_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The embed section minus runtime choices (device, batch size), keyed like ``--set embed.*``."""
    section = to_jsonable(cfg.embed)
    return {"embed": {k: v for k, v in section.items() if k not in _RUNTIME_KEYS}}


def prep_dir(cfg: PipelineConfig) -> Path:
    """``<run>/prep``: where the caption files come from."""
    return cfg.run_dir / "prep"


def features_path(stage_dir: Path, shard: str) -> Path:
    """Feature file of one shard."""
    return stage_dir / "features" / f"{shard}.npy"


def list_shards(cfg: PipelineConfig, stage_dir: Path) -> list[Shard]:
    """One shard per caption file of the prep manifest, fingerprinted by that file.

    Raises:
        FileNotFoundError: prep has not finished, or the embed model is not on this machine.
    """
    text_encoder.resolve_model_path(cfg.embed.model)  # fail before any work, with one line
    pdir = prep_dir(cfg)
    manifest = artifacts.read_manifest(pdir, "prep")
    shards = []
    digests = artifacts.DigestCache(stage_dir)
    for rel in manifest["outputs"]:
        path = pdir / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"embed: prep output {path} is missing; rerun `python -m pipeline prep --force`"
            )
        shards.append(Shard(Path(rel).stem, digests.fingerprint(path), {"captions": str(path)}))
    digests.save()
    return shards


def process_shard(cfg: PipelineConfig, shard: Shard, stage_dir: Path, runtime: Runtime) -> dict[str, Any]:
    """Embed one caption file into ``features/<shard>.npy`` on ``runtime``'s device and precision;
    return counts and model facts."""
    captions = read_parquet(shard.inputs["captions"], "embed", ["caption"]).column("caption").to_pylist()
    texts = ["" if c is None else c for c in captions]
    empty = sum(1 for t in texts if not t.strip())
    encoder = _encoder(cfg, runtime)
    result = encoder.encode(
        texts,
        batch_size=cfg.embed.batch_size,
        precision=runtime.precision,
        normalize=cfg.embed.normalize,
        max_length=cfg.embed.max_seq_length,
        progress=_progress(runtime),
        desc=f"embed {shard.name}",
    )
    with artifacts.atomic_path(features_path(stage_dir, shard.name)) as tmp, open(tmp, "wb") as fh:
        # A file handle, not a name: np.save would append ".npy" to the temporary name.
        np.save(fh, result.features.astype(cfg.embed.dtype, copy=False))
    return {
        "in": len(texts),
        "out": len(texts),
        "skipped": {},
        "empty_caption": empty,
        "truncated": result.truncated,
        "dim": encoder.dim,
        "normalized": bool(cfg.embed.normalize or encoder.normalizes),
        "max_seq_length": encoder.effective_max_length(cfg.embed.max_seq_length),
        "precision": runtime.precision,
        "device": str(encoder.device),
    }


def finalize(cfg: PipelineConfig, stage_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Check the feature files against prep and return the manifest fields."""
    pmanifest = artifacts.read_manifest(prep_dir(cfg), "prep")
    names = [Path(rel).stem for rel in pmanifest["outputs"]]
    by_shard = {r["shard"]: r for r in records}
    dims = {int(r["dim"]) for r in records}
    if len(dims) > 1:
        raise StageError(f"embed: shards have different feature sizes {sorted(dims)}; rerun with --force")
    dim = dims.pop() if dims else text_encoder.load_text_model(cfg.embed.model, pooling=cfg.embed.pooling).dim
    total = 0
    for name in names:
        shape = np.load(features_path(stage_dir, name), mmap_mode="r").shape
        if shape != (by_shard[name]["out"], dim):
            raise StageError(
                f"embed: {name}.npy has shape {shape}, expected ({by_shard[name]['out']}, {dim})"
            )
        total += shape[0]
    if total != pmanifest.get("num_pairs", total):
        raise StageError(
            f"embed: {total} feature rows but prep has {pmanifest['num_pairs']} pairs; rerun with --force"
        )
    return {
        "model": cfg.embed.model,
        "model_path": str(text_encoder.resolve_model_path(cfg.embed.model)),
        "dim": dim,
        "normalize": all(r.get("normalized", cfg.embed.normalize) for r in records),
        "dtype": cfg.embed.dtype,
        "pooling": cfg.embed.pooling,
        "precision": sorted({r.get("precision", "") for r in records}),
        "max_seq_length": max((int(r.get("max_seq_length", 0)) for r in records), default=0),
        "outputs": [str(features_path(stage_dir, n).relative_to(stage_dir)) for n in names],
        "num_pairs": total,
        "empty_captions": sum(int(r.get("empty_caption", 0)) for r in records),
        "truncated": sum(int(r.get("truncated", 0)) for r in records),
    }


def load_features(stage_dir: str | Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The embed manifest and its feature arrays (memory-mapped), in pair-id order."""
    stage_dir = Path(stage_dir)
    manifest = artifacts.read_manifest(stage_dir, "embed")
    return manifest, [np.load(stage_dir / rel, mmap_mode="r") for rel in manifest["outputs"]]


# --------------------------------------------------------------------------- runtime


def _progress(runtime: Runtime) -> bool | None:
    """The per-shard captions/s bar: as the runtime says, else on a terminal and in-process only."""
    if runtime.progress is not None:
        return runtime.progress
    # Several pool workers writing bars to one terminal garble it; the runner's shard bar suffices.
    return False if multiprocessing.parent_process() is not None else None


def _encoder(cfg: PipelineConfig, runtime: Runtime) -> text_encoder.TextEncoder:
    if runtime.device.type == "cpu":
        _share_cores(cfg)
    return text_encoder.load_text_model(cfg.embed.model, device=runtime.device, pooling=cfg.embed.pooling)


def _share_cores(cfg: PipelineConfig) -> None:
    """Share the cores among pool workers / local ranks instead of oversubscribing them."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = local_world_size()
    if multiprocessing.parent_process() is not None:
        procs *= max(1, cfg.run.workers)
    if procs > 1:
        torch.set_num_threads(max(1, cores // procs))


# --------------------------------------------------------------------------- torchrun entry point


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun entry: each rank embeds its stride of shards; rank 0 then writes the manifest."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return torchrun_stage("embed", list(argv) if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
