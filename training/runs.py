"""The training runs of a pipeline run: names, folders, what data each sees, its span of the schedule.

Runs (each a folder ``<run>/train/<name>/``):

* ``seed``: the dense seed model, steps ``[0, seed_steps)`` on every pair;
* ``expert_<k>``: data expert ``k``, from the seed checkpoint, steps ``[seed_steps, steps)`` on
  coarse cluster ``k`` (plus ``train.ooc_ratio`` of the other pairs);
* baselines (``train.baselines``), the systems the experts are compared with:

  ``dense``
      the seed continued on every pair to ``train.steps``: the same steps, schedule and per-model
      compute as each expert (MoDE's dense baseline at equal per-model compute);
  ``dense_equal_compute``
      one dense model trained from scratch for the experts' *total* budget,
      ``seed_steps + E * (steps - seed_steps)`` steps, its cosine schedule over that horizon;
  ``random_split`` (``random_split_<k>``)
      MoDE's "Random-E": E experts from the seed on a random partition of the pairs with exactly
      the cluster sizes (``train/random_split/partition/``), combined uniformly;
  ``full_ensemble`` (``dense`` + ``full_ensemble_<k>``, k = 1..E-1)
      MoDE's "Full-E": E dense continuations from the seed with different data orders, averaged;
      its first member is the ``dense`` run itself.

The ``--expert`` argument of ``python -m pipeline train`` / ``training.main`` names targets:
``seed``, an expert index ``k`` (or ``expert_<k>``), ``experts`` (all experts), a baseline
(``dense``, ``random_split``, ``random_split_<k>``, ...), ``baselines`` (every configured one) or
``all`` (the seed, every expert, then the configured baselines).

This module is the one place that knows the layout ``<run>/train/<name>/`` and the run names; the
launcher, ``pipeline status``, the ensemble and the Makefile ask it (``python -m training.runs
--config <yaml> <name>`` prints a run's folder). It imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import PipelineConfig, add_config_args, load_config
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from training.loop import RunSpec

SEED = "seed"
EXPERT_PREFIX = "expert_"
FINAL = "final.pt"
"""The finished model of a run, in its folder."""
BASELINES: tuple[str, ...] = ("dense", "dense_equal_compute", "random_split", "full_ensemble")
"""Baseline systems ``train.baselines`` may name."""


def train_dir(cfg: PipelineConfig) -> Path:
    """``<run>/train``."""
    return cfg.run_dir / "train"


def run_dir(cfg: PipelineConfig, name: str) -> Path:
    """``<run>/train/<name>``: the folder of run ``name`` (``seed``, ``expert_<k>``, ``dense``...)."""
    return train_dir(cfg) / name


def final_path(cfg: PipelineConfig, name: str) -> Path:
    """The finished model of run ``name``: ``<run>/train/<name>/final.pt``."""
    return run_dir(cfg, name) / FINAL


def expert_name(k: int) -> str:
    """Folder / run name of expert ``k``."""
    return f"{EXPERT_PREFIX}{k}"


def expert_index(name: str) -> int | None:
    """``k`` of an ``expert_<k>`` run name, None for any other run."""
    tail = name.removeprefix(EXPERT_PREFIX)
    return int(tail) if name.startswith(EXPERT_PREFIX) and tail.isdigit() else None


def short_label(name: str) -> str:
    """The launcher's label of a run: ``expert_3`` → ``3``; the seed and baselines keep their name."""
    return name.removeprefix(EXPERT_PREFIX)


def from_label(label: str) -> str:
    """The run name of a launcher label: ``3`` → ``expert_3`` (inverse of :func:`short_label`)."""
    return expert_name(int(label)) if label.isdigit() else label


def equal_compute_steps(cfg: PipelineConfig, num_experts: int) -> int:
    """Steps of ``dense_equal_compute``: the seed's plus every expert's continuation."""
    return cfg.train.seed_steps + num_experts * (cfg.train.steps - cfg.train.seed_steps)


def baseline_members(name: str, num_experts: int) -> list[str]:
    """The runs a baseline system is made of (``full_ensemble``'s first member is ``dense``)."""
    if name == "random_split":
        return [f"random_split_{k}" for k in range(num_experts)]
    if name == "full_ensemble":
        return ["dense"] + [f"full_ensemble_{k}" for k in range(1, num_experts)]
    if name in BASELINES:
        return [name]
    raise ConfigError(f"train.baselines: unknown baseline '{name}' (known: {', '.join(BASELINES)})")


def baseline_runs(cfg: PipelineConfig, num_experts: int, names: list[str] | None = None) -> list[str]:
    """Every run of the configured (or given) baselines, each once, in a stable order."""
    runs: list[str] = []
    for name in cfg.train.baselines if names is None else names:
        runs += [r for r in baseline_members(name, num_experts) if r not in runs]
    return runs


def run_names(cfg: PipelineConfig, num_experts: int) -> list[str]:
    """Every run of the pipeline run: seed (when ``seed_steps`` > 0), experts, configured baselines."""
    seed = [SEED] if cfg.train.seed_steps > 0 else []
    return seed + [expert_name(k) for k in range(num_experts)] + baseline_runs(cfg, num_experts)


def _split_index(name: str, prefix: str, num_experts: int, low: int = 0) -> int | None:
    if not name.startswith(prefix):
        return None
    tail = name[len(prefix) :]
    if not tail.isdigit() or not low <= int(tail) < num_experts:
        return -1
    return int(tail)


def spec_for(
    cfg: PipelineConfig, name: str, num_experts: int, branch_from: Path | None = None
) -> RunSpec:
    """The :class:`RunSpec` of run ``name`` (``branch_from``: the seed checkpoint it starts from)."""
    from training.loop import RunSpec  # torch; this module stays importable without it

    steps, seed_steps = cfg.train.steps, cfg.train.seed_steps
    start = seed_steps if seed_steps > 0 else 0
    folder = run_dir(cfg, name)
    if name == SEED:
        return RunSpec(SEED, None, folder, 0, seed_steps)
    for prefix, partition in ((EXPERT_PREFIX, "assign"), ("random_split_", "random_split")):
        k = _split_index(name, prefix, num_experts)
        if k is not None and k >= 0:
            return RunSpec(name, k, folder, start, steps, branch_from, partition=partition)
    if name == "dense":
        return RunSpec(name, None, folder, start, steps, branch_from)
    k = _split_index(name, "full_ensemble_", num_experts, low=1)
    if k is not None and k >= 1:
        return RunSpec(name, None, folder, start, steps, branch_from, data_variant=k)
    if name == "dense_equal_compute":
        total = equal_compute_steps(cfg, num_experts)
        return RunSpec(name, None, folder, 0, total, None, schedule_steps=total)
    raise ConfigError(f"--expert {name}: no such run (runs: {', '.join(run_names(cfg, num_experts))})")


def branches_from_seed(spec: RunSpec, cfg: PipelineConfig) -> bool:
    """True when the run continues from the seed checkpoint (every run but seed and
    ``dense_equal_compute``, when ``train.seed_steps`` > 0)."""
    return cfg.train.seed_steps > 0 and spec.name != SEED and spec.schedule_steps is None


def config_for(cfg: PipelineConfig, spec: RunSpec) -> PipelineConfig:
    """The config a run trains with: ``dense_equal_compute`` has its own horizon and no seed."""
    if spec.schedule_steps is None:
        return cfg
    train = dataclasses.replace(cfg.train, steps=spec.schedule_steps, seed_steps=0)
    return dataclasses.replace(cfg, train=train)


def parse_targets(cfg: PipelineConfig, expert: str | int, num_experts: int) -> list[str]:
    """Run names asked for by ``--expert`` (see the module docstring), checked before anything runs.

    Raises:
        ConfigError: an unknown name or an expert index out of range (one line).
    """
    text = str(expert).strip()
    experts = [expert_name(k) for k in range(num_experts)]
    if text == "all":
        return run_names(cfg, num_experts)
    if text == SEED:
        return [SEED]
    if text == "experts":
        return experts
    if text == "baselines":
        return baseline_runs(cfg, num_experts)
    if text in BASELINES:
        return baseline_members(text, num_experts)
    if text.lstrip("-").isdigit():
        if not 0 <= int(text) < num_experts:
            raise ConfigError(f"--expert {text}: out of range; the run has experts 0..{num_experts - 1}")
        return [expert_name(int(text))]
    try:
        spec_for(cfg, text, num_experts)
    except ConfigError:
        raise ConfigError(
            f"--expert {text}: expected an expert index in [0, {num_experts}), 'seed', 'experts', "
            f"'baselines', 'all' or a baseline run ({', '.join(BASELINES)}, random_split_<k>, ...)"
        ) from None
    return [text]


def main(argv: list[str] | None = None) -> int:
    """``python -m training.runs --config <yaml> [name ...]``: print each run's folder (default ``<run>/train``)."""
    p = argparse.ArgumentParser(prog="python -m training.runs", description=main.__doc__)
    add_config_args(p, default=None)
    p.add_argument("names", nargs="*", help="run names (seed, expert_<k>, dense, ...)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in [run_dir(cfg, n) for n in args.names] or [train_dir(cfg)]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
