"""Scale-out on SLURM through submitit: job arrays for sharded stages, DDP jobs for training.

* ``prep``, ``embed``, ``assign``: one array task per ``launcher.slurm.shards_per_job`` *unfinished*
  shards; each task runs :func:`pipeline.runner.run_stage` on its shard range, and whichever task
  finds every shard done writes the manifest (``run_stage`` only finalizes when every shard has a
  completion record). prep tasks are CPU-only; embed/assign tasks get one GPU.
* ``cluster``, ``ensemble``: one single-GPU job.
* ``train``: one job of ``nodes`` x ``gpus_per_node`` tasks (one DDP rank per task); ``--expert all``
  is an array with one such job per unfinished expert and baseline run (``train.baselines``), after
  the seed job (``afterok``) when the seed is not trained yet.

Every task is a :class:`submitit.helpers.Checkpointable`: on preemption or time limit submitit
requeues it with the same arguments. A requeued stage task reruns its range and its completion
records make it skip the finished shards; a requeued training task resumes from its latest
checkpoint. Where SLURM is absent (no ``sbatch`` on PATH) or ``launcher.dry_run`` is set, the
sbatch scripts are printed instead of submitted. See docs/cluster.md.
"""

from __future__ import annotations

import dataclasses
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
from submitit.core.utils import DelayedSubmission

from pipeline import artifacts
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.runner import (
    STAGE_MODULES,
    StageError,
    StagePlan,
    _stale_message,
    plan_stage,
    run_stage,
    stage_dir,
)

SHARDED_STAGES = ("prep", "embed", "assign")
"""Stages submitted as job arrays over shard ranges (the others run as one job)."""
CPU_STAGES = ("prep",)
"""Stages whose jobs request no GPU."""
SUBMISSIONS = "submissions.jsonl"
"""One line per submission in a stage's log folder: time, job ids, shard ranges or experts."""
_SHOWN_TASKS = 6


class LaunchError(StageError):
    """A submission cannot be made; the message says what to do."""


# --------------------------------------------------------------------------- tasks (run on the cluster)


class StageTask(submitit.helpers.Checkpointable):
    """One array task of a stage: ``run_stage`` on a shard range (``None`` = the whole stage).

    Args:
        cfg: the resolved pipeline config (pickled into the job).
        stage: stage name.
        shard_range: ``(lo, hi)`` indices into the stage's shard listing, or ``None``.
    """

    def __init__(
        self, cfg: PipelineConfig, stage: str, shard_range: tuple[int, int] | None, force: bool = False
    ) -> None:
        self.cfg = cfg
        self.stage = stage
        self.shard_range = shard_range
        self.force = force

    def __call__(self) -> dict[str, Any]:
        """Run the unfinished shards of the range (with ``force``: every shard of it, each output
        replaced in place, nothing removed first); write the manifest if no shard is left."""
        _log_to_stderr()
        summary = run_stage(
            self.cfg, self.stage, shard_range=self.shard_range, workers=1, progress=False,
            force=self.force, redo_done=self.force or None,
        )
        summary.pop("manifest", None)  # keep the job's result pickle small
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Requeue the same range: finished shards (redone ones included) are skipped through their
        completion records."""
        return DelayedSubmission(StageTask(self.cfg, self.stage, self.shard_range))

    def __repr__(self) -> str:
        return f"StageTask({self.stage!r}, shard_range={self.shard_range})"


class TrainTask(submitit.helpers.Checkpointable):
    """One DDP rank of a training job of the seed model or one expert.

    Sets the torch.distributed variables from the SLURM allocation, then calls
    ``training.main.train_experts``.

    Args:
        cfg: the resolved pipeline config.
        expert: ``"seed"`` or an expert index as a string.
        resume: ``"latest"``, ``"none"`` or a checkpoint path (first run only; requeues use
            ``"latest"``).
    """

    def __init__(self, cfg: PipelineConfig, expert: str, resume: str = "latest") -> None:
        self.cfg = cfg
        self.expert = expert
        self.resume = resume

    def __call__(self) -> Any:
        """Train (or resume) the seed model or one expert."""
        _log_to_stderr()
        _export_torch_distributed_env()
        from training.main import train_experts

        progress = int(os.environ.get("RANK", "0")) == 0
        resume = self.resume
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            # put back by SLURM itself (scontrol requeue, node failure): the job reruns the
            # submitted pickle, not checkpoint()'s; continue, never restart from zero
            logging.getLogger(__name__).info(
                "train %s: requeued by SLURM (restart %s); resuming from the latest checkpoint",
                self.expert,
                os.environ["SLURM_RESTART_COUNT"],
            )
            resume = "latest"
        return train_experts(self.cfg, self.expert, resume=resume, progress=progress)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Requeue from the latest checkpoint (never from zero, whatever the first run asked)."""
        return DelayedSubmission(TrainTask(self.cfg, self.expert, resume="latest"))

    def __repr__(self) -> str:
        return f"TrainTask(expert={self.expert!r}, resume={self.resume!r})"


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _export_torch_distributed_env() -> None:
    """MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the submitit job (env:// init)."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_DEBUG_JOB_ID" not in os.environ:
        return  # called outside a submitit job: plain single process, or torchrun already set them
    # Each task keeps all node GPUs visible and picks cuda:LOCAL_RANK (pipeline.runtime).
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


# --------------------------------------------------------------------------- executor parameters


def slurm_available() -> bool:
    """Whether ``sbatch`` and ``srun`` are on PATH (submitit needs both)."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def log_folder(cfg: PipelineConfig, stage: str) -> Path:
    """``<launcher.folder>/<stage>``, default ``<run>/_slurm/<stage>``."""
    base = Path(cfg.launcher.folder) if cfg.launcher.folder else cfg.run_dir / "_slurm"
    return base / stage


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
        stage: a stage name or ``"train"``.
    """
    if stage != "train" and stage not in STAGE_MODULES:
        raise LaunchError(f"unknown stage '{stage}' (known: {', '.join([*STAGE_MODULES, 'train'])})")
    s = cfg.launcher.slurm
    train = stage == "train"
    gpus = s.gpus_per_node if train else (None if stage in CPU_STAGES else 1)
    partition = (s.cpu_partition or s.partition) if stage in CPU_STAGES else s.partition
    params: dict[str, Any] = {
        "name": f"{cfg.run.name}-{stage}",
        "timeout_min": s.time_min if train else (s.stage_time_min or s.time_min),
        "nodes": s.nodes if train else 1,
        "tasks_per_node": s.gpus_per_node if train else 1,
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


# --------------------------------------------------------------------------- sharded and global stages


def split_ranges(indices: list[int], per_job: int) -> list[tuple[int, int]]:
    """Group sorted shard indices ``per_job`` at a time into disjoint ``[lo, hi)`` ranges.

    A range may span finished shards between unfinished ones; ``run_stage`` skips those.
    """
    if per_job <= 0:
        raise ValueError(f"per_job must be > 0, got {per_job}")
    groups = [indices[i : i + per_job] for i in range(0, len(indices), per_job)]
    return [(g[0], g[-1] + 1) for g in groups]


def _manifest_current(cfg: PipelineConfig, stage: str, chash: str) -> bool:
    path = stage_dir(cfg, stage) / artifacts.MANIFEST
    return path.is_file() and artifacts.read_json(path).get("config_hash") == chash


def plan_tasks(cfg: PipelineConfig, stage: str, *, force: bool = False) -> list[StageTask]:
    """The tasks a submission of ``stage`` would run (empty when there is nothing to do).

    With ``force`` every shard is redone by the tasks themselves, as a local ``--force`` run
    does: nothing is removed before it is submitted, each output is replaced when its shard is
    redone, so a failed or cancelled array leaves the earlier outputs in place.
    """
    return _plan_tasks(cfg, stage, force)[1]


def _plan_tasks(cfg: PipelineConfig, stage: str, force: bool) -> tuple[StagePlan, list[StageTask]]:
    plan = plan_stage(cfg, stage)
    if plan.upstream_stale or ((plan.stale or plan.orphans) and not force):
        raise StageError(_stale_message(cfg, stage, plan))
    if force:
        plan = dataclasses.replace(plan, done=[], stale=[], orphans=[], todo=[s.name for s in plan.shards])
    if not plan.todo and _manifest_current(cfg, stage, plan.config_hash):
        return plan, []
    if stage not in SHARDED_STAGES:
        return plan, [StageTask(cfg, stage, None, force)]
    todo = set(plan.todo)
    indices = [i for i, shard in enumerate(plan.shards) if shard.name in todo]
    # every shard done but no manifest (its writer died): one task that only finalizes
    ranges = split_ranges(indices, cfg.launcher.slurm.shards_per_job) or [(0, 0)]
    return plan, [StageTask(cfg, stage, r, force) for r in ranges]


def submit_stage(
    cfg: PipelineConfig,
    stage: str,
    *,
    force: bool = False,
    cluster: str | None = None,
    config_path: str | None = None,
) -> list[Job]:
    """Submit the unfinished work of a stage; print the job ids, the log folder and a hint.

    Args:
        cfg: the resolved pipeline config.
        stage: ``prep``, ``embed``, ``assign`` (arrays) or ``cluster``, ``ensemble`` (one job).
        force: redo every shard (records are cleared before submitting).
        cluster: ``None`` = SLURM when ``sbatch`` is on PATH, otherwise a dry run; ``"slurm"``,
            ``"local"`` or ``"debug"`` force an executor.
        config_path: shown in the ``pipeline status`` hint.

    Returns:
        The submitted jobs (empty for a dry run or when there is nothing to do).
    """
    if stage == "train":
        raise LaunchError("train: use submit_train (python -m pipeline train --launcher slurm)")
    dry_run = cfg.launcher.dry_run or (cluster is None and not slurm_available())
    plan, tasks = _plan_tasks(cfg, stage, force)
    folder = log_folder(cfg, stage)
    if not tasks:
        print(f"{stage}: nothing to do (every shard done, manifest written)")
        return []
    detail = _describe_tasks(cfg, plan, tasks)
    if dry_run:
        _print_dry_run(cfg, stage, plan, tasks, folder, detail)
        return []
    effective = cluster or "slurm"
    if effective == "slurm":
        _refuse_if_active(folder, stage)
        _print_failures(stage, folder)
    executor = make_executor(cfg, stage, folder=folder, cluster=effective)
    jobs = _submit_all(executor, tasks, cfg.launcher.slurm.max_array_size)
    _record_submission(folder, stage, jobs, [f"shards {t.shard_range}" for t in tasks])
    _print_submitted(stage, jobs, detail, folder, config_path, cfg)
    return jobs


def _submit_all(executor: submitit.AutoExecutor, tasks: list[Any], max_array_size: int) -> list[Job]:
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


def _describe_tasks(cfg: PipelineConfig, plan: StagePlan, tasks: list[StageTask]) -> str:
    if tasks[0].shard_range is None:
        return "1 job over the whole stage"
    todo = set(plan.todo)
    count = sum(1 for t in tasks for s in plan.shards[slice(*t.shard_range)] if s.name in todo)
    per = cfg.launcher.slurm.shards_per_job
    return f"{len(tasks)} task(s) over {count} unfinished of {len(plan.shards)} shard(s), <= {per} per task"


def _task_lines(plan: StagePlan, tasks: list[StageTask]) -> list[str]:
    if tasks[0].shard_range is None:
        return []
    lines = []
    for i, task in enumerate(tasks):
        if _SHOWN_TASKS <= i < len(tasks) - 1:
            if i == _SHOWN_TASKS:
                lines.append(f"  ... {len(tasks) - _SHOWN_TASKS - 1} more task(s)")
            continue
        lo, hi = task.shard_range
        names = f"{plan.shards[lo].name} .. {plan.shards[hi - 1].name}" if hi > lo else "(finalize only)"
        lines.append(f"  task {i}: --shards {lo}:{hi}  {names}")
    return lines


def _print_dry_run(
    cfg: PipelineConfig, stage: str, plan: StagePlan, tasks: list[StageTask], folder: Path, detail: str
) -> None:
    why = "launcher.dry_run is set" if cfg.launcher.dry_run else "no sbatch on PATH"
    print(f"{stage}: dry run ({why}); nothing was submitted. Would submit {detail}:")
    for line in _task_lines(plan, tasks):
        print(line)
    limit = cfg.launcher.slurm.max_array_size
    script = render_sbatch(cfg, stage, folder=folder, array_size=min(len(tasks), limit))
    if len(tasks) > limit:
        print(f"  as {-(-len(tasks) // limit)} arrays of <= {limit} task(s) (launcher.slurm.max_array_size)")
    print(f"----- sbatch script (logs in {folder}) -----")
    print(script.rstrip())
    print("----- end of script -----")


def _print_submitted(
    what: str, jobs: list[Job], detail: str, folder: Path, config_path: str | None, cfg: PipelineConfig
) -> None:
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
    parts = [f"array {a} ({n} task(s))" for a, n in arrays.items()] + singles[:_SHOWN_TASKS]
    more = f" and {len(singles) - _SHOWN_TASKS} more" if len(singles) > _SHOWN_TASKS else ""
    return ", ".join(parts) + more


def _record_submission(folder: Path, what: str, jobs: list[Job], labels: list[str]) -> None:
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


def active_jobs(folder: Path) -> dict[str, str]:
    """Jobs submitted from ``folder`` that are still queued or running: ``{job id: label}``.

    Empty where ``squeue`` is unavailable (nothing can be known then).
    """
    path = folder / SUBMISSIONS
    if not path.is_file() or shutil.which("squeue") is None:
        return {}
    recorded: dict[str, str] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        recorded.update(zip(entry["job_ids"], entry["labels"], strict=True))
    try:
        # -r lists pending array tasks one per line (``4101_3``) instead of ``4101_[3-9]``
        cmd = ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    queued = {line.strip() for line in out.splitlines() if line.strip()}
    return {job_id: label for job_id, label in recorded.items() if job_id in queued}


def _refuse_if_active(folder: Path, stage: str) -> None:
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
    path = folder / SUBMISSIONS
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        return []
    if folder.name != "train":
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
    base = Path(cfg.launcher.folder) if cfg.launcher.folder else cfg.run_dir / "_slurm"
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


def _print_failures(what: str, folder: Path) -> None:
    """Name the failed jobs of the previous submission, what they covered and their logs."""
    for job in failed_jobs(folder):
        error = f": {job['error']}" if job["error"] else ""
        print(f"{what}: earlier job {job['job_id']} ({job['label']}) {job['state']}{error}")
        print(f"  log: {job['log']}")


# --------------------------------------------------------------------------- training


def expert_dir(cfg: PipelineConfig, expert: str) -> Path:
    """``<run>/train/seed``, ``<run>/train/expert_<k>`` or ``<run>/train/<baseline run>``."""
    name = f"expert_{expert}" if expert.isdigit() else expert
    return cfg.run_dir / "train" / name


def train_runs(cfg: PipelineConfig) -> dict[str, str]:
    """State of every training run: ``{"seed": state, "0": state, ...}``.

    States are ``done``, ``stale`` (finished under another config), ``partial`` and
    ``not started``; there is no ``seed`` entry when ``train.seed_steps`` is 0. Read from
    ``training.main.training_status``, or from ``final.pt`` files where training is not installed.
    """
    try:
        from training.main import training_status
    except ImportError:
        names = (["seed"] if cfg.train.seed_steps > 0 else []) + [
            str(k) for k in range(cfg.cluster.num_experts)
        ]
        return {n: "done" if (expert_dir(cfg, n) / "final.pt").is_file() else "not started" for n in names}
    runs = {}
    for row in training_status(cfg):
        name = row["stage"].removeprefix("train/").removeprefix("expert_")
        runs[name] = "stale" if row.get("stale") else row["state"]
    return runs


def _experts(cfg: PipelineConfig, expert: str, n: int) -> list[str]:
    """Runs after the seed that ``--expert`` asks for, as ``train_runs`` names them ("0", "dense", ...)."""
    from training.runs import SEED, parse_targets

    return [name.removeprefix("expert_") for name in parse_targets(cfg, expert, n) if name != SEED]


def submit_train(
    cfg: PipelineConfig,
    expert: str,
    config_path: str | None,
    overrides: list[str] | None,
    *,
    cluster: str | None = None,
    resume: str = "latest",
) -> list[Job]:
    """Submit the seed model and/or experts as multi-node DDP jobs.

    The seed job is submitted first when it is asked for or not trained yet (and
    ``train.seed_steps > 0``); the experts then run as one array (one multi-node job per
    unfinished expert) with ``--dependency=afterok:<seed job>``. Runs already done, and runs
    whose earlier job is still queued (``squeue``), are not submitted again; experts then wait
    for the queued seed job. On the local/debug executors, which know no dependencies, the seed
    job is waited for instead.

    Args:
        cfg: the resolved pipeline config.
        expert: ``"seed"``, ``"all"`` or an expert index.
        config_path: the config file (shown in the hints and the torchrun equivalent).
        overrides: the ``--set`` overrides (shown in the torchrun equivalent).
        cluster: as in :func:`submit_stage`.
        resume: ``latest``, ``none`` or a checkpoint path, for the runs asked for (the seed keeps
            ``latest`` when only experts are asked for); requeued tasks always use ``latest``.

    Returns:
        The submitted jobs, seed first (empty for a dry run or when there is nothing to submit).
    """
    runs = train_runs(cfg)
    wanted = _experts(cfg, expert, sum(1 for name in runs if name.isdigit()))
    seed_resume = resume if expert in ("seed", "all") else "latest"
    experts = [k for k in wanted if resume != "latest" or runs.get(k) != "done"]
    run_seed = "seed" in runs and (expert == "seed" or bool(experts))
    run_seed = run_seed and (seed_resume != "latest" or runs["seed"] != "done")
    stale = [k for k in experts if runs.get(k) == "stale" and resume == "latest"]
    if run_seed and runs["seed"] == "stale" and seed_resume == "latest":
        stale.insert(0, "seed")
    if stale:
        raise LaunchError(
            f"train: {', '.join(stale)} finished under another config; "
            f"resubmit with --resume none to retrain (python -m pipeline status shows the runs)"
        )
    folder = log_folder(cfg, "train")
    dry_run = cfg.launcher.dry_run or (cluster is None and not slurm_available())
    effective = cluster or "slurm"
    queued = {} if dry_run or effective != "slurm" else {v: k for k, v in active_jobs(folder).items()}
    if not dry_run and effective == "slurm":
        _print_failures("train", folder)
    for k in [k for k in experts if k in queued]:
        print(f"train expert {k}: job {queued[k]} is still queued or running; not submitted again")
        experts.remove(k)
    seed_queued = run_seed and "seed" in queued
    run_seed = run_seed and not seed_queued and (expert == "seed" or bool(experts))
    if not run_seed and not experts:
        print(f"train {expert}: nothing to submit (done or queued; see python -m pipeline status)")
        return []
    names = {"seed": f"{cfg.run.name}-train-seed", "experts": f"{cfg.run.name}-train-experts"}
    if dry_run:
        resumes = (seed_resume, resume)
        _print_train_dry_run(cfg, run_seed, experts, folder, names, config_path, overrides or [], resumes)
        return []
    jobs: list[Job] = []
    dependency = f"afterok:{queued['seed']}" if seed_queued else None
    if run_seed:
        executor = make_executor(cfg, "train", folder=folder, cluster=effective, name=names["seed"])
        seed_job = executor.submit(TrainTask(cfg, "seed", resume=seed_resume))
        jobs.append(seed_job)
        _print_submitted("train seed", [seed_job], _ddp_detail(cfg), folder, config_path, cfg)
        if effective == "slurm":
            dependency = f"afterok:{seed_job.job_id}"
        elif experts:
            seed_job.result()  # no dependencies outside SLURM
    if experts:
        executor = make_executor(
            cfg, "train", folder=folder, cluster=effective, dependency=dependency, name=names["experts"]
        )
        tasks = [TrainTask(cfg, k, resume=resume) for k in experts]
        expert_jobs = _submit_all(executor, tasks, cfg.launcher.slurm.max_array_size)
        jobs += expert_jobs
        after = f", after {dependency}" if dependency else ""
        detail = f"expert(s) {', '.join(experts)}, each {_ddp_detail(cfg)}{after}"
        _print_submitted("train experts", expert_jobs, detail, folder, config_path, cfg)
    labels = (["seed"] if run_seed else []) + experts
    _record_submission(folder, f"train {expert}", jobs, labels)
    return jobs


def _ddp_detail(cfg: PipelineConfig) -> str:
    s = cfg.launcher.slurm
    return f"{s.nodes} node(s) x {s.gpus_per_node} GPU(s) = {s.nodes * s.gpus_per_node} DDP rank(s)"


def torchrun_command(
    cfg: PipelineConfig, expert: str, config_path: str | None, overrides: list[str], resume: str = "latest"
) -> str:
    """The equivalent multi-node torchrun command (run on every node), shell-quoted.

    Every argument is quoted (``$HOST``, the rendezvous host to fill in, is left to the shell).
    """
    s = cfg.launcher.slurm
    args = ["--config", config_path or "<config>", "--expert", str(expert)]
    for item in overrides:
        args += ["--set", item]
    args += ["--resume", resume]
    return (
        f"torchrun --nnodes={s.nodes} --nproc_per_node={s.gpus_per_node} --rdzv_backend=c10d "
        f"--rdzv_endpoint=$HOST:29500 -m training.main {shlex.join(args)}"
    )


def _print_train_dry_run(
    cfg: PipelineConfig,
    run_seed: bool,
    experts: list[str],
    folder: Path,
    names: dict[str, str],
    config_path: str | None,
    overrides: list[str],
    resumes: tuple[str, str] = ("latest", "latest"),
) -> None:
    why = "launcher.dry_run is set" if cfg.launcher.dry_run else "no sbatch on PATH"
    print(f"train: dry run ({why}); nothing was submitted.")
    if run_seed:
        print(f"seed job: {_ddp_detail(cfg)}")
        print(f"  torchrun equivalent: {torchrun_command(cfg, 'seed', config_path, overrides, resumes[0])}")
        print("----- sbatch script: seed -----")
        print(render_sbatch(cfg, "train", folder=folder, name=names["seed"]).rstrip())
    if experts:
        dependency = "afterok:<seed job id>" if run_seed else None
        print(f"expert array: expert(s) {', '.join(experts)}, one job each, {_ddp_detail(cfg)}")
        for k in experts:
            print(f"  torchrun equivalent: {torchrun_command(cfg, k, config_path, overrides, resumes[1])}")
        print("----- sbatch script: experts -----")
        script = render_sbatch(
            cfg, "train", folder=folder, array_size=len(experts), dependency=dependency, name=names["experts"]
        )
        print(script.rstrip())
    print("----- end of scripts -----")
