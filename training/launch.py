"""How training processes start: the entry-point wrapper, the torchrun command, SLURM jobs.

* :func:`run_entry`: the body of ``python -m training.main`` / ``training.ssl.main`` as one rank
  (one-line errors, exit code 2, the process group torn down).
* :func:`torchrun_args` + :func:`pipeline.launch.torchrun_command`: the command line of a
  data-parallel run (``python -m pipeline train --launcher torchrun`` runs it; the SLURM dry run
  prints its multi-node form).
* :func:`submit_train`: the seed and the runs after it as multi-node DDP jobs through submitit
  (``python -m pipeline train --launcher slurm``), on the generic pieces of :mod:`pipeline.slurm`.
  One job of ``nodes`` x ``gpus_per_node`` tasks (one DDP rank per task) per run; the runs after
  the seed (experts, baselines) are an array submitted with ``--dependency=afterok:<seed job>``
  when the seed is not trained yet. A requeued task resumes from its latest checkpoint.

Runs are named by :mod:`training.runs`; the launcher labels them short (``seed``, ``0``, ``dense``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch.distributed as dist
from submitit.core.core import Job
from submitit.core.utils import DelayedSubmission

from pipeline import slurm
from pipeline.config import PipelineConfig
from pipeline.launch import shell_line, torchrun_command
from pipeline.slurm import LaunchError
from training import runs

log = logging.getLogger("training")

ENTRY_MODULE = "training.main"
"""The module torchrun and srun start for training runs."""


# --------------------------------------------------------------------------- entry points


def run_entry(body: Callable[[], object], errors: tuple[type[BaseException], ...]) -> int:
    """Run an entry point's work in this process (one rank); returns the exit code.

    INFO logging to stderr; an expected error (``errors``) is one ``error: ...`` line and exit
    code 2; the torch.distributed process group is torn down in every case.
    """
    slurm.log_to_stderr()
    try:
        body()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def torchrun_args(config_path: str | None, expert: str, resume: str = "latest") -> list[str]:
    """Arguments of ``-m training.main`` for one ``--expert`` target (``--set`` items go after)."""
    return ["--config", config_path or "<config>", "--expert", str(expert), "--resume", resume]


def train_command(
    cfg: PipelineConfig, config_path: str | None, expert: str, overrides: list[str], resume: str = "latest"
) -> list[str]:
    """The one-node torchrun command of ``python -m pipeline train --launcher torchrun``."""
    args = torchrun_args(config_path, expert, resume)
    return torchrun_command(ENTRY_MODULE, args, overrides, nproc_per_node=cfg.launcher.nproc_per_node)


def cluster_command(
    cfg: PipelineConfig, config_path: str | None, expert: str, overrides: list[str], resume: str = "latest"
) -> str:
    """The torchrun command equivalent to one SLURM training job (run on every node), shell-quoted."""
    s = cfg.launcher.slurm
    args = torchrun_args(config_path, expert, resume)
    return shell_line(
        torchrun_command(ENTRY_MODULE, args, overrides, nproc_per_node=s.gpus_per_node, nnodes=s.nodes)
    )


# --------------------------------------------------------------------------- SLURM


class TrainTask(submitit.helpers.Checkpointable):
    """One DDP rank of a training job of the seed model or one run after it.

    Sets the torch.distributed variables from the SLURM allocation, then calls
    ``training.main.train_experts``.

    Args:
        cfg: the resolved pipeline config.
        expert: a launcher label: ``"seed"``, an expert index as a string, a baseline run.
        resume: ``"latest"``, ``"none"`` or a checkpoint path (first run only; requeues use
            ``"latest"``).
    """

    def __init__(self, cfg: PipelineConfig, expert: str, resume: str = "latest") -> None:
        self.cfg = cfg
        self.expert = expert
        self.resume = resume

    def __call__(self) -> Any:
        """Train (or resume) the run."""
        slurm.log_to_stderr()
        slurm.export_torch_distributed_env()
        from training.main import train_experts  # training.main imports this module (run_entry)

        progress = int(os.environ.get("RANK", "0")) == 0
        resume = self.resume
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            # put back by SLURM itself (scontrol requeue, node failure): the job reruns the
            # submitted pickle, not checkpoint()'s; continue, never restart from zero
            log.info(
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


def train_runs(cfg: PipelineConfig) -> dict[str, str]:
    """State of every training run by launcher label: ``{"seed": state, "0": state, "dense": ...}``.

    States are ``done``, ``stale`` (finished under another config), ``partial`` and
    ``not started``; there is no ``seed`` entry when ``train.seed_steps`` is 0.
    """
    from training.main import training_status  # training.main imports this module (run_entry)

    states = {}
    for row in training_status(cfg):
        label = runs.short_label(row["stage"].removeprefix("train/"))
        states[label] = "stale" if row.get("stale") else row["state"]
    return states


def requested_runs(cfg: PipelineConfig, expert: str, num_experts: int) -> list[str]:
    """Labels of the runs after the seed that ``--expert`` asks for ("0", "dense", ...)."""
    return [runs.short_label(name) for name in runs.parse_targets(cfg, expert, num_experts) if name != runs.SEED]


@dataclass
class TrainPlan:
    """What a submission of training runs does."""

    seed: bool
    """Submit a seed job."""
    experts: list[str]
    """Labels of the runs after the seed, one array task each."""
    seed_resume: str
    resume: str
    after: str | None = None
    """sbatch ``--dependency`` of the array (a queued or just submitted seed job)."""


def plan_train(cfg: PipelineConfig, expert: str, resume: str) -> TrainPlan:
    """The runs to submit: those asked for that are not done (all of them with ``resume`` other than
    ``latest``), the seed first when they need it.

    Raises:
        LaunchError: a run to continue finished under another config.
    """
    states = train_runs(cfg)
    wanted = requested_runs(cfg, expert, sum(1 for label in states if label.isdigit()))
    seed_resume = resume if expert in ("seed", "all") else "latest"
    experts = [k for k in wanted if resume != "latest" or states.get(k) != "done"]
    run_seed = runs.SEED in states and (expert == runs.SEED or bool(experts))
    run_seed = run_seed and (seed_resume != "latest" or states[runs.SEED] != "done")
    stale = [k for k in experts if states.get(k) == "stale" and resume == "latest"]
    if run_seed and states[runs.SEED] == "stale" and seed_resume == "latest":
        stale.insert(0, runs.SEED)
    if stale:
        raise LaunchError(
            f"train: {', '.join(stale)} finished under another config; "
            f"resubmit with --resume none to retrain (python -m pipeline status shows the runs)"
        )
    return TrainPlan(run_seed, experts, seed_resume, resume)


def _leave_queued(plan: TrainPlan, expert: str, folder: Path) -> None:
    """Drop the runs whose earlier job is still queued or running; the array then waits for a
    queued seed job."""
    queued = {label: job_id for job_id, label in slurm.active_jobs(folder).items()}
    for k in [k for k in plan.experts if k in queued]:
        print(f"train expert {k}: job {queued[k]} is still queued or running; not submitted again")
        plan.experts.remove(k)
    seed_queued = plan.seed and runs.SEED in queued
    plan.seed = plan.seed and not seed_queued and (expert == runs.SEED or bool(plan.experts))
    plan.after = f"afterok:{queued[runs.SEED]}" if seed_queued else None


def submit_train(
    cfg: PipelineConfig,
    expert: str,
    config_path: str | None,
    overrides: list[str] | None,
    *,
    cluster: str | None = None,
    resume: str = "latest",
) -> list[Job]:
    """Submit the seed model and/or the runs after it as multi-node DDP jobs.

    The seed job is submitted first when it is asked for or not trained yet (and
    ``train.seed_steps > 0``); the other runs then go as one array (one multi-node job per
    unfinished run) with ``--dependency=afterok:<seed job>``. Runs already done, and runs whose
    earlier job is still queued (``squeue``), are not submitted again; the array then waits for
    the queued seed job. On the local/debug executors, which know no dependencies, the seed job
    is waited for instead.

    Args:
        cfg: the resolved pipeline config.
        expert: an ``--expert`` target (:func:`training.runs.parse_targets`).
        config_path: the config file (shown in the hints and the torchrun equivalent).
        overrides: the ``--set`` overrides (shown in the torchrun equivalent).
        cluster: as in :func:`pipeline.launch.submit_stage`.
        resume: ``latest``, ``none`` or a checkpoint path, for the runs asked for (the seed keeps
            ``latest`` when only other runs are asked for); requeued tasks always use ``latest``.

    Returns:
        The submitted jobs, seed first (empty for a dry run or when there is nothing to submit).
    """
    plan = plan_train(cfg, expert, resume)
    folder = slurm.log_folder(cfg, slurm.DDP_JOB)
    dry_run = slurm.is_dry_run(cfg, cluster)
    effective = cluster or "slurm"
    if not dry_run and effective == "slurm":
        slurm.print_failures("train", folder)
        _leave_queued(plan, expert, folder)
    if not plan.seed and not plan.experts:
        print(f"train {expert}: nothing to submit (done or queued; see python -m pipeline status)")
        return []
    if dry_run:
        print_train_dry_run(cfg, plan, folder, config_path, overrides or [])
        return []
    jobs = _submit_seed(cfg, plan, folder, effective, config_path)
    jobs += _submit_runs(cfg, plan, folder, effective, config_path)
    slurm.record_submission(folder, f"train {expert}", jobs, ([runs.SEED] if plan.seed else []) + plan.experts)
    return jobs


def _job_name(cfg: PipelineConfig, part: str) -> str:
    return f"{cfg.run.name}-train-{part}"


def _ddp_detail(cfg: PipelineConfig) -> str:
    s = cfg.launcher.slurm
    return f"{s.nodes} node(s) x {s.gpus_per_node} GPU(s) = {s.nodes * s.gpus_per_node} DDP rank(s)"


def _submit_seed(
    cfg: PipelineConfig, plan: TrainPlan, folder: Path, cluster: str, config_path: str | None
) -> list[Job]:
    """The seed job; the array after it depends on it (SLURM) or waits for it (local executors)."""
    if not plan.seed:
        return []
    executor = slurm.make_executor(cfg, slurm.DDP_JOB, folder=folder, cluster=cluster, name=_job_name(cfg, "seed"))
    job = executor.submit(TrainTask(cfg, runs.SEED, resume=plan.seed_resume))
    slurm.print_submitted("train seed", [job], _ddp_detail(cfg), folder, config_path, cfg)
    if cluster == "slurm":
        plan.after = f"afterok:{job.job_id}"
    elif plan.experts:
        job.result()  # no dependencies outside SLURM
    return [job]


def _submit_runs(
    cfg: PipelineConfig, plan: TrainPlan, folder: Path, cluster: str, config_path: str | None
) -> list[Job]:
    """The runs after the seed as one array (split at ``launcher.slurm.max_array_size``)."""
    if not plan.experts:
        return []
    executor = slurm.make_executor(
        cfg, slurm.DDP_JOB, folder=folder, cluster=cluster, dependency=plan.after, name=_job_name(cfg, "experts")
    )
    tasks = [TrainTask(cfg, k, resume=plan.resume) for k in plan.experts]
    jobs = slurm.submit_all(executor, tasks, cfg.launcher.slurm.max_array_size)
    after = f", after {plan.after}" if plan.after else ""
    detail = f"expert(s) {', '.join(plan.experts)}, each {_ddp_detail(cfg)}{after}"
    slurm.print_submitted("train experts", jobs, detail, folder, config_path, cfg)
    return jobs


def print_train_dry_run(
    cfg: PipelineConfig, plan: TrainPlan, folder: Path, config_path: str | None, overrides: list[str]
) -> None:
    """What a submission would do: per job, its shape, the torchrun equivalent and the sbatch script."""
    print(f"train: dry run ({slurm.dry_run_reason(cfg)}); nothing was submitted.")
    if plan.seed:
        print(f"seed job: {_ddp_detail(cfg)}")
        print(f"  torchrun equivalent: {cluster_command(cfg, config_path, runs.SEED, overrides, plan.seed_resume)}")
        print("----- sbatch script: seed -----")
        print(slurm.render_sbatch(cfg, slurm.DDP_JOB, folder=folder, name=_job_name(cfg, "seed")).rstrip())
    if plan.experts:
        dependency = "afterok:<seed job id>" if plan.seed else None
        print(f"expert array: expert(s) {', '.join(plan.experts)}, one job each, {_ddp_detail(cfg)}")
        for k in plan.experts:
            print(f"  torchrun equivalent: {cluster_command(cfg, config_path, k, overrides, plan.resume)}")
        print("----- sbatch script: experts -----")
        script = slurm.render_sbatch(
            cfg, slurm.DDP_JOB, folder=folder, array_size=len(plan.experts), dependency=dependency,
            name=_job_name(cfg, "experts"),
        )
        print(script.rstrip())
    print("----- end of scripts -----")
