"""Trainer options: GCL losses (pair ids, data_size, tau lr), distillation, locked temperature, grad checkpointing."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import dump_yaml
from pipeline.runtime import Runtime, launcher_env, set_cpu_threads
from tests.tiny import fresh_run
from training import checkpoint as ckpt
from training.main import train_experts
from training.metrics import read_metrics
from training.synthetic import make_synthetic_run

BASE = ["train.workers=0", "train.batch_size=16", "train.steps=3", "train.seed_steps=0", "train.save_every=3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_synthetic_run(
        tmp_path_factory.mktemp("train_options"), num_shards=2, per_shard=40, overrides=BASE
    )


def fresh(base, tmp_path, *overrides: str):
    return fresh_run(base, tmp_path, *overrides)[0]


def test_fastclip_v3_gets_pair_ids_data_size_and_its_own_tau_lr(base, tmp_path):
    # multiply_tau and temperature_scheme come resolved (v0 defaults) in the dumped base config.
    cfg = fresh(
        base,
        tmp_path,
        "loss.name=fastclip",
        "loss.version=v3",
        "loss.multiply_tau=true",
        "loss.lr_tau=2e-4",
        "loss.lr_tau_scheduler=const",
        "loss.temperature=0.05",
    )
    train_experts(cfg, 1, progress=False)
    run_dir = cfg.run_dir / "train" / "expert_1"
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, 3))
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["logit_scale"]["lr"] == pytest.approx(2e-4)
    assert abs(rows[0]["logit_scale"] - 20.0) < 0.1  # initialised from loss.temperature = 0.05
    assert state["loss"]  # per-sample tables saved


def test_teacher_distillation_init_and_locked_scale_with_grad_checkpointing(base, tmp_path):
    teacher_cfg = fresh(base, tmp_path / "t", "train.steps=2", "train.save_every=2")
    train_experts(teacher_cfg, 0, progress=False)
    teacher = teacher_cfg.run_dir / "train" / "expert_0" / "final.pt"
    cfg = fresh(
        base,
        tmp_path / "s",
        f"train.teacher=mode-micro-vit:{teacher}",
        "train.init_from_teacher=true",
        "train.lock_logit_scale=true",
        "train.grad_checkpointing=true",
        "loss.distill_weight=0.5",
    )
    train_experts(cfg, 0, progress=False)
    rows = [r for r in read_metrics(cfg.run_dir / "train" / "expert_0" / "metrics.jsonl") if "loss" in r]
    assert any(k.startswith("distill") for k in rows[0]), rows[0]
    final = torch.load(cfg.run_dir / "train" / "expert_0" / "final.pt")
    assert torch.equal(final["logit_scale"], torch.load(teacher)["logit_scale"])  # copied, then locked


def test_launcher_environment_and_cpu_threads(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launcher_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launcher_env() == (2, 4, 0)  # torchrun's variables win
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_cpu_threads(Runtime(), workers=2) == before  # an explicit setting is respected
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads(Runtime(), workers=64) == 1
    finally:
        torch.set_num_threads(before)


def _open_clip_train_checkpoint(final, path):
    """What ``open_clip_train`` saves: epoch, name, DDP-prefixed ``state_dict``, optimizer state."""
    state = {f"module.{k}": v for k, v in torch.load(final).items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"epoch": 1, "name": "seed", "state_dict": state, "optimizer": opt.state_dict()}, path)
    return path


def test_finetune_from_an_open_clip_train_checkpoint_with_the_image_tower_locked(base, tmp_path):
    seed_cfg = fresh(base, tmp_path / "t", "train.steps=2", "train.save_every=2")
    train_experts(seed_cfg, 0, progress=False)
    seed = torch.load(seed_cfg.run_dir / "train" / "expert_0" / "final.pt")
    start = _open_clip_train_checkpoint(seed_cfg.run_dir / "train" / "expert_0" / "final.pt", tmp_path / "e1.pt")
    cfg = fresh(base, tmp_path / "s", f"train.pretrained={start}", "train.lock_image=true")
    train_experts(cfg, 0, progress=False)
    final = torch.load(cfg.run_dir / "train" / "expert_0" / "final.pt")
    visual = [k for k in final if k.startswith("visual.")]
    assert visual and all(torch.equal(final[k], seed[k]) for k in visual)  # loaded, then frozen
    assert not torch.equal(final["text_projection"], seed["text_projection"])  # the text tower trains
    unlocked = fresh(
        base, tmp_path / "u", f"train.pretrained={start}", "train.lock_image=true",
        "train.lock_image_unlocked_groups=1", "train.lock_text=true",
    )
    train_experts(unlocked, 0, progress=False)
    final = torch.load(unlocked.run_dir / "train" / "expert_0" / "final.pt")
    assert torch.equal(final["visual.conv1.weight"], seed["visual.conv1.weight"])
    assert not torch.equal(final["visual.proj"], seed["visual.proj"])  # last group unlocked
    assert torch.equal(final["token_embedding.weight"], seed["token_embedding.weight"])


def test_patch_dropout_and_forced_image_size(base, tmp_path):
    from training.models import create_model

    bundle = create_model("mode-micro-vit", force_patch_dropout=0.5, force_image_size=48)
    assert bundle.model.visual.patch_dropout.prob == 0.5
    assert bundle.model.visual.positional_embedding.shape[0] == (48 // 8) ** 2 + 1
    cfg = fresh(base, tmp_path, "train.force_patch_dropout=0.5", "train.force_image_size=48")
    train_experts(cfg, 0, progress=False)
    final = torch.load(cfg.run_dir / "train" / "expert_0" / "final.pt")
    assert final["visual.positional_embedding"].shape[0] == 37


def test_wrong_teacher_or_none_is_one_line_naming_both(base, tmp_path, capsys):
    from pipeline import cli

    teacher = tmp_path / "rn.pt"
    from training.models import create_model

    torch.save(create_model("mode-tiny-rn").model.state_dict(), teacher)
    cfg = fresh(base, tmp_path, f"train.teacher=mode-micro-vit:{teacher}", "loss.distill_weight=0.5")
    config = tmp_path / "c.yaml"
    config.write_text(dump_yaml(cfg))
    assert cli.main(["train", "--config", str(config), "--expert", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another architecture (ResNet" in err and "than 'mode-micro-vit'" in err
    assert cli.main(["train", "--config", str(config), "--expert", "0", "--set", "train.teacher="]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: loss.distill_weight: 0.5 needs a reference model in train.teacher (empty)"
