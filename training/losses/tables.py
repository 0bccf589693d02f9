"""Per-sample state tables indexed by global pair id."""

from __future__ import annotations

import torch
from torch import nn


class SampleTables(nn.Module):
    """Named float vectors of length ``size`` kept as buffers (so they are in ``state_dict``).

    Reads and writes move ids and values to each table's own device, so the tables may live on the
    CPU while the features are on a GPU (and stay correct if someone moves the module).

    Args:
        inits: Table name -> initial value.
        size: Rows per table (the dataset size).
        dtype: Storage dtype (float32 by default; float64 in exactness tests).
        device: Storage device.
    """

    def __init__(
        self, inits: dict[str, float], size: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"data_size: must be > 0 for the per-sample tables, got {size}")
        self.size = size
        self.inits = dict(inits)
        for name, value in inits.items():
            self.register_buffer(name, torch.full((size,), float(value), dtype=dtype, device=device))

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise ValueError unless ``ids`` is a 1-D integer tensor with values in [0, size)."""
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"pair_ids: expected a 1-D int64 tensor, got shape {tuple(ids.shape)} {ids.dtype}"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.size:
            raise ValueError(f"pair_ids: must be in [0, data_size={self.size}), got min {lo} max {hi}")

    def read(self, names: list[str], ids: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``ids`` of each named table, as ``like``'s dtype and device (one transfer for all)."""
        ids = ids.to(self._device())
        rows = torch.stack([getattr(self, name)[ids] for name in names])
        return list(rows.to(device=like.device, dtype=like.dtype).unbind(0))

    def write(self, values: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
        """Store ``values[name]`` at rows ``ids`` of each named table (one transfer for all)."""
        device = self._device()
        ids = ids.to(device)
        rows = torch.stack([value.detach() for value in values.values()]).to(device)
        for name, row in zip(values, rows.unbind(0), strict=True):
            table = getattr(self, name)
            table[ids] = row.to(table.dtype)

    def _device(self) -> torch.device:
        return next(self.buffers()).device

    def reset(self, names: list[str]) -> None:
        """Refill the named tables with their initial values."""
        for name in names:
            getattr(self, name).fill_(self.inits[name])
