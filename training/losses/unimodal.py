"""Unimodal (two augmented views of one image) contrastive losses: SogCLR's GCL and SimCLR's NT-Xent.

For a global batch of B images with views a and b (L2-normalised projections ``z_a``, ``z_b``),
anchor i of view a has the 2(B-1) negatives ``{z_b[j], z_a[j] : j != i}`` and the positive ``z_b[i]``
(symmetrically for view b). With temperature T:

* ``simclr`` (NT-Xent): ``l_i = -log( exp(s_ii'/T) / sum_{k != i} exp(s_ik/T) )`` over the 2B-1
  candidates; the loss is ``mean_i (l_i^a + l_i^b)`` (SogCLR ``contrastive_loss``).
* ``dcl`` (SogCLR, ``sogclr/builder.py`` ``dynamic_contrastive_loss``): per image one moving average
  ``u_i`` of ``g_i = (1/(2(B-1))) sum_{negatives} exp(s_ik/T)``. Both views use the stored ``u_i``:
  ``u^a_i = (1-gamma) u_i + gamma g^a_i`` (same for b), and ``(u^a_i + u^b_i)/2`` is written back
  (the PyTorch branch; the TF branch stores the sum). A first visit takes ``u = g`` (gamma = 1).
  The surrogate ``-s_ii' + sum_k sg(exp(s_ik/T)/u_i) s_ik / (2(B-1))`` (logits not divided by T, as
  upstream) has the gradient ``T (1/u_i) grad g_i - grad s_ii'``, i.e. T times the gradient of
  ``-s_ii'/T + log g_i`` with the stale global ``u_i`` in place of the mini-batch ``g_i``.

Distributed: features are all-gathered **with** autograd (``torch.distributed.nn``), so negatives on
other ranks receive their gradient (the fix LibAUC made for SogCLR issue #1); the u's are gathered
with the ids and written into every rank's replica. After DDP averages parameter gradients over K
ranks the step equals one process on the global batch (``tests/unit/test_ssl_loss.py``).

Reused from the CLIP losses: :class:`~training.losses.tables.SampleTables` (the u table, saved in
``state_dict``), :func:`~training.losses.estimators.moving_average` and the collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.losses.dist_utils import (
    all_gather_columns,
    all_gather_no_grad,
    all_gather_with_grad,
    check_process_group,
)
from training.losses.estimators import moving_average, u_statistics
from training.losses.tables import SampleTables

LOSS_TYPES = ("dcl", "simclr")
class UnimodalContrastiveLoss(nn.Module):
    """SogCLR ``dcl`` or SimCLR ``simclr`` on two views.

    Args:
        loss_type: ``dcl`` or ``simclr``.
        data_size: Number of images (rows of the u table; ``dcl`` only).
        temperature: T (SogCLR: 0.1).
        gamma: Moving-average rate of u (SogCLR: 0.9).
        rank, world_size: This process in the data-parallel group.
        table_dtype: Storage dtype of the u table (float64 in exactness tests).
    """

    def __init__(
        self,
        *,
        loss_type: str = "dcl",
        data_size: int = 0,
        temperature: float = 0.1,
        gamma: float = 0.9,
        rank: int = 0,
        world_size: int = 1,
        table_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: {loss_type!r} is not one of {list(LOSS_TYPES)}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma: must be in (0, 1], got {gamma}")
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        check_process_group(rank, world_size)
        self.loss_type, self.temperature, self.gamma = loss_type, float(temperature), float(gamma)
        self.rank, self.world_size = rank, world_size
        self.tables = (
            SampleTables({"u": 0.0}, data_size, dtype=table_dtype, device="cpu") if loss_type == "dcl" else None
        )

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of the local batch.

        Args:
            z_a, z_b: [b, d] projections of the two views (normalised here).
            index: [b] int64 image ids in [0, data_size) (``dcl``).

        Returns:
            ``contrastive_loss`` (back-propagate it) and detached diagnostics (u statistics for dcl).
        """
        if z_a.shape != z_b.shape or z_a.dim() != 2:
            raise ValueError(f"z_b: expected shape {tuple(z_a.shape)}, got {tuple(z_b.shape)}")
        z_a, z_b = F.normalize(z_a.float() if z_a.dtype != torch.float64 else z_a, dim=1), F.normalize(
            z_b.float() if z_b.dtype != torch.float64 else z_b, dim=1
        )
        b = z_a.shape[0]
        big_a, big_b = all_gather_with_grad(z_a, self.world_size), all_gather_with_grad(z_b, self.world_size)
        n = big_a.shape[0]
        own = torch.arange(b, device=z_a.device) + self.rank * b
        # Rows: anchors of view a then view b; columns: [other view | same view] of the global batch.
        logits = torch.cat(
            [torch.cat([z_a @ big_b.T, z_a @ big_a.T], dim=1), torch.cat([z_b @ big_a.T, z_b @ big_b.T], dim=1)]
        )
        rows = torch.arange(2 * b, device=z_a.device)
        pos_col = torch.cat([own, own])
        self_col = pos_col + n
        neg = torch.ones_like(logits, dtype=torch.bool)
        neg[rows, pos_col] = False
        neg[rows, self_col] = False
        positive = logits[rows, pos_col]
        if self.loss_type == "simclr":
            scaled = (logits / self.temperature).masked_fill(~neg, float("-inf"))
            scaled[rows, pos_col] = positive / self.temperature
            per_anchor = torch.logsumexp(scaled, dim=1) - positive / self.temperature
            return {"contrastive_loss": per_anchor.view(2, b).sum(0).mean()}
        return self._dcl(logits, neg, positive, index, n)

    def _dcl(
        self, logits: torch.Tensor, neg: torch.Tensor, positive: torch.Tensor, index: torch.Tensor, n: int
    ) -> dict[str, torch.Tensor]:
        assert self.tables is not None
        b = logits.shape[0] // 2
        self.tables.check_ids(index)
        denom = 2.0 * (n - 1)
        exp_neg = (logits.detach() / self.temperature).masked_fill(~neg, float("-inf")).exp()
        g = exp_neg.sum(dim=1) / denom  # [2b]: view a anchors, then view b
        (u_old,) = self.tables.read(["u"], index, like=g)
        u_a = moving_average(u_old, g[:b], self.gamma)
        u_b = moving_average(u_old, g[b:], self.gamma)
        ids = all_gather_no_grad(index.to(device=g.device, dtype=torch.int64), self.world_size)
        (u_all,) = all_gather_columns([(u_a + u_b) / 2], self.world_size)
        self.tables.write({"u": u_all}, ids)
        weights = exp_neg / torch.cat([u_a, u_b])[:, None]
        per_anchor = -positive + (weights * logits.masked_fill(~neg, 0.0)).sum(dim=1) / denom
        terms = {"contrastive_loss": per_anchor.view(2, b).sum(0).mean(), "gamma": torch.tensor(self.gamma)}
        terms.update(u_statistics(torch.cat([u_a, u_b])))
        terms["g_mean"] = g.mean()
        return terms
