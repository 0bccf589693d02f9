"""The pipeline's stages on SLURM (submitit) and the torchrun command line.

* ``prep``, ``embed``, ``assign``: one array task per ``launcher.slurm.shards_per_job`` *unfinished*
  shards; each task runs :func:`pipeline.runner.run_stage` on its shard range, and whichever task
  finds every shard done writes the manifest (``run_stage`` only finalizes when every shard has a
  completion record). prep tasks are CPU-only; embed/assign tasks get one GPU.
* ``cluster``, ``ensemble``: one single-GPU job.
* ``train``: see :mod:`training.launch` (multi-node DDP jobs, built on the same pieces).

The generic parts (executor parameters, sbatch rendering, submission logs, job states) are in
:mod:`pipeline.slurm`. Every task is a :class:`submitit.helpers.Checkpointable`: on preemption or
time limit submitit requeues it with the same arguments; a requeued stage task reruns its range and
its completion records make it skip the finished shards. Where SLURM is absent (no ``sbatch`` on
PATH) or ``launcher.dry_run`` is set, the sbatch scripts are printed instead of submitted. See
docs/cluster.md.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import submitit
from submitit.core.core import Job
from submitit.core.utils import DelayedSubmission

from pipeline import artifacts, slurm
from pipeline.config import PipelineConfig
from pipeline.errors import StageError
from pipeline.runner import StagePlan, plan_stage, run_stage, stage_dir, stale_message
from pipeline.slurm import LaunchError

SHARDED_STAGES = ("prep", "embed", "assign")
"""Stages submitted as job arrays over shard ranges (the others run as one job)."""
RDZV_ENDPOINT = "--rdzv_endpoint=$HOST:29500"
"""Multi-node rendezvous argument of :func:`torchrun_command`; ``$HOST`` is left to the shell."""


# --------------------------------------------------------------------------- torchrun


def torchrun_command(
    module: str, args: list[str], overrides: list[str] = (), *, nproc_per_node: int, nnodes: int = 1
) -> list[str]:
    """``torchrun ... -m <module> <args> --set <override> ...``: one node, or ``nnodes`` meeting at
    ``$HOST`` (c10d rendezvous; the command to run on every node, see :func:`shell_line`).

    Args:
        module: the entry module (``training.main``, ``training.ssl.main``, ``stages.embed``...).
        args: its arguments.
        overrides: config overrides, each passed as ``--set <item>``.
        nproc_per_node: processes (GPUs) per node.
        nnodes: nodes.
    """
    head = ["torchrun"]
    if nnodes > 1:
        head += [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d", RDZV_ENDPOINT]
    else:
        head.append(f"--nproc_per_node={nproc_per_node}")
    return [*head, "-m", module, *args, *[x for item in overrides for x in ("--set", item)]]


def shell_line(cmd: list[str]) -> str:
    """The command shell-quoted, every argument but the rendezvous host placeholder."""
    return " ".join(part if part == RDZV_ENDPOINT else shlex.quote(part) for part in cmd)


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
        slurm.log_to_stderr()
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


# --------------------------------------------------------------------------- planning and submitting


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
        raise StageError(stale_message(cfg, stage, plan))
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
        raise LaunchError("train: use training.launch.submit_train (python -m pipeline train --launcher slurm)")
    dry_run = slurm.is_dry_run(cfg, cluster)
    plan, tasks = _plan_tasks(cfg, stage, force)
    folder = slurm.log_folder(cfg, stage)
    if not tasks:
        print(f"{stage}: nothing to do (every shard done, manifest written)")
        return []
    detail = _describe_tasks(cfg, plan, tasks)
    if dry_run:
        _print_dry_run(cfg, stage, plan, tasks, folder, detail)
        return []
    effective = cluster or "slurm"
    if effective == "slurm":
        slurm.refuse_if_active(folder, stage)
        slurm.print_failures(stage, folder)
    executor = slurm.make_executor(cfg, stage, folder=folder, cluster=effective)
    jobs = slurm.submit_all(executor, tasks, cfg.launcher.slurm.max_array_size)
    slurm.record_submission(folder, stage, jobs, [f"shards {t.shard_range}" for t in tasks])
    slurm.print_submitted(stage, jobs, detail, folder, config_path, cfg)
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
        if slurm.SHOWN_JOBS <= i < len(tasks) - 1:
            if i == slurm.SHOWN_JOBS:
                lines.append(f"  ... {len(tasks) - slurm.SHOWN_JOBS - 1} more task(s)")
            continue
        lo, hi = task.shard_range
        names = f"{plan.shards[lo].name} .. {plan.shards[hi - 1].name}" if hi > lo else "(finalize only)"
        lines.append(f"  task {i}: --shards {lo}:{hi}  {names}")
    return lines


def _print_dry_run(
    cfg: PipelineConfig, stage: str, plan: StagePlan, tasks: list[StageTask], folder: Path, detail: str
) -> None:
    print(f"{stage}: dry run ({slurm.dry_run_reason(cfg)}); nothing was submitted. Would submit {detail}:")
    for line in _task_lines(plan, tasks):
        print(line)
    limit = cfg.launcher.slurm.max_array_size
    script = slurm.render_sbatch(cfg, stage, folder=folder, array_size=min(len(tasks), limit))
    if len(tasks) > limit:
        print(f"  as {-(-len(tasks) // limit)} arrays of <= {limit} task(s) (launcher.slurm.max_array_size)")
    print(f"----- sbatch script (logs in {folder}) -----")
    print(script.rstrip())
    print("----- end of script -----")

