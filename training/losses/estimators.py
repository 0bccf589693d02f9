"""Small numerical building blocks shared by the GCL losses (no state, no communication)."""

from __future__ import annotations

import torch

INVALID_U = 1e-35
"""u below this (or inf / nan) counts as never visited and is reset to the batch estimate."""


def masked_mean_exp(diff: torch.Tensor, keep: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """Row sums of ``exp(diff)`` over kept entries, divided by ``denom``.

    Dropped entries are set to -inf *before* the exponential, so a huge dropped logit can neither
    overflow into ``inf * 0 = nan`` nor leak a gradient.

    Args:
        diff: [rows, cols] exponents (already scaled by the logit scale, shifted by the positive).
        keep: [rows, cols] bool, True for negatives that enter the sum.
        denom: [rows] normaliser (number of negatives, or its per-worker share).

    Returns:
        [rows] the normalised sums.
    """
    return diff.masked_fill(~keep, float("-inf")).exp().sum(dim=1) / denom


def moving_average(
    u_old: torch.Tensor, g: torch.Tensor, gamma: float, rescale: torch.Tensor | None = None
) -> torch.Tensor:
    """SogCLR / FastCLIP estimator update ``u <- (1 - gamma) * u * rescale + gamma * g``.

    Entries never visited (u < 1e-35, inf or nan) take ``g`` directly, i.e. gamma = 1 on the first
    visit (fast_clip ``local``).

    Args:
        u_old: [b] stored estimates.
        g: [b] mini-batch estimates (no grad).
        gamma: Inner learning rate.
        rescale: Optional [b] factor ``exp(bound_old - bound_new)`` for the shifted v2 estimates.

    Returns:
        [b] the new estimates.
    """
    invalid = (u_old < INVALID_U) | ~torch.isfinite(u_old)
    carried = u_old if rescale is None else u_old * rescale
    u_new = (1.0 - gamma) * carried + gamma * g
    return torch.where(invalid, g, u_new)


def per_sample_adam(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    step: int,
    bounds: tuple[float, float],
    use_sqrt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step for a vector of independent scalar parameters, projected onto ``bounds``.

    Args:
        param: [b] current values.
        grad: [b] gradients.
        m: [b] first moments.
        v: [b] second moments.
        lr: Learning rate (scalar or [b]).
        betas: (beta1, beta2).
        eps: Added to the denominator.
        step: Exponent of the bias correction. The upstream codes use ``epoch + 1``: each sample is
            visited about once per epoch, so this approximates its own step count.
        bounds: (low, high) projection interval.
        use_sqrt: Divide by ``sqrt(v_hat)`` (Adam); False divides by ``v_hat`` as fast_clip's
            per-sample temperature code does.

    Returns:
        (param, m, v) after the step.
    """
    beta1, beta2 = betas
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - beta1**step)
    v_hat = v / (1.0 - beta2**step)
    denom = v_hat.sqrt() if use_sqrt else v_hat
    param = (param - lr * m_hat / (denom + eps)).clamp(min=bounds[0], max=bounds[1])
    return param, m, v


STAT_QUANTILES = (0.1, 0.5, 0.9)


def u_statistics(values: torch.Tensor, prefix: str = "u") -> dict[str, torch.Tensor]:
    """``<prefix>_mean`` and the 10/50/90 % quantiles ``<prefix>_q10`` ... of a vector (detached).

    The losses log these for their per-sample state (u, GloFND's lambda) in metrics.jsonl.
    """
    values = values.detach().float()
    levels = torch.tensor(STAT_QUANTILES, dtype=values.dtype, device=values.device)
    out = {f"{prefix}_mean": values.mean()}
    for level, value in zip(STAT_QUANTILES, torch.quantile(values, levels), strict=True):
        out[f"{prefix}_q{round(level * 100)}"] = value
    return out
