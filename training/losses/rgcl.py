"""RGCL with individual temperatures (iSogCLR / FastCLIP-v2).

Every sample keeps, per anchor side, a temperature tau_i (init ``temperature``), a running bound b_i
of its scaled logit gaps (for stable exponentials), u_i stored in the shifted scale
(``u_i ~ mean_j exp(d_ij - b_i)``, ``d_ij = (s_ij - s_ii)/tau_i``) and Adam moments m_i, v_i:
40 B per sample in float32. Each step, for the local anchors (fast_clip ``FastCLIPLossIndividual``):

* ``b_new = max(b_old, max_j d_ij)``; ``u <- (1 - gamma) u exp(b_old - b_new) + gamma g``;
* ``dRGCL/dtau_i = log u_i + b_i + rho - (1/(B-1)) sum_j exp(d_ij - b_i) d_ij / u_i``, clamped to
  [-5, 5] (the derivative of ``tau_i (log g_i + rho)``; fast_clip leaves out the 1/n of the dataset
  mean, which only rescales lr_tau);
* one Adam step with lr ``lr_tau`` (1/3 of it where tau_i <= 0.03 for ``step_thresh``),
  betas (0, 0) during epoch 0 and (0.9, 0.999) after, bias correction exponent epoch + 1, then
  projection onto [0.01, 1]. ``tau_adam_sqrt`` (default True) divides by sqrt(v_hat) as Adam does;
  fast_clip's code (both stored versions, and the GloFND fork) divides by v_hat.

The model surrogate has the two-pass form of ``gcl.py`` with per-anchor temperatures; the model's
``logit_scale`` is not used (and frozen).
"""

from __future__ import annotations

import torch

from pipeline.sections import LossConfig
from training.losses.base import LossInputs
from training.losses.estimators import masked_mean_exp, moving_average, per_sample_adam, u_statistics
from training.losses.gcl import SIDES, GCLBase, GlobalBatch
from training.losses.schedules import STEP_THRESH_RATIO, STEP_THRESH_TAU

TAU_BOUNDS = (0.01, 1.0)
TAU_BETAS = (0.9, 0.999)
TAU_EPS = 1e-8
TAU_GRAD_CLAMP = 5.0
_STATE = ("u", "tau", "bound", "tau_m", "tau_v")


class IndividualTemperatureGCL(GCLBase):
    """FastCLIP-v2: GCL with a learned temperature per sample and anchor side.

    Arguments as :class:`GCLBase`; ``cfg`` has ``temperature_scheme="individual_learnable"``, ``lr_tau`` > 0.
    """

    def table_inits(self, cfg: LossConfig) -> dict[str, float]:
        """u, tau, bound and tau's Adam moments per side."""
        if cfg.temperature_scheme != "individual_learnable":
            raise ValueError(
                f"temperature_scheme: IndividualTemperatureGCL needs 'individual_learnable', "
                f"got {cfg.temperature_scheme!r}"
            )
        inits = {"u": 0.0, "tau": cfg.temperature, "bound": 0.0, "tau_m": 0.0, "tau_v": 0.0}
        return {f"{name}_{side}": inits[name] for name in _STATE for side in SIDES}

    def contrastive_terms(self, x: LossInputs) -> dict[str, torch.Tensor]:
        """The FastCLIP-v2 surrogate; updates u, tau, bounds and moments. ``logit_scale`` is unused."""
        batch, sim, diag = self.local_scores(x)
        pair_ids = x.pair_ids
        columns, local = {}, {}
        for side in SIDES:
            values = self.tables.read([f"{n}_{side}" for n in _STATE], pair_ids, like=diag)
            state = dict(zip(_STATE, values, strict=True))
            g, new = self._local_side(sim[side] - diag[:, None], state, batch)
            columns.update({f"{name}_{side}": value for name, value in new.items()})
            local[side] = self._weight(state["tau"]) * g / (new["u"] + self.cfg.eps)
        shared = self.share(columns, batch, tuple(f"{n}_{side}" for n in _STATE for side in SIDES))
        loss = self.surrogate(local, self._remote(sim, shared, batch))
        taus = torch.cat([columns["tau_im"], columns["tau_tt"]])
        return {
            "contrastive_loss": loss,
            "tau": taus.mean(),
            "gamma": torch.tensor(self.gamma),
            # u of the gathered batch (the same on every rank); v2 stores u shifted by its bound.
            **u_statistics(torch.cat([shared["u_im"], shared["u_tt"]])),
        }

    def _local_side(
        self, gap: torch.Tensor, state: dict[str, torch.Tensor], batch: GlobalBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mini-batch estimate g (with grad) and the updated per-sample state of one anchor side."""
        cfg, neg = self.cfg, batch.neg
        n = neg.sum(dim=1).to(gap.dtype)
        diff = gap / state["tau"][:, None]
        bound = torch.maximum(state["bound"], diff.detach().max(dim=1).values)
        g = masked_mean_exp(diff - bound[:, None], neg, n)
        u = moving_average(state["u"], g.detach(), self.gamma, rescale=torch.exp(state["bound"] - bound))
        weights = (diff.detach() - bound[:, None]).masked_fill(~neg, float("-inf")).exp()
        grad = (
            -(weights * diff.detach()).sum(dim=1) / (u + cfg.eps) / n
            + torch.log(u + cfg.eps)
            + bound
            + cfg.rho
        ).clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)
        tau, m, v = per_sample_adam(
            state["tau"],
            grad,
            state["tau_m"],
            state["tau_v"],
            lr=self._tau_lr(state["tau"]),
            betas=TAU_BETAS if self.epoch > 0 else (0.0, 0.0),
            eps=TAU_EPS,
            step=self.epoch + 1,
            bounds=TAU_BOUNDS,
            use_sqrt=cfg.tau_adam_sqrt,
        )
        return g, {"u": u, "tau": tau, "bound": bound, "tau_m": m, "tau_v": v, "tau_old": state["tau"]}

    def _remote(
        self, sim: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], batch: GlobalBatch
    ) -> dict[str, torch.Tensor]:
        """Every global anchor against the local negatives, with its gathered tau, bound and u."""
        b, big_b = sim["im"].shape
        negatives = {"im": sim["tt"].T, "tt": sim["im"].T}
        # fast_clip scores remote anchors with the tau it just updated; "paper" keeps the local pass's tau.
        tau_key = "tau_old" if self.cfg.grad_convention == "paper" else "tau"
        remote = {}
        for side in SIDES:
            tau, bound = shared[f"{tau_key}_{side}"], shared[f"bound_{side}"]
            diff = (negatives[side] - batch.diag[:, None]) / tau[:, None] - bound[:, None]
            h = masked_mean_exp(diff, batch.neg.T, torch.full_like(tau, (big_b - 1) * b / big_b))
            remote[side] = self._weight(shared[f"tau_old_{side}"]) * h / (shared[f"u_{side}"] + self.cfg.eps)
        return remote

    def _weight(self, tau: torch.Tensor) -> torch.Tensor | float:
        """Per-anchor factor of the surrogate: tau_i for ``paper`` (the RGCL gradient), 1 as in fast_clip."""
        return tau if self.cfg.grad_convention == "paper" else 1.0

    def _tau_lr(self, tau: torch.Tensor) -> torch.Tensor | float:
        if self.cfg.lr_tau_scheduler == "step_thresh":
            reduced = tau.new_full(tau.shape, self.cfg.lr_tau * STEP_THRESH_RATIO)
            return torch.where(tau <= STEP_THRESH_TAU, reduced, self.cfg.lr_tau)
        return self.cfg.lr_tau
