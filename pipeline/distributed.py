"""Runtime facts (device, rank) and the torchrun form of sharded stages.

``torchrun --nproc_per_node=N -m stages.<name> --config ...`` runs one rank per process: each rank
takes every N-th unfinished shard, all ranks meet at a barrier, and rank 0 writes the manifest.
Because every shard's output depends only on the shard, the result does not depend on N.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.config import PipelineConfig, add_config_args, load_config
from pipeline.errors import ConfigError, StageError
from pipeline.lineage import remember_invocation
from pipeline.runner import run_stage


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


def torchrun_stage(
    name: str, argv: list[str] | None = None, *, setup: Callable[[PipelineConfig, int], None] | None = None
) -> int:
    """Entry point of ``python -m stages.<name>`` under torchrun (also works as one process).

    Each rank runs its stride of unfinished shards; ``--force`` is applied by rank 0 alone before
    anyone plans (so no rank deletes another's fresh work); after a barrier rank 0 writes the
    manifest. Errors are one line per rank and every rank still reaches the barriers.

    Args:
        name: stage name.
        argv: command line (default ``sys.argv[1:]``).
        setup: optional hook ``setup(cfg, local_rank)`` run before any work (e.g. pick the GPU).
    """
    args = _parse_args(name, argv)
    rank, world, local_rank = env_rank()
    try:
        cfg = remember_invocation(load_config(args.config, args.overrides), args.config, args.overrides)
        if setup is not None:
            setup(cfg, local_rank)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if world > 1 and not dist.is_initialized():
        # gloo is enough for barriers and works with and without GPUs; ranks may wait for slow ones.
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    ok = True
    if args.force and rank == 0:
        ok = _guarded(name, lambda: run_stage(cfg, name, force=True, shard_range=(0, 0), workers=1, finalize=False))
    ok = _all_ok(ok, world) and _guarded(
        name,
        lambda: run_stage(cfg, name, stride=(rank, world), workers=1, progress=not args.quiet, finalize=False),
        label=f"rank {rank}/{world}",
    )
    ok = _all_ok(ok, world)
    if ok and rank == 0:
        ok = _guarded(name, lambda: run_stage(cfg, name, workers=1, progress=False))
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 2


def _parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"torchrun --nproc_per_node=N -m stages.{name}")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="redo shards made with another config/inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _guarded(name: str, call: Callable[[], dict], label: str = "") -> bool:
    """Run a stage call; report an error as one line (the other ranks must still reach the barrier)."""
    try:
        summary = call()
    except (StageError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error{f' ({label})' if label else ''}: {exc}", file=sys.stderr)
        return False
    print(f"{name}{f' {label}' if label else ''}: ran {summary.get('ran', 0)} shard(s), skipped {summary.get('skipped', 0)}")
    return True


def _all_ok(ok: bool, world: int) -> bool:
    """True on every rank only if it is true on all of them."""
    if world <= 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
