"""The train stage end to end on a tiny synthetic run: seed → experts, skip, resume, learning, export."""

from __future__ import annotations

import open_clip
import pytest
import torch

from pipeline import cli
from pipeline.artifacts import read_json
from pipeline.config import dump_yaml, load_config
from pipeline.errors import StageError
from pipeline.runner import run_stage
from tests.tiny import fresh_run
from training import checkpoint as ckpt
from training.main import train_experts, training_status
from training.metrics import read_metrics
from training.optim import cosine_lr
from training.synthetic import make_synthetic_run, write_assign

BASE = ["train.workers=1", "train.batch_size=16", "train.steps=8", "train.seed_steps=4", "train.save_every=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prep + assign artifacts of a 4-shard, 2-expert synthetic run (nothing trained)."""
    return make_synthetic_run(
        tmp_path_factory.mktemp("train_e2e"), num_shards=4, per_shard=48, overrides=BASE
    )


def fresh(base, tmp_path, *overrides: str):
    """A copy of the untrained run under ``tmp_path`` with extra overrides."""
    return fresh_run(base, tmp_path, *overrides)


def test_all_trains_seed_then_experts_from_it_and_reruns_do_nothing(base, tmp_path, capsys):
    cfg, _ = fresh(base, tmp_path)
    with pytest.raises(StageError, match="--expert seed"):
        train_experts(cfg, 1, progress=False)
    results = train_experts(cfg, "all", progress=False)
    assert [(r["run"], r["state"], r["step"]) for r in results] == [
        ("seed", "done", 4),
        ("expert_0", "done", 8),
        ("expert_1", "done", 8),
        ("dense", "done", 8),
    ]
    expert = cfg.run_dir / "train" / "expert_0"
    manifest = read_json(expert / "manifest.json")
    assert manifest["start_step"] == 4 and manifest["branch_from"].endswith("seed/checkpoints/step_4.pt")
    rows = [r for r in read_metrics(expert / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    assert rows[0]["lr"] == pytest.approx(cosine_lr(4, cfg.train.lr, cfg.train.warmup, cfg.train.steps))
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(expert, 8))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {8}  # Adam moments carried over
    assert state["data"]["batches"] == 4 and state["world_size"] == 1
    assert (cfg.run_dir / "train" / "seed" / "checkpoints" / "step_4.pt").is_file()
    assert (expert / "tensorboard").is_dir() and (expert / "config.yaml").is_file()
    capsys.readouterr()
    again = train_experts(cfg, "all", progress=False)
    assert {r["state"] for r in again} == {"skipped"}
    assert capsys.readouterr().out.count("nothing to do") == 4
    status = {r["stage"]: r for r in training_status(cfg)}
    assert status["train/expert_1"]["state"] == "done" and status["train/expert_1"]["shards_done"] == 8
    changed = load_config(None, [f"run.root={tmp_path / 'runs'}", *_base_overrides(base), "train.lr=5e-4"])
    with pytest.raises(StageError, match="changed: train.lr"):
        train_experts(changed, 0, progress=False)


def _base_overrides(base) -> list[str]:
    cfg = base.cfg
    return [
        f"data.train={cfg.data.train}",
        "data.layout=flat",
        f"data.eval_root={cfg.data.eval_root}",
        "run.name=synthetic",
        "cluster.num_experts=2",
        "train.model=mode-micro-vit",
        "train.precision=fp32",
        "train.warmup=2",
        "train.log_every=1",
        "train.eval_every=0",
        "run.workers=1",
        *BASE,
    ]


def test_final_pt_loads_with_open_clip(base, tmp_path):
    cfg, _ = fresh(base, tmp_path, "train.seed_steps=0", "train.steps=2")
    train_experts(cfg, 0, progress=False)
    run_dir = cfg.run_dir / "train" / "expert_0"
    model, _, preprocess = open_clip.create_model_and_transforms(
        "mode-micro-vit", pretrained=str(run_dir / "final.pt")
    )
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert preprocess.transforms[0].size in (32, (32, 32))


def test_stop_and_resume_equals_an_uninterrupted_run(base, tmp_path):
    overrides = ("train.seed_steps=0", "train.steps=6", "train.workers=2", "train.save_every=2")
    straight, _ = fresh(base, tmp_path / "a", *overrides)
    train_experts(straight, 0, progress=False)
    resumed, _ = fresh(base, tmp_path / "b", *overrides)
    first = train_experts(resumed, 0, progress=False, stop_at_step=3)
    assert first == [{"run": "expert_0", "state": "partial", "step": 3}]
    assert {r["stage"]: r for r in training_status(resumed)}["train/expert_0"]["state"] == "partial"
    changed = load_config(
        None, [f"run.root={tmp_path / 'b' / 'runs'}", *_base_overrides(base), *overrides, "train.wd=0.3"]
    )
    with pytest.raises(StageError, match="changed: train.wd.*--resume none"):
        train_experts(changed, 0, progress=False)
    train_experts(resumed, 0, progress=False)
    a, b = (cfg.run_dir / "train" / "expert_0" for cfg in (straight, resumed))
    final_a, final_b = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    curve = [(r["step"], r["loss"]) for r in read_metrics(a / "metrics.jsonl") if "loss" in r]
    assert curve == [(r["step"], r["loss"]) for r in read_metrics(b / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6]


def test_training_lowers_the_loss_and_beats_chance_zero_shot(base, tmp_path):
    cfg, config = fresh(
        base,
        tmp_path,
        "train.seed_steps=30",
        "train.steps=30",
        "train.batch_size=32",
        "train.lr=2e-3",
        "train.warmup=3",
        "train.eval_every=30",
        "train.save_every=30",
    )
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(config),
                "--expert",
                "seed",
                "--quiet",
                "--set",
                f"run.root={tmp_path / 'runs'}",
                "--set",
                "train.seed_steps=30",
                "--set",
                "train.steps=30",
                "--set",
                "train.batch_size=32",
                "--set",
                "train.lr=2e-3",
                "--set",
                "train.warmup=3",
                "--set",
                "train.eval_every=30",
                "--set",
                "train.save_every=30",
            ]
        )
        == 0
    )
    run_dir = cfg.run_dir / "train" / "seed"
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    accuracy = read_json(run_dir / "manifest.json")["zeroshot"]["zeroshot/shapes/top1"]
    assert accuracy > 0.6  # 4 classes: chance is 0.25


def test_shards_behind_a_pipe_url_are_streamed_with_the_same_batches(base, tmp_path):
    from training.data import (
        ExpertStream,
        ShardCache,
        StreamedShard,
        StreamLayout,
        load_expert_data,
        open_shard,
    )

    config = tmp_path / "config.yaml"
    config.write_text(dump_yaml(base.cfg))
    piped_train = f"pipe:cat {base.cfg.data.train}"  # pipe:cat <root>/data/train/{0..3}.tar
    cfg = load_config(config, [f"run.root={tmp_path / 'runs'}", f"data.train={piped_train}"])
    run_stage(cfg, "prep", progress=False)
    write_assign(cfg, base.labels, base.num_experts)
    piped, local = load_expert_data(cfg, 0), load_expert_data(base.cfg, 0)
    assert [s.path for s in piped.shards] == [f"pipe:cat {s.path}" for s in local.shards]
    assert isinstance(open_shard(piped.shards[0], piped), StreamedShard)

    def batches(data, capacity):
        stream = ExpertStream(data, StreamLayout("samples", 0, 1, 1, 8, 64), None, "mode-micro-vit")
        cache, out = ShardCache(data, capacity), []
        for batch in range(24):
            for epoch, shard, ordinal in stream.batch_sources(batch):
                key, pair_id = cache.picks(shard, epoch)[ordinal]
                out.append((pair_id, cache.reader(shard).read(key)["jpg"]))
        return out

    assert batches(piped, 2) == batches(local, 4)  # a 64-pair window over 48-pair shards: evictions
    results = train_experts(cfg, "seed", progress=False)
    assert [(r["run"], r["state"], r["step"]) for r in results] == [("seed", "done", 4)]
