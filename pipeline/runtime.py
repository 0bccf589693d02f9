"""Runtime facts of this process: device, precision, rank, world size, local rank.

The one place that reads the launcher's environment (torchrun or SLURM), resolves a device name
(``auto`` → this rank's GPU when CUDA is available, else CPU), speaks the precision vocabulary and
joins the process group. An entry point builds one :class:`Runtime` and passes it down as an
argument (to stage functions, the text encoder, the trainer); the config never holds these facts,
and nothing travels through environment variables or module-level flags.

Precision names (``embed.precision``, ``train.precision``, ``ssl.precision``): the canonical ones
are ``auto``, ``fp32``, ``bf16`` and ``fp16`` (autocast dtypes); ``amp_bf16`` (= ``bf16``) and
``amp`` (= ``fp16``) are accepted spellings of the same choices.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import StageError

if TYPE_CHECKING:  # torch is imported where a device is resolved: a CPU-only stage's workers never load it
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Canonical precision names."""
PRECISION_ALIASES = {"amp_bf16": "bf16", "amp": "fp16"}
"""Accepted spellings of canonical precisions (OpenCLIP's ``--precision`` names)."""


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and at which precision; built once per entry point, then passed down.

    Plain strings and ints only, so it pickles to spawned pool workers without importing torch.
    """

    device_name: str = "cpu"
    """Resolved device: ``cpu``, ``cuda:<i>``, ``mps`` (never ``auto``)."""
    precision: str = "fp32"
    """Resolved canonical precision: ``fp32``, ``bf16`` or ``fp16`` (never ``auto``)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    progress: bool | None = None
    """Per-item progress bars (e.g. captions/s): on, off, or ``None`` = only on a terminal."""

    @property
    def device(self) -> torch.device:
        """The resolved device as a ``torch.device``."""
        import torch

        return torch.device(self.device_name)

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process works on the job."""
        return self.world_size > 1


# --------------------------------------------------------------------------- launcher environment


def _env_int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return default


def launcher_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank): torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when set,
    else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` for a job of several tasks,
    else (0, 1, 0)."""
    env = os.environ if environ is None else environ
    if env.get("RANK", "").strip() and env.get("WORLD_SIZE", "").strip():
        return _env_int(env, "RANK", default=0), _env_int(env, "WORLD_SIZE", default=1), _env_int(env, "LOCAL_RANK", default=0)
    if env.get("SLURM_PROCID", "").strip() and _env_int(env, "SLURM_NTASKS", default=1) > 1:
        return (
            _env_int(env, "SLURM_PROCID", default=0),
            _env_int(env, "SLURM_NTASKS", default=1),
            _env_int(env, "SLURM_LOCALID", default=0),
        )
    return 0, 1, 0


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this node (torchrun ``LOCAL_WORLD_SIZE``, SLURM ``SLURM_NTASKS_PER_NODE``)."""
    env = os.environ if environ is None else environ
    return max(1, _env_int(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=1))


# --------------------------------------------------------------------------- device and precision


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto``: this rank's GPU (``cuda:<local_rank>``) when CUDA is available, else CPU; ``cuda``
    without an index: ``cuda:<local_rank>``; anything else as named. ``key`` names the config key
    in the error.

    Raises:
        StageError: a CUDA device is named but CUDA is not available.
    """
    import torch

    return torch.device(device_name(name, local_rank, key))


def device_name(name: str | torch.device = "auto", local_rank: int = 0, key: str = "device") -> str:
    """:func:`resolve_device` as a string (``cpu`` and ``mps`` are returned without importing torch)."""
    name = str(name)
    if name in ("cpu", "mps"):
        return name
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StageError(f"{key}: '{name}' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return str(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX512-BF16).

    A bf16 matmul *works* on every CPU, but without these units it is emulated and several times
    slower than fp32, so a trial matmul would be the wrong test.
    """
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return torch.backends.mkldnn.is_available() and any(getattr(cpu, c)() for c in checks)
    except (AttributeError, RuntimeError):
        return False


def canonical_precision(name: str) -> str:
    """The canonical name of a precision spelling (``amp_bf16`` → ``bf16``, ``amp`` → ``fp16``)."""
    name = PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"precision: {name!r} is not one of {[*PRECISIONS, *PRECISION_ALIASES]}")
    return name


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``name`` on ``device``.

    ``auto``: ``bf16`` on GPUs (``fp16`` on a GPU known to lack bf16) and on CPUs with native bf16,
    else ``fp32``.
    """
    name = canonical_precision(name)
    if name != "auto":
        return name
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        lacks_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
        return "fp16" if lacks_bf16 else "bf16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def current(
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    progress: bool | None = None,
    environ: Mapping[str, str] | None = None,
    key: str = "device",
) -> Runtime:
    """The runtime of this process: rank from the launcher's environment, ``device`` resolved for
    this rank, ``precision`` resolved for that device."""
    rank, world_size, local_rank = launcher_env(environ)
    dev = device_name(device, local_rank, key)
    return Runtime(dev, resolve_precision(precision, dev), rank, world_size, local_rank, progress)


def for_section(cfg: Any, name: str, *, progress: bool | None = None) -> Runtime:
    """:func:`current` with the ``device`` and ``precision`` keys of config section ``name``, e.g.
    ``for_section(cfg, "embed")``; a section without them (``prep``) runs on the CPU in fp32."""
    section = getattr(cfg, name, None)
    device = getattr(section, "device", "cpu")  # a section without a device key: a CPU stage
    precision = getattr(section, "precision", "fp32")
    return current(device, precision, progress=progress, key=f"{name}.device")


# --------------------------------------------------------------------------- process group


def _slurm_master_env() -> None:
    """Fill MASTER_ADDR / MASTER_PORT for env:// init under srun (first host of the job)."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", ""))
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30, check=True
            )
            os.environ["MASTER_ADDR"] = out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            raise RuntimeError("SLURM: set MASTER_ADDR (and MASTER_PORT) in the job script") from None
    os.environ.setdefault("MASTER_PORT", str(20000 + _env_int(os.environ, "SLURM_JOB_ID", default=0) % 20000))


def join_process_group(rt: Runtime, *, backend: str | None = None, timeout: datetime.timedelta | None = None) -> None:
    """Join the process group of ``rt`` (no-op for one process or when already joined).

    ``backend`` defaults to NCCL on GPU and gloo on CPU.
    """
    import torch.distributed as dist

    if not rt.distributed or dist.is_initialized():
        return
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        _slurm_master_env()
    dist.init_process_group(
        backend or ("nccl" if rt.device.type == "cuda" else "gloo"),
        init_method="env://",
        rank=rt.rank,
        world_size=rt.world_size,
        timeout=timeout or datetime.timedelta(minutes=30),
    )


def init_distributed(
    device: str = "auto", precision: str = "auto", timeout_min: int = 30, key: str = "train.device"
) -> Runtime:
    """The runtime of a training process, after joining its process group (an existing one is reused).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>`` (``train.device``); a GPU becomes the
            current CUDA device.
        precision: ``train.precision`` (any spelling; resolved for the device).
        timeout_min: collective timeout.
    """
    import torch
    import torch.distributed as dist

    rt = current(device, precision, key=key)
    if dist.is_available() and dist.is_initialized():
        rt = Runtime(rt.device_name, rt.precision, dist.get_rank(), dist.get_world_size(), rt.local_rank, rt.progress)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    join_process_group(rt, timeout=datetime.timedelta(minutes=timeout_min))
    return rt


def leave_process_group(rt: Runtime) -> None:
    """Leave the process group (when there is one)."""
    import torch.distributed as dist

    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def set_cpu_threads(rt: Runtime, workers: int) -> int:
    """Give CPU work the cores its loader workers leave free (unless OMP_NUM_THREADS is set).

    Oversubscribed intra-op threads make small CPU steps many times slower (threads wait on each
    other at every op), so each process takes ``cores / processes on this node - workers`` (>= 1).

    Returns:
        The number of intra-op threads now in use.
    """
    import torch

    if rt.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local_world_size() - workers))
    return torch.get_num_threads()


def barrier(rt: Runtime) -> None:
    """Wait for every rank (no-op for one process)."""
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(rt: Runtime, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not rt.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(rt: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_ints(rt: Runtime, values: list[int], op: str = "sum") -> list[int]:
    """Element-wise ``sum`` / ``min`` of integers over the ranks (unchanged for one process)."""
    if not rt.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return [int(v) for v in tensor.tolist()]
