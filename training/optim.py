"""AdamW parameter groups (OpenCLIP's weight-decay rule, a separate logit-scale group) and schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig
from training.losses import tau_lr_multiplier

DECAY, NO_DECAY, LOGIT_SCALE = "decay", "no_decay", "logit_scale"


@dataclass(frozen=True)
class ScaleRule:
    """How the logit scale is optimised (from the loss's ``param_group_overrides`` and the config)."""

    lr: float | None
    """Own learning rate (lr_tau), or None to follow the model's schedule."""
    scheduler: str
    frozen: bool

    @classmethod
    def from_overrides(cls, overrides: dict[str, dict[str, Any]], lock: bool) -> ScaleRule:
        """Combine the loss's overrides with ``train.lock_logit_scale``."""
        rule = overrides.get("logit_scale", {})
        return cls(rule.get("lr"), rule.get("scheduler", "cosine"), bool(rule.get("frozen", False)) or lock)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """OpenCLIP's rule: gains, biases, norms and the logit scale/bias get no weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: nn.Module, cfg: TrainConfig, scale: ScaleRule) -> torch.optim.AdamW:
    """AdamW over three named groups: ``decay``, ``no_decay`` and ``logit_scale``.

    A frozen logit scale gets ``requires_grad=False`` and no group. Call before wrapping in DDP.
    """
    groups: dict[str, list[torch.Tensor]] = {DECAY: [], NO_DECAY: [], LOGIT_SCALE: []}
    for name, param in model.named_parameters():
        if name == "logit_scale":
            param.requires_grad_(not scale.frozen)
            if not scale.frozen:
                groups[LOGIT_SCALE].append(param)
        elif param.requires_grad:
            groups[NO_DECAY if no_weight_decay(name, param) else DECAY].append(param)
    params = [
        {"name": name, "params": ps, "weight_decay": cfg.wd * cfg.wd_multiplier if name == DECAY else 0.0}
        for name, ps in groups.items()
        if ps
    ]
    fused = all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
        for g in params
        for p in g["params"]
    )
    return torch.optim.AdamW(params, lr=cfg.lr * cfg.lr_multiplier, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Re-apply betas/eps/weight decay (``wd x wd_multiplier``) from the config (after loading an optimizer state)."""
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = (cfg.beta1, cfg.beta2), cfg.eps
        group["weight_decay"] = cfg.wd * cfg.wd_multiplier if group.get("name") == DECAY else 0.0


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine down to ``min_lr`` at ``total``.

    Same curve as OpenCLIP's ``cosine_lr`` (warmup ``base_lr * (step + 1) / warmup``) plus a floor.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def set_learning_rates(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, scale: ScaleRule, step: int, tau: float
) -> dict[str, float]:
    """Set every group's lr for ``step``; returns ``{group name: lr}``.

    Args:
        optimizer: From :func:`build_optimizer`.
        cfg: Train config (lr, warmup, steps, min_lr).
        scale: Logit-scale rule; with its own lr the group follows ``tau_lr_multiplier``.
        step: Global step (0-based) of the whole seed + expert schedule.
        tau: Current temperature 1 / exp(logit_scale) (``step_thresh`` scheduler).
    """
    m = cfg.lr_multiplier  # the reference README's 3η: lr and min_lr scaled together
    model_lr = cosine_lr(step, cfg.lr * m, cfg.warmup, cfg.steps, cfg.min_lr * m)
    rates = {}
    for group in optimizer.param_groups:
        lr = model_lr
        if group.get("name") == LOGIT_SCALE and scale.lr is not None:
            lr = scale.lr * tau_lr_multiplier(scale.scheduler, step, cfg.steps, cfg.warmup, tau)
        group["lr"] = lr
        rates[group.get("name", "group")] = lr
    return rates
