"""Forward + backward time of every loss variant against the CLIP loss, on one process.

    python -m benchmarks.bench_losses [--batch 256] [--dim 512] [--data-size 100000] [--repeats 20]

Prints a table and, last, one JSON line with the medians (ms) and the overhead relative to CLIP.
The features are leaf tensors, so only the loss itself is timed (no encoder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from training.losses import LossConfig, build_loss

VARIANTS: dict[str, dict] = {
    "clip": dict(name="clip"),
    "v0": dict(name="fastclip", version="v0"),
    "v1": dict(name="fastclip", version="v1"),
    "v2": dict(name="fastclip", version="v2", lr_tau=0.0133, lr_tau_scheduler="const"),
    "v3": dict(name="fastclip", version="v3"),
    "v1+glofnd": dict(name="fastclip", version="v1", glofnd="glofnd"),
    "v3+glofnd": dict(name="fastclip", version="v3", glofnd="glofnd"),
    "v3+distill": dict(name="fastclip", version="v3", distill_weight=0.5),
}


INT_OPTIONS = {"--batch": 256, "--dim": 512, "--data-size": 100_000, "--warmup": 3, "--repeats": 30}
"""Integer options and their defaults."""


class Runner:
    """One loss variant with fixed features; ``step()`` times one forward + backward in ms."""

    def __init__(self, kwargs: dict, args: argparse.Namespace) -> None:
        self.loss = build_loss(
            LossConfig(data_size=args.data_size, **kwargs), rank=0, world_size=1, device="cpu"
        )
        self.loss.set_epoch(1)
        self.gen = torch.Generator().manual_seed(0)
        self.image = F.normalize(torch.randn(args.batch, args.dim, generator=self.gen), dim=1)
        self.text = F.normalize(self.image + torch.randn(args.batch, args.dim, generator=self.gen), dim=1)
        self.teacher = (
            F.normalize(self.image + 0.1 * torch.randn_like(self.image), dim=1),
            self.text.clone(),
        )
        self.args = args

    def step(self) -> float:
        ids = torch.randperm(self.args.data_size, generator=self.gen)[: self.args.batch]
        image, text = self.image.clone().requires_grad_(), self.text.clone().requires_grad_()
        scale = torch.tensor(1 / 0.07, requires_grad=True)
        start = time.perf_counter()
        out = self.loss(image, text, scale, ids, teacher=self.teacher)
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in INT_OPTIONS.items():
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runners = {name: Runner(kwargs, args) for name, kwargs in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    # Round-robin over the variants so that load changes on a shared machine hit all of them alike.
    for round_index in range(args.warmup + args.repeats):
        for name, runner in runners.items():
            elapsed = runner.step()
            if round_index >= args.warmup:
                times[name].append(elapsed)
    results = {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}
    for res in results.values():
        res["x_clip_median"] = res["median_ms"] / results["clip"]["median_ms"]
        res["x_clip_min"] = res["min_ms"] / results["clip"]["min_ms"]
    setting = f"b={args.batch} d={args.dim} data_size={args.data_size} threads={args.threads}"
    print(f"{setting} repeats={args.repeats}")
    print(f"{'loss':<12}{'median ms':>11}{'min ms':>9}{'x clip (median)':>17}{'x clip (min)':>14}")
    for name, res in results.items():
        print(
            f"{name:<12}{res['median_ms']:>11.2f}{res['min_ms']:>9.2f}{res['x_clip_median']:>17.2f}"
            f"{res['x_clip_min']:>14.2f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "losses",
                "batch": args.batch,
                "dim": args.dim,
                "data_size": args.data_size,
                "threads": args.threads,
                "results": {k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
