"""OpenCLIP's mini-batch contrastive loss (symmetric InfoNCE), with its distributed options."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.base import ContrastiveLoss, LossInputs
from training.losses.dist_utils import all_gather_no_grad, all_gather_with_grad


class ClipLoss(ContrastiveLoss):
    """Numerically the same as ``open_clip.loss.ClipLoss(local_loss, gather_with_grad, rank, world_size)``.

    With ``local_loss`` each rank scores its b rows against the gathered B columns; otherwise every
    rank computes the full B x B loss. ``gather_with_grad`` differentiates through the gather (the
    only setting whose DDP-averaged gradient is the global-batch gradient together with local_loss).
    A ``global_constant`` temperature scheme detaches the logit scale.
    """

    def contrastive_terms(self, x: LossInputs) -> dict[str, torch.Tensor]:
        """Symmetric cross-entropy over the (gathered) batch; see ``ContrastiveLoss.forward``."""
        logit_scale = x.logit_scale
        if self.cfg.temperature_scheme == "global_constant":
            logit_scale = logit_scale.detach()
        logits_image, logits_text = self._logits(x.image, x.text, logit_scale)
        labels = torch.arange(logits_image.shape[0], device=logits_image.device)
        if self.world_size > 1 and self.cfg.local_loss:
            labels = labels + logits_image.shape[0] * self.rank
        loss = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
        return {"contrastive_loss": loss, "tau": 1.0 / logit_scale.detach()}

    def _logits(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return scale * image @ text.T, scale * text @ image.T
        if self.cfg.gather_with_grad:
            all_image = all_gather_with_grad(image, self.world_size)
            all_text = all_gather_with_grad(text, self.world_size)
        else:
            all_image, all_text = self._gather_keep_local_grad(image, text)
        if self.cfg.local_loss:
            return scale * image @ all_text.T, scale * text @ all_image.T
        logits_image = scale * all_image @ all_text.T
        return logits_image, logits_image.T

    def _gather_keep_local_grad(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        all_image = all_gather_no_grad(image, self.world_size)
        all_text = all_gather_no_grad(text, self.world_size)
        if self.cfg.local_loss:
            return all_image, all_text
        # OpenCLIP puts the local rows back so that the full-batch loss still reaches this rank's features.
        b = image.shape[0]
        rows = slice(self.rank * b, (self.rank + 1) * b)
        image_parts = [all_image[: rows.start], image, all_image[rows.stop :]]
        text_parts = [all_text[: rows.start], text, all_text[rows.stop :]]
        return torch.cat(image_parts), torch.cat(text_parts)
