"""The trained CLIP models of a run (data experts, the seed, the baselines); loading and encoding are
``training/evaluation/clip.py``'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from training import runs

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the run."""

    name: str
    """Run name (``expert_<k>``, ``seed``, ``dense``, ``random_split_<k>``...): the output file stem."""
    column: str
    """Report column of the model alone: ``expert-<k>``, ``seed``, ``dense``..."""
    path: Path
    """Its ``final.pt``."""
    expert: int | None
    """Expert index, or None for the seed and baseline models."""


def expert_spec(cfg: PipelineConfig, k: int) -> ModelSpec:
    """Expert ``k``'s model."""
    name = runs.expert_name(k)
    return ModelSpec(name, f"expert-{k}", runs.final_path(cfg, name), k)


def seed_spec(cfg: PipelineConfig) -> ModelSpec:
    """The dense seed model the experts branch from (reported as ``seed``)."""
    return ModelSpec(runs.SEED, runs.SEED, runs.final_path(cfg, runs.SEED), None)


def run_spec(cfg: PipelineConfig, name: str) -> ModelSpec:
    """A baseline run's model (``dense``, ``random_split_<k>``...)."""
    return ModelSpec(name, name, runs.final_path(cfg, name), None)


def baseline_systems(cfg: PipelineConfig, num_experts: int) -> dict[str, list[str]]:
    """``{system: [run names]}`` of the baselines in the report: the configured ones (all required)
    and any other whose runs are all trained."""
    systems = {}
    for name in runs.BASELINES:
        members = runs.baseline_members(name, num_experts)
        if name in cfg.train.baselines or all(run_spec(cfg, m).path.is_file() for m in members):
            systems[name] = members
    return systems


def model_specs(cfg: PipelineConfig, num_experts: int) -> list[ModelSpec]:
    """Experts ``0..E-1`` and the configured baselines' runs (all required), the seed model when it
    has a ``final.pt``.

    Raises:
        FileNotFoundError: a model has no ``final.pt`` (one line saying how to train it).
    """
    specs = [expert_spec(cfg, k) for k in range(num_experts)]
    seen = set()
    for members in baseline_systems(cfg, num_experts).values():
        specs += [run_spec(cfg, m) for m in members if m not in seen]
        seen.update(members)
    for spec in specs:
        if not spec.path.is_file():
            target = spec.expert if spec.expert is not None else spec.name
            raise FileNotFoundError(
                f"ensemble: {spec.name} has no {spec.path}; train it with `make train EXPERT={target}`"
            )
    seed = seed_spec(cfg)
    return specs + ([seed] if seed.path.is_file() else [])
