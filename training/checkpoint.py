"""Training checkpoints (``checkpoints/step_<n>.pt``), resume rules and the exported ``final.pt``.

A checkpoint holds everything needed to continue bit-for-bit: model, optimizer, grad scaler, loss
state (GCL tables), every rank's RNG states, the data position, the world size and the config. It is
written by rank 0 through a temporary file and ``os.replace``, so a crash never leaves a partial
``step_<n>.pt``; only the newest ``train.keep_last`` are kept (plus any step a caller pins, e.g. the
seed checkpoint experts branch from).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import artifacts
from pipeline.artifacts import atomic_path
from pipeline.errors import StageError
from pipeline.runtime import Runtime, gather_objects
from pipeline.safeload import torch_load
from training import runs
from training.models import unwrap

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
FINAL = runs.FINAL


def checkpoint_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """``<run_dir>/checkpoints/step_<step>.pt``."""
    return checkpoint_dir(run_dir) / f"step_{step}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint, oldest first."""
    found = []
    folder = checkpoint_dir(run_dir)
    for path in folder.glob("step_*.pt") if folder.is_dir() else []:
        match = _STEP_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        artifacts.torch_save(state, tmp)


def save_step(
    ctx: Runtime,
    run_dir: Path,
    step: int,
    state: Callable[[], dict[str, Any]],
    keep_last: int,
    pinned: frozenset[int] = frozenset(),
) -> Path:
    """Checkpoint a run at ``step``; every rank calls it (each one's RNG state is gathered).

    Rank 0 writes ``checkpoints/step_<step>.pt`` with ``state()`` plus ``rng`` (every rank's, in
    rank order), then keeps the newest ``keep_last`` (and the ``pinned`` steps). Returns the path.
    """
    rngs = gather_objects(ctx, rng_state())
    path = checkpoint_path(run_dir, step)
    if ctx.is_main:
        save_checkpoint(path, {**state(), "rng": rngs})
        prune_checkpoints(run_dir, keep_last, pinned)
    return path


def prune_checkpoints(run_dir: Path, keep_last: int, pinned: frozenset[int] = frozenset()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never a pinned step); returns the deleted."""
    found = list_checkpoints(run_dir)
    doomed = [path for step, path in found[: max(0, len(found) - keep_last)] if step not in pinned]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: Path, what: str = "--resume") -> dict[str, Any]:
    """Read a checkpoint onto the CPU (``weights_only``: tensors and plain types, no code runs)."""
    if not Path(path).is_file():
        raise StageError(f"{what}: no such checkpoint {path}")
    state = torch_load(path, what)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise StageError(f"{what}: {path} is not a training checkpoint (no 'model' and 'step')")
    return state


def check_world_size(state: dict[str, Any], world_size: int, path: Path) -> None:
    """Refuse to resume under another world size: the global batch, hence the results, would change."""
    saved = int(state.get("world_size", 1))
    if saved != world_size:
        raise StageError(
            f"{path} was written by {saved} process(es), this job has {world_size}: the global batch would "
            f"change; resume with {saved} process(es), or start over with --resume none"
        )


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors and plain types.

    numpy's state is stored as a dict with the key table as a tensor, so checkpoints load with
    ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_final(run_dir: Path, model: nn.Module) -> Path:
    """Write ``final.pt``: the plain model state dict (no DDP prefix, float32 tensors on CPU).

    ``open_clip.create_model_and_transforms(<model>, pretrained=<run_dir>/final.pt)`` loads it. A
    BatchNorm frozen by ``train.lock_image_freeze_bn_stats`` (open_clip's ``FrozenBatchNorm2d``) has no
    ``num_batches_tracked``; it is written back (0) so that a fresh model loads the file strictly.
    """
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
        for k, v in unwrap(model).state_dict().items()
    }
    for name, module in unwrap(model).named_modules():
        if type(module).__name__ == "FrozenBatchNorm2d":
            state.setdefault(f"{name}.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    path = Path(run_dir) / FINAL
    with atomic_path(path) as tmp:
        artifacts.torch_save(state, tmp)
    return path
