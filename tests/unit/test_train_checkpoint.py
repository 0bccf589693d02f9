"""Checkpoint files: atomic writes, pruning, latest, world-size refusal, RNG and the exported final.pt."""

from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from pipeline.errors import StageError
from training import checkpoint as ckpt
from training.models import create_model, register_model_configs


def test_latest_is_the_highest_step_and_prune_keeps_pinned(tmp_path):
    for step in (5, 9, 10, 20):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"step": step})
    assert ckpt.latest_checkpoint(tmp_path).name == "step_20.pt"
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2, pinned=frozenset({5}))
    assert sorted(p.name for p in deleted) == ["step_9.pt"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 10, 20]
    assert not list(tmp_path.glob("checkpoints/.*"))  # no temporary files left behind
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_failed_write_leaves_no_checkpoint(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 3), {"bad": Boom()})
    assert ckpt.list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").iterdir())


def test_resume_under_another_world_size_is_refused(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 4)
    ckpt.check_world_size({"world_size": 2}, 2, path)
    with pytest.raises(StageError, match=r"written by 2 process\(es\), this job has 1"):
        ckpt.check_world_size({"world_size": 2}, 1, path)
    with pytest.raises(StageError, match="no such checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_final_pt_loads_with_open_clip_as_is(tmp_path):
    bundle = create_model("mode-micro-vit")
    with torch.no_grad():
        bundle.model.logit_scale.fill_(2.5)

    class Wrapped(nn.Module):  # what DDP looks like to export_final
        def __init__(self, module):
            super().__init__()
            self.module = module

    path = ckpt.export_final(tmp_path, Wrapped(bundle.model))
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in saved)
    register_model_configs()
    loaded, _, preprocess = open_clip.create_model_and_transforms("mode-micro-vit", pretrained=str(path))
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert float(loaded.logit_scale.detach()) == 2.5 and preprocess is not None


def test_final_of_a_locked_resnet_with_frozen_bn_stats_loads_strictly(tmp_path):
    from pipeline.config import TrainConfig
    from training.models import lock_towers

    model = create_model("mode-tiny-rn").model
    frozen = lock_towers(model, TrainConfig(lock_image=True, lock_image_freeze_bn_stats=True))
    assert frozen and all(name.startswith("visual.") for name in frozen)
    path = ckpt.export_final(tmp_path, model)
    assert "visual.bn1.num_batches_tracked" in torch.load(path)
    open_clip.create_model_and_transforms("mode-tiny-rn", pretrained=str(path))  # strict
