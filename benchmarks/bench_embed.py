"""Embed-stage throughput vs a bare ``SentenceTransformer.encode`` on the same captions and device.

The stage figure includes everything ``run_stage(cfg, "embed", workers=1)`` does: planning, reading
the caption Parquet, tokenizing, length-sorted encoding, writing the ``.npy`` files, records and the
manifest. The bare figure is ``model.encode(captions, batch_size=...)`` under the same autocast.
The model is loaded once; then, per precision, ``benchmarks/paired.py`` runs one full warm-up of
each side and ``--repeats`` (>= 5) paired rounds alternating which side runs first, on the same
threads; the figure is the median per-round ratio stage ÷ bare with its min–max (never a best-of).

    python -m benchmarks.bench_embed [--captions 8192] [--precisions fp32,bf16] [--repeats 5]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.paired import fmt, paired, record, set_threads
from pipeline import artifacts, runtime
from pipeline.config import load_config
from pipeline.runner import run_stage
from stages import text_encoder

_WORDS = (
    "a the an of on in with near under over photo picture image dog cat bird horse car bus boat "
    "train plane man woman child people group red blue green yellow black white small large old "
    "young running sitting standing walking playing eating holding street beach park field city "
    "river mountain snow table kitchen room window tree flower grass sky night sunset wooden "
    "digit shape texture word letter drawing painting close-up view two three several"
).split()


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of 6-14 words from a fixed vocabulary (seeded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def write_prep(run_dir: Path, captions: list[str], shards: int) -> None:
    """A finished prep stage holding ``captions`` split into ``shards`` caption files."""
    pdir = run_dir / "prep"
    (pdir / "captions").mkdir(parents=True, exist_ok=True)
    outputs, bounds = [], np.linspace(0, len(captions), shards + 1).astype(int)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = f"s0_{s}"
        table = pa.table(
            {
                "pair_id": pa.array(range(lo, hi), pa.int64()),
                "shard": pa.array([name] * (hi - lo)),
                "key": pa.array([str(i) for i in range(lo, hi)]),
                "caption": pa.array(captions[lo:hi]),
                "source": pa.array([0] * (hi - lo), pa.int16()),
            }
        )
        pq.write_table(table, pdir / "captions" / f"{name}.parquet")
        outputs.append(f"captions/{name}.parquet")
    artifacts.write_json(
        pdir / "manifest.json", {"stage": "prep", "outputs": outputs, "num_pairs": len(captions)}
    )


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def time_bare(
    model, captions: list[str], precision: str, batch_size: int, device: torch.device
) -> tuple[float, float, np.ndarray]:
    """Wall and process-CPU seconds of a bare ``model.encode``, and its output."""
    start, cpu = time.perf_counter(), time.process_time()
    with _autocast(precision, device):
        out = model.encode(captions, batch_size=batch_size, convert_to_numpy=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def time_stage(root: Path, precision: str, batch_size: int, device: str) -> tuple[float, float, np.ndarray]:
    """Wall and process-CPU seconds of a full ``run_stage(cfg, "embed", workers=1)``, and its features."""
    cfg = load_config(
        None,
        [
            f"run.root={root}",
            "run.name=bench",
            f"embed.precision={precision}",
            f"embed.batch_size={batch_size}",
            f"embed.device={device}",
            "embed.dtype=float32",
        ],
    )
    shutil.rmtree(root / "bench" / "embed", ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_stage(cfg, "embed", workers=1, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sdir = root / "bench" / "embed"
    feats = np.concatenate([np.load(sdir / rel) for rel in summary["manifest"]["outputs"]])
    return seconds, cpu, feats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", type=int, default=8192)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default), same for both")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    threads = set_threads(args.threads)
    device = runtime.resolve_device(args.device)
    captions = make_captions(args.captions)
    encoder = text_encoder.load_text_model("all-MiniLM-L6-v2", device=device)
    model = encoder.module
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        root = Path(tmp)
        write_prep(root / "bench", captions, args.shards)
        for precision in args.precisions.split(","):
            cpu: dict[str, list[float]] = {"bare": [], "stage": []}
            outs: dict[str, np.ndarray] = {}

            def bare(precision=precision, cpu=cpu, outs=outs):
                _, c, outs["bare"] = time_bare(model, captions, precision, args.batch_size, device)
                cpu["bare"].append(c)

            def stage(precision=precision, cpu=cpu, outs=outs):
                _, c, outs["stage"] = time_stage(root, precision, args.batch_size, str(device))
                cpu["stage"].append(c)

            run = paired(stage, bare, args.repeats)
            summary = run.summary(len(captions), "captions/s")
            cpu_ratios = [b / s for b, s in zip(cpu["bare"][1:], cpu["stage"][1:], strict=True)]
            rows.append(
                {
                    "precision": precision,
                    "stage_vs_bare": summary,
                    "bare_cps": round(summary["peer_rate_median"], 1),
                    "stage_cps": round(summary["ours_rate_median"], 1),
                    "ratio": round(summary["speed_ratio_median"], 3),
                    # CPU seconds of this process: steadier than wall time when others share the cores.
                    "ratio_cpu_time": round(float(np.median(cpu_ratios)), 3),
                    "bare_s": [round(x, 2) for x in run.peer],
                    "stage_s": [round(x, 2) for x in run.ours],
                    "min_cos": round(float(np.min(np.sum(outs["stage"] * outs["bare"], axis=1))), 5),
                }
            )
    print(
        f"device={device} threads={torch.get_num_threads()} captions={len(captions)} batch={args.batch_size}"
    )
    print(
        f"{'precision':<10}{'bare cap/s':>12}{'stage cap/s':>13}{'ratio':>8}{'ratio(cpu)':>12}{'min cos':>9}"
    )
    for r in rows:
        print(
            f"{r['precision']:<10}{r['bare_cps']:>12}{r['stage_cps']:>13}{r['ratio']:>8}"
            f"{r['ratio_cpu_time']:>12}{r['min_cos']:>9}"
        )
    native = runtime.cpu_has_native_bf16() if device.type == "cpu" else None
    for r in rows:
        print(f"{r['precision']}: stage / bare {fmt(r['stage_vs_bare'])}")
    record(
        "embed",
        {"device": str(device), "threads": threads, "cpu_native_bf16": native, "captions": len(captions),
         "batch_size": args.batch_size, "results": rows},
        f"python -m benchmarks.bench_embed --captions {args.captions} --precisions {args.precisions} "
        f"--repeats {args.repeats} --device {args.device}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
