"""The torchrun form of sharded stages (device, precision and rank come from ``pipeline.runtime``).

``torchrun --nproc_per_node=N -m stages.<name> --config ...`` runs one rank per process: each rank
takes every N-th unfinished shard, all ranks meet at a barrier, and rank 0 writes the manifest and
says what all ranks did. Because every shard's output depends only on the shard, the result does
not depend on N.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import timedelta

from pipeline.config import add_config_args, load_config
from pipeline.errors import ConfigError, StageError
from pipeline.lineage import remember_invocation
from pipeline.runner import run_stage
from pipeline.runtime import Runtime, all_reduce_ints, for_section, join_process_group, leave_process_group


def torchrun_stage(name: str, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stages.<name>`` under torchrun (also works as one process).

    Each rank runs its stride of unfinished shards on its own device (the stage section's
    ``device``, ``auto`` = ``cuda:<local rank>`` when there are GPUs); ``--force`` is applied by
    rank 0 alone before anyone plans (so no rank deletes another's fresh work); after a barrier rank
    0 writes the manifest and prints the shards all ranks ran. Errors are one line per rank and
    every rank still reaches the barriers.

    Args:
        name: stage name (its config section gives the device and precision).
        argv: command line (default ``sys.argv[1:]``).
    """
    args = _parse_args(name, argv)
    try:
        cfg = remember_invocation(load_config(args.config, args.overrides), args.config, args.overrides)
        rt = for_section(cfg, name, progress=False if args.quiet else None)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # gloo is enough for barriers and works with and without GPUs; ranks may wait for slow ones.
    join_process_group(rt, backend="gloo", timeout=timedelta(hours=12))
    ok = True
    if args.force and rt.is_main:
        redo = _guarded(
            name, lambda: run_stage(cfg, name, force=True, shard_range=(0, 0), workers=1, finalize=False, runtime=rt)
        )
        ok = redo is not None
    stride = (rt.rank, rt.world_size)
    mine = _guarded(
        name,
        lambda: run_stage(cfg, name, stride=stride, workers=1, progress=not args.quiet, finalize=False, runtime=rt),
        label=f"rank {rt.rank}/{rt.world_size}",
    ) if _all_ok(rt, ok) else None
    ok, ran = all_reduce_ints(rt, [int(mine is not None), int(mine["ran"]) if mine else 0], op="sum")
    ok = ok == rt.world_size
    if ok and rt.is_main:
        final = _guarded(name, lambda: run_stage(cfg, name, workers=1, progress=False, runtime=rt), quiet=True)
        ok = final is not None
        if ok:
            before = int(final.get("skipped", 0)) - ran
            print(f"{name}: {rt.world_size} rank(s) ran {ran} shard(s) in all, {max(0, before)} already done; manifest written")
    leave_process_group(rt)
    return 0 if ok else 2


def _parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"torchrun --nproc_per_node=N -m stages.{name}")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="redo shards made with another config/inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _guarded(name: str, call: Callable[[], dict], label: str = "", quiet: bool = False) -> dict | None:
    """Run a stage call and return its summary; report an error as one line and return None (the
    other ranks must still reach the barrier)."""
    try:
        summary = call()
    except (StageError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error{f' ({label})' if label else ''}: {exc}", file=sys.stderr)
        return None
    if not quiet:
        print(f"{name}{f' {label}' if label else ''}: ran {summary.get('ran', 0)} shard(s), skipped {summary.get('skipped', 0)}")
    return summary


def _all_ok(rt: Runtime, ok: bool) -> bool:
    """True on every rank only if it is true on all of them."""
    return all_reduce_ints(rt, [int(ok)], op="min")[0] == 1
