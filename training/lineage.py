"""Lineage of train runs: what a run consumed, and whether that is still what the run folder holds.

Generic over every run under ``<run>/train/<name>/`` (the seed, ``expert_<k>``, baselines): a run
declares whether it reads the cluster assignment (``uses_assign``) and whether it continues from the
seed checkpoint (``from_seed``). Its identity (hashed into the run's ``config_hash``) then holds

* ``prep``: the prep manifest's lineage digest (its config chain; not the shard listing);
* ``assign``: the assign manifest's lineage digest (config chain + the centres' content digest);
* ``seed_checkpoint``: the content digest of the seed checkpoint it branched from;

and its manifest records ``consumed`` (the upstream shard fingerprints it trained on) and
``upstream_lineage`` (the upstream lineage blocks, to name what changed). A changed digest or a
consumed shard whose content changed or vanished makes the run stale; shards added since only
make it *grown* (docs/growth.md), never stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import artifacts, lineage
from pipeline.config import PipelineConfig
from training import runs

UPSTREAM_KEYS = ("prep", "assign", "seed_checkpoint")
"""Identity keys that name an upstream artifact rather than a config value."""


def _manifest(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    return artifacts.read_manifest(cfg.run_dir / stage, stage)


def _stage_digest(manifest: dict[str, Any]) -> str:
    # Manifests written before lineage existed (or by hand) fall back to their config hash.
    return manifest.get("lineage_digest") or manifest.get("config_hash", "")


def seed_checkpoint_path(cfg: PipelineConfig) -> Path:
    """The seed checkpoint every run that continues from the seed starts from."""
    return runs.run_dir(cfg, runs.SEED) / "checkpoints" / f"step_{cfg.train.seed_steps}.pt"


def seed_digest(cfg: PipelineConfig) -> str:
    """Content digest of the seed checkpoint ('missing' before the seed is trained)."""
    path = seed_checkpoint_path(cfg)
    if not path.is_file():
        return "missing"
    cache = artifacts.DigestCache(runs.train_dir(cfg))
    digest = cache.digest(path)
    cache.save()
    return digest


def upstream_identity(cfg: PipelineConfig, *, uses_assign: bool, from_seed: bool) -> dict[str, str]:
    """The upstream part of a run's identity (see the module docstring).

    Raises:
        FileNotFoundError: prep (or assign) has not finished.
    """
    identity = {"prep": _stage_digest(_manifest(cfg, "prep"))}
    if uses_assign:
        identity["assign"] = _stage_digest(_manifest(cfg, "assign"))
    if from_seed and cfg.train.seed_steps > 0:
        identity["seed_checkpoint"] = seed_digest(cfg)
    return identity


def data_stage(uses_assign: bool) -> str:
    """The stage whose shards a run reads: assign for cluster-filtered runs, else prep."""
    return "assign" if uses_assign else "prep"


def manifest_fields(cfg: PipelineConfig, *, uses_assign: bool) -> dict[str, Any]:
    """Fields a finished run adds to its manifest: ``consumed`` shards and ``upstream_lineage``."""
    stage = data_stage(uses_assign)
    fields: dict[str, Any] = {"consumed": {stage: _manifest(cfg, stage).get("inputs", {})}}
    fields["upstream_lineage"] = {
        s: _manifest(cfg, s).get("lineage", {}) for s in ("prep", "assign")[: 1 + uses_assign]
    }
    return fields


def describe(cfg: PipelineConfig, keys: list[str], saved_manifest: dict[str, Any] | None = None) -> str:
    """Changed identity keys in words: ``upstream assign changed (...)`` for upstream keys."""
    saved_blocks = (saved_manifest or {}).get("upstream_lineage", {})
    words = []
    for key in keys[:8]:
        if key == "seed_checkpoint":
            words.append("upstream seed changed (its checkpoint was retrained)")
        elif key in UPSTREAM_KEYS:
            now = lineage.read_lineage(cfg.run_dir / key)
            change = lineage.describe_change(saved_blocks.get(key), now[1] if now else {})
            words.append(f"upstream {key} changed ({change})")
        else:
            words.append(key)
    return ", ".join(words) or "unknown"


def data_state(cfg: PipelineConfig, manifest: dict[str, Any]) -> tuple[str, str]:
    """``(stale reason, growth note)`` of a finished run from the shards it consumed."""
    for stage, consumed in manifest.get("consumed", {}).items():
        try:
            current = _manifest(cfg, stage).get("inputs", {})
        except FileNotFoundError:
            return f"upstream {stage} is missing", ""
        changed, added = lineage.data_change(consumed, current)
        regenerated = _regenerated(cfg, stage, changed, current)
        changed = [s for s in changed if s not in regenerated]
        if changed:
            return f"upstream {stage} changed ({len(changed)} consumed shard(s) changed or removed)", ""
        notes = []
        if added:
            notes.append(f"{stage} grew by {len(added)} shard(s) since")
        if regenerated:
            gens = sorted(set(regenerated.values()))
            notes.append(f"{len(regenerated)} shard(s) re-assigned to new experts of generation {', '.join(map(str, gens))}")
        if notes:
            return "", "; ".join(notes) + "; continue with docs/growth.md"
    return "", ""


def _regenerated(cfg: PipelineConfig, stage: str, changed: list[str], current: dict[str, str]) -> dict[str, int]:
    """Changed consumed assign shards that a later generation re-assigned (growth, not staleness)."""
    if stage != "assign" or not changed:
        return {}
    from stages.generations import regenerated_shards

    owned = regenerated_shards(cfg)
    return {s: owned[s] for s in changed if s in owned and s in current}


def upstream_stale(cfg: PipelineConfig, *, uses_assign: bool) -> str:
    """Why the stage a run reads is itself stale under the current config ('' when it is not)."""
    from pipeline.errors import StageError
    from pipeline.runner import plan_stage, stale_reason

    stage = data_stage(uses_assign)
    try:
        plan = plan_stage(cfg, stage)
    except (FileNotFoundError, StageError, ImportError, OSError, KeyError, ValueError):
        return ""
    if plan.upstream_stale:
        return plan.upstream_stale
    if plan.stale or plan.orphans:
        return "upstream " + stale_reason(cfg, stage, plan)
    return ""


def check_upstream(cfg: PipelineConfig, run: str, *, uses_assign: bool, done: dict[str, Any] | None) -> None:
    """Refuse to train (or to call a finished run current) on a stale upstream.

    Raises:
        StageError: the stage the run reads is stale, or shards a finished run consumed changed.
    """
    from pipeline.errors import StageError

    reason = upstream_stale(cfg, uses_assign=uses_assign)
    if reason:
        root = reason.split(" ", 2)[1]
        raise StageError(f"train/{run}: {reason}; redo it first: {lineage.suggest(cfg, f'{root} --force')}")
    if done is not None:
        reason, _ = data_state(cfg, done)
        if reason:
            target = runs.short_label(run)
            raise StageError(
                f"train/{run}: {reason}; retrain with {lineage.suggest(cfg, f'train --expert {target} --resume none')}"
            )
