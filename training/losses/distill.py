"""Feature distillation from a frozen reference (teacher) CLIP (clip_with_reference, "FD").

The total objective is ``(1 - w) * contrastive + w * L_FD`` with

    L_FD = mean_i ||t_img_i - s_img_i||^2 + mean_i ||t_txt_i - s_txt_i||^2

on the normalised embeddings of the local batch (no gather: DDP averaging makes it the global mean).
"""

from __future__ import annotations

import torch
from torch import nn


def feature_distillation_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Squared L2 distance between student and teacher embeddings, averaged over the batch.

    Args:
        image_features: [b, d] student image embeddings (normalised, with grad).
        text_features: [b, d] student text embeddings.
        teacher: (teacher_image_features, teacher_text_features), each [b, d], normalised, no grad.

    Returns:
        Scalar ``mean ||t_img - s_img||^2 + mean ||t_txt - s_txt||^2``.
    """
    teacher_image, teacher_text = teacher
    for side, student, ref in (
        ("image", image_features, teacher_image),
        ("text", text_features, teacher_text),
    ):
        if student.shape != ref.shape:
            raise ValueError(
                f"teacher: {side} features have shape {tuple(ref.shape)}, student has {tuple(student.shape)}"
            )
    image_term = (teacher_image.detach() - image_features).pow(2).sum(dim=1).mean()
    text_term = (teacher_text.detach() - text_features).pow(2).sum(dim=1).mean()
    return image_term + text_term


def combine_with_distillation(
    terms: dict[str, torch.Tensor], distill: torch.Tensor, weight: float
) -> dict[str, torch.Tensor]:
    """Scale every ``*_loss`` term by ``1 - weight`` and add ``distill_loss = weight * distill``.

    Summing the ``*_loss`` values of the result gives ``(1 - w) * main + w * L_FD``; the unweighted
    distillation value is logged as ``distill_raw``.
    """
    out = {key: value * (1.0 - weight) if key.endswith("_loss") else value for key, value in terms.items()}
    out["distill_loss"] = weight * distill
    out["distill_raw"] = distill.detach()
    return out


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module, teacher: nn.Module, *, exclude: tuple[str, ...] = ()
) -> list[str]:
    """Copy every teacher parameter whose name and shape match into the student (--init-from-distilled).

    Parameters whose shapes differ (e.g. patch and position embeddings from ViT-B/32 to ViT-B/16) are
    left as initialised.

    Args:
        student: Model to initialise (unwrapped or DDP-wrapped).
        teacher: Reference model.
        exclude: Parameter names never copied (e.g. ``("logit_scale",)`` to keep the student's tau).

    Returns:
        The names of the copied parameters, in the student's order.
    """
    student = getattr(student, "module", student)
    teacher_params = dict(getattr(teacher, "module", teacher).named_parameters())
    copied = []
    for name, param in student.named_parameters():
        source = teacher_params.get(name)
        if name in exclude or source is None or source.shape != param.shape:
            continue
        param.copy_(source.to(device=param.device, dtype=param.dtype))
        copied.append(name)
    return copied
