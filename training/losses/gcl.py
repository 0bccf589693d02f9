"""Global contrastive loss (SogCLR / FastCLIP v0, v1, v3), optionally with GloFND.

Per worker k with local batch b of a global batch B (fast_clip ``local`` + ``forward``):

1. gather the features without autograd; the local anchors i are scored against all B columns:
   ``g_i = (1/n_i) sum_{j kept} exp(s_ls (s_ij - s_ii))`` with n_i = B - 1 (or GloFND's kept count);
   gradient flows only into the local anchor and positive;
2. ``u_i <- (1 - gamma) u_i + gamma g_i`` (first visit: ``u_i = g_i``), then the new u's (and GloFND's
   lambda, moments and kept counts) are all-gathered with the pair ids and written into every rank's
   table, so all replicas stay identical;
3. every global anchor j is scored against the local negatives only, ``h_j = sum_{i local} ... /
   (b n_j / B)``, which sends the "feature as a negative" part of the gradient to the local features;
4. surrogate ``L = 1/2 [mean_i (g_i/(u_i+eps)) + mean_j (h_j/(u_j+eps))]`` summed over both anchor
   sides. After DDP averages gradients over the K ranks, the gradient equals the exact global-batch
   estimator ``(1/(2B)) sum_i (1/u_i) grad g_i``, i.e. ``grad F / (2 tau)`` of
   ``F = (tau/n) sum_i [log(eps + g1_i) + log(eps + g2_i)]`` when u = g.
5. ``multiply_tau`` (v3, RGCL-g): ``L / sg(s_ls) + rho / s_ls + mean(log u1 + log u2) / (2 s_ls)``;
   the model gradient becomes ``grad F / 2`` and d/dtau that of ``(F + 2 rho tau) / 2`` (RGCL-g),
   except for the factor noted in ``training/losses/__init__.py`` (``grad_convention``).

Table memory per sample: 8 B (u for both sides, float32); GloFND adds lambda, m, v per side (24 B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.sections import LossConfig
from training.losses.base import ContrastiveLoss, LossInputs
from training.losses.dist_utils import all_gather_columns, all_gather_no_grad
from training.losses.estimators import masked_mean_exp, moving_average, u_statistics
from training.losses.glofnd import LAMBDA_INIT, GloFNDThreshold
from training.losses.schedules import gamma_at_epoch
from training.losses.tables import SampleTables

SIDES = ("im", "tt")
"""Anchor sides: image anchors against texts ("im"), text anchors against images ("tt")."""


@dataclass
class GlobalBatch:
    """The gathered global batch (constants) and where this rank's rows sit in it."""

    image: torch.Tensor
    """[B, d] image features of all ranks, no grad."""
    text: torch.Tensor
    """[B, d] text features of all ranks, no grad."""
    ids: torch.Tensor
    """[B] pair ids of all ranks."""
    diag: torch.Tensor
    """[B] positive-pair similarities s_jj, no grad."""
    neg: torch.Tensor
    """[b, B] bool, True except at each local anchor's own positive (column offset + i)."""
    offset: int
    """Row of this rank's first sample in the global batch."""


def compute_dtype(features: torch.Tensor) -> torch.Tensor:
    """Half-precision features are promoted to float32: the exponentials need the range."""
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


class GCLBase(ContrastiveLoss):
    """Tables, gamma schedule and FastCLIP communication shared by the GCL variants.

    Subclasses name their per-sample tables (and check the config) in :meth:`table_inits`.

    Args:
        cfg: Loss configuration (``data_size`` > 0).
        rank: This process's rank.
        world_size: Number of data-parallel processes.
        table_device: Where the tables live.
        table_dtype: Storage dtype of the tables.
    """

    def __init__(
        self,
        *,
        cfg: LossConfig,
        rank: int = 0,
        world_size: int = 1,
        table_device: torch.device | str = "cpu",
        table_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(cfg=cfg, rank=rank, world_size=world_size)
        tables = self.table_inits(cfg)
        self.tables = SampleTables(tables, cfg.data_size, dtype=table_dtype, device=table_device)
        self.gamma = 1.0

    def table_inits(self, cfg: LossConfig) -> dict[str, float]:
        """Table name -> initial value; raises ``ValueError`` for a config the variant cannot run."""
        raise NotImplementedError

    def local_scores(self, x: LossInputs) -> tuple[GlobalBatch, dict[str, torch.Tensor], torch.Tensor]:
        """The gathered batch, the local anchors' similarity blocks per side and their positives."""
        image, text = compute_dtype(x.image), compute_dtype(x.text)
        batch = self.gather_batch(image, text, x.pair_ids)
        sim = {"im": image @ batch.text.T, "tt": text @ batch.image.T}
        return batch, sim, (image * text).sum(dim=1)

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch and move gamma along its schedule (1 in epoch 0)."""
        super().set_epoch(epoch)
        self.gamma = gamma_at_epoch(
            epoch, self.cfg.gamma, self.cfg.gamma_schedule, self.cfg.gamma_decay_epochs
        )

    def get_extra_state(self) -> dict:
        """Epoch and gamma, saved next to the tables."""
        return {"epoch": self.epoch, "gamma": self.gamma}

    def set_extra_state(self, state: dict) -> None:
        """Restore epoch and gamma."""
        super().set_extra_state(state)
        self.gamma = float(state["gamma"])

    def gather_batch(self, image: torch.Tensor, text: torch.Tensor, pair_ids: torch.Tensor) -> GlobalBatch:
        """All-gather features and ids (no autograd) and build the local negative mask."""
        self.tables.check_ids(pair_ids)
        all_image = all_gather_no_grad(image, self.world_size)
        all_text = all_gather_no_grad(text, self.world_size)
        all_ids = all_gather_no_grad(pair_ids.to(device=image.device, dtype=torch.int64), self.world_size)
        b, offset = image.shape[0], self.rank * image.shape[0]
        neg = torch.ones(b, all_image.shape[0], dtype=torch.bool, device=image.device)
        local = torch.arange(b, device=image.device)
        neg[local, local + offset] = False
        return GlobalBatch(all_image, all_text, all_ids, (all_image * all_text).sum(dim=1), neg, offset)

    def share(
        self, columns: dict[str, torch.Tensor], batch: GlobalBatch, store: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """All-gather [b] columns into [B] ones; write the ``store`` names into the tables at all ids."""
        names = list(columns)
        gathered = dict(
            zip(names, all_gather_columns([columns[n] for n in names], self.world_size), strict=True)
        )
        self.tables.write({name: gathered[name] for name in store}, batch.ids)
        return gathered

    def surrogate(self, local: dict[str, torch.Tensor], remote: dict[str, torch.Tensor]) -> torch.Tensor:
        """``1/2 [mean_i sum_sides local_i + mean_j sum_sides remote_j]`` of per-anchor ratios g/(u+eps)."""
        local_sum = sum(local[side] for side in SIDES)
        remote_sum = sum(remote[side] for side in SIDES)
        return 0.5 * (local_sum.mean() + remote_sum.mean())


class GlobalContrastiveLoss(GCLBase):
    """GCL with a global temperature: FastCLIP v0 / v1 / v3 and SogCLR, optionally with GloFND.

    Arguments as :class:`GCLBase`; ``cfg`` has a global ``temperature_scheme`` and ``data_size`` > 0.
    """

    def table_inits(self, cfg: LossConfig) -> dict[str, float]:
        """u per side; GloFND adds lambda and its Adam moments per side."""
        if cfg.temperature_scheme == "individual_learnable":
            raise ValueError("temperature_scheme: 'individual_learnable' needs IndividualTemperatureGCL")
        tables = {f"u_{side}": 0.0 for side in SIDES}
        self.glofnd = None
        if cfg.glofnd == "glofnd":
            self.glofnd = GloFNDThreshold(
                cfg.glofnd_alpha,
                cfg.glofnd_lr_lda,
                cfg.glofnd_start_update,
                cfg.glofnd_start_lda,
                cfg.glofnd_init_quantile,
            )
            for side in SIDES:
                tables.update({f"lda_{side}": LAMBDA_INIT, f"lda_m_{side}": 0.0, f"lda_v_{side}": 0.0})
        return tables

    def contrastive_terms(self, x: LossInputs) -> dict[str, torch.Tensor]:
        """The FastCLIP surrogate for the local batch; see ``ContrastiveLoss.forward``."""
        batch, sim, diag = self.local_scores(x)
        pair_ids = x.pair_ids
        scale = x.logit_scale.to(diag.dtype)
        if self.cfg.temperature_scheme == "global_constant":
            scale = scale.detach()
        keep, columns, store = self._thresholds(sim, batch, pair_ids)
        g = {
            side: masked_mean_exp(scale * (sim[side] - diag[:, None]), keep[side], columns[f"n_{side}"])
            for side in SIDES
        }
        u_old = dict(zip(SIDES, self.tables.read(["u_im", "u_tt"], pair_ids, like=diag), strict=True))
        for side in SIDES:
            columns[f"u_{side}"] = moving_average(u_old[side], g[side].detach(), self.gamma)
        shared = self.share(columns, batch, store + ("u_im", "u_tt"))
        loss = self._two_pass_loss(sim, g, columns, shared, keep, batch, scale)
        return self._terms(loss, scale, columns, shared, keep, batch)

    def _thresholds(
        self, sim: dict[str, torch.Tensor], batch: GlobalBatch, pair_ids: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple[str, ...]]:
        """Keep masks, the columns to share (kept counts, updated lambda state) and the tables to store."""
        keep = dict.fromkeys(SIDES, batch.neg)
        columns = {f"n_{side}": batch.neg.sum(dim=1).to(batch.diag.dtype) for side in SIDES}
        if self.glofnd is None or not self.glofnd.updates_at(self.epoch):
            return keep, columns, ()
        store: tuple[str, ...] = ()
        for side in SIDES:
            names = [f"lda_{side}", f"lda_m_{side}", f"lda_v_{side}"]
            lam, m, v = self.tables.read(names, pair_ids, like=batch.diag)
            columns.update(
                zip(
                    names, self.glofnd.step(sim[side].detach(), batch.neg, lam, m, v, self.epoch), strict=True
                )
            )
            store += tuple(names)
            if self.glofnd.masks_at(self.epoch):
                keep[side] = GloFNDThreshold.keep_mask(sim[side].detach(), batch.neg, columns[f"lda_{side}"])
                # An anchor whose negatives are all flagged contributes g = 0 instead of 0/0.
                columns[f"n_{side}"] = keep[side].sum(dim=1).clamp(min=1).to(batch.diag.dtype)
        return keep, columns, store

    def _two_pass_loss(
        self,
        sim: dict[str, torch.Tensor],
        g: dict[str, torch.Tensor],
        columns: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        keep: dict[str, torch.Tensor],
        batch: GlobalBatch,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Local-anchor and remote-anchor passes combined into the FastCLIP surrogate (+ RGCL-g terms)."""
        cfg, b = self.cfg, sim["im"].shape[0]
        share_of_b = b / batch.image.shape[0]
        remote_scale = scale.detach() if cfg.grad_convention == "paper" else scale
        # The remote pass reuses the local similarity blocks: image anchors meet local texts in sim["tt"].T.
        negatives = {"im": sim["tt"].T, "tt": sim["im"].T}
        remote_keep = self._remote_keep(keep, batch)
        local, remote = {}, {}
        for side in SIDES:
            local[side] = g[side] / (columns[f"u_{side}"] + cfg.eps)
            h = masked_mean_exp(
                remote_scale * (negatives[side] - batch.diag[:, None]),
                remote_keep[side],
                shared[f"n_{side}"] * share_of_b,
            )
            remote[side] = h / (shared[f"u_{side}"] + cfg.eps)
        loss = self.surrogate(local, remote)
        if cfg.multiply_tau:
            log_u = torch.log(columns["u_im"] + cfg.eps) + torch.log(columns["u_tt"] + cfg.eps)
            loss = loss / scale.detach() + cfg.rho / scale + 0.5 * log_u.mean() / scale
        return loss

    def _remote_keep(self, keep: dict[str, torch.Tensor], batch: GlobalBatch) -> dict[str, torch.Tensor]:
        """Per side, the [B, b] keep mask of every global anchor against this rank's negatives."""
        if all(keep[side] is batch.neg for side in SIDES):
            return dict.fromkeys(SIDES, batch.neg.T)
        # Each anchor's mask was decided by its owner rank; one uint8 gather serves both sides.
        stacked = torch.stack([keep[side] for side in SIDES], dim=1).to(torch.uint8)
        gathered = all_gather_no_grad(stacked, self.world_size)
        columns = gathered[:, :, batch.offset : batch.offset + stacked.shape[0]].bool()
        return {side: columns[:, k] for k, side in enumerate(SIDES)}

    def _terms(
        self,
        loss: torch.Tensor,
        scale: torch.Tensor,
        columns: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        keep: dict[str, torch.Tensor],
        batch: GlobalBatch,
    ) -> dict[str, torch.Tensor]:
        u = torch.cat([columns["u_im"], columns["u_tt"]])
        tau = 1.0 / scale.detach()
        terms = {
            "contrastive_loss": loss,
            "tau": tau,
            "gamma": torch.tensor(self.gamma),
            "gcl_estimate": tau * torch.log(u + self.cfg.eps).mean() * 2.0,
        }
        # Statistics of the gathered (global-batch) state: identical on every rank.
        terms.update(u_statistics(torch.cat([shared["u_im"], shared["u_tt"]])))
        if self.glofnd is not None:
            kept = (keep["im"].sum() + keep["tt"].sum()).to(u.dtype)
            terms["kept_frac"] = kept / (2.0 * batch.neg.sum())
            terms["neg_removed_frac"] = 1.0 - terms["kept_frac"]
            # 0: lambda frozen (epoch < glofnd_start_update), 1: lambda learning, 2: mask applied.
            phase = int(self.glofnd.updates_at(self.epoch)) + int(self.glofnd.masks_at(self.epoch))
            terms["glofnd_phase"] = torch.tensor(float(phase))
            if "lda_im" in shared:
                lam = torch.cat([shared["lda_im"], shared["lda_tt"]])
                terms.update(u_statistics(lam, "lambda"))
                # Anchors whose lambda has left its start value 1 (lambda moves once per visit).
                terms["lambda_moved_frac"] = (lam < LAMBDA_INIT).to(u.dtype).mean()
        return terms

    def reset_thresholds(self) -> None:
        """With ``glofnd_reset_lda``, restart every lambda at 1 and zero its Adam moments (after a resume)."""
        if self.glofnd is None or not self.cfg.glofnd_reset_lda:
            return
        self.tables.reset([f"{name}_{side}" for name in ("lda", "lda_m", "lda_v") for side in SIDES])
