"""Scale run: prep → embed → cluster → assign at growing N, wall time and peak memory per stage.

    python benchmarks/bench_scale.py --sizes 5000,10000,20000 --k 256          # CPU, minutes
    python benchmarks/bench_scale.py --sizes 250000,500000,1000000 --k 1024    # the issue's run (hours on 2 cores)

Generates ``max(sizes)`` synthetic pairs once (captions from varied templates and a word list,
seeded; small JPEG images, 10k pairs per tar shard), then for each N runs every stage in its own
``python -m pipeline <stage>`` process on the first N/10k shards and records its wall time and
peak resident memory (``os.wait4``'s ``ru_maxrss`` of that process). The cluster stage fits on a
fixed-size sample (``--cluster-sample``, MoDE fits on a sample too), so its memory is bounded;
prep, embed and assign stream shard by shard. ``growth`` is the exponent ``b`` of ``wall ~ N^b``
between consecutive sizes (1 = linear). Appends one line to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from paired import record  # noqa: E402

WORDS = (
    "dog cat bird horse cow sheep car bus truck bicycle boat train plane man woman child girl boy "
    "people crowd team red blue green yellow black white orange purple brown grey small large tiny "
    "huge old young wooden metal glass street beach park field city river lake mountain forest snow "
    "desert table kitchen bedroom window door tree flower grass sky cloud night sunset sunrise "
    "rain road bridge tower house church market garden pizza cake coffee book phone guitar ball"
).split()
TEMPLATES = (
    "a photo of a {a} {b}",
    "{a} {b} near the {c}",
    "close-up of a {a} {b} on a {c}",
    "a {a} {b} and a {c} {d} in the {e}",
    "two {b}s by the {c} at {e}",
    "an old picture of the {c}",
    "{a} {b}, {c} in the background",
    "view of a {c} with {a} {d}",
    "a painting of a {b} sitting on a {c}",
    "several {b}s walking along the {c} in {a} light",
)
PAIRS_PER_SHARD = 10_000
STAGES = ("prep", "embed", "cluster", "assign")


def caption(rng: random.Random) -> str:
    words = {k: rng.choice(WORDS) for k in "abcde"}
    return rng.choice(TEMPLATES).format(**words)


def make_images(count: int = 64, size: int = 16) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def make_shards(root: Path, total: int, seed: int = 0) -> int:
    """Writes ``ceil(total / 10k)`` shards ``root/<s % 100>/<s>.tar``; returns the shard count."""
    rng = random.Random(seed)
    images = make_images()
    shards = math.ceil(total / PAIRS_PER_SHARD)
    for s in range(shards):
        path = root / str(s % 100) / f"{s}.tar"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(min(PAIRS_PER_SHARD, total - s * PAIRS_PER_SHARD)):
                key = f"{s:05d}_{i:05d}"
                for name, data in (
                    (f"{key}.json", json.dumps({"texts": [caption(rng), caption(rng)]}).encode()),
                    (f"{key}.jpg", images[rng.randrange(len(images))]),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return shards


def run_stage_process(stage: str, overrides: list[str], log: Path) -> dict[str, float]:
    """One stage in its own process: wall seconds and peak RSS (MiB) of that process."""
    cmd = [sys.executable, "-m", "pipeline", stage]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed (rc {proc.returncode}); see {log}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,10000,20000", help="comma-separated pair counts")
    ap.add_argument("--k", type=int, default=256, help="fine clusters")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10, help="fine k-means iterations")
    ap.add_argument("--cluster-sample", type=int, default=50_000, help="pairs the fine fit uses (at most N)")
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--workdir", default="", help="keep data and runs here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every stage (0: default)")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        data = work / "data"
        began = time.perf_counter()
        make_shards(data, sizes[-1])
        gen_s = time.perf_counter() - began
        print(f"generated {sizes[-1]} pairs in {gen_s:.0f} s", flush=True)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for n in sizes:
            shards = math.ceil(n / PAIRS_PER_SHARD)
            if n % PAIRS_PER_SHARD and n > PAIRS_PER_SHARD:
                raise SystemExit(f"--sizes: {n} is not a multiple of {PAIRS_PER_SHARD}")
            overrides = [
                f"run.root={work / 'runs'}",
                f"run.name=n{n}",
                f"data.train={data}/{{0..{shards - 1}}}.tar",
                "run.workers=1",
                f"cluster.num_fine={args.k}",
                f"cluster.num_experts={args.experts}",
                f"cluster.max_iter={args.iters}",
                f"cluster.sample_size={min(n, args.cluster_sample)}",
                f"embed.batch_size={args.embed_batch}",
            ]
            if n < PAIRS_PER_SHARD:  # one partial shard: prep keeps only the first n pairs
                overrides[2] = f"data.train={_partial_shard(work, data, n)}"
            results[str(n)] = {}
            for stage in STAGES:
                fig = run_stage_process(stage, overrides, work / f"n{n}.log")
                results[str(n)][stage] = fig
                print(f"N={n:>8} {stage:<8} {fig['wall_s']:8.1f} s  peak {fig['peak_rss_mib']:7.0f} MiB", flush=True)
    growth = {}
    for a, b in zip(sizes, sizes[1:], strict=False):
        growth[f"{a}->{b}"] = {
            stage: round(
                math.log(results[str(b)][stage]["wall_s"] / results[str(a)][stage]["wall_s"]) / math.log(b / a), 2
            )
            for stage in STAGES
        }
    for pair, g in growth.items():
        print(f"growth exponent {pair}: {g}")
    # wall = a + b * N per stage (least squares): a is the fixed start-up (imports, model load),
    # b the per-pair cost that an extrapolation multiplies.
    linear = {}
    for stage in STAGES:
        xs = [float(n) for n in sizes]
        ys = [results[str(n)][stage]["wall_s"] for n in sizes]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        linear[stage] = {"startup_s": my - b * mx, "s_per_1M_pairs": b * 1e6}
        print(f"{stage:<8} wall ~ {my - b * mx:.1f} s + {b * 1e6:.0f} s per 1M pairs")
    cmd = (f"python benchmarks/bench_scale.py --sizes {args.sizes} --k {args.k} --iters {args.iters} "
           f"--cluster-sample {args.cluster_sample}")
    record("scale", {"sizes": results, "growth": growth, "linear_fit": linear, "generate_s": gen_s, "config": vars(args)}, cmd)
    return 0


def _partial_shard(work: Path, data: Path, n: int) -> str:
    """A copy of shard 0 cut to its first ``n`` pairs (for sizes below one shard)."""
    out = work / f"part{n}" / "0.tar"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data / "0" / "0.tar") as src, tarfile.open(out, "w") as dst:
            for i, member in enumerate(src):
                if i >= 2 * n:
                    break
                dst.addfile(member, src.extractfile(member))
    return f"{out.parent}/{{0..0}}.tar"


if __name__ == "__main__":
    sys.exit(main())
