"""Typed, validated configuration of the contrastive losses (the ``loss`` config section).

Field names follow the FastCLIP / GloFND command-line options, so recipes from those repositories
carry over (``--rho 6.5`` becomes ``rho: 6.5``). ``version`` is a shortcut for FastCLIP's named
variants; it fills ``temperature_scheme`` and ``multiply_tau`` (FastCLIP README table):

======== ========= ==================== ============
version  objective temperature_scheme   multiply_tau
======== ========= ==================== ============
v0       GCL       global_learnable     False
v1       GCL       global_constant      False
v2       RGCL      individual_learnable False
v3       RGCL-g    global_learnable     True
======== ========= ==================== ============

Leaving ``temperature_scheme`` / ``multiply_tau`` unset (None) takes them from ``version``, or
``global_learnable`` / False without a version; setting them to something the version contradicts
is refused. Every check raises ``ValueError`` naming the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

VERSION_SETTINGS: dict[str, tuple[str, bool]] = {
    "v0": ("global_learnable", False),
    "v1": ("global_constant", False),
    "v2": ("individual_learnable", False),
    "v3": ("global_learnable", True),
}
"""FastCLIP version -> (temperature_scheme, multiply_tau)."""

_CHOICES: dict[str, tuple[object, ...]] = {
    "name": ("clip", "gcl", "fastclip"),
    "version": (None, "v0", "v1", "v2", "v3"),
    "gamma_schedule": ("cosine", "constant"),
    "lr_tau_scheduler": ("cosine", "const", "step_thresh"),
    "temperature_scheme": (None, "global_constant", "global_learnable", "individual_learnable"),
    "glofnd": ("none", "glofnd"),
    "distill_mode": ("feature",),
    "table_device": ("cpu", "cuda", "same"),
    "grad_convention": ("upstream", "paper"),
}


@dataclass(kw_only=True)
class LossConfig:
    """Which contrastive loss to train with, and its hyper-parameters."""

    name: Literal["clip", "gcl", "fastclip"] = "clip"
    """``clip``: OpenCLIP mini-batch InfoNCE. ``gcl``: SogCLR global contrastive loss with explicit
    settings. ``fastclip``: the same GCL family, usually selected through ``version``."""
    version: Literal["v0", "v1", "v2", "v3"] | None = None
    """FastCLIP variant (fastclip only); sets ``temperature_scheme`` and ``multiply_tau``."""
    data_size: int = 0
    """Rows of the per-sample tables (> every pair id). 0: the trainer fills in the dataset size."""
    gamma: float = 0.8
    """Final inner learning rate gamma_min of the moving-average estimator u, in (0, 1]."""
    gamma_schedule: Literal["cosine", "constant"] = "cosine"
    """gamma over epochs: 1 in epoch 0, then cosine from 1 down to ``gamma``, or ``gamma`` at once."""
    gamma_decay_epochs: int = 10
    """Epochs of the cosine decay of gamma (FastCLIP README: about half the epochs)."""
    rho: float = 8.0
    """DRO radius of RGCL / RGCL-g (v2, v3); larger pushes the temperature down."""
    eps: float = 1e-14
    """epsilon in log(eps + g) and g / (u + eps)."""
    temperature: float = 0.07
    """Initial temperature tau in [0.01, 1] (global logit scale = 1/tau; v2 per-sample tau init)."""
    lr_tau: float = -1.0
    """Learning rate of the temperature; < 0 uses the model lr (global schemes). v2 needs > 0."""
    lr_tau_scheduler: Literal["cosine", "const", "step_thresh"] = "cosine"
    """Schedule of lr_tau; ``step_thresh`` divides it by 3 once tau <= 0.03 (see schedules.py)."""
    temperature_scheme: Literal["global_constant", "global_learnable", "individual_learnable"] | None = None
    """How tau is treated; None: from ``version`` (or ``global_learnable`` without one)."""
    multiply_tau: bool | None = None
    """Optimise RGCL-g (tau-scaled GCL + rho*tau) instead of GCL; None: from ``version`` (or False)."""
    glofnd: Literal["none", "glofnd"] = "none"
    """Global false-negative detection: drop negatives above a learned per-anchor quantile."""
    glofnd_alpha: float = 1e-3
    """Fraction of each anchor's negatives (dataset-wide) treated as false negatives, in (0, 1)."""
    glofnd_lr_lda: float = 0.05
    """Adam learning rate of the per-anchor thresholds lambda."""
    glofnd_start_update: int = 0
    """Epoch from which lambda is updated."""
    glofnd_start_lda: int = 0
    """Epoch from which negatives above lambda are removed (>= glofnd_start_update)."""
    glofnd_reset_lda: bool = False
    """When resuming, restart lambda from 1 (``reset_thresholds``) instead of the checkpoint."""
    glofnd_init_quantile: bool = False
    """GloFND's ``init_quantile``: an anchor's first update sets lambda to the (1 - alpha) quantile of
    its negatives in the batch instead of one Adam step from 1 (the filter then acts from the first
    visit; without it lambda moves about ``glofnd_lr_lda`` per visit, i.e. per epoch)."""
    distill_weight: float = 0.0
    """w in (1 - w) * contrastive + w * feature distillation, in [0, 1]; 0 disables the teacher."""
    distill_mode: Literal["feature"] = "feature"
    """Distillation loss; ``feature``: squared L2 between normalised teacher and student features."""
    table_device: Literal["cpu", "cuda", "same"] = "cpu"
    """Where the per-sample tables live; ``same``: the training device."""
    local_loss: bool = True
    """CLIP loss only: local rows against the gathered batch (OpenCLIP --local-loss)."""
    gather_with_grad: bool = True
    """CLIP loss only: differentiate through the feature all-gather (OpenCLIP --gather-with-grad)."""
    grad_convention: Literal["upstream", "paper"] = "upstream"
    """``upstream``: gradients exactly as fast_clip's code. ``paper``: fixes three places where the
    code departs from the stated objectives (see training/losses/__init__.py)."""
    tau_adam_sqrt: bool = True
    """v2 per-sample temperature Adam divides by sqrt(v_hat) (True) or by v_hat as fast_clip's code."""

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"{key}: {value!r} is not one of {list(allowed)}")
        self._resolve_version()
        self._check_ranges()
        self._check_combinations()

    def _resolve_version(self) -> None:
        if self.version is None:
            self.temperature_scheme = self.temperature_scheme or "global_learnable"
            self.multiply_tau = bool(self.multiply_tau)
            return
        if self.name != "fastclip":
            raise ValueError(f"version: {self.version!r} needs name='fastclip', got name={self.name!r}")
        scheme, multiply = VERSION_SETTINGS[self.version]
        for key, implied in (("temperature_scheme", scheme), ("multiply_tau", multiply)):
            value = getattr(self, key)
            if value is not None and value != implied:
                raise ValueError(
                    f"{key}: {value!r} contradicts version={self.version!r} (which means {implied!r})"
                )
        self.temperature_scheme, self.multiply_tau = scheme, multiply

    def _check_ranges(self) -> None:
        checks = (
            ("data_size", self.data_size >= 0, ">= 0"),
            ("gamma", 0.0 < self.gamma <= 1.0, "in (0, 1]"),
            ("gamma_decay_epochs", self.gamma_decay_epochs >= 1, ">= 1"),
            ("eps", self.eps >= 0.0, ">= 0"),
            ("temperature", 0.01 <= self.temperature <= 1.0, "in [0.01, 1]"),
            ("lr_tau", self.lr_tau != 0.0 and math.isfinite(self.lr_tau), "finite and != 0 (< 0: model lr)"),
            ("glofnd_alpha", 0.0 < self.glofnd_alpha < 1.0, "in (0, 1)"),
            ("glofnd_lr_lda", self.glofnd_lr_lda > 0.0, "> 0"),
            ("glofnd_start_update", self.glofnd_start_update >= 0, ">= 0"),
            ("glofnd_start_lda", self.glofnd_start_lda >= 0, ">= 0"),
            ("distill_weight", 0.0 <= self.distill_weight <= 1.0, "in [0, 1]"),
        )
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"{key}: must be {rule}, got {getattr(self, key)!r}")

    def _check_combinations(self) -> None:
        if self.name == "clip":
            self._check_clip()
        if self.temperature_scheme == "individual_learnable":
            self._check_individual()
        if self.glofnd_start_update > self.glofnd_start_lda:
            raise ValueError(
                f"glofnd_start_update: must be <= glofnd_start_lda={self.glofnd_start_lda}, "
                f"got {self.glofnd_start_update}"
            )

    def _check_clip(self) -> None:
        if self.temperature_scheme == "individual_learnable":
            raise ValueError("temperature_scheme: 'individual_learnable' needs name='gcl' or 'fastclip'")
        if self.multiply_tau:
            raise ValueError("multiply_tau: True needs name='gcl' or 'fastclip', got name='clip'")
        if self.glofnd != "none":
            raise ValueError(f"glofnd: {self.glofnd!r} needs name='gcl' or 'fastclip', got name='clip'")

    def _check_individual(self) -> None:
        if self.glofnd != "none":
            raise ValueError(
                f"glofnd: {self.glofnd!r} works with global temperature schemes only, "
                f"got temperature_scheme='individual_learnable'"
            )
        if self.multiply_tau:
            raise ValueError(
                "multiply_tau: True is meaningless with temperature_scheme='individual_learnable'"
            )
        if self.lr_tau < 0:
            raise ValueError(
                f"lr_tau: individual_learnable updates tau inside the loss and needs lr_tau > 0, "
                f"got {self.lr_tau}"
            )
        if self.lr_tau_scheduler == "cosine":
            raise ValueError(
                "lr_tau_scheduler: 'cosine' needs the step count, which the loss does not "
                "see; use 'const' or 'step_thresh' with temperature_scheme='individual_learnable'"
            )

    @property
    def is_gcl(self) -> bool:
        """True for the global contrastive family (per-sample tables, FastCLIP communication)."""
        return self.name in ("gcl", "fastclip")
