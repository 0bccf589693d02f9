"""The stage contract and the resumable shard runner.

A stage is a module exposing plain functions (see docs/architecture.md):

* ``hash_inputs(cfg) -> object``: the config values that define the outputs (hashed).
* ``list_shards(cfg, stage_dir) -> list[Shard]``: the units of work, each with an input fingerprint.
* ``process_shard(cfg, shard, stage_dir, runtime) -> dict``: do one shard on ``runtime``
  (a :class:`pipeline.runtime.Runtime`: device, precision, rank), return its counts
  (``{"in": n, "out": n, "skipped": {reason: n}, ...}``). Outputs must be written atomically.
* ``finalize(cfg, stage_dir, records) -> dict`` (optional): merge step; returns manifest fields.

The runner skips shards whose completion record matches the current config hash and input
fingerprint, refuses to mix outputs made under another config or from other inputs (``--force``
redoes them), runs the rest in a local process pool with a progress bar, and writes the stage
manifest once every shard is done.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline import artifacts, lineage
from pipeline.config import PipelineConfig, config_hash, diff_keys, dump_yaml, to_jsonable
from pipeline.errors import StageError
from pipeline.runtime import Runtime, for_section

log = logging.getLogger("pipeline")

STAGE_MODULES = {
    "prep": "stages.prep",
    "embed": "stages.embed",
    "cluster": "stages.cluster",
    "assign": "stages.assign",
    "ensemble": "ensemble.stage",
}
"""Sharded/global stages run by this runner, in pipeline order (training has its own entry point)."""



@dataclass(frozen=True)
class Shard:
    """One unit of work of a stage."""

    name: str
    fingerprint: str
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StagePlan:
    """What a run of a stage would do."""

    stage: str
    config_hash: str
    shards: list[Shard]
    done: list[str]
    stale: list[str]
    todo: list[str]
    orphans: list[str]
    upstream: dict[str, str] = field(default_factory=dict)
    """Lineage digests of the upstream manifests this stage consumes (``UPSTREAM`` of its module)."""
    upstream_stale: str = ""
    """Why an upstream stage is stale under the current config ('' when none is)."""
    upstream_changed: dict[str, list[str]] = field(default_factory=dict)
    """Upstream stage → this stage's shards made from another version of it."""


def load_stage(name: str):
    """Import a stage module by stage name."""
    if name not in STAGE_MODULES:
        raise StageError(f"unknown stage '{name}' (known: {', '.join(STAGE_MODULES)})")
    return importlib.import_module(STAGE_MODULES[name])


def stage_dir(cfg: PipelineConfig, name: str) -> Path:
    """``<run>/<stage>``."""
    return cfg.run_dir / name


def _upstream_state(cfg: PipelineConfig, module, memo: dict) -> tuple[dict[str, str], str]:
    """Current lineage digests of the stage's upstream manifests, and why one of them is stale.

    An upstream is stale when its own shards are (another config, other inputs) or, transitively,
    one of its upstreams is; the reason names the stage nearest the root of the change.
    """
    digests, reason = {}, ""
    for up in getattr(module, "UPSTREAM", ()):
        found = lineage.read_lineage(stage_dir(cfg, up))
        if found is not None:
            digests[up] = found[0]
        if reason:
            continue
        try:
            plan = memo[up] if up in memo else plan_stage(cfg, up, _memo=memo)
        except (FileNotFoundError, StageError, ImportError, OSError, KeyError, ValueError):
            continue
        if plan.upstream_stale:
            reason = plan.upstream_stale
        elif plan.stale or plan.orphans:
            reason = f"upstream {stale_reason(cfg, up, plan)}"
    return digests, reason


def plan_stage(cfg: PipelineConfig, name: str, *, _memo: dict | None = None) -> StagePlan:
    """Compare the stage's shards with the completion records on disk (and its upstreams' state)."""
    memo = {} if _memo is None else _memo
    module = load_stage(name)
    sdir = stage_dir(cfg, name)
    chash = config_hash(module.hash_inputs(cfg))
    upstream, upstream_stale = _upstream_state(cfg, module, memo)
    try:
        shards = module.list_shards(cfg, sdir)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        # an upstream manifest that parses but lacks what this stage reads
        raise StageError(f"{name}: an upstream manifest is incomplete or corrupt ({type(exc).__name__}: {exc}); "
                         f"rerun the stage before {name} with --force") from None
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = [n for n, c in Counter(names).items() if c > 1][:3]
        raise StageError(f"{name}: duplicate shard names {dup}; give sources distinct paths")
    done, stale, todo = [], [], []
    changed: dict[str, list[str]] = {}
    for shard in shards:
        rec_path = artifacts.done_path(sdir, shard.name)
        if not rec_path.is_file():
            todo.append(shard.name)
            continue
        rec = artifacts.read_json(rec_path)
        same = rec.get("config_hash") == chash and rec.get("fingerprint") == shard.fingerprint
        for up, digest in rec.get("upstream", {}).items():
            if upstream.get(up, digest) != digest:
                changed.setdefault(up, []).append(shard.name)
                same = False
        (done if same else stale).append(shard.name)
    known = set(names)
    orphans = sorted(
        p.stem for p in (sdir / artifacts.DONE_DIR).glob("*.json") if p.stem not in known
    )
    plan = StagePlan(name, chash, shards, done, stale, todo, orphans, upstream, upstream_stale, changed)
    memo[name] = plan
    return plan


def stale_reason(cfg: PipelineConfig, name: str, plan: StagePlan) -> str:
    """``<stage> is stale (<why>)``: changed keys, changed upstreams, changed or dropped inputs."""
    module = load_stage(name)
    why = []
    saved = stage_dir(cfg, name) / "_hashed_config.json"
    if saved.is_file():
        changed = diff_keys(artifacts.read_json(saved), to_jsonable(module.hash_inputs(cfg)))
        if changed:
            why.append("changed: " + ", ".join(changed[:8]))
    for up in plan.upstream_changed:
        why.append(f"upstream {up} changed: {_upstream_change(cfg, name, up)}")
    if not why and plan.stale:
        why.append(f"{len(plan.stale)} shard(s) have other inputs")
    if plan.orphans:
        why.append(f"{len(plan.orphans)} finished shard(s) no longer listed")
    return f"{name} is stale ({'; '.join(why)})"


def _upstream_change(cfg: PipelineConfig, name: str, up: str) -> str:
    path = stage_dir(cfg, name) / artifacts.MANIFEST
    saved = artifacts.read_json(path).get("upstream_lineage", {}).get(up) if path.is_file() else None
    now = lineage.read_lineage(stage_dir(cfg, up))
    return lineage.describe_change(saved, now[1] if now else {})


def stale_message(cfg: PipelineConfig, name: str, plan: StagePlan) -> str:
    """The one-line refusal to run over stale work: what is stale, why, and the command that redoes it."""
    if plan.upstream_stale:
        root = plan.upstream_stale.split(" ", 2)[1]
        return (
            f"{name}: {plan.upstream_stale}; redo it first: {lineage.suggest(cfg, f'{root} --force')}"
        )
    parts = []
    if plan.stale:
        parts.append(f"{len(plan.stale)} shard(s) were made with another config or other inputs")
    if plan.orphans:
        parts.append(f"{len(plan.orphans)} finished shard(s) are no longer in the input listing")
    reason = stale_reason(cfg, name, plan)
    detail = reason[reason.index("(") + 1 : -1]
    return (
        f"{name}: " + "; ".join(parts) + f" ({detail}). Redo with {lineage.suggest(cfg, f'{name} --force')} "
        f"({stage_dir(cfg, name)})."
    )


def _run_shard(
    name: str, cfg: PipelineConfig, shard: Shard, sdir: Path, chash: str, upstream: dict, rt: Runtime
) -> dict:
    """Process one shard and write its completion record (after its outputs)."""
    module = load_stage(name)
    start = time.perf_counter()
    counts = module.process_shard(cfg, shard, sdir, rt)  # may name its own "fingerprint" (inputs it used)
    record = {
        "shard": shard.name,
        "fingerprint": shard.fingerprint,
        "config_hash": chash,
        "upstream": upstream or {},
        "seconds": round(time.perf_counter() - start, 3),
        "git_sha": artifacts.git_sha(),
        **counts,
    }
    artifacts.write_json(artifacts.done_path(sdir, shard.name), record)
    return record


def _select(
    shards: list[Shard], shard_range: tuple[int, int] | None, stride: tuple[int, int] | None
) -> list[Shard]:
    if shard_range is not None:
        shards = shards[shard_range[0] : shard_range[1]]
    if stride is not None:
        rank, world = stride
        shards = shards[rank::world]
    return shards


def run_stage(
    cfg: PipelineConfig,
    name: str,
    *,
    force: bool = False,
    shard_range: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
    finalize: bool = True,
    redo_done: bool | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run (or resume) a stage; returns a summary (and writes the manifest when complete).

    Args:
        cfg: the resolved pipeline config.
        name: stage name (see ``STAGE_MODULES``).
        force: redo shards made under another config or inputs (and, with no finished work left
            to keep, every shard).
        shard_range: ``(lo, hi)`` indices into the stage's shard list; only those run (SLURM
            arrays). The manifest is written when all shards are done.
        stride: ``(rank, world_size)``: take every ``world_size``-th shard from ``rank`` (torchrun
            ranks; each rank gets a disjoint set).
        workers: process-pool size (default ``run.workers``); 1 runs in-process.
        progress: show a progress bar.
        finalize: write the manifest when every shard is done (under torchrun only rank 0 does,
            after a barrier).
        redo_done: with ``force``, also redo finished shards of a partial run (a forced SLURM
            array task redoes its whole range); default: only when the run covers every shard.
        runtime: device, precision and rank the shards run with (default: from the stage's config
            section and the launcher's environment, see ``pipeline.runtime.for_section``).
    """
    sdir = stage_dir(cfg, name)
    plan = plan_stage(cfg, name)  # lists the inputs first: bad inputs fail before anything is written
    sdir.mkdir(parents=True, exist_ok=True)
    if plan.upstream_stale or ((plan.stale or plan.orphans) and not force):
        raise StageError(stale_message(cfg, name, plan))
    partial = shard_range is not None or stride is not None
    if force:
        plan = _forced_plan(plan, redo_done=not partial if redo_done is None else redo_done)
    _write_stage_config(cfg, name, sdir, clean_temps=not partial)
    todo = set(plan.todo)
    selected = [s for s in _select(plan.shards, shard_range, stride) if s.name in todo]
    if not selected and not plan.todo:
        manifest = _current_manifest(sdir, plan)
        if manifest is not None:
            log.info("%s: all %d shard(s) already done; nothing to do", name, len(plan.shards))
            return {"stage": name, "ran": 0, "skipped": len(plan.done), "manifest": manifest}
    rt = runtime or for_section(cfg, name, progress=None if progress else False)
    failures = _execute(cfg, name, selected, sdir, (plan.config_hash, plan.upstream), workers, progress, rt)
    if force and len(failures) < len(selected):
        # some outputs were replaced: the old manifest no longer describes the stage
        (sdir / artifacts.MANIFEST).unlink(missing_ok=True)
    if failures:
        lines = "; ".join(f"{s}: {e}" for s, e in failures[:5])
        raise StageError(f"{name}: {len(failures)} shard(s) failed ({lines}). Rerun to redo only those.")
    return _finish(cfg, name, plan, {"stage": name, "ran": len(selected), "skipped": len(plan.done)}, finalize)


def _forced_plan(plan: StagePlan, redo_done: bool) -> StagePlan:
    """The plan of a ``--force`` run: stale shards (and with ``redo_done`` the finished ones) to do.

    Nothing is removed before its replacement is complete: the shards to redo are run again (their
    records and outputs are overwritten shard by shard); the old manifest and the records of shards
    no longer listed go only once the new outputs are in place.
    """
    redo = plan.stale + (plan.done if redo_done else [])
    return dataclasses.replace(plan, done=[n for n in plan.done if n not in redo], stale=[], todo=plan.todo + redo)


def _write_stage_config(cfg: PipelineConfig, name: str, sdir: Path, clean_temps: bool) -> None:
    """``config.yaml`` and ``_hashed_config.json`` of the stage; with ``clean_temps`` (this run is the
    stage's only writer) the temporary files a killed run left go first."""
    if clean_temps:
        artifacts.remove_stale_temps(sdir)
    artifacts.write_text(sdir / "config.yaml", dump_yaml(cfg))
    artifacts.write_json(sdir / "_hashed_config.json", to_jsonable(load_stage(name).hash_inputs(cfg)))


def _current_manifest(sdir: Path, plan: StagePlan) -> dict[str, Any] | None:
    """The stage's manifest when it describes exactly this plan, else None."""
    path = sdir / artifacts.MANIFEST
    if not path.is_file():
        return None
    manifest = artifacts.read_json(path)
    return manifest if _manifest_current(manifest, plan) else None


def _finish(
    cfg: PipelineConfig, name: str, plan: StagePlan, summary: dict[str, Any], finalize: bool
) -> dict[str, Any]:
    """Write the manifest once every shard has its record (and ``finalize`` asks for it)."""
    sdir = stage_dir(cfg, name)
    remaining = [s.name for s in plan.shards if not artifacts.done_path(sdir, s.name).is_file()]
    if remaining or not finalize:
        if remaining:
            log.info("%s: %d shard(s) still to do; manifest not written yet", name, len(remaining))
        return {**summary, "remaining": len(remaining)}
    if plan.orphans:
        _clear(sdir, plan.orphans)
    summary["manifest"] = write_manifest(cfg, name, plan)
    return summary


def _locations(plan: StagePlan) -> str:
    """Digest of where the shards' inputs are (paths): a moved input only re-finalizes."""
    return artifacts.object_digest([[s.name, s.inputs] for s in plan.shards])


def _manifest_current(manifest: dict[str, Any], plan: StagePlan) -> bool:
    """The manifest describes exactly these shards, config, upstreams and input locations."""
    return (
        manifest.get("config_hash") == plan.config_hash
        and manifest.get("inputs") == {s.name: s.fingerprint for s in plan.shards}
        and manifest.get("lineage", {}).get("upstream", plan.upstream) == plan.upstream
        and manifest.get("locations", "") == _locations(plan)
    )


def _clear(sdir: Path, names: list[str]) -> None:
    for shard in names:
        artifacts.done_path(sdir, shard).unlink(missing_ok=True)
    (sdir / artifacts.MANIFEST).unlink(missing_ok=True)


def _execute(cfg, name, shards, sdir, chash, workers, progress, rt) -> list[tuple[str, str]]:
    """Run shards in-process or in a pool; return (shard, error) for the failures.

    ``chash`` is ``(config_hash, upstream lineage digests)``, both written into every record.
    """
    chash, upstream = chash
    workers = cfg.run.workers if workers is None else workers
    failures: list[tuple[str, str]] = []
    if not shards:
        return failures
    bar = tqdm(total=len(shards), desc=name, unit="shard", disable=not progress)
    if workers <= 1 or len(shards) == 1:
        for shard in shards:
            try:
                _run_shard(name, cfg, shard, sdir, chash, upstream, rt)
            except Exception as exc:  # noqa: BLE001 - reported per shard, others continue
                _log_failure(name, shard.name, exc)
                failures.append((shard.name, _describe(exc)))
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(shards)), mp_context=ctx) as pool:
            futures = {pool.submit(_run_shard, name, cfg, s, sdir, chash, upstream, rt): s for s in shards}
            for fut in as_completed(futures):
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001
                    shard = futures[fut].name
                    log.error("%s: shard %s failed: %s", name, shard, _describe(exc))
                    failures.append((shard, _describe(exc)))
                bar.update(1)
    bar.close()
    return failures


EXPECTED_ERRORS = (StageError, ValueError, FileNotFoundError)
"""Errors that say what is wrong in their message (config, input, unreadable file): no traceback."""


def _describe(exc: BaseException) -> str:
    """One line for a failed shard: the message alone for expected errors, else type and message."""
    text = " ".join(str(exc).split())[:400]
    return text if isinstance(exc, EXPECTED_ERRORS) and text else f"{type(exc).__name__}: {text}"


def _log_failure(name: str, shard: str, exc: BaseException) -> None:
    if isinstance(exc, EXPECTED_ERRORS):
        log.error("%s: shard %s failed: %s", name, shard, _describe(exc))
    else:
        log.exception("%s: shard %s failed", name, shard)


def _sum_counts(records: list[dict]) -> dict[str, Any]:
    totals: Counter = Counter()
    skipped: Counter = Counter()
    for rec in records:
        for key in ("in", "out"):
            totals[key] += rec.get(key, 0)
        skipped.update(rec.get("skipped", {}))
    return {"in": totals["in"], "out": totals["out"], "skipped": dict(sorted(skipped.items()))}


def write_manifest(cfg: PipelineConfig, name: str, plan: StagePlan) -> dict[str, Any]:
    """Finalize the stage and write ``manifest.json`` (the only thing downstream reads)."""
    module = load_stage(name)
    sdir = stage_dir(cfg, name)
    records = [artifacts.read_json(artifacts.done_path(sdir, s.name)) for s in plan.shards]
    extra = module.finalize(cfg, sdir, records) if hasattr(module, "finalize") else {}
    block = lineage.lineage_block(
        to_jsonable(module.hash_inputs(cfg)), plan.upstream, extra.pop("outputs_digest", None)
    )
    upstream_lineage = {}
    for up in plan.upstream:
        found = lineage.read_lineage(stage_dir(cfg, up))
        upstream_lineage[up] = found[1] if found else {}
    manifest = {
        "stage": name,
        "config_hash": plan.config_hash,
        "config": to_jsonable(module.hash_inputs(cfg)),
        "inputs": {s.name: r["fingerprint"] for s, r in zip(plan.shards, records, strict=True)},
        "locations": _locations(plan),
        "lineage": block,
        "lineage_digest": lineage.digest(block),
        "upstream_lineage": upstream_lineage,
        "outputs": [],
        "counts": _sum_counts(records),
        "num_shards": len(plan.shards),
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 3),
        "git_sha": artifacts.git_sha(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    artifacts.write_json(sdir / artifacts.MANIFEST, manifest)
    counts = manifest["counts"]
    log.info(
        "%s: done — %d shard(s), in %d, out %d, skipped %s",
        name,
        len(plan.shards),
        counts["in"],
        counts["out"],
        counts["skipped"] or "none",
    )
    return manifest


def stage_status(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    """Progress of a stage from its completion records (used by ``pipeline status``)."""
    sdir = stage_dir(cfg, name)
    has_manifest = (sdir / artifacts.MANIFEST).is_file()
    try:
        plan = plan_stage(cfg, name)
    except (FileNotFoundError, StageError, ImportError, ValueError) as exc:
        return {"stage": name, "state": "waiting", "detail": str(exc).split("\n")[0]}
    total = len(plan.shards)
    reason = ""
    if plan.upstream_stale:
        state, reason = "stale", plan.upstream_stale
    elif plan.stale or plan.orphans:
        state, reason = "stale", stale_reason(cfg, name, plan)
    elif has_manifest and not plan.todo:
        state = "done"
    elif plan.done:
        state = "partial"
    else:
        state = "not started"
    counts = {}
    if has_manifest:
        counts = artifacts.read_json(sdir / artifacts.MANIFEST).get("counts", {})
    return {
        "stage": name,
        "state": state,
        "shards_done": len(plan.done),
        "shards_total": total,
        "stale": len(plan.stale) + len(plan.orphans),
        "counts": counts,
        **({"detail": reason} if reason else {}),
    }
