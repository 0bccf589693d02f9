"""Collectives used by the losses; world size 1 never touches ``torch.distributed``.

Every gather concatenates along dim 0 in rank order, so row ``rank * b + i`` of the result is row
``i`` of rank ``rank``. All ranks must pass the same local batch size (use ``drop_last``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def all_gather_no_grad(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank, without autograd (the result is a constant)."""
    tensor = tensor.detach()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_with_grad(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank; backward sums the gradients back to their owners."""
    if world_size == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_gather_columns(columns: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Gather several [b] vectors of one dtype in a single collective; returns [B] vectors."""
    if world_size == 1:
        return [c.detach() for c in columns]
    packed = all_gather_no_grad(torch.stack(columns, dim=1), world_size)
    return list(packed.unbind(dim=1))


def check_process_group(rank: int, world_size: int) -> None:
    """Raise ValueError when ``rank`` / ``world_size`` disagree with the initialised process group."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    if world_size == 1:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size: {world_size} needs an initialised torch.distributed process group")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"rank/world_size: got {rank}/{world_size}, process group says "
            f"{dist.get_rank()}/{dist.get_world_size()}"
        )
