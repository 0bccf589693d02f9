"""GloFND threshold dynamics: quantile tracking, kept-count normalisation, start epochs, reset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss
from training.losses.glofnd import GloFNDThreshold

DTYPE = torch.float64


def test_lambda_converges_to_the_quantile_of_a_fixed_similarity_distribution():
    """Each anchor sees fresh negatives from its own fixed distribution every 'epoch' (one visit per
    epoch, as in training); lambda must settle at that distribution's (1 - alpha) quantile."""
    alpha, anchors, negatives = 0.1, 4, 400
    rule = GloFNDThreshold(alpha=alpha, lr=0.01, start_update=0, start_lda=0)
    centres = torch.tensor([-0.3, 0.0, 0.2, 0.4], dtype=DTYPE)
    spread = 0.15
    gen = torch.Generator().manual_seed(0)
    lam = torch.ones(anchors, dtype=DTYPE)
    m, v = torch.zeros_like(lam), torch.zeros_like(lam)
    neg = torch.ones(anchors, negatives, dtype=torch.bool)
    history = []
    for epoch in range(600):
        sim = centres[:, None] + spread * torch.randn(anchors, negatives, generator=gen, dtype=DTYPE)
        lam, m, v = rule.step(sim.clamp(-1, 1), neg, lam, m, v, epoch)
        history.append(lam)
    z = math.sqrt(2) * torch.erfinv(
        torch.tensor(1 - 2 * alpha, dtype=DTYPE)
    )  # standard normal (1-alpha) quantile
    target = centres + spread * z
    settled = torch.stack(history[-100:]).mean(0)
    torch.testing.assert_close(settled, target, rtol=0, atol=0.01)
    assert float(history[0].min()) < 1.0, "lambda must start moving down from 1"


def test_lambda_gradient_counts_only_negatives_above_threshold():
    rule = GloFNDThreshold(alpha=0.25, lr=0.1, start_update=0, start_lda=0)
    sim = torch.tensor([[0.9, 0.5, 0.1, -0.2, 0.8]], dtype=DTYPE)
    neg = torch.tensor([[False, True, True, True, True]])
    lam = torch.tensor([0.3], dtype=DTYPE)
    _, m, _ = rule.step(sim, neg, lam, torch.zeros(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE), epoch=5)
    # Above 0.3 among the 4 negatives: 0.5 and 0.8 (the positive 0.9 is not a negative).
    assert float(m[0]) == pytest.approx(0.1 * (0.25 - 2 / 4))


def loss_with(**extra):
    cfg = LossConfig(
        name="fastclip",
        version="v1",
        data_size=8,
        glofnd="glofnd",
        glofnd_alpha=0.2,
        glofnd_lr_lda=0.3,
        **extra,
    )
    return build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=DTYPE)


def batch(n=5, d=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    return image, text, torch.arange(n)


def test_kept_count_is_the_normaliser():
    loss = loss_with()
    image, text, ids = batch()
    S = image @ text.T
    loss.tables.lda_im[ids] = torch.tensor([0.0, 0.3, -0.2, 1.0, 0.5], dtype=DTYPE)
    out = loss(image, text, torch.tensor(10.0, dtype=DTYPE), ids)
    lam_new = loss.tables.lda_im[ids]  # the mask of a step uses the lambda updated in that step
    for i in range(5):
        kept = [j for j in range(5) if j != i and S[i, j] <= lam_new[i]]
        g = sum(math.exp(10.0 * (S[i, j] - S[i, i])) for j in kept) / max(len(kept), 1)
        assert float(loss.tables.u_im[i]) == pytest.approx(g, rel=1e-12), f"anchor {i} kept {kept}"
    assert float(out["kept_frac"]) < 1.0


def test_start_update_and_start_lda_are_honoured():
    loss = loss_with(glofnd_start_update=1, glofnd_start_lda=2)
    image, text, ids = batch()
    S = image @ text.T
    scale = torch.tensor(10.0, dtype=DTYPE)
    unmasked = torch.tensor(
        [sum(math.exp(10.0 * (S[i, j] - S[i, i])) for j in range(5) if j != i) / 4 for i in range(5)],
        dtype=DTYPE,
    )

    out = loss(image, text, scale, ids)  # epoch 0: nothing moves, nothing masked
    assert torch.equal(loss.tables.lda_im, torch.ones(8, dtype=DTYPE))
    assert float(out["kept_frac"]) == 1.0

    loss.set_epoch(1)  # lambda moves, mask not applied yet
    out = loss(image, text, scale, ids)
    assert float(loss.tables.lda_im[0]) < 1.0
    assert float(out["kept_frac"]) == 1.0
    torch.testing.assert_close(loss.tables.u_im[ids], unmasked, rtol=1e-12, atol=0)

    loss.set_epoch(2)  # both
    out = loss(image, text, scale, ids)
    assert float(out["kept_frac"]) < 1.0
    assert not torch.allclose(loss.tables.u_im[ids], unmasked)


@pytest.mark.parametrize("reset", [True, False])
def test_reset_thresholds_follows_glofnd_reset_lda(reset):
    loss = loss_with(glofnd_reset_lda=reset)
    image, text, ids = batch()
    loss(image, text, torch.tensor(10.0, dtype=DTYPE), ids)
    before = {k: v.clone() for k, v in loss.state_dict().items() if k.startswith("tables.")}
    loss.reset_thresholds()
    after = loss.state_dict()
    for key, value in before.items():
        if key.startswith("tables.lda") and reset:
            expected = 1.0 if key.startswith("tables.lda_i") or key.startswith("tables.lda_t") else 0.0
            assert torch.equal(after[key], torch.full_like(value, expected)), key
        else:
            assert torch.equal(after[key], value), key
    assert not torch.equal(before["tables.lda_im"], torch.ones(8, dtype=DTYPE))
