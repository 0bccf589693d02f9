"""Training throughput (samples/s) of our trainer against ``python -m open_clip_train.main``.

    python -m benchmarks.bench_train [--steps 60 --batch-size 64 --workers 2 --precision amp_bf16
                                      --model mode-tiny-vit --repeats 5 --threads 1,2]

Both run as separate processes on the same synthetic tars (64 px coloured shapes, ``.txt`` caption,
``.json`` and ``.jpg`` per pair), with the same model config (open_clip gets it through
``local-dir:`` with an ``open_clip_config.json``), batch size, precision, loader workers, AdamW
settings, warmup and gradient clipping, on the CPU. Two figures per run: steady-state samples/s
(samples over wall time of the logged intervals after the first ``--skip`` steps; OpenCLIP: its
``Batch (t)`` interval averages; ours: ``metrics.jsonl``) and whole-process samples/s (all
trained samples over the subprocess's wall time, start-up and data loading included).

Fairness (``benchmarks/paired.py`` rules): every thread setting gives **both** trainers the same
``OMP_NUM_THREADS`` (ours then keeps torch's default instead of its own core split); one untimed
warm-up run of each trainer first; ``--repeats`` (>= 5) paired rounds alternating which trainer
runs first; the median per-round ratio ours ÷ OpenCLIP with its min–max. Prints a table and a
final JSON line (also appended to ``benchmarks/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.paired import record
from pipeline.config import dump_yaml
from training.models import MODEL_CONFIG_DIR
from training.synthetic import make_synthetic_run

REPO = Path(__file__).resolve().parents[1]

_BATCH_T = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/.*?Batch \(t\): ([0-9.]+)")


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Tars + prep + our config file + open_clip's local-dir model folder."""
    overrides = [
        f"train.model={args.model}",
        f"train.precision={args.precision}",
        f"train.batch_size={args.batch_size}",
        f"train.workers={args.workers}",
        f"train.steps={args.steps}",
        f"train.seed_steps={args.steps}",
        "train.warmup=10",
        "train.lr=1e-3",
        "train.wd=0.1",
        "train.grad_clip_norm=1.0",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        f"train.save_every={args.steps}",
        f"train.device={args.device}",
        "train.data_split=shards",
    ]
    run = make_synthetic_run(
        root, num_shards=args.shards, per_shard=args.pairs, image_size=64, with_txt=True, overrides=overrides
    )
    config = root / "config.yaml"
    config.write_text(dump_yaml(run.cfg))
    model_dir = root / "openclip_model"
    model_dir.mkdir()
    model_cfg = json.loads((MODEL_CONFIG_DIR / f"{args.model}.json").read_text())
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}})
    )
    return config, model_dir


def run_ours(root: Path, config: Path, args: argparse.Namespace, env: dict[str, str], tag: str) -> float:
    """Steady-state samples/s of ``python -m training.main`` (seed run on every pair)."""
    runs = root / f"ours_{tag}"
    cmd = [
        sys.executable,
        "-m",
        "training.main",
        "--config",
        str(config),
        "--expert",
        "seed",
        "--quiet",
        "--set",
        f"run.root={runs}",
    ]
    for stage in ("prep",):
        src = root / "runs" / "synthetic" / stage
        dst = runs / "synthetic" / stage
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(src, dst)
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"our trainer failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (runs / "synthetic" / "train" / "seed" / "metrics.jsonl").open()]
    steady = [r for r in rows if "samples_per_s" in r and r["step"] > args.skip]
    seconds = sum(args.log_every * args.batch_size / r["samples_per_s"] for r in steady)
    return len(steady) * args.log_every * args.batch_size / seconds


def run_openclip(
    root: Path, model_dir: Path, args: argparse.Namespace, env: dict[str, str], tag: str
) -> float:
    """Steady-state samples/s of ``python -m open_clip_train.main`` on the same tars."""
    logs = root / f"openclip_{tag}"
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--train-data",
        f"{root}/data/train/{{0..{args.shards - 1}}}.tar",
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(args.steps * args.batch_size),
        "--epochs",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--precision",
        args.precision,
        "--model",
        f"local-dir:{model_dir}",
        "--lr",
        "1e-3",
        "--wd",
        "0.1",
        "--warmup",
        "10",
        "--grad-clip-norm",
        "1.0",
        "--log-every-n-steps",
        str(args.log_every),
        "--device",
        args.device,
        "--logs",
        str(logs),
        "--name",
        "bench",
        "--save-frequency",
        "0",
        "--seed",
        "0",
        "--report-to",
        "",
    ]
    proc = subprocess.run(cmd, cwd=root, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{proc.stderr[-3000:]}")
    text = (logs / "bench" / "out.log").read_text()
    intervals = []  # (samples done at the log line, mean batch time of the interval)
    for match in _BATCH_T.finditer(text):
        intervals.append((int(match.group(1)), float(match.group(2))))
    steady = [(n, t) for n, t in intervals if n // args.batch_size > args.skip]
    if not steady:
        raise RuntimeError(f"open_clip_train: no log line after step {args.skip}:\n{text[-2000:]}")
    steps = args.log_every * len(steady)
    return steps * args.batch_size / sum(args.log_every * t for _, t in steady)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="amp_bf16", choices=["fp32", "amp_bf16"])
    ap.add_argument("--model", default="mode-tiny-vit")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=512, help="pairs per shard")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the steady rate")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS, the same for both")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both trainers)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each")
    args = ap.parse_args()
    settings = [int(t) for t in args.threads.split(",") if t.strip()]
    rates: dict[int, dict[str, dict[str, list[float]]]] = {
        t: {n: {"steady": [], "whole": []} for n in ("ours", "open_clip")} for t in settings
    }
    samples = args.steps * args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        config, model_dir = prepare(root, args)

        def one(name: str, threads: int, tag: str) -> tuple[float, float]:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            began = time.perf_counter()
            if name == "ours":
                steady = run_ours(root, config, args, env, tag)
            else:
                steady = run_openclip(root, model_dir, args, env, tag)
            return steady, samples / (time.perf_counter() - began)

        for threads in settings:
            if not args.no_warmup:
                for name in ("ours", "open_clip"):
                    one(name, threads, f"warm{threads}")
            for rep in range(args.repeats):
                order = ["ours", "open_clip"] if rep % 2 == 0 else ["open_clip", "ours"]
                for name in order:
                    steady, whole = one(name, threads, f"{threads}_{rep}")
                    rates[threads][name]["steady"].append(steady)
                    rates[threads][name]["whole"].append(whole)
                    print(f"  threads={threads} {name:<10} rep {rep}: steady {steady:8.1f}  whole {whole:8.1f} "
                          "samples/s", flush=True)
    summary: dict[str, object] = {
        "model": args.model,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "steps": args.steps,
        "threads": {},
    }
    print(f"\n{'threads':<8}{'figure':<8}{'ours s/s':>10}{'open_clip':>11}  ratio median (min-max, n)")
    for threads in settings:
        row = {}
        for figure in ("steady", "whole"):
            ours, theirs = rates[threads]["ours"][figure], rates[threads]["open_clip"][figure]
            ratios = [a / b for a, b in zip(ours, theirs, strict=True)]  # paired: same load window
            row[figure] = {
                "repeats": len(ratios),
                "speed_ratio_median": statistics.median(ratios),
                "speed_ratio_min": min(ratios),
                "speed_ratio_max": max(ratios),
                "unit": "samples/s",
                "ours_rate_median": statistics.median(ours),
                "peer_rate_median": statistics.median(theirs),
            }
            print(f"{threads:<8}{figure:<8}{statistics.median(ours):>10.1f}{statistics.median(theirs):>11.1f}  "
                  f"{row[figure]['speed_ratio_median']:.2f} ({min(ratios):.2f}-{max(ratios):.2f}, n={len(ratios)})")
        summary["threads"][str(threads)] = row
    argv = " ".join(sys.argv[1:])
    record("train", summary, f"python -m benchmarks.bench_train {argv}".strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
