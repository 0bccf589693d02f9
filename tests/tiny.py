"""The tiny chain settings the end-to-end tests share (demo data of 240 pairs, micro ViT, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import PipelineConfig, dump_yaml, load_config


def tiny_overrides(**changes: object) -> list[str]:
    """``--set`` overrides for a chain that runs in seconds; ``changes`` replace or add keys
    (``train__steps=8`` sets ``train.steps``)."""
    sets: dict[str, object] = {
        "demo_data.num_pairs": 240,
        "demo_data.pairs_per_shard": 60,
        "demo_data.eval_per_class": 2,
        "demo_data.retrieval_pairs": 16,
        "demo_data.image_size": 32,
        "run.workers": 1,
        "cluster.num_fine": 8,
        "cluster.num_experts": 2,
        "train.model": "mode-micro-vit",
        "train.batch_size": 8,
        "train.steps": 6,
        "train.seed_steps": 4,
        "train.warmup": 1,
        "train.workers": 0,
        "train.save_every": 2,
        "train.log_every": 2,
        "train.eval_every": 0,
        "train.precision": "fp32",
        "ensemble.batch_size": 16,
        "ensemble.bootstrap_resamples": 200,
        "train.baselines": "[dense, random_split]",
    }
    sets.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"{key}={value}" for key, value in sets.items()]


def fresh_run(base: object, tmp_path: Path, *overrides: str) -> tuple[PipelineConfig, Path]:
    """A copy of ``base``'s untrained run (prep + assign) under ``tmp_path``, with extra overrides;
    ``base`` is a ``training.synthetic.make_synthetic_run`` result. Returns (config, its yaml)."""
    src = base.cfg.run_dir
    for stage in ("prep", "assign"):
        shutil.copytree(src / stage, tmp_path / "runs" / src.name / stage)
    config = tmp_path / "config.yaml"
    config.write_text(dump_yaml(base.cfg))
    return load_config(config, [f"run.root={tmp_path / 'runs'}", *overrides]), config
