"""Whole training-step time of every loss variant against the CLIP loss, on one process (CPU, fp32).

    python -m benchmarks.bench_loss_step [--model mode-tiny-rn] [--batch 64] [--image-size N]
                                         [--steps 30] [--warmup 5] [--threads 1] [--data-size 20000]

One step is what ``training.loop.Trainer.train_step`` does, minus AMP and gradient clipping: set the
learning rates, model forward on a fixed synthetic batch (random images, tokenized captions), the
frozen teacher's forward (distillation only), loss forward, backward, AdamW step (the trainer's
parameter groups, from the loss's ``param_group_overrides``) and ``loss.after_optimizer_step``.
Every variant gets its own copy of the same initial model, its own optimizer and its own loss; the
teacher of ``v3+distill`` is another copy of that initial model (eval mode, no gradients). Pair ids
slide over ``[0, data_size)`` from step to step, as an epoch's would, so the per-sample u / lambda
tables are read and written at fresh rows.

Variants run round-robin (one step each per round, starting variant rotated every round), so drift
on a shared machine hits all of them alike. ``clip_aa`` is a second, identical CLIP runner: its
"overhead" is the A/A noise floor of the measurement. Per variant: median and min ms/step, the
overhead vs CLIP in % from the medians and as the median of per-round paired ratios (the verdict
uses the paired one, teacher included), the loss's own extra time (its forward plus its part of the
backward, up to the feature gradients) as % of CLIP's step, and the median time of each phase.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import open_clip
import torch

from pipeline.config import TrainConfig
from training.loop import Teacher
from training.losses import LossConfig, build_loss
from training.models import quiet_open_clip, register_model_configs
from training.optim import ScaleRule, build_optimizer, set_learning_rates

_GLOFND = dict(glofnd="glofnd", glofnd_start_update=0, glofnd_start_lda=0)

VARIANTS: dict[str, dict] = {
    "clip": dict(name="clip"),
    "clip_aa": dict(name="clip"),
    "v0": dict(name="fastclip", version="v0"),
    "v1": dict(name="fastclip", version="v1"),
    "v2": dict(name="fastclip", version="v2", lr_tau=0.0133, lr_tau_scheduler="const"),
    "v3": dict(name="fastclip", version="v3"),
    "v1+glofnd": dict(name="fastclip", version="v1", **_GLOFND),
    "v3+glofnd": dict(name="fastclip", version="v3", **_GLOFND),
    "v3+distill": dict(name="fastclip", version="v3", distill_weight=0.5),
}
"""Loss configs; ``clip_aa`` is the A/A control (same as ``clip``)."""

PHASES = ("forward", "teacher", "loss_fwd", "loss_bwd", "model_bwd", "optimizer")
"""Phases of a step; ``loss_fwd`` includes zero_grad, ``model_bwd`` is the encoders' backward."""

_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")


def synthetic_batch(
    batch: int, image_size: int, tokenizer, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images [b, 3, s, s] and tokenized captions of varying length."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    captions = []
    for i in range(batch):
        color, shape = _COLORS[i % len(_COLORS)], _SHAPES[(i // len(_COLORS)) % len(_SHAPES)]
        extra = " on a plain background" * (i % 3)
        captions.append(f"a photo of a {color} {shape}{extra}")
    return images, tokenizer(captions)


class Runner:
    """One loss variant with its own model, optimizer and loss; ``step()`` times one training step."""

    def __init__(
        self, kwargs: dict, base: torch.nn.Module, cfg: TrainConfig, args: argparse.Namespace
    ) -> None:
        self.loss = build_loss(
            LossConfig(data_size=args.data_size, **kwargs), rank=0, world_size=1, device="cpu"
        )
        self.loss.set_epoch(1)  # past epoch 0, where gamma is 1: the moving averages really mix
        self.model = copy.deepcopy(base).train()
        overrides = self.loss.param_group_overrides()
        init = overrides.get("logit_scale", {}).get("init")
        if init is not None:  # as training.setup.init_logit_scale for a randomly initialised model
            with torch.no_grad():
                self.model.logit_scale.fill_(float(init))
        self.scale_rule = ScaleRule.from_overrides(overrides, lock=False)
        self.cfg = cfg
        self.optimizer = build_optimizer(self.model, cfg, self.scale_rule)
        self.teacher = None
        if self.loss.cfg.distill_weight > 0:
            teacher_model = copy.deepcopy(base).eval().requires_grad_(False)
            self.teacher = Teacher(teacher_model, model_image_size(base), base.context_length)

    def step(
        self, images: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, step: int
    ) -> dict[str, float]:
        """One training step; returns the ms of each phase and the total."""
        clock = time.perf_counter
        t0 = clock()
        set_learning_rates(self.optimizer, self.cfg, self.scale_rule, step, 0.0)
        image_features, text_features, logit_scale = self.model(images, tokens)[:3]
        t1 = clock()
        teacher = self.teacher.features(images, tokens) if self.teacher is not None else None
        t2 = clock()
        terms = self.loss(image_features, text_features, logit_scale, ids, teacher=teacher)
        total = sum(v for k, v in terms.items() if k.endswith("_loss"))
        # CPU autograd runs on this thread and executes ready nodes newest first, so every node of
        # the loss (created after the encoders) runs before the encoders' last node (the text
        # features' normalisation): the first feature-gradient hook to fire marks the end of the
        # loss's backward (the other fires after the whole text-encoder backward).
        feature_grads_at: list[float] = []
        for features in (image_features, text_features):
            features.register_hook(lambda grad: feature_grads_at.append(clock()))
        self.optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        total.backward()
        t4 = clock()
        self.optimizer.step()
        self.loss.after_optimizer_step(self.model)
        t5 = clock()
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {float(total)} at step {step}")
        t_loss_bwd = min(feature_grads_at, default=t3)
        spans = ((t0, t1), (t1, t2), (t2, t3), (t3, t_loss_bwd), (t_loss_bwd, t4), (t4, t5))
        ms = [1000 * (b - a) for a, b in spans]
        return {**dict(zip(PHASES, ms, strict=True)), "total": 1000 * (t5 - t0)}


def build_base_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object]:
    register_model_configs()
    with quiet_open_clip():
        model = open_clip.create_model(args.model, force_image_size=args.image_size)
        tokenizer = open_clip.get_tokenizer(args.model)
    return model, tokenizer


def model_image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def pct(x: float) -> float:
    return 100.0 * (x - 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mode-tiny-rn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)"
    )
    parser.add_argument("--data-size", type=int, default=20_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target-pct", type=float, default=5.0, help="overhead goal vs CLIP (for the verdict)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall0 = time.perf_counter()

    base, tokenizer = build_base_model(args)
    image_size = model_image_size(base)
    images, tokens = synthetic_batch(args.batch, image_size, tokenizer, args.seed)
    rounds = args.warmup + args.steps
    cfg = TrainConfig(
        lr=args.lr, steps=rounds, seed_steps=rounds, warmup=min(args.warmup, rounds - 1), device="cpu"
    )
    runners = {name: Runner(kwargs, base, cfg, args) for name, kwargs in VARIANTS.items()}
    names = list(runners)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in names}

    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            # Sliding window of pair ids: fresh table rows every step, as within an epoch.
            ids = (r * args.batch + torch.arange(args.batch)) % args.data_size
            start = r % len(names)  # rotate who goes first, so no variant always follows the same one
            for name in names[start:] + names[:start]:
                res = runners[name].step(images, tokens, ids, r)
                if r >= args.warmup:
                    times[name].append(res)
            gc.collect()
    finally:
        gc.enable()

    clip_totals = [t["total"] for t in times["clip"]]
    clip_med = statistics.median(clip_totals)
    clip_loss = statistics.median(t["loss_fwd"] + t["loss_bwd"] for t in times["clip"])
    results: dict[str, dict[str, float]] = {}
    for name in names:
        totals = [t["total"] for t in times[name]]
        med = statistics.median(totals)
        loss_ms = statistics.median(t["loss_fwd"] + t["loss_bwd"] for t in times[name])
        res = {
            "median_ms": med,
            "min_ms": min(totals),
            "overhead_pct": pct(med / clip_med),
            "paired_overhead_pct": pct(
                statistics.median(t / c for t, c in zip(totals, clip_totals, strict=True))
            ),
            # Low-noise estimate: the loss's own extra forward + backward time over CLIP's, relative
            # to CLIP's whole step (excludes the teacher).
            "loss_attrib_pct": 100.0 * (loss_ms - clip_loss) / clip_med,
        }
        for phase in PHASES:
            res[f"{phase}_ms"] = statistics.median(t[phase] for t in times[name])
        if runners[name].teacher is not None:
            no_teacher = [t["total"] - t["teacher"] for t in times[name]]
            res["median_ms_excl_teacher"] = statistics.median(no_teacher)
            res["overhead_pct_excl_teacher"] = pct(res["median_ms_excl_teacher"] / clip_med)
            res["paired_overhead_pct_excl_teacher"] = pct(
                statistics.median(t / c for t, c in zip(no_teacher, clip_totals, strict=True))
            )
            res["teacher_pct_of_clip_step"] = 100.0 * res["teacher_ms"] / clip_med
        results[name] = res

    noise = abs(results["clip_aa"]["paired_overhead_pct"])
    print(
        f"model={args.model} b={args.batch} image={image_size} ctx={base.context_length} "
        f"data_size={args.data_size} threads={args.threads} steps={args.steps} "
        f"warmup={args.warmup} fp32 cpu"
    )
    print(
        f"{'loss':<12}{'median ms':>10}{'min ms':>9}{'ovh %':>8}{'paired %':>10}{'loss %':>8}"
        f"{'fwd':>8}{'teacher':>9}{'loss f':>8}{'loss b':>8}{'enc bwd':>9}{'optim':>7}"
    )
    for name, res in results.items():
        print(
            f"{name:<12}{res['median_ms']:>10.1f}{res['min_ms']:>9.1f}{res['overhead_pct']:>+8.1f}"
            f"{res['paired_overhead_pct']:>+10.1f}{res['loss_attrib_pct']:>+8.2f}"
            f"{res['forward_ms']:>8.1f}{res['teacher_ms']:>9.1f}{res['loss_fwd_ms']:>8.2f}"
            f"{res['loss_bwd_ms']:>8.2f}{res['model_bwd_ms']:>9.1f}{res['optimizer_ms']:>7.1f}"
        )
        if "median_ms_excl_teacher" in res:
            print(
                f"{'  - teacher':<12}{res['median_ms_excl_teacher']:>10.1f}{'':>9}"
                f"{res['overhead_pct_excl_teacher']:>+8.1f}"
                f"{res['paired_overhead_pct_excl_teacher']:>+10.1f}"
            )
    print(
        "ovh %: medians vs clip; paired %: median of per-round ratios; loss %: (loss fwd + loss bwd"
        " - clip's) / clip step; '- teacher': the step without the teacher forward"
    )
    meets = [
        name
        for name, res in results.items()
        if name not in ("clip", "clip_aa") and res["paired_overhead_pct"] <= args.target_pct
    ]
    print(
        f"overhead <= {args.target_pct:g}% vs clip (paired, whole step incl. teacher): "
        f"{', '.join(meets) or 'none'}; A/A noise |clip_aa| {noise:.1f}%; "
        f"wall {time.perf_counter() - wall0:.0f}s"
    )
    print(
        json.dumps(
            {
                "benchmark": "loss_step",
                "model": args.model,
                "batch": args.batch,
                "image_size": image_size,
                "data_size": args.data_size,
                "threads": args.threads,
                "steps": args.steps,
                "warmup": args.warmup,
                "target_pct": args.target_pct,
                "meets_target": meets,
                "results": {k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
