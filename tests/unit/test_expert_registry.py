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


def test_a_shard_re_assigned_to_a_new_generation_is_a_note_not_stale(tmp_path):
    from training.lineage import data_state

    cfg = load_config(None, [f"run.root={tmp_path}"])
    adir = cfg.run_dir / "assign"
    adir.mkdir(parents=True)
    artifacts.write_json(adir / "manifest.json", {"stage": "assign", "inputs": {"a": "x2", "b": "y", "c": "z"}})
    done = {"consumed": {"assign": {"a": "x1", "b": "y"}}}
    reason, note = data_state(cfg, done)
    assert "1 consumed shard(s) changed" in reason and not note  # without a generation: stale
    artifacts.write_json(experts.registry_path(cfg), {"experts": [], "generations": [{"generation": 1, "shards": ["a"]}]})
    reason, note = data_state(cfg, done)
    assert not reason and "1 shard(s) re-assigned to new experts of generation 1" in note and "grew by 1" in note


def test_shards_are_assigned_to_the_generations_up_to_the_one_fitted_on_them(tmp_path):
    from stages import generations

    cfg = load_config(None, [f"run.root={tmp_path}"])
    gens = [{"generation": 1, "shards": ["s3"]}, {"generation": 2, "shards": ["s4"]}]
    fitted = ["s0", "s1"]
    assert [generations.shard_generation(cfg, s, gens, fitted) for s in ("s0", "s3", "s4", "s9")] == [0, 1, 2, 2]
    assert generations.shard_generation(cfg, "s9", [], fitted) == 0
    files = generations.fingerprint_files(cfg, "s3", gens, fitted)
    assert [f.name for f in files] == ["gen_1.pth"] and generations.fingerprint_files(cfg, "s0", gens, fitted) == []
