"""New experts (generations): fit centres on grown data, and which centres each shard is assigned to.

``python -m pipeline add-experts`` (docs/growth.md, "New experts") fits ``--num-fine`` balanced
fine centres (``stages.clustering``) on the pairs of the embed shards that no clustering has seen yet
(not in the cluster stage's ``fitted_shards`` nor in an earlier generation), groups them into
``--num-experts`` new experts (coarse k-means of the new centres) numbered after the existing ones,
and writes

* ``<run>/cluster/generations/gen_<g>.pth``: ``{"center": [K_g, D], "owner": [K_g] global expert
  ids, "shards": [...], "generation": g}`` (self-contained: assignment fingerprints it);
* ``<run>/experts.json``: the registry read by :mod:`pipeline.experts` (``experts``: the added
  experts with their global fine ids; ``generations``: each generation's shards, centres, file digest).

Assignment rule (``stages.assign`` calls :func:`shard_centers`): a shard the cluster stage was
fitted on is assigned to generation 0's centres; a shard a generation ``g`` was fitted on, to the
union of the centres of generations ``0..g``; a shard no clustering has seen, to the union of all
generations. So earlier shards are never re-assigned (their fingerprints do not name later
generation files), and a new pair goes to a new expert when it is nearest one of its centres.
``add-experts`` drops the assign completion records of the shards it was fitted on, so a plain
``assign`` redoes exactly those shards, and the ensemble's, so a plain ``ensemble`` picks up the new
experts (reusing the saved outputs of unchanged models).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import artifacts
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.experts import generation_path, registry, registry_path
from pipeline.runtime import resolve_device
from pipeline.safeload import torch_load
from stages import clustering

GENERATIONS = "generations"


def _registry_json(cfg: PipelineConfig) -> dict[str, Any]:
    path = registry_path(cfg)
    return artifacts.read_json(path) if path.is_file() else {"experts": [], GENERATIONS: []}


def generations(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The added generations (``[]`` while the run has only generation 0), in order."""
    return sorted(_registry_json(cfg).get(GENERATIONS, []), key=lambda g: g["generation"])


def fitted_shards(cfg: PipelineConfig) -> list[str]:
    """The shards the cluster stage (generation 0) was fitted on."""
    return list(artifacts.read_manifest(cfg.run_dir / "cluster", "cluster").get("fitted_shards", []))


def shard_generation(cfg: PipelineConfig, shard: str, gens: list[dict[str, Any]] | None = None,
                     fitted: list[str] | None = None) -> int:
    """The newest generation whose centres shard ``shard`` is assigned to (see the module docstring)."""
    gens = generations(cfg) if gens is None else gens
    if not gens:
        return 0
    if shard in (fitted_shards(cfg) if fitted is None else fitted):
        return 0
    for gen in gens:
        if shard in gen["shards"]:
            return int(gen["generation"])
    return int(gens[-1]["generation"])


def regenerated_shards(cfg: PipelineConfig) -> dict[str, int]:
    """Shards a generation >= 1 was fitted on → that generation (their assignment names it)."""
    return {s: int(g["generation"]) for g in generations(cfg) for s in g["shards"]}


def fingerprint_files(cfg: PipelineConfig, shard: str, gens: list[dict[str, Any]] | None = None,
                      fitted: list[str] | None = None) -> list[Path]:
    """Generation files the assignment of ``shard`` depends on (none for generation-0 shards)."""
    upto = shard_generation(cfg, shard, gens, fitted)
    return [generation_path(cfg, g) for g in range(1, upto + 1)]


def centers_upto(cfg: PipelineConfig, generation: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Union of the fine centres of generations ``0..generation`` (all when None), their owning
    expert and the number of experts they cover."""
    cdir = cfg.run_dir / "cluster"
    fine = torch_load(cdir / "fine_centers.pth", "cluster")["center"].float()
    coarse = torch_load(cdir / "coarse.pth", "cluster")
    owner, num = coarse["assign"].long(), int(coarse["coarse"].shape[0])
    centers, owners = [fine], [owner]
    for gen in generations(cfg):
        if generation is not None and gen["generation"] > generation:
            break
        saved = torch_load(generation_path(cfg, gen["generation"]), "cluster")
        centers.append(saved["center"].float())
        owners.append(saved["owner"].long())
    owner = torch.cat(owners)
    return torch.cat(centers), owner, max(num, int(owner.max()) + 1 if len(owner) else 0)


def shard_centers(cfg: PipelineConfig, shard: str, fine: torch.Tensor, fine_to_coarse: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The centres and fine→expert map to assign ``shard`` with (generation 0's unless grown)."""
    g = shard_generation(cfg, shard)
    if g == 0:
        return fine, fine_to_coarse
    centers, owner, _ = centers_upto(cfg, g)
    return centers, owner


def totals(cfg: PipelineConfig) -> tuple[int, int]:
    """``(fine centres, experts)`` of every generation together."""
    gens = generations(cfg)
    if not gens:
        return cfg.cluster.num_fine, cfg.cluster.num_experts
    _, owner, num = centers_upto(cfg)
    return len(owner), num


def union_digest(cfg: PipelineConfig) -> str:
    """Digest of the added generations' centre files ('' while there are none)."""
    gens = generations(cfg)
    return "+" + ",".join(g["digest"] for g in gens) if gens else ""


# --------------------------------------------------------------------------- add-experts


def new_shards(cfg: PipelineConfig) -> list[Path]:
    """Embed feature files no clustering (generation 0 or later) was fitted on."""
    from stages.cluster import embed_outputs

    _, files = embed_outputs(cfg)
    seen = set(fitted_shards(cfg)) | set(regenerated_shards(cfg))
    return [f for f in files if f.stem not in seen]


def _check(cfg: PipelineConfig, num_experts: int, num_fine: int) -> None:
    if num_experts < 1:
        raise ConfigError(f"add-experts: --num-experts must be >= 1, got {num_experts}")
    if num_fine < num_experts:
        raise ConfigError(f"add-experts: --num-fine ({num_fine}) must be >= --num-experts ({num_experts})")
    from pipeline.errors import StageError
    from pipeline.runner import plan_stage

    plan = plan_stage(cfg, "cluster")
    if plan.upstream_stale or plan.stale or plan.todo:
        raise StageError("add-experts: the cluster stage is not current; run `python -m pipeline cluster` first")


def add_experts(cfg: PipelineConfig, num_experts: int, num_fine: int) -> dict[str, Any]:
    """Fit generation ``g`` on the shards no clustering has seen; returns a summary.

    Raises:
        ConfigError: invalid counts, no new data, or fewer new pairs than ``num_fine``.
        StageError: the cluster stage is missing or not current.
    """
    _check(cfg, num_experts, num_fine)
    files = new_shards(cfg)
    if not files:
        raise ConfigError(
            "add-experts: no new data: every embed shard was already clustered (add shards to data.train "
            "and run prep and embed first; docs/growth.md)"
        )
    feats = [np.load(f, mmap_mode="r") for f in files]
    x = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(feats).astype(np.float32)), dim=1)
    if x.shape[0] < num_fine:
        raise ConfigError(f"add-experts: --num-fine {num_fine} needs at least as many new pairs, got {x.shape[0]}")
    _, old_owner, old_experts = centers_upto(cfg)
    gens = generations(cfg)
    g = (gens[-1]["generation"] if gens else 0) + 1
    c = cfg.cluster
    fine = kmeans_fit(cfg, x, num_fine)
    if num_experts > 1:
        _, local = clustering.coarse_cluster(
            fine.centers, num_experts, balanced=c.coarse_balanced, metric=c.metric, seed=cfg.run.seed + g,
            n_init=c.coarse_n_init, balance_slack=c.balance_slack,
        )
    else:
        local = torch.zeros(num_fine, dtype=torch.long)
    owner = local.long() + old_experts
    _drop_records(cfg, [f.stem for f in files])
    path = generation_path(cfg, g)
    path.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(path) as tmp:
        artifacts.torch_save({"center": fine.centers.float(), "owner": owner, "shards": [f.stem for f in files],
                    "generation": g}, tmp)
    first = len(old_owner)
    added = [
        {"expert": old_experts + k, "generation": g,
         "fine": [first + i for i in range(num_fine) if int(local[i]) == k]}
        for k in range(num_experts)
    ]
    data = _registry_json(cfg)
    data["experts"] = [*data.get("experts", []), *added]
    data[GENERATIONS] = [*gens, {
        "generation": g, "shards": [f.stem for f in files], "num_fine": num_fine, "num_pairs": int(x.shape[0]),
        "experts": [e["expert"] for e in added], "file": str(path.relative_to(cfg.run_dir)),
        "digest": artifacts.content_digest(path), "sizes": fine.sizes.long().tolist(),
    }]
    artifacts.write_json(registry_path(cfg), data)
    return {"generation": g, "experts": [e["expert"] for e in added], "shards": [f.stem for f in files],
            "pairs": int(x.shape[0]), "num_fine": num_fine, "total_experts": len(registry(cfg))}


def kmeans_fit(cfg: PipelineConfig, x: torch.Tensor, num_fine: int):
    """Balanced fine k-means with the cluster section's settings."""
    c = cfg.cluster
    return clustering.fit_kmeans(
        x, num_fine, balanced=c.balanced, metric=c.metric, init=c.init, max_iter=c.max_iter, tol=c.tol,
        seed=cfg.run.seed, device=resolve_device(c.device), chunk_size=c.chunk_size,
        balance_slack=c.balance_slack, progress=sys.stderr.isatty(),
    )


def _drop_records(cfg: PipelineConfig, shards: list[str]) -> None:
    """Make ``assign`` redo these shards (against the new union of centres) and ``ensemble`` every
    task (with the new experts; unchanged models' outputs are reused), both without ``--force``."""
    adir = cfg.run_dir / "assign"
    for shard in shards:
        artifacts.done_path(adir, shard).unlink(missing_ok=True)
    for record in sorted((cfg.run_dir / "ensemble" / artifacts.DONE_DIR).glob("*.json")):
        record.unlink()

