"""``build_loss``: the one constructor the trainer calls."""

from __future__ import annotations

import torch

from pipeline.sections import LossConfig
from training.losses.base import ContrastiveLoss
from training.losses.clip import ClipLoss
from training.losses.gcl import GlobalContrastiveLoss
from training.losses.rgcl import IndividualTemperatureGCL


def build_loss(
    cfg: LossConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    table_dtype: torch.dtype = torch.float32,
) -> ContrastiveLoss:
    """Build the configured loss.

    Args:
        cfg: Loss configuration; GCL variants need ``data_size`` > 0 (the trainer fills it in).
        rank: This process's rank.
        world_size: Number of data-parallel processes (> 1 needs an initialised process group).
        device: Training device; tables go there when ``table_device="same"``.
        table_dtype: Storage dtype of the per-sample tables (float64 for exactness tests).

    Returns:
        A :class:`ContrastiveLoss`.
    """
    if not cfg.is_gcl:
        return ClipLoss(cfg=cfg, rank=rank, world_size=world_size)
    if cfg.data_size <= 0:
        raise ValueError(
            f"data_size: must be > 0 for name={cfg.name!r} (the trainer sets it to the dataset "
            f"size), got {cfg.data_size}"
        )
    table_device = _table_device(cfg.table_device, torch.device(device))
    cls = (
        IndividualTemperatureGCL
        if cfg.temperature_scheme == "individual_learnable"
        else GlobalContrastiveLoss
    )
    return cls(cfg=cfg, rank=rank, world_size=world_size, table_device=table_device, table_dtype=table_dtype)


def _table_device(choice: str, device: torch.device) -> torch.device:
    if choice == "same":
        return device
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("table_device: 'cuda' requested but CUDA is not available")
    if choice == "cuda" and device.type == "cuda":
        return device
    return torch.device(choice)
