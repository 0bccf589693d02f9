"""state_dict round trip: every table and the epoch/gamma restore bit for bit; the next step matches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss

VARIANTS = {
    "clip": dict(name="clip"),
    "v1": dict(name="fastclip", version="v1"),
    "v3": dict(name="fastclip", version="v3"),
    "v2": dict(name="fastclip", version="v2", lr_tau=0.02, lr_tau_scheduler="step_thresh"),
    "v3+glofnd": dict(name="fastclip", version="v3", glofnd="glofnd", glofnd_alpha=0.2, glofnd_lr_lda=0.2),
}


def batch(seed, n=6, d=5):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    text = F.normalize(image + 0.6 * torch.randn(n, d, generator=gen), dim=1)
    ids = torch.randperm(12, generator=gen)[:n]
    return image, text, ids


def step(loss, seed):
    image, text, ids = batch(seed)
    image.requires_grad_()
    scale = torch.tensor(12.0, requires_grad=True)
    out = loss(image, text, scale, ids)
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    return out, image.grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip_is_bit_exact(variant):
    cfg = LossConfig(data_size=12, **VARIANTS[variant])
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu")
    for epoch, seed in ((0, 1), (1, 2), (3, 3)):
        loss.set_epoch(epoch)
        step(loss, seed)
    state = loss.state_dict()
    restored = build_loss(cfg, rank=0, world_size=1, device="cpu")
    restored.load_state_dict(state)

    fresh = restored.state_dict()
    assert fresh.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh[key], value), key
        else:
            assert fresh[key] == value, key
    assert restored.epoch == 3
    if cfg.is_gcl:
        assert restored.gamma == loss.gamma != 1.0

    out_a, grad_a = step(loss, 4)
    out_b, grad_b = step(restored, 4)
    assert torch.equal(grad_a, grad_b)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    for key, value in loss.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored.state_dict()[key], value), key


def test_state_names_every_table():
    cfg = LossConfig(data_size=12, **VARIANTS["v3+glofnd"])
    keys = set(build_loss(cfg, rank=0, world_size=1, device="cpu").state_dict())
    assert keys == {
        "_extra_state",
        "tables.u_im",
        "tables.u_tt",
        "tables.lda_im",
        "tables.lda_tt",
        "tables.lda_m_im",
        "tables.lda_m_tt",
        "tables.lda_v_im",
        "tables.lda_v_tt",
    }
    cfg = LossConfig(data_size=12, **VARIANTS["v2"])
    keys = set(build_loss(cfg, rank=0, world_size=1, device="cpu").state_dict())
    assert len(keys) == 11 and {"tables.tau_im", "tables.bound_tt", "tables.tau_v_im"} <= keys
