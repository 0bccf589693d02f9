"""Distributed runtime context: rank, world size and device, from torchrun or SLURM environment.

``init_distributed()`` is the one place that reads the launcher's environment; everything else gets a
:class:`DistContext` passed down (the config never holds runtime facts).
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK...) or SLURM (SLURM_PROCID...) variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            _env_int("RANK", default=0),
            _env_int("WORLD_SIZE", default=1),
            _env_int("LOCAL_RANK", default=0),
        )
    if "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        return (
            _env_int("SLURM_PROCID", default=0),
            _env_int("SLURM_NTASKS", default=1),
            _env_int("SLURM_LOCALID", default=0),
        )
    return 0, 1, 0


def _slurm_master_env() -> None:
    """Fill MASTER_ADDR / MASTER_PORT for env:// init under srun (first host of the job)."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", ""))
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodes],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            os.environ["MASTER_ADDR"] = out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            raise RuntimeError("SLURM: set MASTER_ADDR (and MASTER_PORT) in the job script") from None
    os.environ.setdefault("MASTER_PORT", str(20000 + _env_int("SLURM_JOB_ID", default=0) % 20000))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else CPU; otherwise the named device."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device: '{requested}' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto", timeout_min: int = 30) -> DistContext:
    """Join the process group described by the launcher's environment (no-op for one process).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>`` (``train.device``).
        timeout_min: Collective timeout.

    Returns:
        The context; NCCL is used on GPU, gloo on CPU. An existing process group is reused.
    """
    rank, world_size, local_rank = launcher_env()
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    ctx_device = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            _slurm_master_env()
        backend = "nccl" if ctx_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=ctx_device)


def set_cpu_threads(ctx: DistContext, workers: int) -> int:
    """Give CPU training the cores its loader workers leave free (unless OMP_NUM_THREADS is set).

    Oversubscribed intra-op threads make small CPU steps many times slower (threads wait on each
    other at every op), so each process takes ``cores / processes on this node - workers`` (>= 1).

    Returns:
        The number of intra-op threads now in use.
    """
    if ctx.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=1)
        torch.set_num_threads(max(1, cores // max(1, local) - workers))
    return torch.get_num_threads()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_true(ctx: DistContext, flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    if not ctx.distributed:
        return flag
    return all(gather_objects(ctx, bool(flag)))


def destroy(ctx: DistContext) -> None:
    """Leave the process group (when there is one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
