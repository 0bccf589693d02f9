"""Feature distillation: weighting, gradient, teacher checks, student initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.losses import LossConfig, build_loss, init_student_from_teacher

DTYPE = torch.float64


def features(seed, n=6, d=5):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    text = F.normalize(image + torch.randn(n, d, generator=gen, dtype=DTYPE), dim=1)
    return image, text


def step(cfg, image, text, teacher, scale=2.0):
    loss = build_loss(cfg, rank=0, world_size=1, device="cpu", table_dtype=DTYPE)
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    logit_scale = torch.tensor(scale, dtype=DTYPE, requires_grad=True)
    out = loss(image, text, logit_scale, torch.arange(image.shape[0]), teacher=teacher)
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    total.backward()
    return out, total, image.grad, text.grad, logit_scale.grad


@pytest.mark.parametrize("main", ["clip", "v3"])
def test_distillation_gradient_is_weighted_sum_of_main_and_feature_terms(main):
    w = 0.3
    image, text = features(0)
    teacher = features(1)
    base = dict(name="clip") if main == "clip" else dict(name="fastclip", version="v3", data_size=6)
    out0, total0, gi0, gt0, gs0 = step(LossConfig(**base), image, text, None)
    out, total, gi, gt, gs = step(LossConfig(**base, distill_weight=w), image, text, teacher)

    n = image.shape[0]
    fd = ((teacher[0] - image) ** 2).sum(1).mean() + ((teacher[1] - text) ** 2).sum(1).mean()
    assert out["distill_loss"].item() == pytest.approx(w * float(fd), rel=1e-12)
    assert out["contrastive_loss"].item() == pytest.approx(
        (1 - w) * out0["contrastive_loss"].item(), rel=1e-12
    )
    assert total.item() == pytest.approx((1 - w) * total0.item() + w * float(fd), rel=1e-12)
    # d/ds_i mean_i ||t_i - s_i||^2 = 2 (s_i - t_i) / n
    torch.testing.assert_close(gi, (1 - w) * gi0 + w * 2 * (image - teacher[0]) / n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt, (1 - w) * gt0 + w * 2 * (text - teacher[1]) / n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gs, (1 - w) * gs0, rtol=1e-12, atol=1e-14)


def test_missing_or_mismatched_teacher_is_refused():
    image, text = features(0)
    cfg = LossConfig(name="clip", distill_weight=0.5)
    with pytest.raises(ValueError, match="teacher: required when distill_weight=0.5"):
        step(cfg, image, text, None)
    with pytest.raises(ValueError, match="teacher: image features have shape"):
        step(cfg, image, text, (image[:3], text))


class Tiny(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.embed = nn.Parameter(torch.randn(width, 4))
        self.logit_scale = nn.Parameter(torch.tensor(1.0))


def test_init_student_from_teacher_copies_shape_matching_parameters():
    torch.manual_seed(0)
    student, teacher = Tiny(width=3), Tiny(width=5)
    embed_before = student.embed.detach().clone()
    copied = init_student_from_teacher(student, teacher, exclude=("logit_scale",))
    assert copied == ["proj.weight", "proj.bias"]
    assert torch.equal(student.proj.weight, teacher.proj.weight)
    assert torch.equal(student.embed, embed_before)
    student.logit_scale.data.fill_(2.0)
    assert "logit_scale" in init_student_from_teacher(student, teacher)
    assert student.logit_scale.item() == 1.0
