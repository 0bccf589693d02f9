"""GloFND: global false-negative detection with a learned per-anchor threshold lambda_i.

lambda_i tracks the (1 - alpha) quantile of anchor i's similarities to all its negatives in the
dataset, i.e. minimises ``alpha * lam + mean_j (s_ij - lam)_+``, whose stochastic subgradient on a
batch is ``alpha - (1/|negatives|) sum_j 1[s_ij > lam]`` (GloFND ``LambdaThreshold.update``). Each
anchor takes one Adam step (beta 0.9 / 0.98, eps 1e-8, bias correction with exponent epoch + 1)
whenever it is in the batch, then lambda is clamped to [-1, 1]; lambda starts at 1 (nothing removed).
Negatives with raw cosine similarity ``s_ij > lambda_i`` then leave the inner sum and the normaliser
becomes the number of kept negatives. As upstream, the mask of a step uses the lambda just updated.

This module is pure math on [b, B] similarity blocks; the loss owns the tables and communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.losses.estimators import per_sample_adam

LAMBDA_INIT = 1.0
LAMBDA_BETAS = (0.9, 0.98)
LAMBDA_EPS = 1e-8


@dataclass(frozen=True)
class GloFNDThreshold:
    """Update and masking rules of the per-anchor thresholds.

    Args:
        alpha: Fraction of negatives considered false (the quantile level is 1 - alpha).
        lr: Adam learning rate of lambda (``glofnd_lr_lda``).
        start_update: First epoch in which lambda moves.
        start_lda: First epoch in which the mask is applied.
        init_quantile: An anchor still at ``LAMBDA_INIT`` takes the (1 - alpha) quantile of its batch
            negatives instead of an Adam step (GloFND ``init_quantile``).
    """

    alpha: float
    lr: float
    start_update: int
    start_lda: int
    init_quantile: bool = False

    def updates_at(self, epoch: int) -> bool:
        """Whether lambda is updated during ``epoch``."""
        return epoch >= self.start_update

    def masks_at(self, epoch: int) -> bool:
        """Whether negatives above lambda are removed during ``epoch``."""
        return epoch >= self.start_lda

    def step(
        self,
        sim: torch.Tensor,
        neg: torch.Tensor,
        lam: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        epoch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One Adam step of the anchors' thresholds.

        Args:
            sim: [b, B] raw cosine similarities of the anchors to the global batch.
            neg: [b, B] bool, True for the anchors' negatives (everything but the positive).
            lam: [b] thresholds; m, v: [b] Adam moments.
            epoch: Current epoch (bias-correction exponent epoch + 1).

        Returns:
            (lam, m, v) after the step.
        """
        above = ((sim > lam[:, None]) & neg).sum(dim=1).to(sim.dtype)
        grad = self.alpha - above / neg.sum(dim=1).to(sim.dtype)
        if self.init_quantile:
            fresh = lam >= LAMBDA_INIT
            if bool(fresh.any()):
                level = torch.tensor(1.0 - self.alpha, dtype=sim.dtype, device=sim.device)
                start = torch.nanquantile(sim.masked_fill(~neg, float("nan")), level, dim=1)
                stepped = per_sample_adam(
                    lam, grad, m, v, lr=self.lr, betas=LAMBDA_BETAS, eps=LAMBDA_EPS, step=epoch + 1,
                    bounds=(-1.0, 1.0),
                )
                return torch.where(fresh, start, stepped[0]), stepped[1] * ~fresh, stepped[2] * ~fresh
        return per_sample_adam(
            lam,
            grad,
            m,
            v,
            lr=self.lr,
            betas=LAMBDA_BETAS,
            eps=LAMBDA_EPS,
            step=epoch + 1,
            bounds=(-1.0, 1.0),
        )

    @staticmethod
    def keep_mask(sim: torch.Tensor, neg: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """[b, B] bool: negatives at or below their anchor's threshold."""
        return neg & (sim <= lam[:, None])
