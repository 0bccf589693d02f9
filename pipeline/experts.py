"""The expert registry: which experts a run holds, the generation each belongs to, the fine centres it owns.

Generation 0 is the cluster stage's output: expert ``k`` owns the fine centres ``c`` with
``coarse.pth["assign"][c] == k``. Later generations (docs/growth.md, "new experts") append
entries to ``<run>/experts.json``, each with the fine centres it owns, stored in
``<run>/cluster/generations/gen_<g>.pth`` (``{"center": [K_g, D]}``) and numbered after the
existing ones (global fine id = number of centres of earlier generations + local id). Experts of
every generation keep their own ``train/expert_<k>/`` folder and checkpoint; routing and the ensemble
use the union of all generations' centres, each mapped to the expert that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import artifacts
from pipeline.config import PipelineConfig

REGISTRY = "experts.json"


@dataclass(frozen=True)
class Expert:
    """One data expert of a run."""

    expert: int
    """Global expert id: ``train/expert_<id>/``, the ``coarse`` column of assign."""
    generation: int
    """0 for the cluster stage's experts, g for experts added by the g-th growth step."""
    fine: tuple[int, ...]
    """Global ids of the fine centres it owns (routing and assignment)."""


def registry_path(cfg: PipelineConfig) -> Path:
    """``<run>/experts.json`` (absent while the run has only generation 0)."""
    return cfg.run_dir / REGISTRY


def generation_path(cfg: PipelineConfig, generation: int) -> Path:
    """Centres added by generation ``generation`` (>= 1)."""
    return cfg.run_dir / "cluster" / "generations" / f"gen_{generation}.pth"


def registry(cfg: PipelineConfig) -> list[Expert]:
    """Every expert of the run, in expert-id order.

    Raises:
        FileNotFoundError: the cluster stage has not finished.
    """
    cdir = cfg.run_dir / "cluster"
    artifacts.read_manifest(cdir, "cluster")
    fine_to_coarse = torch.load(cdir / "coarse.pth", map_location="cpu")["assign"].long()
    num = int(fine_to_coarse.max()) + 1 if len(fine_to_coarse) else 0
    experts = [
        Expert(k, 0, tuple(int(c) for c in (fine_to_coarse == k).nonzero().flatten())) for k in range(num)
    ]
    path = registry_path(cfg)
    if path.is_file():
        for entry in artifacts.read_json(path)["experts"]:
            if entry["generation"] > 0:
                experts.append(Expert(int(entry["expert"]), int(entry["generation"]), tuple(entry["fine"])))
    return sorted(experts, key=lambda e: e.expert)


def union_centers(cfg: PipelineConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fine centres of every generation ``[K, D]``, their owning expert ``[K]`` and the number of experts."""
    experts = registry(cfg)
    parts = [torch.load(cfg.run_dir / "cluster" / "fine_centers.pth", map_location="cpu")["center"].float()]
    for generation in sorted({e.generation for e in experts if e.generation > 0}):
        parts.append(torch.load(generation_path(cfg, generation), map_location="cpu")["center"].float())
    centers = torch.cat(parts)
    owner = torch.full((centers.shape[0],), -1, dtype=torch.long)
    for e in experts:
        owner[list(e.fine)] = e.expert
    return centers, owner, len(experts)


def markdown_section(cfg: PipelineConfig) -> str:
    """The report's experts table: id, generation and number of fine centres owned."""
    try:
        experts = registry(cfg)
    except FileNotFoundError:
        return ""
    lines = ["", "## Experts", "", "| expert | generation | fine centres |", "|---|---|---|"]
    lines += [f"| expert-{e.expert} | {e.generation} | {len(e.fine)} |" for e in experts]
    return "\n".join(lines) + "\n"
