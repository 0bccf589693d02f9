"""The GCL family's state in the logged terms: u quantiles, GloFND phase, lambda statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss


def step(loss, epoch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(8, 6, generator=gen), dim=1)
    text = F.normalize(image + 0.3 * torch.randn(8, 6, generator=gen), dim=1)
    loss.set_epoch(epoch)
    return loss(image, text, torch.tensor(10.0), torch.arange(8))


def test_u_quantiles_are_logged_for_every_gcl_variant():
    for kw in ({"version": "v1"}, {"version": "v3"}, {"version": "v2", "lr_tau": 0.01, "lr_tau_scheduler": "const"}):
        out = step(build_loss(LossConfig(name="fastclip", data_size=8, **kw), rank=0, world_size=1, device="cpu"), 0)
        assert float(out["u_q10"]) <= float(out["u_q50"]) <= float(out["u_q90"])
        assert float(out["u_mean"]) > 0


def test_glofnd_phase_and_lambda_statistics_show_why_nothing_is_removed():
    cfg = LossConfig(
        name="fastclip", version="v1", data_size=8, glofnd="glofnd", glofnd_alpha=0.2, glofnd_lr_lda=0.05,
        glofnd_start_update=1, glofnd_start_lda=2,
    )
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu")
    before = step(loss, 0)
    assert float(before["glofnd_phase"]) == 0 and "lambda_mean" not in before
    assert float(before["neg_removed_frac"]) == 0.0
    learning = step(loss, 1)
    assert float(learning["glofnd_phase"]) == 1
    # One Adam step from lambda = 1 moves each visited anchor by about lr: nothing is above it yet.
    assert 0.9 < float(learning["lambda_mean"]) < 1.0 and float(learning["lambda_moved_frac"]) == 1.0
    assert float(learning["neg_removed_frac"]) == 0.0
    for epoch in range(2, 60):
        masked = step(loss, epoch)
    assert float(masked["glofnd_phase"]) == 2
    assert float(masked["lambda_q50"]) < 0.9
    assert float(masked["neg_removed_frac"]) > 0.0


def test_init_quantile_sets_lambda_to_the_batch_quantile_on_the_first_visit():
    cfg = LossConfig(
        name="fastclip", version="v1", data_size=8, glofnd="glofnd", glofnd_alpha=0.25, glofnd_init_quantile=True
    )
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu")
    out = step(loss, 0)
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 6, generator=gen), dim=1)
    text = F.normalize(image + 0.3 * torch.randn(8, 6, generator=gen), dim=1)
    sim = image @ text.T
    neg = ~torch.eye(8, dtype=torch.bool)
    want = torch.stack([torch.quantile(sim[i][neg[i]], 0.75) for i in range(8)])
    torch.testing.assert_close(loss.tables.lda_im, want)
    assert float(out["neg_removed_frac"]) > 0.1  # the filter acts from the first visit
    again = step(loss, 1)  # later visits take Adam steps from there
    assert float(again["lambda_moved_frac"]) == 1.0
