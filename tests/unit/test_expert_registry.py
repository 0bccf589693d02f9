"""The expert registry: generation 0 from the cluster stage, later generations from experts.json."""

from __future__ import annotations

import torch

from pipeline import artifacts, experts
from pipeline.config import load_config


def test_registry_holds_generations_and_routing_uses_the_union_of_centres(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}"])
    cdir = cfg.run_dir / "cluster"
    cdir.mkdir(parents=True)
    artifacts.write_json(cdir / "manifest.json", {"stage": "cluster"})
    torch.save({"center": torch.eye(4)}, cdir / "fine_centers.pth")
    torch.save({"coarse": torch.zeros(2, 4), "assign": torch.tensor([0, 1, 0, 1])}, cdir / "coarse.pth")
    assert [(e.expert, e.generation, e.fine) for e in experts.registry(cfg)] == [(0, 0, (0, 2)), (1, 0, (1, 3))]
    path = experts.generation_path(cfg, 1)
    path.parent.mkdir(parents=True)
    torch.save({"center": -torch.eye(4)[:2]}, path)
    artifacts.write_json(experts.registry_path(cfg), {"experts": [{"expert": 2, "generation": 1, "fine": [4, 5]}]})
    centers, owner, num = experts.union_centers(cfg)
    assert centers.shape == (6, 4) and owner.tolist() == [0, 1, 0, 1, 2, 2] and num == 3
    section = experts.markdown_section(cfg)
    assert "| expert-2 | 1 | 2 |" in section and "| expert-0 | 0 | 2 |" in section
