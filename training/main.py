"""The ``train`` stage: the dense seed model, then one CLIP per coarse cluster (a data expert).

In-process (one rank; what ``python -m pipeline train --expert k|seed|all`` calls)::

    from training.main import train_experts
    train_experts(cfg, "all")

Data-parallel (NCCL on GPU, gloo on CPU; SLURM's srun environment works too)::

    torchrun --nproc_per_node=8 -m training.main --config configs/demo.yaml --expert 3 [--set k=v]
             [--resume latest|none|<path>]

Schedule (MoDE): the seed run trains steps ``[0, seed_steps)`` on all pairs into
``<run>/train/seed/``; expert ``k`` starts from the seed checkpoint at ``seed_steps`` (model,
optimizer, scaler, loss state; not the data position) and continues the same cosine schedule to
``train.steps`` on its cluster's pairs, in ``<run>/train/expert_<k>/``. The baselines of
``train.baselines`` (``dense`` by default; see :mod:`training.runs`) are runs of the same kind. A
finished run (``final.pt`` and ``manifest.json`` with the same config) is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.artifacts import (
    MANIFEST,
    git_sha,
    read_json,
    remove_stale_temps,
    write_json,
    write_text,
)
from pipeline.config import (
    ConfigError,
    PipelineConfig,
    add_config_args,
    config_hash,
    diff_keys,
    dump_yaml,
    load_config,
    to_jsonable,
)
from pipeline.errors import CorruptArtifactError, StageError
from pipeline.lineage import remember_invocation, suggest
from pipeline.runtime import Runtime, barrier, broadcast_object, init_distributed, set_cpu_threads
from training import checkpoint as ckpt
from training import lineage, runs
from training.data import num_experts
from training.launch import run_entry
from training.loop import RunSpec
from training.models import create_model
from training.setup import Restore, build_trainer

log = logging.getLogger("training")

OPERATIONAL_KEYS = frozenset(
    {
        "workers",
        "save_every",
        "keep_last",
        "log_every",
        "eval_every",
        "eval_tasks",
        "device",
        "grad_checkpointing",
        "baselines",
    }
)
"""Train keys that do not change what a run computes (changing them never invalidates a run)."""


# --------------------------------------------------------------------------- runs and their identity


def seed_spec(cfg: PipelineConfig) -> RunSpec:
    """The dense seed run: steps ``[0, seed_steps)`` on every pair."""
    return runs.spec_for(cfg, runs.SEED, 0)


def run_identity(cfg: PipelineConfig, spec: RunSpec) -> dict[str, Any]:
    """The config values (and upstream artifacts) that define what a run computes."""
    cfg = runs.config_for(cfg, spec)
    train = {k: v for k, v in to_jsonable(cfg.train).items() if k not in OPERATIONAL_KEYS}
    if spec.expert is None:
        train.pop("ooc_ratio")
    identity = {
        "train": train,
        "loss": to_jsonable(cfg.loss),
        "seed": cfg.run.seed,
        "expert": spec.expert,
    }
    uses_assign = spec.expert is not None
    identity.update(lineage.upstream_identity(cfg, uses_assign=uses_assign, from_seed=runs.branches_from_seed(spec, cfg)))
    if spec.name not in (runs.SEED, runs.expert_name(spec.expert or 0)):
        identity["run"] = {"name": spec.name, "partition": spec.partition, "variant": spec.data_variant}
    return identity


def _finished(spec: RunSpec) -> dict[str, Any] | None:
    path = spec.run_dir / MANIFEST
    if path.is_file() and (spec.run_dir / ckpt.FINAL).is_file():
        return read_json(path)
    return None


def _changed(saved: dict[str, Any], now: dict[str, Any], cfg: PipelineConfig | None = None) -> str:
    keys = diff_keys(saved, now)
    if cfg is None:
        return ", ".join(keys[:8]) or "unknown"
    return lineage.describe(cfg, keys)


def seed_checkpoint(cfg: PipelineConfig, name: str) -> Path | None:
    """The seed checkpoint run ``name`` branches from (None when ``seed_steps`` is 0).

    Raises:
        StageError: the seed run is missing, unfinished or was made with another config.
    """
    if cfg.train.seed_steps == 0:
        return None
    spec = seed_spec(cfg)
    done = _finished(spec)
    identity = run_identity(cfg, spec)
    if done is None:
        raise StageError(
            f"train/{name} starts from the seed model at step {cfg.train.seed_steps}, which is not trained: "
            f"run {suggest(cfg, 'train --expert seed')} first (or --expert all)"
        )
    if done.get("config_hash") != config_hash(identity):
        raise StageError(
            f"train/seed was trained with another config (changed: {_changed(done.get('identity', {}), identity, cfg)}); "
            f"retrain it with {suggest(cfg, 'train --expert seed --resume none')}"
        )
    path = ckpt.checkpoint_path(spec.run_dir, cfg.train.seed_steps)
    if not path.is_file():
        raise StageError(f"train/seed: {path} is missing; retrain the seed with --expert seed --resume none")
    return path


# --------------------------------------------------------------------------- one run


def _clear_run(spec: RunSpec) -> None:
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(spec.run_dir / name, ignore_errors=True)
    for name in (ckpt.FINAL, MANIFEST, "metrics.jsonl"):
        (spec.run_dir / name).unlink(missing_ok=True)


def choose_restore(spec: RunSpec, ctx: Runtime, resume: str, identity: dict[str, Any]) -> Restore:
    """Which checkpoint the run starts from (``latest``, ``none`` or a path), checked for resumability."""
    path: Path | None = None
    if resume == "none":
        if ctx.is_main:
            _clear_run(spec)
        barrier(ctx)
    elif resume == "latest":
        path = broadcast_object(ctx, ckpt.latest_checkpoint(spec.run_dir))
    else:
        path = Path(resume)
    if path is None:
        if spec.branch_from is None:
            return Restore()
        return Restore(ckpt.load_checkpoint(spec.branch_from, "train/seed"), spec.branch_from, resume=False)
    state = ckpt.load_checkpoint(path)
    ckpt.check_world_size(state, ctx.world_size, path)
    if state.get("identity_hash") != config_hash(identity):
        message = f"{path} was written with another config (changed: {_changed(state.get('identity', {}), identity)})"
        if resume == "latest":
            raise StageError(
                f"train/{spec.name}: {message}; --resume none starts over, --resume <path> continues anyway"
            )
        log.warning("%s; continuing as asked", message)
    return Restore(state, path, resume=True)


def _warn_branch_world_size(restore: Restore, ctx: Runtime) -> None:
    if restore.state is not None and not restore.resume and restore.state.get("world_size") != ctx.world_size:
        log.warning(
            "the seed ran with %s process(es), this expert with %d: the global batch changes at the branch",
            restore.state.get("world_size"),
            ctx.world_size,
        )


def _finalize(
    cfg: PipelineConfig,
    spec: RunSpec,
    ctx: Runtime,
    model,
    identity: dict[str, Any],
    summary: dict[str, Any],
) -> None:
    if not ctx.is_main:
        return
    ckpt.export_final(spec.run_dir, model)
    write_json(
        spec.run_dir / MANIFEST,
        {
            "stage": "train",
            "run": spec.name,
            "expert": spec.expert,
            "model": cfg.train.model,
            "final": ckpt.FINAL,
            "start_step": spec.start_step,
            "step": spec.end_step,
            "branch_from": str(spec.branch_from) if spec.branch_from else None,
            "config_hash": config_hash(identity),
            "identity": identity,
            "world_size": ctx.world_size,
            **lineage.manifest_fields(cfg, uses_assign=spec.expert is not None),
            "git_sha": git_sha(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **summary,
        },
    )


def _export_branch_only(
    cfg: PipelineConfig, spec: RunSpec, ctx: Runtime, restore: Restore, identity: dict[str, Any]
) -> dict[str, Any]:
    """A run with no steps of its own (seed_steps == steps) is the seed model."""
    bundle = create_model(cfg.train.model, "", "cpu")
    if restore.state is not None:
        bundle.model.load_state_dict(restore.state["model"])
    _finalize(cfg, spec, ctx, bundle.model, identity, {"seconds": 0.0, "global_batch": 0, "zeroshot": {}})
    return {"run": spec.name, "state": "done", "step": spec.end_step}


def _skip_finished(
    spec: RunSpec, ctx: Runtime, resume: str, identity: dict[str, Any], cfg: PipelineConfig | None = None
) -> dict[str, Any] | None:
    """The result of a finished run with the same config (None when it has to run)."""
    done = _finished(spec)
    if done is None or resume != "latest":
        return None
    if done.get("config_hash") != config_hash(identity):
        target = "seed" if spec.expert is None else spec.expert
        raise StageError(
            f"train/{spec.name}: finished with another config or upstream (changed: "
            f"{_changed(done.get('identity', {}), identity, cfg)}); retrain with "
            f"{suggest(cfg, f'train --expert {target} --resume none') if cfg else '--resume none'}"
        )
    if ctx.is_main:
        print(f"train/{spec.name}: nothing to do (finished at step {done.get('step')})")
    return {"run": spec.name, "state": "skipped", "step": done.get("step")}


def _train(
    cfg: PipelineConfig,
    spec: RunSpec,
    ctx: Runtime,
    restore: Restore,
    identity: dict[str, Any],
    progress: bool,
    stop_at_step: int | None,
) -> dict[str, Any]:
    """Build the trainer, run it, export the final model when the run is complete."""
    extra = {
        "config": to_jsonable(cfg),
        "identity": identity,
        "identity_hash": config_hash(identity),
        "git_sha": git_sha(),
    }
    trainer = build_trainer(cfg, spec, ctx, restore, extra, progress)
    began = time.perf_counter()
    state = trainer.train(stop_at_step)
    trainer.close()
    complete = state.step >= spec.end_step
    if complete:
        summary = {
            "seconds": round(time.perf_counter() - began, 3),
            "global_batch": trainer.global_batch,
            "samples_seen": state.batches * trainer.global_batch,
            "zeroshot": state.last_eval,
        }
        _finalize(cfg, spec, ctx, trainer.model, identity, summary)
    barrier(ctx)
    return {"run": spec.name, "state": "done" if complete else "partial", "step": state.step}


def train_run(
    cfg: PipelineConfig,
    spec: RunSpec,
    ctx: Runtime,
    *,
    resume: str = "latest",
    progress: bool = True,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Train (or skip, or resume) one run; returns ``{"run", "state", "step"}``."""
    identity = run_identity(cfg, spec)
    cfg = runs.config_for(cfg, spec)
    if resume == "latest":
        lineage.check_upstream(cfg, spec.name, uses_assign=spec.expert is not None, done=_finished(spec))
    skipped = _skip_finished(spec, ctx, resume, identity, cfg)
    if skipped is not None:
        return skipped
    if ctx.is_main:  # rank 0 is this run's only writer: temporary files here are a killed run's
        remove_stale_temps(spec.run_dir)
    restore = choose_restore(spec, ctx, resume, identity)
    _warn_branch_world_size(restore, ctx)
    if ctx.is_main:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(spec.run_dir / "config.yaml", dump_yaml(cfg))
    if spec.start_step >= spec.end_step and not restore.resume:
        return _export_branch_only(cfg, spec, ctx, restore, identity)
    return _train(cfg, spec, ctx, restore, identity, progress, stop_at_step)


# --------------------------------------------------------------------------- entry points


def _spec(cfg: PipelineConfig, name: str, num_experts: int) -> RunSpec:
    spec = runs.spec_for(cfg, name, num_experts)
    if runs.branches_from_seed(spec, cfg):
        return dataclasses.replace(spec, branch_from=seed_checkpoint(cfg, name))
    return spec


def train_experts(
    cfg: PipelineConfig,
    expert: str | int,
    *,
    resume: str = "latest",
    progress: bool = True,
    stop_at_step: int | None = None,
) -> list[dict[str, Any]]:
    """Train the seed model, experts and baselines (see :mod:`training.runs` for the names).

    Args:
        cfg: Pipeline config (``train`` and ``loss`` sections; prep and assign must have run).
        expert: ``"seed"``, an expert index, ``"experts"``, a baseline (``"dense"``,
            ``"random_split"``, ``"random_split_2"``...), ``"baselines"`` or ``"all"`` (the seed,
            every expert, then the configured baselines). Checked before anything is written.
        resume: ``latest`` (continue from the newest checkpoint; skip finished runs), ``none``
            (start over) or a checkpoint path (single run only).
        progress: tqdm bar on rank 0.
        stop_at_step: Stop (after checkpointing) once this global step is reached, e.g. to fit a
            time slot; a later call resumes.

    Returns:
        One ``{"run", "state", "step"}`` per run (state ``done``, ``partial`` or ``skipped``).
    """
    e = num_experts(cfg)
    targets = runs.parse_targets(cfg, expert, e)
    if resume not in ("latest", "none") and len(targets) > 1:
        raise ConfigError("--resume <path> needs a single run (--expert seed, an index or one baseline run)")
    ctx = init_distributed(cfg.train.device, cfg.train.precision)
    set_cpu_threads(ctx, cfg.train.workers)
    results = []
    for target in targets:
        if target == runs.SEED and cfg.train.seed_steps == 0:
            if ctx.is_main and str(expert) == runs.SEED:
                print("train/seed: nothing to do (train.seed_steps is 0: experts start from scratch)")
            continue
        spec = _spec(cfg, target, e)
        results.append(train_run(cfg, spec, ctx, resume=resume, progress=progress, stop_at_step=stop_at_step))
        if target == runs.SEED and results[-1]["state"] == "partial":
            break
    return results


def training_status(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One status row per run: ``{"stage": "train/expert_0", "state", "shards_done", "shards_total"}``.

    ``shards_done`` / ``shards_total`` are steps (the latest checkpoint / the run's last step).
    Rows: the seed, every expert and every configured baseline run.
    """
    e = num_experts(cfg)
    rows = []
    for name in runs.run_names(cfg, e):
        spec = runs.spec_for(cfg, name, e)
        done = _finished(spec)
        latest = ckpt.list_checkpoints(spec.run_dir)
        row = {"stage": f"train/{spec.name}", "shards_total": spec.end_step}
        if done is not None:
            row.update(state="done", shards_done=done.get("step", spec.end_step))
            row.update(_run_staleness(cfg, spec, done))
        elif latest:
            row.update(state="partial", shards_done=latest[-1][0])
        else:
            row.update(state="not started", shards_done=0)
        rows.append(row)
    return rows


def _run_staleness(cfg: PipelineConfig, spec: RunSpec, done: dict[str, Any]) -> dict[str, Any]:
    """``{"state": "stale", "stale": 1, "detail": why}`` for a stale finished run, a growth ``note``, or {}."""
    uses_assign = spec.expert is not None
    try:
        identity = run_identity(cfg, spec)
    except FileNotFoundError as exc:
        return {"state": "stale", "stale": 1, "detail": str(exc).split(";")[0]}
    reason = lineage.upstream_stale(cfg, uses_assign=uses_assign)
    if not reason and done.get("config_hash") != config_hash(identity):
        reason = "changed: " + lineage.describe(cfg, diff_keys(done.get("identity", {}), identity), done)
    data_reason, note = lineage.data_state(cfg, done)
    reason = reason or data_reason
    if reason:
        return {"state": "stale", "stale": 1, "detail": reason}
    return {"note": note} if note else {}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m training.main`` (torchrun form of ``python -m pipeline train``)."""
    p = argparse.ArgumentParser(prog="torchrun ... -m training.main", description=__doc__.split("\n")[0])
    add_config_args(p, default=None)
    p.add_argument(
        "--expert",
        default="0",
        help="expert index, 'seed', 'experts', a baseline (dense, random_split, ...), 'baselines' or 'all' (default 0)",
    )
    p.add_argument("--resume", default="latest", help="'latest' (default), 'none' or a checkpoint path")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.main``; returns the exit code."""
    args = build_parser().parse_args(argv)

    def train() -> None:
        cfg = remember_invocation(load_config(args.config, args.overrides), args.config, args.overrides)
        train_experts(cfg, args.expert, resume=args.resume, progress=not args.quiet, stop_at_step=args.stop_at_step)

    return run_entry(train, (ConfigError, StageError, FileNotFoundError, CorruptArtifactError))


if __name__ == "__main__":
    sys.exit(main())
