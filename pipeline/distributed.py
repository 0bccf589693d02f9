"""Runtime facts (device, rank) and the torchrun form of sharded stages.

``torchrun --nproc_per_node=N -m stages.<name> --config ...`` runs one rank per process: each rank
takes every N-th unfinished shard, all ranks meet at a barrier, and rank 0 writes the manifest.
Because every shard's output depends only on the shard, the result does not depend on N.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.config import load_config
from pipeline.runner import plan_stage, run_stage, stage_dir


def env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    for r, w, lr in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, 0))
    return 0, 1, 0


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → this process's CUDA device (``LOCAL_RANK``) when present, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", env_rank()[2] % torch.cuda.device_count())
    return torch.device("cpu")


def torchrun_stage(name: str, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stages.<name>`` under torchrun (also works as a single process)."""
    parser = argparse.ArgumentParser(prog=f"torchrun ... -m stages.{name}")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank, world, _ = env_rank()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=4))
    try:
        if args.force and rank == 0:
            _clear_for_force(cfg, name)
        _barrier(world)
        run_stage(cfg, name, stride=(rank, world), workers=1, finalize=False, progress=rank == 0)
        _barrier(world)
        if rank == 0:
            run_stage(cfg, name, workers=1, progress=False)
        _barrier(world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _clear_for_force(cfg, name: str) -> None:
    from pipeline import artifacts

    plan = plan_stage(cfg, name)
    sdir = stage_dir(cfg, name)
    for shard in plan.done + plan.stale + plan.orphans:
        artifacts.done_path(sdir, shard).unlink(missing_ok=True)
    (sdir / artifacts.MANIFEST).unlink(missing_ok=True)
