"""Training throughput (samples/s) of our trainer against ``python -m open_clip_train.main``.

    python benchmarks/bench_train.py [--steps 60 --batch-size 64 --workers 2 --precision amp_bf16
                                      --model mode-tiny-vit --repeats 1 --threads both]

Both run as separate processes on the same synthetic tars (64 px coloured shapes, ``.txt`` caption,
``.json`` and ``.jpg`` per pair), with the same model config (open_clip gets it through
``local-dir:`` with an ``open_clip_config.json``), batch size, precision, loader workers, AdamW
settings, warmup and gradient clipping, on the CPU. Throughput is steady-state: samples over wall
time of the logged intervals after the first ``--skip`` steps (OpenCLIP: its ``Batch (t)``
interval averages; ours: ``metrics.jsonl``). Two thread settings are measured: ``default`` (each
trainer's own choice: ours gives the CPU cores the loader workers leave free, OpenCLIP keeps
torch's default) and ``omp1`` (``OMP_NUM_THREADS=1`` for both). Repeats alternate the order of the
two trainers; ratios are paired per repeat (same load window) and the median is reported, since
a shared machine's load moves these numbers a lot. Prints a table and a final JSON line.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import dump_yaml  # noqa: E402
from training.models import MODEL_CONFIG_DIR  # noqa: E402
from training.synthetic import make_synthetic_run  # noqa: E402

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
        "train.device=cpu",
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
        "cpu",
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
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", default="both", choices=["default", "omp1", "both"])
    args = ap.parse_args()
    settings = ["default", "omp1"] if args.threads == "both" else [args.threads]
    results: dict[str, dict[str, list[float]]] = {s: {"ours": [], "open_clip": []} for s in settings}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        config, model_dir = prepare(root, args)
        for rep in range(args.repeats):
            for setting in settings:
                env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
                if setting == "omp1":
                    env["OMP_NUM_THREADS"] = "1"
                order = ["ours", "open_clip"] if rep % 2 == 0 else ["open_clip", "ours"]
                for name in order:
                    tag = f"{setting}_{rep}"
                    began = time.perf_counter()
                    rate = (
                        run_ours(root, config, args, env, tag)
                        if name == "ours"
                        else run_openclip(root, model_dir, args, env, tag)
                    )
                    results[setting][name].append(rate)
                    print(
                        f"  {setting:<8} {name:<10} rep {rep}: {rate:8.1f} samples/s "
                        f"({time.perf_counter() - began:.0f} s wall)",
                        flush=True,
                    )
    summary: dict[str, object] = {
        "bench": "train",
        "model": args.model,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "steps": args.steps,
    }
    print(f"\n{'threads':<10}{'ours s/s':>12}{'open_clip s/s':>16}{'ratio':>8}  per-repeat ratios")
    for setting in settings:
        ours, theirs = results[setting]["ours"], results[setting]["open_clip"]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]  # paired: same time window
        ratio = statistics.median(ratios)
        print(
            f"{setting:<10}{statistics.median(ours):>12.1f}{statistics.median(theirs):>16.1f}{ratio:>8.2f}  "
            + " ".join(f"{r:.2f}" for r in ratios)
        )
        summary[f"{setting}_ours_samples_per_s"] = round(statistics.median(ours), 1)
        summary[f"{setting}_openclip_samples_per_s"] = round(statistics.median(theirs), 1)
        summary[f"{setting}_ratio"] = round(ratio, 3)
        summary[f"{setting}_ratios"] = [round(r, 3) for r in ratios]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
