"""Assembling a :class:`training.loop.Trainer` from the config, in named build steps."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.runtime import Runtime
from training import checkpoint as ckpt
from training.data import (
    Batch,
    ExpertData,
    ExpertStream,
    SampleDecoder,
    StreamLayout,
    build_loader,
    load_expert_data,
    resolve_split,
)
from training.evaluation.tasks import classification_tasks
from training.evaluation.zeroshot import ZeroShotEvaluator
from training.loop import Precision, RunSpec, Teacher, Trainer, TrainState, resolve_precision
from training.losses import ContrastiveLoss, LossConfig, build_loss, init_student_from_teacher
from training.metrics import MetricsLogger
from training.models import ModelBundle, create_model, create_teacher, lock_towers
from training.optim import ScaleRule, apply_hyperparameters, build_optimizer

log = logging.getLogger("training")


@dataclasses.dataclass
class Restore:
    """What a run starts from: a checkpoint to resume (everything) or to branch from (no data, no RNG)."""

    state: dict[str, Any] | None = None
    path: Path | None = None
    resume: bool = False
    """True: continue this run (data position, RNG). False: branch (an expert from the seed)."""


def filled_loss_config(cfg: PipelineConfig, data: ExpertData) -> LossConfig:
    """``cfg.loss`` with ``data_size`` = the dataset's pair count when left at 0 (cfg is not mutated)."""
    if cfg.loss.data_size > 0:
        if cfg.loss.data_size < data.num_pairs:
            raise ConfigError(f"loss.data_size: {cfg.loss.data_size} < {data.num_pairs} pairs in the dataset")
        return cfg.loss
    return dataclasses.replace(cfg.loss, data_size=data.num_pairs)


def build_model(cfg: PipelineConfig, ctx: Runtime) -> ModelBundle:
    """The student: same random init on every rank (seeded), or ``train.pretrained``."""
    torch.manual_seed(cfg.run.seed)
    t = cfg.train
    bundle = create_model(
        t.model,
        t.pretrained,
        ctx.device,
        force_patch_dropout=None if t.force_patch_dropout < 0 else t.force_patch_dropout,
        force_image_size=t.force_image_size or None,
    )
    frozen = lock_towers(bundle.model, t)
    if frozen:
        log.info("lock_image/lock_text: %d parameter tensors frozen", len(frozen))
    if t.grad_checkpointing:
        bundle.model.set_grad_checkpointing(True)
    return bundle


def build_teacher(
    cfg: PipelineConfig, student: nn.Module, ctx: Runtime, loss_cfg: LossConfig
) -> Teacher | None:
    """The frozen reference model of ``train.teacher`` (None when unset or unused)."""
    if not cfg.train.teacher:
        return None
    bundle = create_teacher(cfg.train.teacher, ctx.device)
    if cfg.train.init_from_teacher:
        with torch.no_grad():
            copied = init_student_from_teacher(student, bundle.model)
        log.info("init_from_teacher: copied %d parameter tensors", len(copied))
    if loss_cfg.distill_weight == 0.0:
        return None
    visual = bundle.model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else int(visual.image_size)
    return Teacher(bundle.model, size, int(bundle.model.context_length))


def init_logit_scale(model: nn.Module, loss: ContrastiveLoss, cfg: PipelineConfig) -> None:
    """Give a randomly initialised model the loss's initial temperature."""
    init = loss.param_group_overrides().get("logit_scale", {}).get("init")
    if init is not None and not cfg.train.pretrained and not cfg.train.init_from_teacher:
        with torch.no_grad():
            model.logit_scale.fill_(float(init))


def build_layout(cfg: PipelineConfig, data: ExpertData, ctx: Runtime) -> StreamLayout:
    """How this job's ranks and workers share the stream."""
    workers = max(1, cfg.train.workers)
    split = resolve_split(cfg.train.data_split, data, ctx.world_size * workers)
    return StreamLayout(
        split, ctx.rank, ctx.world_size, workers, cfg.train.batch_size, cfg.train.shuffle_buffer
    )


def restore_weights(
    restore: Restore,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss: ContrastiveLoss,
    cfg: PipelineConfig,
) -> None:
    """Load model, optimizer, scaler and loss state from a resume or branch checkpoint."""
    state = restore.state
    assert state is not None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    apply_hyperparameters(optimizer, cfg.train)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("loss") is not None:
        loss.load_state_dict(state["loss"])
    if cfg.loss.glofnd_reset_lda:
        loss.reset_thresholds()


def initial_state(spec: RunSpec, restore: Restore) -> TrainState:
    """Step, data position and epoch offset the run starts at."""
    if restore.state is None:
        return TrainState(step=spec.start_step, batches=0)
    data = restore.state.get("data", {})
    if restore.resume:
        return TrainState(
            step=int(restore.state["step"]),
            batches=int(data.get("batches", 0)),
            epoch_offset=int(data.get("epoch_offset", 0)),
        )
    fraction = float(data.get("epoch_fraction", 0.0))
    return TrainState(step=int(restore.state["step"]), batches=0, epoch_offset=math.ceil(fraction - 1e-9))


def seed_or_restore_rng(cfg: PipelineConfig, ctx: Runtime, restore: Restore) -> None:
    """Per-rank RNG: the saved states on resume, else ``run.seed + rank``."""
    if restore.resume and restore.state is not None:
        ckpt.set_rng_state(restore.state["rng"][ctx.rank])
        return
    torch.manual_seed(cfg.run.seed + ctx.rank)
    np.random.seed(cfg.run.seed + ctx.rank)
    random.seed(cfg.run.seed + ctx.rank)


def wrap_ddp(model: nn.Module, ctx: Runtime) -> nn.Module:
    """DistributedDataParallel for more than one process."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def build_evaluator(
    cfg: PipelineConfig, bundle: ModelBundle, ctx: Runtime, precision: Precision
) -> ZeroShotEvaluator | None:
    """Zero-shot evaluator on rank 0 when ``train.eval_every`` > 0 and eval tasks exist."""
    if not ctx.is_main or cfg.train.eval_every == 0:
        return None
    if not cfg.train.eval_tasks and not Path(cfg.data.eval_root).is_dir():
        log.warning(
            "train.eval_every: no eval tasks under %s; zero-shot evaluation is off", cfg.data.eval_root
        )
        return None
    tasks = classification_tasks(cfg.data.eval_root, cfg.train.eval_tasks)
    if not tasks:
        log.warning(
            "train.eval_every: no classification task under %s; evaluation is off", cfg.data.eval_root
        )
        return None
    return ZeroShotEvaluator(
        tasks,
        bundle.val_transform,
        bundle.tokenizer,
        ctx.device,
        precision.autocast,
        batch_size=max(64, cfg.train.batch_size),
    )


def layout_info(layout: StreamLayout) -> dict[str, Any]:
    """What a checkpoint records of the data layout."""
    return {
        "split": layout.split,
        "readers": layout.readers,
        "batch_size": layout.batch_size,
        "shuffle_buffer": layout.shuffle_buffer,
    }


def build_batches(
    cfg: PipelineConfig,
    spec: RunSpec,
    ctx: Runtime,
    bundle: ModelBundle,
    data: ExpertData,
    batches_done: int,
    restore: Restore,
) -> tuple[Iterator[Batch], StreamLayout]:
    """The run's batch iterator, positioned after ``batches_done`` batches (loader workers started)."""
    layout = build_layout(cfg, data, ctx)
    saved = (restore.state or {}).get("layout") if restore.resume else None
    if saved and saved != layout_info(layout):
        log.warning(
            "train/%s: data layout changed since the checkpoint (%s -> %s); the stream continues at the "
            "same position in another order",
            spec.name,
            saved,
            layout_info(layout),
        )
    decoder = SampleDecoder(
        bundle.train_transform, cfg.run.seed, data.image_keys, data.caption_keys, data.json_fields
    )
    stream = ExpertStream(data, layout, decoder, cfg.train.model, start_batch=batches_done)
    return build_loader(stream, cfg.train.workers, pin_memory=ctx.device.type == "cuda"), layout


@dataclasses.dataclass
class Optimisation:
    """The model and what updates it."""

    bundle: ModelBundle
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss: ContrastiveLoss
    scale_rule: ScaleRule
    teacher: Teacher | None


def build_optimisation(
    cfg: PipelineConfig, ctx: Runtime, data: ExpertData, precision: Precision, restore: Restore
) -> Optimisation:
    """Model, teacher, loss, AdamW and grad scaler, restored from ``restore`` when given."""
    loss_cfg = filled_loss_config(cfg, data)
    bundle = build_model(cfg, ctx)
    teacher = build_teacher(cfg, bundle.model, ctx, loss_cfg)
    loss = build_loss(loss_cfg, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    scale_rule = ScaleRule.from_overrides(loss.param_group_overrides(), cfg.train.lock_logit_scale)
    init_logit_scale(bundle.model, loss, cfg)
    optimizer = build_optimizer(bundle.model, cfg.train, scale_rule)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision.needs_scaler)
    if restore.state is not None:
        restore_weights(restore, bundle.model, optimizer, scaler, loss, cfg)
    return Optimisation(bundle, optimizer, scaler, loss, scale_rule, teacher)


def build_trainer(
    cfg: PipelineConfig,
    spec: RunSpec,
    ctx: Runtime,
    restore: Restore,
    extra: dict[str, Any],
    progress: bool = True,
) -> Trainer:
    """Assemble the trainer of one run.

    Args:
        cfg: Pipeline config.
        spec: The run (seed or expert) and its span of the schedule.
        ctx: Distributed context.
        restore: Checkpoint to resume or branch from (or nothing).
        extra: Static fields stored in every checkpoint (config, identity).
        progress: Show a progress bar on rank 0.
    """
    precision = resolve_precision(cfg.train.precision, ctx.device)
    data = load_expert_data(cfg, spec.expert, spec.partition, spec.data_variant)
    opt = build_optimisation(cfg, ctx, data, precision, restore)
    state = initial_state(spec, restore)
    batches, layout = build_batches(cfg, spec, ctx, opt.bundle, data, state.batches, restore)
    # After the loader: creating its iterator draws from the RNG, which must not shift the saved states.
    seed_or_restore_rng(cfg, ctx, restore)
    return Trainer(
        cfg=cfg.train,
        spec=spec,
        ctx=ctx,
        model=wrap_ddp(opt.bundle.model, ctx),
        optimizer=opt.optimizer,
        scaler=opt.scaler,
        loss=opt.loss,
        scale_rule=opt.scale_rule,
        precision=precision,
        batches=batches,
        global_batch=layout.global_batch,
        epoch_size=data.epoch_size,
        state=state,
        logger=MetricsLogger(spec.run_dir, ctx.is_main, state.step),
        checkpoint_extra=lambda: {**extra, "layout": layout_info(layout)},
        evaluator=build_evaluator(cfg, opt.bundle, ctx, precision),
        teacher=opt.teacher,
        progress=progress,
        pinned_steps=frozenset({spec.end_step}) if spec.expert is None else frozenset(),
    )
