"""Generic SLURM machinery on submitit: executor parameters, sbatch rendering, submitting arrays,
the submission log of a log folder, job states and failures, and refusing to submit twice.

:mod:`pipeline.launch` plans and submits the pipeline's stages on top of it, and
:mod:`training.launch` the training runs. Nothing here knows what a job runs.

A log folder (``<launcher.folder>/<name>``, default ``<run>/_slurm/<name>``) holds submitit's
pickles and logs and ``submissions.jsonl``: one line per submission (time, what, job ids, labels).
``python -m pipeline status`` reads the latest jobs of every folder back through ``squeue``/``sacct``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.core.core import Job

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, StageError
from pipeline.runner import STAGE_MODULES

CPU_STAGES = ("prep",)
"""Stages whose jobs request no GPU."""
DDP_JOB = "train"
"""The job kind of multi-node data-parallel runs: ``nodes`` x ``gpus_per_node`` tasks, one rank each."""
SUBMISSIONS = "submissions.jsonl"
"""One line per submission in a log folder: time, job ids, shard ranges or runs."""
PER_LABEL_FOLDERS = ("train",)
"""Log folders whose jobs count per label (the last job of each training run), not per submission."""
SHOWN_JOBS = 6
"""How many single job ids (or array tasks) a printed line names before it says "and N more"."""


class LaunchError(StageError):
    """A submission cannot be made; the message says what to do."""


# --------------------------------------------------------------------------- inside a job


def log_to_stderr() -> None:
    """INFO logging to stderr with a time stamp (a job's ``*_log.err``, a torchrun rank's console)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def export_torch_distributed_env() -> None:
    """MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the submitit job (env:// init)."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_DEBUG_JOB_ID" not in os.environ:
        return  # called outside a submitit job: plain single process, or torchrun already set them
    # Each task keeps all node GPUs visible and picks cuda:LOCAL_RANK (pipeline.distributed).
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)

# --------------------------------------------------------------------------- executor parameters


def slurm_available() -> bool:
    """Whether ``sbatch`` and ``srun`` are on PATH (submitit needs both)."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None



def is_dry_run(cfg: PipelineConfig, cluster: str | None) -> bool:
    """Print instead of submit: ``launcher.dry_run`` is set, or no executor was forced and SLURM is absent."""
    return cfg.launcher.dry_run or (cluster is None and not slurm_available())


def dry_run_reason(cfg: PipelineConfig) -> str:
    """Why a submission is a dry run, for the first printed line."""
    return "launcher.dry_run is set" if cfg.launcher.dry_run else "no sbatch on PATH"


def log_root(cfg: PipelineConfig) -> Path:
    """``launcher.folder``, default ``<run>/_slurm``: the parent of every log folder."""
    return Path(cfg.launcher.folder) if cfg.launcher.folder else cfg.run_dir / "_slurm"


def log_folder(cfg: PipelineConfig, stage: str) -> Path:
    """``<launcher.folder>/<stage>``, default ``<run>/_slurm/<stage>``."""
    return log_root(cfg) / stage


def parse_extra_sbatch(lines: list[str]) -> dict[str, str | bool]:
    """``["--exclusive", "#SBATCH --mail-type=END"]`` → ``{"exclusive": True, "mail_type": "END"}``.

    Keys use submitit's underscore form so an extra option overrides the generated one.
    """
    out: dict[str, str | bool] = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip()
        if not text.startswith("--") or " " in text.split("=", 1)[0]:
            raise ConfigError(f"launcher.slurm.extra_sbatch: {line!r} is not a long option like --qos=high")
        key, sep, value = text[2:].partition("=")
        out[key.replace("-", "_")] = value if sep else True
    return out


def executor_parameters(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` arguments for one job of ``stage``.

    Args:
        cfg: the resolved pipeline config (``launcher.slurm`` is read).
        stage: a stage name or ``"train"`` (:data:`DDP_JOB`).
    """
    if stage != DDP_JOB and stage not in STAGE_MODULES:
        raise LaunchError(f"unknown stage '{stage}' (known: {', '.join([*STAGE_MODULES, DDP_JOB])})")
    s = cfg.launcher.slurm
    ddp = stage == DDP_JOB
    gpus = s.gpus_per_node if ddp else (None if stage in CPU_STAGES else 1)
    partition = (s.cpu_partition or s.partition) if stage in CPU_STAGES else s.partition
    params: dict[str, Any] = {
        "name": f"{cfg.run.name}-{stage}",
        "timeout_min": s.time_min if ddp else (s.stage_time_min or s.time_min),
        "nodes": s.nodes if ddp else 1,
        "tasks_per_node": s.gpus_per_node if ddp else 1,
        "gpus_per_node": gpus,
        "cpus_per_task": s.cpus_per_task,
        "mem_gb": s.mem_gb or None,
        "slurm_partition": partition or None,
        "slurm_account": s.account or None,
        "slurm_qos": s.qos or None,
        "slurm_constraint": s.constraint or None,
        "slurm_array_parallelism": s.array_parallelism,
        "slurm_additional_parameters": parse_extra_sbatch(s.extra_sbatch) or None,
        "slurm_setup": list(s.setup) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _with_dependency(params: dict[str, Any], dependency: str | None, name: str | None) -> dict[str, Any]:
    params = dict(params)
    if dependency:
        extra = dict(params.get("slurm_additional_parameters", {}))
        extra["dependency"] = dependency
        params["slurm_additional_parameters"] = extra
    if name:
        params["name"] = name
    return params


def make_executor(
    cfg: PipelineConfig,
    stage: str,
    *,
    folder: str | Path | None = None,
    cluster: str | None = None,
    dependency: str | None = None,
    name: str | None = None,
) -> submitit.AutoExecutor:
    """A submitit executor holding the sbatch parameters of ``stage``'s jobs.

    Args:
        cfg: the resolved pipeline config.
        stage: a stage name or ``"train"``.
        folder: log folder (default :func:`log_folder`).
        cluster: ``"slurm"`` (default), ``"local"`` (subprocesses) or ``"debug"`` (in-process).
        dependency: sbatch ``--dependency``, e.g. ``"afterok:1234"`` (SLURM only).
        name: job name (default ``<run>-<stage>``).
    """
    cluster = cluster or "slurm"
    if cluster == "slurm" and not slurm_available():
        raise LaunchError(
            "SLURM not found (no sbatch/srun on PATH); set launcher.dry_run=true to print the scripts"
        )
    params = _with_dependency(executor_parameters(cfg, stage), dependency, name)
    if cluster != "slurm":
        params["nodes"] = 1  # local executors have a single node
    executor = submitit.AutoExecutor(
        folder=Path(folder) if folder else log_folder(cfg, stage),
        cluster=cluster,
        slurm_max_num_timeout=cfg.launcher.slurm.max_requeue,
    )
    executor.update_parameters(**params)
    return executor


class _SbatchRenderer(submitit.SlurmExecutor):
    """submitit's own sbatch rendering, usable where SLURM is absent; it never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _submit_command(self, command: str) -> Job:
        raise LaunchError("dry run: nothing is submitted")


def render_sbatch(
    cfg: PipelineConfig,
    stage: str,
    *,
    folder: str | Path | None = None,
    array_size: int = 1,
    dependency: str | None = None,
    name: str | None = None,
) -> str:
    """The sbatch script submitit would submit for ``stage`` (no SLURM needed).

    Args:
        cfg: the resolved pipeline config.
        stage: a stage name or ``"train"``.
        folder: log folder (default :func:`log_folder`).
        array_size: number of array tasks (1 = a plain job, as submitit does).
        dependency: sbatch ``--dependency``.
        name: job name (default ``<run>-<stage>``).
    """
    params = _with_dependency(executor_parameters(cfg, stage), dependency, name)
    renderer = _SbatchRenderer(Path(folder) if folder else log_folder(cfg, stage))
    # Same split as AutoExecutor: generic names are translated, ``slurm_*`` ones passed through.
    generic = renderer._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")})
    specific = {k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")}
    renderer.update_parameters(**generic, **specific)
    if array_size > 1:
        renderer.parameters["map_count"] = array_size
    return renderer._make_submission_file_text(renderer._submitit_command_str, "dry-run")



# --------------------------------------------------------------------------- submitting and the submission log


def submit_all(executor: submitit.AutoExecutor, tasks: list[Any], max_array_size: int) -> list[Job]:
    """Submit tasks as arrays of at most ``max_array_size`` (SLURM's MaxArraySize)."""
    jobs: list[Job] = []
    for start in range(0, len(tasks), max_array_size):
        chunk = tasks[start : start + max_array_size]
        if len(chunk) == 1:
            jobs.append(executor.submit(chunk[0]))
            continue
        with executor.batch():
            jobs += [executor.submit(task) for task in chunk]
    return jobs


def print_submitted(
    what: str, jobs: list[Job], detail: str, folder: Path, config_path: str | None, cfg: PipelineConfig
) -> None:
    """Say what was submitted (job ids grouped by array), where its logs are and how to watch it."""
    print(f"{what}: submitted {_describe_ids([str(j.job_id) for j in jobs])}: {detail}")
    print(f"  logs: {folder}")
    shown = shlex.quote(config_path) if config_path else "<config>"
    print(f"  watch: python -m pipeline status --config {shown}   (run {cfg.run_dir})")


def _describe_ids(ids: list[str]) -> str:
    """``4101_0 4101_1 4102_0`` → ``array 4101 (2 task(s)), array 4102 (1 task(s))``."""
    arrays: dict[str, int] = {}
    singles = []
    for job_id in ids:
        match = re.fullmatch(r"(\d+)_\d+", job_id)
        if match:
            arrays[match.group(1)] = arrays.get(match.group(1), 0) + 1
        else:
            singles.append(job_id)
    parts = [f"array {a} ({n} task(s))" for a, n in arrays.items()] + singles[:SHOWN_JOBS]
    more = f" and {len(singles) - SHOWN_JOBS} more" if len(singles) > SHOWN_JOBS else ""
    return ", ".join(parts) + more


def record_submission(folder: Path, what: str, jobs: list[Job], labels: list[str]) -> None:
    """Append ``{time, what, job_ids, labels}`` to the folder's submission log."""
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "what": what,
        "job_ids": [str(j.job_id) for j in jobs],
        "labels": labels,
    }
    with (folder / SUBMISSIONS).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _submissions(folder: Path) -> list[dict[str, Any]]:
    """The entries of the folder's submission log, oldest first (none without one)."""
    path = folder / SUBMISSIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def active_jobs(folder: Path) -> dict[str, str]:
    """Jobs submitted from ``folder`` that are still queued or running: ``{job id: label}``.

    Empty where ``squeue`` is unavailable (nothing can be known then).
    """
    if shutil.which("squeue") is None:
        return {}
    recorded: dict[str, str] = {}
    for entry in _submissions(folder):
        recorded.update(zip(entry["job_ids"], entry["labels"], strict=True))
    try:
        # -r lists pending array tasks one per line (``4101_3``) instead of ``4101_[3-9]``
        cmd = ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    queued = {line.strip() for line in out.splitlines() if line.strip()}
    return {job_id: label for job_id, label in recorded.items() if job_id in queued}


def refuse_if_active(folder: Path, stage: str) -> None:
    """Raise :class:`LaunchError` while jobs of an earlier submission from ``folder`` are queued or running."""
    active = active_jobs(folder)
    if active:
        ids = sorted({job_id.split("_")[0] for job_id in active})
        raise LaunchError(
            f"{stage}: job(s) {', '.join(ids)} of an earlier submission are still queued or running; "
            f"wait for them (python -m pipeline status) or scancel them, then resubmit"
        )


# --------------------------------------------------------------------------- job states (status, failures)

_NOT_FAILED = ("COMPLETED", "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


def _slurm_query(cmd: list[str]) -> list[list[str]]:
    """``|``-separated rows of a squeue/sacct call; empty when it fails (no SLURM, no accounting)."""
    if shutil.which(cmd[0]) is None:
        return []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    return [line.split("|") for line in proc.stdout.splitlines() if line.strip()]


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """SLURM's view of jobs: ``{job id: (state, reason or exit code)}``.

    Queued and running jobs come from ``squeue`` (state and reason, e.g. ``PENDING``,
    ``Dependency``), finished ones from ``sacct`` (e.g. ``FAILED``, ``1:0``). Array tasks are
    ``<array>_<task>``. Jobs neither knows are left out (no SLURM here, or no accounting).
    """
    if not job_ids:
        return {}
    wanted = set(job_ids)
    states: dict[str, tuple[str, str]] = {}
    for row in _slurm_query(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-u", getpass.getuser()]):
        if len(row) == 3 and row[0] in wanted:
            states[row[0]] = (row[1], row[2])
    rest = sorted({j.split("_")[0] for j in wanted if j not in states})
    if rest:
        cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State,ExitCode", "-j", ",".join(rest)]
        for row in _slurm_query(cmd):
            if len(row) == 3 and row[0] in wanted and row[0] not in states:
                states[row[0]] = (row[1].split()[0], row[2])  # "CANCELLED by 0" -> CANCELLED
    return states


def _latest_jobs(folder: Path) -> list[tuple[str, str]]:
    """``(job id, label)`` of the jobs that count now in a log folder.

    Stage folders: the last submission (it covered every shard unfinished then). The train
    folder: the last job of each run (seed, each expert), whichever submission made it.
    """
    entries = _submissions(folder)
    if not entries:
        return []
    if folder.name not in PER_LABEL_FOLDERS:
        return list(zip(entries[-1]["job_ids"], entries[-1]["labels"], strict=True))
    latest: dict[str, str] = {}
    for entry in entries:
        latest.update({label: job_id for job_id, label in zip(entry["job_ids"], entry["labels"], strict=True)})
    return [(job_id, label) for label, job_id in latest.items()]


def job_log(folder: Path, job_id: str) -> Path:
    """stderr log of the first task (rank 0) of a job: ``<folder>/<job id>_0_log.err``."""
    return submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0).stderr


def _job_error(folder: Path, job_id: str) -> str:
    """The last line of the error a failed task recorded (its result pickle), or ``""``."""
    paths = submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0)
    try:
        outcome, detail = submitit.core.utils.pickle_load(paths.result_pickle)
    except Exception:  # noqa: BLE001 - no result (killed, cancelled) or an unreadable one
        return ""
    if outcome != "error":
        return ""
    lines = [line.strip() for line in str(detail).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def slurm_jobs(cfg: PipelineConfig) -> list[dict[str, str]]:
    """The jobs of every stage's latest submission as SLURM reports them.

    Rows ``{stage, job_id, label, state, reason, log, error, failed}`` (``error``: the last line of
    a failed task's error; ``failed``: ``"yes"`` when the job ended without success); empty where
    SLURM cannot be asked. ``python -m pipeline status`` prints them.
    """
    base = log_root(cfg)
    if not base.is_dir():
        return []
    jobs = {folder: _latest_jobs(folder) for folder in sorted(base.iterdir()) if folder.is_dir()}
    states = job_states([job_id for pairs in jobs.values() for job_id, _ in pairs])
    rows = []
    for folder, pairs in jobs.items():
        for job_id, label in pairs:
            if job_id not in states:
                continue
            state, reason = states[job_id]
            failed = state not in _NOT_FAILED
            rows.append(
                {
                    "stage": folder.name,
                    "job_id": job_id,
                    "label": label,
                    "state": state,
                    "reason": reason,
                    "log": str(job_log(folder, job_id)),
                    "error": _job_error(folder, job_id) if failed else "",
                    "failed": "yes" if failed else "",
                }
            )
    return rows


def failed_jobs(folder: Path) -> list[dict[str, str]]:
    """Jobs of the latest submission from ``folder`` that ended without success (sacct)."""
    pairs = _latest_jobs(folder)
    states = job_states([job_id for job_id, _ in pairs])
    out = []
    for job_id, label in pairs:
        state = states.get(job_id, ("", ""))[0]
        if state and state not in _NOT_FAILED:
            out.append(
                {
                    "job_id": job_id,
                    "label": label,
                    "state": state,
                    "log": str(job_log(folder, job_id)),
                    "error": _job_error(folder, job_id),
                }
            )
    return out


def print_failures(what: str, folder: Path) -> None:
    """Name the failed jobs of the previous submission, what they covered and their logs."""
    for job in failed_jobs(folder):
        error = f": {job['error']}" if job["error"] else ""
        print(f"{what}: earlier job {job['job_id']} ({job['label']}) {job['state']}{error}")
        print(f"  log: {job['log']}")

