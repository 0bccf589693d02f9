"""Self-supervised image training (SogCLR ``dcl`` / SimCLR ``simclr``): ``python -m pipeline ssl``.

In-process (one rank)::

    python -m pipeline ssl --config configs/demo_sogclr.yaml [--set ssl.loss_type=simclr] [--resume latest|none|PATH]

Data-parallel (NCCL on GPU, gloo on CPU; srun's environment works too)::

    torchrun --nproc_per_node=4 -m training.ssl.main --config configs/sogclr_imagenet.yaml

SLURM: ``python -m pipeline ssl --launcher slurm`` submits one multi-node job through submitit
(``launcher.slurm`` sizes it; requeues resume from the newest checkpoint).

Run folder ``<run>/ssl/<ssl.run_name>/`` (or ``<ssl.save_dir>/<ssl.run_name>``): ``config.yaml``,
``checkpoints/step_<n>.pt`` (model, LARS state, grad scaler, the u table, every rank's RNG, step),
``metrics.jsonl`` + ``tensorboard/``, ``final.pt`` (backbone + projector state dict) and
``manifest.json``. Resume is exact: the data order and the augmentations are functions of
``(run.seed, epoch, image id)`` and the position is the step.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import slurm
from pipeline.artifacts import git_sha, read_json, write_json, write_text
from pipeline.config import PipelineConfig, add_config_args, config_hash, dump_yaml, load_config
from pipeline.errors import ConfigError, StageError
from pipeline.runtime import Runtime, init_distributed, set_cpu_threads
from training import checkpoint as ckpt
from training.launch import run_entry
from training.losses.unimodal import UnimodalContrastiveLoss
from training.metrics import MetricsLogger
from training.models import unwrap
from training.optim import cosine_lr
from training.ssl.data import EpochSampler, TwoViewDataset, list_images
from training.ssl.model import SSLModel

log = logging.getLogger("training")

OPERATIONAL_KEYS = frozenset({"workers", "print_freq", "save_every", "keep_last", "device", "save_dir", "run_name"})
"""``ssl`` keys that do not change what a run computes."""


def run_dir(cfg: PipelineConfig) -> Path:
    """``<run>/ssl/<run_name>`` or ``<save_dir>/<run_name>``."""
    root = Path(cfg.ssl.save_dir) if cfg.ssl.save_dir else cfg.run_dir / "ssl"
    return root / cfg.ssl.run_name


def identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The config values that define the run (a changed one refuses a resume)."""
    ssl = {k: v for k, v in vars(cfg.ssl).items() if k not in OPERATIONAL_KEYS}
    return {"ssl": ssl, "seed": cfg.run.seed}


def build_optimizer(model: nn.Module, cfg: PipelineConfig) -> torch.optim.Optimizer:
    """LARS / SGD / AdamW; biases and norms (ndim < 2) get neither weight decay nor LARS adaptation
    (timm's Lars adapts only groups with weight decay, as MoCo v3's LARS excludes them)."""
    s = cfg.ssl
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": s.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if s.optimizer == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=s.scaled_lr(), momentum=s.momentum, weight_decay=s.wd, trust_coeff=0.001)
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.scaled_lr(), momentum=s.momentum, weight_decay=s.wd)
    return torch.optim.AdamW(groups, lr=s.scaled_lr(), weight_decay=s.wd)


class SSLTrainer:
    """One self-supervised run; :meth:`train` runs to the end (or ``stop_at_step``)."""

    def __init__(self, cfg: PipelineConfig, ctx: Runtime, resume: str = "latest", progress: bool = True) -> None:
        from training.loop import resolve_precision

        s = cfg.ssl
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.dir = run_dir(cfg)
        refs, _ = list_images(s.data, "train")
        if s.max_images:
            refs = refs[: s.max_images]
        self.num_images = len(refs)
        self.sampler_args = (len(refs), s.batch_size, ctx.rank, ctx.world_size, cfg.run.seed)
        self.steps_per_epoch = len(refs) // s.batch_size
        self.total_steps = s.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(s.warmup_epochs * self.steps_per_epoch))
        self.dataset = TwoViewDataset(refs, s.image_size, s.crop_min, cfg.run.seed)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        model = SSLModel(s.arch, s.mlp_dim, s.proj_dim, s.small_stem)
        if ctx.distributed and s.sync_bn and ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(ctx.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.precision = resolve_precision(s.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision.needs_scaler)
        self.loss = UnimodalContrastiveLoss(
            loss_type=s.loss_type,
            data_size=len(refs),
            temperature=s.temperature,
            gamma=s.gamma,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        self.step = self._restore(resume)
        if ctx.distributed:
            from training.setup import wrap_ddp

            self.model = wrap_ddp(self.model, ctx)
        self.logger = MetricsLogger(self.dir, ctx.is_main, self.step)

    def _restore(self, resume: str) -> int:
        ident = identity(self.cfg)
        if resume == "none" and self.ctx.is_main:
            shutil.rmtree(ckpt.checkpoint_dir(self.dir), ignore_errors=True)
            for name in (ckpt.FINAL, "manifest.json", "metrics.jsonl"):
                (self.dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.dir / "tensorboard", ignore_errors=True)
        if self.ctx.distributed:
            dist.barrier()
        path = None if resume == "none" else (Path(resume) if resume != "latest" else ckpt.latest_checkpoint(self.dir))
        if path is None:
            if self.ctx.is_main:
                self.dir.mkdir(parents=True, exist_ok=True)
                write_text(self.dir / "config.yaml", dump_yaml(self.cfg))
            torch.manual_seed(self.cfg.run.seed + 1000 + self.ctx.rank)
            return 0
        state = ckpt.load_checkpoint(path)
        ckpt.check_world_size(state, self.ctx.world_size, path)
        if state.get("identity") != ident:
            changed = sorted(k for k in ident["ssl"] if state.get("identity", {}).get("ssl", {}).get(k) != ident["ssl"][k])
            if resume == "latest":
                raise StageError(
                    f"{path}: written under another config (changed: {', '.join('ssl.' + k for k in changed) or 'run.seed'}); "
                    "start over with --resume none, or pass --resume PATH to continue anyway"
                )
            log.warning("ssl: resuming %s under a changed config", path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss.load_state_dict(state["loss"])
        ckpt.set_rng_state(state["rng"][self.ctx.rank])
        log.info("ssl: resumed %s at step %d", path, state["step"])
        return int(state["step"])

    def loader(self) -> Any:
        """Endless iterator of this rank's batches from the current step."""
        sampler = EpochSampler(*self.sampler_args, start=self.step)
        local = self.cfg.ssl.batch_size // self.ctx.world_size
        workers = self.cfg.ssl.workers
        return iter(
            DataLoader(
                self.dataset, batch_size=local, sampler=sampler, num_workers=workers,
                pin_memory=self.ctx.device.type == "cuda", persistent_workers=workers > 0,
            )
        )

    def train_step(self, view_a: torch.Tensor, view_b: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step; returns detached terms."""
        lr = cosine_lr(self.step, self.cfg.ssl.scaled_lr(), self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        device = self.ctx.device
        images = torch.cat([view_a, view_b]).to(device, non_blocking=True)
        with self.precision.autocast():
            z = self.model(images)
        z_a, z_b = z.float().chunk(2)
        terms = self.loss(z_a, z_b, index.to(torch.int64))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["contrastive_loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out = {k: v.detach().float() for k, v in terms.items()}
        out["loss"] = out.pop("contrastive_loss")
        out["lr"] = torch.tensor(lr)
        return out

    def train(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule (or ``stop_at_step``), checkpointing on the way."""
        s = self.cfg.ssl
        stop = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        if (self.dir / ckpt.FINAL).is_file() and self.step >= self.total_steps:
            log.info("ssl/%s: nothing to do (finished at step %d)", s.run_name, self.step)
            return {"step": self.step, "skipped": True}
        batches = self.loader()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=f"ssl/{s.run_name}",
                   disable=not (self.progress and self.ctx.is_main), dynamic_ncols=True)
        clock = (time.perf_counter(), self.step)
        saved = -1
        while self.step < stop:
            view_a, view_b, index = next(batches)
            terms = self.train_step(view_a, view_b, index)
            self.step += 1
            bar.update(1)
            if self.step % s.print_freq == 0 or self.step == self.total_steps:
                clock = self._log(terms, clock, bar)
            if self.step % s.save_every == 0 or self.step == stop:
                self.save()
                saved = self.step
        bar.close()
        if saved != self.step:
            self.save()
        if self.step >= self.total_steps and self.ctx.is_main:
            ckpt.export_final(self.dir, self.model)
            write_json(self.dir / "manifest.json", self._manifest())
        self.logger.close()
        return {"step": self.step, "run_dir": str(self.dir)}

    def _log(self, terms: dict[str, torch.Tensor], clock: tuple[float, int], bar: tqdm) -> tuple[float, int]:
        names = sorted(terms)
        values = torch.stack([terms[k].reshape(()).cpu() for k in names])
        if self.ctx.distributed:
            values = values.to(self.ctx.device)
            dist.all_reduce(values)
            values = values.cpu() / self.ctx.world_size
        row = {k: float(v) for k, v in zip(names, values.tolist(), strict=True)}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"ssl/{self.cfg.ssl.run_name}: loss is {row['loss']} at step {self.step}")
        now = time.perf_counter()
        row["samples_per_s"] = (self.step - clock[1]) * self.cfg.ssl.batch_size / max(1e-9, now - clock[0])
        row["epoch"] = self.step / self.steps_per_epoch
        self.logger.log(self.step, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        return now, self.step

    def save(self) -> Path:
        """``checkpoints/step_<n>.pt`` (rank 0 writes; every rank's RNG state is in it)."""
        return ckpt.save_step(self.ctx, self.dir, self.step, self._checkpoint_state, self.cfg.ssl.keep_last)

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss.state_dict(),
            "world_size": self.ctx.world_size,
            "identity": identity(self.cfg),
            "epoch": self.step / self.steps_per_epoch,
        }

    def _manifest(self) -> dict[str, Any]:
        s = self.cfg.ssl
        return {
            "stage": "ssl",
            "run_name": s.run_name,
            "arch": s.arch,
            "loss_type": s.loss_type,
            "images": self.num_images,
            "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "peak_lr": s.scaled_lr(),
            "world_size": self.ctx.world_size,
            "config_hash": config_hash(identity(self.cfg)),
            "git_sha": git_sha(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def train_ssl(
    cfg: PipelineConfig, resume: str = "latest", progress: bool = True, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Train (or resume) the configured SSL run in this process group."""
    ctx = init_distributed(cfg.ssl.device, cfg.ssl.precision, key="ssl.device")
    set_cpu_threads(ctx, cfg.ssl.workers)
    trainer = SSLTrainer(cfg, ctx, resume=resume, progress=progress)
    return trainer.train(stop_at_step)


def read_manifest(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The finished run's manifest, if any."""
    path = run_dir(cfg) / "manifest.json"
    return read_json(path) if path.is_file() else None


class SSLTask:
    """One DDP rank of a SLURM job (submitit); requeues resume from the newest checkpoint."""

    def __init__(self, cfg: PipelineConfig, resume: str = "latest") -> None:
        self.cfg, self.resume = cfg, resume

    def __call__(self) -> Any:
        """Train."""
        slurm.log_to_stderr()
        slurm.export_torch_distributed_env()
        return train_ssl(self.cfg, resume=self.resume, progress=False)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue with ``--resume latest``."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SSLTask(self.cfg, "latest"))


def submit_ssl(cfg: PipelineConfig, resume: str = "latest") -> Any:
    """Submit the run as one multi-node job (``launcher.slurm``); dry run prints the sbatch script."""
    folder = slurm.log_folder(cfg, "ssl")
    name = f"{cfg.run.name}-ssl-{cfg.ssl.run_name}"
    if slurm.is_dry_run(cfg, None):
        print("ssl: dry run (launcher.dry_run or no sbatch on PATH); nothing was submitted.")
        print(slurm.render_sbatch(cfg, slurm.DDP_JOB, folder=folder, name=name).rstrip())
        return None
    job = slurm.make_executor(cfg, slurm.DDP_JOB, folder=folder, name=name).submit(SSLTask(cfg, resume))
    print(f"ssl: submitted job {job.job_id} (logs in {folder})")
    return job


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m training.ssl.main`` (the torchrun / srun form)."""
    p = argparse.ArgumentParser(prog="torchrun ... -m training.ssl.main", description=__doc__.split("\n")[0])
    add_config_args(p, default=None)
    p.add_argument("--resume", default="latest", help="'latest' (default), 'none' or a checkpoint path")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)

    def train() -> None:
        cfg = load_config(args.config, args.overrides)
        train_ssl(cfg, resume=args.resume, progress=not args.quiet, stop_at_step=args.stop_at_step)

    return run_entry(train, (ConfigError, StageError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
