"""Pure schedule functions: the inner learning rate gamma and the temperature learning rate."""

from __future__ import annotations

import math

STEP_THRESH_TAU = 0.03
"""``step_thresh``: tau at or below which the temperature lr is reduced."""
STEP_THRESH_RATIO = 1.0 / 3.0
"""``step_thresh``: factor applied to the temperature lr once tau <= STEP_THRESH_TAU."""


def gamma_at_epoch(epoch: int, gamma: float, schedule: str, decay_epochs: int) -> float:
    """Inner learning rate of the u moving average for an epoch (fast_clip ``adjust_gamma``).

    Args:
        epoch: Completed passes over the data (0 for the first epoch).
        gamma: Final value gamma_min.
        schedule: ``"cosine"`` (1 -> gamma over ``decay_epochs``) or ``"constant"``.
        decay_epochs: Length of the cosine decay in epochs.

    Returns:
        1.0 in epoch 0 (u is then the mini-batch estimate), gamma_min from ``decay_epochs`` on, and
        ``0.5 (1 + cos(pi epoch / decay_epochs)) (1 - gamma) + gamma`` in between for ``cosine``.
    """
    if epoch < 0:
        raise ValueError(f"epoch: must be >= 0, got {epoch}")
    if epoch == 0:
        return 1.0
    if schedule == "constant" or epoch >= decay_epochs:
        return gamma
    if schedule != "cosine":
        raise ValueError(f"gamma_schedule: {schedule!r} is not one of ['cosine', 'constant']")
    return 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs)) * (1.0 - gamma) + gamma


def tau_lr_multiplier(scheduler: str, step: int, total_steps: int, warmup: int, current_tau: float) -> float:
    """Factor applied to ``lr_tau`` at a step (fast_clip's logit-scale schedulers).

    Args:
        scheduler: ``"cosine"`` (linear warmup, then cosine to 0), ``"const"`` (always 1, no warmup)
            or ``"step_thresh"`` (1, then 1/3 once ``current_tau`` <= 0.03; no warmup).
        step: Current optimizer step (0-based).
        total_steps: Steps of the whole run (cosine only).
        warmup: Warmup steps (cosine only).
        current_tau: Current temperature 1 / exp(logit_scale) (step_thresh only).

    Returns:
        The multiplier; the temperature lr is ``lr_tau * multiplier``.
    """
    if scheduler == "const":
        return 1.0
    if scheduler == "step_thresh":
        return STEP_THRESH_RATIO if current_tau <= STEP_THRESH_TAU else 1.0
    if scheduler != "cosine":
        raise ValueError(f"lr_tau_scheduler: {scheduler!r} is not one of ['cosine', 'const', 'step_thresh']")
    if step < warmup:
        return (step + 1) / warmup
    if total_steps <= warmup:
        raise ValueError(f"total_steps: must be > warmup={warmup} for the cosine schedule, got {total_steps}")
    progress = (step - warmup) / (total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
