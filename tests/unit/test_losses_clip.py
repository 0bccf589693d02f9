"""The CLIP loss equals open_clip's ClipLoss (values and gradients) on one process."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss

DTYPE = torch.float64


def features(n=7, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    text = F.normalize(image + torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    return image, text


def value_and_grads(loss_fn, image, text, scale):
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    value = loss_fn(image, text, scale)
    value.backward()
    return value.detach(), image.grad, text.grad, scale.grad


@pytest.mark.parametrize("local_loss, gather_with_grad", [(True, True), (False, False)])
def test_clip_loss_equals_open_clip(local_loss, gather_with_grad):
    image, text = features()
    scale = torch.tensor(1 / 0.07, dtype=DTYPE)
    cfg = LossConfig(name="clip", local_loss=local_loss, gather_with_grad=gather_with_grad)
    ours = build_loss(cfg, rank=0, world_size=1, device="cpu")
    reference = open_clip.loss.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
    got = value_and_grads(
        lambda a, t, s: ours(a, t, s, torch.arange(7))["contrastive_loss"], image, text, scale
    )
    want = value_and_grads(reference, image, text, scale)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_clip_gradient_matches_softmax_formula():
    """d/d logits of the mean cross-entropy is (softmax - onehot) / n, for each direction."""
    image, text = features(n=5, seed=2)
    s = 3.0
    loss = build_loss(LossConfig(name="clip"), rank=0, world_size=1, device="cpu")
    _, g_img, g_txt, g_scale = value_and_grads(
        lambda a, t, sc: loss(a, t, sc, torch.arange(5))["contrastive_loss"],
        image,
        text,
        torch.tensor(s, dtype=DTYPE),
    )
    n = 5
    P = torch.softmax(s * image @ text.T, dim=1) - torch.eye(n, dtype=DTYPE)  # image -> text rows
    Q = torch.softmax(s * text @ image.T, dim=1) - torch.eye(n, dtype=DTYPE)  # text -> image rows
    torch.testing.assert_close(g_img, 0.5 / n * s * (P @ text + Q.T @ text), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_txt, 0.5 / n * s * (Q @ image + P.T @ image), rtol=1e-12, atol=1e-14)
    expected_scale = 0.5 / n * float((P * (image @ text.T)).sum() + (Q * (text @ image.T)).sum())
    assert float(g_scale) == pytest.approx(expected_scale, rel=1e-10)


def test_global_constant_clip_does_not_train_the_scale():
    image, text = features()
    loss = build_loss(
        LossConfig(name="clip", temperature_scheme="global_constant"), rank=0, world_size=1, device="cpu"
    )
    *_, g_scale = value_and_grads(
        lambda a, t, s: loss(a, t, s, torch.arange(7))["contrastive_loss"],
        image,
        text,
        torch.tensor(10.0, dtype=DTYPE),
    )
    assert g_scale is None
