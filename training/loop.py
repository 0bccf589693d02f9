"""The training loop of one run (the seed model or one expert) and the objects it drives.

:func:`training.setup.build_trainer` assembles a :class:`Trainer`; :meth:`Trainer.train` runs steps
``[start, end)`` of the shared cosine schedule, logging, evaluating and checkpointing on the way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline import runtime
from pipeline.config import TrainConfig
from pipeline.runtime import Runtime
from training import checkpoint as ckpt
from training.data import Batch
from training.losses import ContrastiveLoss
from training.metrics import MetricsLogger
from training.models import unwrap
from training.optim import ScaleRule, set_learning_rates

log = logging.getLogger("training")


@dataclass(frozen=True)
class Precision:
    """Mixed-precision policy: autocast dtype (None = fp32) and whether a GradScaler is needed."""

    name: str
    device_type: str
    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        """fp16 autocast on GPU needs loss scaling."""
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The autocast policy of ``train.precision`` (any spelling, see ``pipeline.runtime``) on ``device``.

    ``fp32``; ``bf16`` (bf16 autocast, CPU too); ``fp16`` (fp16 autocast + GradScaler on GPU, bf16 on
    other devices); ``auto`` (bf16 on GPU and on CPUs with native bf16, else fp32).
    """
    name = runtime.resolve_precision(name, device)
    if name == "fp16" and device.type != "cuda":
        log.warning("train.precision: fp16 ('amp') needs a GPU; using bf16 autocast on %s", device.type)
        name = "bf16"
    if name == "bf16" and device.type == "cpu" and not runtime.cpu_has_native_bf16():
        log.warning(
            "train.precision: this CPU has no native bf16 (AMX / AVX512-BF16), so bf16 autocast is "
            "emulated and several times slower than fp32; consider train.precision: fp32"
        )
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, device.type, dtype)


@dataclass(frozen=True)
class RunSpec:
    """One training run: the seed model or an expert, and its span of the shared schedule."""

    name: str
    """``seed``, ``expert_<k>`` or a baseline run (``dense``, ``random_split_<k>``, ...)."""
    expert: int | None
    run_dir: Path
    start_step: int
    """First step of this run (``seed_steps`` for an expert that branches from the seed)."""
    end_step: int
    branch_from: Path | None = None
    """Seed checkpoint an expert starts from (model, optimizer, scaler, loss state)."""
    partition: str = "assign"
    """Which coarse labels select an expert's pairs: ``assign`` (the clusters) or ``random_split``."""
    data_variant: int = 0
    """Another data order of the same pairs (``full_ensemble_<k>``); 0 = the run seed's order."""
    schedule_steps: int | None = None
    """Horizon of the cosine schedule when it is not ``train.steps`` (``dense_equal_compute``)."""


@dataclass
class Teacher:
    """A frozen reference model whose normalised features feed the loss (distillation)."""

    model: nn.Module
    image_size: int
    context_length: int

    @torch.no_grad()
    def features(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) features of the student's batch, resized / re-padded to the teacher's input."""
        if images.shape[-1] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
            )
        if tokens.shape[1] != self.context_length:
            tokens = F.pad(tokens, (0, max(0, self.context_length - tokens.shape[1])))[
                :, : self.context_length
            ]
        return (
            self.model.encode_image(images, normalize=True).float(),
            self.model.encode_text(tokens, normalize=True).float(),
        )


@dataclass
class TrainState:
    """What changes every step (and is checkpointed)."""

    step: int
    batches: int
    """Batches consumed from this run's data stream (the data position)."""
    epoch_offset: int = 0
    """Loss epochs completed before this run's data started (the seed's, for an expert)."""
    epoch: int = -1
    last_eval: dict[str, float] = field(default_factory=dict)


@dataclass
class Trainer:
    """Everything one run needs; built by :func:`training.setup.build_trainer`."""

    cfg: TrainConfig
    spec: RunSpec
    ctx: Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss: ContrastiveLoss
    scale_rule: ScaleRule
    precision: Precision
    batches: Iterator[Batch]
    global_batch: int
    epoch_size: float
    state: TrainState
    logger: MetricsLogger
    checkpoint_extra: Callable[[], dict[str, Any]]
    """Static checkpoint fields (config, identity, data layout)."""
    evaluator: Callable[[nn.Module], dict[str, float]] | None = None
    teacher: Teacher | None = None
    progress: bool = True
    pinned_steps: frozenset[int] = frozenset()
    _clock: tuple[float, int] = (0.0, 0)
    _saved_step: int = -1

    def train(self, stop_at_step: int | None = None) -> TrainState:
        """Run steps until ``end_step`` (or ``stop_at_step``); checkpoint on the way and at the end."""
        stop = self.spec.end_step if stop_at_step is None else min(stop_at_step, self.spec.end_step)
        bar = tqdm(
            total=self.spec.end_step,
            initial=self.state.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and self.ctx.is_main),
            desc=f"train/{self.spec.name}",
        )
        self._clock = (time.perf_counter(), self.state.step)
        while self.state.step < stop:
            self._sync_epoch()
            terms = self.train_step(next(self.batches))
            self.state.step += 1
            self.state.batches += 1
            self._after_step(terms, bar)
        bar.close()
        if (
            stop == self.spec.end_step
            and self.evaluator is not None
            and self.state.step % self.cfg.eval_every
        ):
            self._evaluate()
        if self._saved_step != self.state.step:
            self.save()
        return self.state

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the loss terms (detached)."""
        images, tokens, ids = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        rates = set_learning_rates(
            self.optimizer, self.cfg, self.scale_rule, self.state.step, self._tau_if_needed()
        )
        with self.precision.autocast():
            image_features, text_features, logit_scale = self.model(images, tokens)[:3]
            teacher = self.teacher.features(images, tokens) if self.teacher is not None else None
        # The loss runs in fp32: the GCL estimators exponentiate similarities / tau.
        terms = self.loss(
            image_features.float(), text_features.float(), logit_scale.float(), ids, teacher=teacher
        )
        total = sum(v for k, v in terms.items() if k.endswith("_loss"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss.after_optimizer_step(self.model)
        out = {k: v.detach() for k, v in terms.items() if torch.is_tensor(v)}
        out["loss"] = total.detach()
        out.update(
            {
                f"lr_{name}" if name != "decay" else "lr": torch.tensor(lr)
                for name, lr in rates.items()
                if name == "decay" or (name == "logit_scale" and self.scale_rule.lr is not None)
            }
        )
        return out

    def _tau_if_needed(self) -> float:
        # Reading the logit scale synchronises a GPU, so only when the tau schedule depends on it.
        return (
            self.tau()
            if self.scale_rule.scheduler == "step_thresh" and self.scale_rule.lr is not None
            else 0.0
        )

    def close(self) -> None:
        """Flush the logs and stop the loader workers."""
        self.logger.close()
        self.batches = iter(())

    def tau(self) -> float:
        """Current temperature 1 / exp(logit_scale)."""
        return float(torch.exp(-unwrap(self.model).logit_scale.detach().float()).reshape(-1)[0])

    def _sync_epoch(self) -> None:
        epoch = self.state.epoch_offset + int(
            self.state.batches * self.global_batch // max(1.0, self.epoch_size)
        )
        if epoch != self.state.epoch:
            self.loss.set_epoch(epoch)
            self.state.epoch = epoch

    def _after_step(self, terms: dict[str, torch.Tensor], bar: tqdm) -> None:
        step = self.state.step
        bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.spec.end_step:
            self._log(terms, bar)
        if self.evaluator is not None and self.cfg.eval_every and step % self.cfg.eval_every == 0:
            self._evaluate()
        if step % self.cfg.save_every == 0 and step != self.spec.end_step:
            self.save()

    def _log(self, terms: dict[str, torch.Tensor], bar: tqdm) -> None:
        names = sorted(terms)
        values = torch.stack([terms[k].float().reshape(()).cpu() for k in names])
        if self.ctx.distributed:
            values = values.to(self.ctx.device)
            dist.all_reduce(values)
            values = values.cpu() / self.ctx.world_size
        now, step = time.perf_counter(), self.state.step
        rate = (step - self._clock[1]) * self.global_batch / max(1e-9, now - self._clock[0])
        self._clock = (now, step)
        row = {k: float(v) for k, v in zip(names, values.tolist(), strict=True)}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"train/{self.spec.name}: loss is {row['loss']} at step {step}")
        row.update(
            {
                "samples_per_s": rate,
                "logit_scale": 1.0 / self.tau(),
                "epoch": self.state.epoch,
                "samples_seen": self.state.batches * self.global_batch,
            }
        )
        self.logger.log(step, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", samples_s=f"{rate:.0f}")

    def _evaluate(self) -> None:
        if not self.ctx.is_main or self.evaluator is None:
            return
        results = self.evaluator(unwrap(self.model))
        self.state.last_eval = results
        self.logger.log(self.state.step, results)
        log.info(
            "train/%s step %d: %s",
            self.spec.name,
            self.state.step,
            ", ".join(f"{k}={v:.3f}" for k, v in results.items()),
        )

    def save(self) -> Path:
        """Write ``checkpoints/step_<step>.pt`` (rank 0; every rank contributes its RNG state)."""
        self._saved_step = self.state.step
        return ckpt.save_step(
            self.ctx, self.spec.run_dir, self.state.step, self._checkpoint_state, self.cfg.keep_last, self.pinned_steps
        )

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "run": self.spec.name,
            "expert": self.spec.expert,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss.state_dict(),
            "world_size": self.ctx.world_size,
            "data": self.data_position(),
            **self.checkpoint_extra(),
        }

    def data_position(self) -> dict[str, Any]:
        """Where the data stream is: batches consumed, samples and (loss) epoch."""
        samples = self.state.batches * self.global_batch
        return {
            "batches": self.state.batches,
            "samples": samples,
            "epoch": self.state.epoch_offset + int(samples // max(1.0, self.epoch_size)),
            "epoch_offset": self.state.epoch_offset,
            "epoch_fraction": samples / max(1.0, self.epoch_size),
        }
