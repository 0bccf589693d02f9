"""The interface every loss implements, and what all of them share (distillation, tau handling)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from pipeline.sections import LossConfig
from training.losses.dist_utils import check_process_group
from training.losses.distill import combine_with_distillation, feature_distillation_loss

LOGIT_SCALE_MAX = math.log(100.0)
"""Clamp of the model's log logit scale: tau in [0.01, 1]."""


class LossInputs(NamedTuple):
    """What :meth:`ContrastiveLoss.contrastive_terms` receives (checked by ``forward``)."""

    image: torch.Tensor
    """[b, d] L2-normalised image embeddings of this rank (with grad)."""
    text: torch.Tensor
    """[b, d] L2-normalised text embeddings of this rank."""
    logit_scale: torch.Tensor
    """Scalar ``exp(logit_scale)`` = 1 / tau."""
    pair_ids: torch.Tensor
    """[b] int64 global pair ids."""


class ContrastiveLoss(nn.Module):
    """Base class of the CLIP / GCL losses as seen by the trainer.

    ``forward`` returns named terms: the trainer back-propagates the sum of the values whose key ends
    with ``_loss``; the other values are detached scalar diagnostics. Subclasses implement
    :meth:`contrastive_terms`; distillation is added here.

    Args:
        cfg: Loss configuration.
        rank: This process's rank.
        world_size: Number of data-parallel processes (1 needs no process group).
    """

    def __init__(self, *, cfg: LossConfig | None = None, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        check_process_group(rank, world_size)
        self.cfg = cfg if cfg is not None else LossConfig()
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        pair_ids: torch.Tensor,
        *,
        teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for the local batch.

        Args:
            image_features: [b, d] L2-normalised image embeddings of this rank (with grad).
            text_features: [b, d] L2-normalised text embeddings of this rank.
            logit_scale: The model's ``exp(logit_scale)`` = 1 / tau (scalar, with grad when learnable).
            pair_ids: [b] int64 global pair ids in [0, data_size).
            teacher: (image, text) teacher embeddings, required when ``distill_weight`` > 0.

        Returns:
            ``*_loss`` terms to sum and back-propagate, plus detached diagnostics.
        """
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(
                f"text_features: expected shape {tuple(image_features.shape)} [b, d], "
                f"got {tuple(text_features.shape)}"
            )
        if pair_ids.shape != image_features.shape[:1]:
            raise ValueError(
                f"pair_ids: expected shape ({image_features.shape[0]},), got {tuple(pair_ids.shape)}"
            )
        terms = self.contrastive_terms(LossInputs(image_features, text_features, logit_scale.reshape(()), pair_ids))
        weight = self.cfg.distill_weight
        if weight == 0.0:
            return terms
        if teacher is None:
            raise ValueError(f"teacher: required when distill_weight={weight} > 0")
        return combine_with_distillation(
            terms, feature_distillation_loss(image_features, text_features, teacher), weight
        )

    def contrastive_terms(self, x: LossInputs) -> dict[str, torch.Tensor]:
        """The loss without distillation, on the inputs :meth:`forward` checked."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Record the number of completed epochs (drives schedules); called at each epoch start."""
        if epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        """Clamp the model's ``logit_scale`` (log of 1/tau) to [0, ln 100], i.e. tau in [0.01, 1]."""
        model = getattr(model, "module", model)
        param = getattr(model, "logit_scale", None)
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"model: {type(model).__name__} has no 'logit_scale' tensor to clamp")
        param.clamp_(0.0, LOGIT_SCALE_MAX)

    def param_group_overrides(self) -> dict[str, dict[str, Any]]:
        """Optimizer settings for the model's ``logit_scale`` parameter.

        Returns:
            ``{"logit_scale": {"lr": lr_tau or None (= model lr), "scheduler": lr_tau_scheduler,
            "frozen": bool, "weight_decay": 0.0, "init": ln(1 / temperature)}}``. The parameter is
            frozen unless the scheme is ``global_learnable``; ``init`` is the value the trainer
            should give it (open_clip's default is ln(1/0.07)).
        """
        cfg = self.cfg
        return {
            "logit_scale": {
                "lr": cfg.lr_tau if cfg.lr_tau > 0 else None,
                "scheduler": cfg.lr_tau_scheduler,
                "frozen": cfg.temperature_scheme != "global_learnable",
                "weight_decay": 0.0,
                "init": math.log(1.0 / cfg.temperature),
            }
        }

    def reset_thresholds(self) -> None:
        """Restart learned false-negative thresholds after a resume (no-op without GloFND)."""

    def get_extra_state(self) -> dict[str, Any]:
        """Scalar state saved in ``state_dict`` next to the tables."""
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        self.epoch = int(state["epoch"])
