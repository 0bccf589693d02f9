"""prep throughput (pairs/s, one worker) against a bare `tarfile` read of the same shards.

    python -m benchmarks.bench_prep [--shards 10 --pairs 1000 --repeats 5]
    python -m benchmarks.bench_prep --tars 'data/demo/train/*.tar'      # existing shards (the demo's)

Both sides read every member of every shard from the page cache; the bare read only iterates
members and reads their bytes, prep also groups pairs, picks a caption, checks the image header
and writes Parquet. Paired (``benchmarks/paired.py``): a warm-up of each side, then ``--repeats``
rounds alternating which side runs first; the median per-round speed ratio prep ÷ bare with its
min–max. Prints a table and a final JSON line (appended to ``benchmarks/results.jsonl``).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.paired import fmt, paired, record, set_threads
from pipeline.config import load_config
from pipeline.runner import run_stage


def make_shards(root: Path, shards: int, pairs: int, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        path = root / str(s % 100) / f"{s}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for i in range(pairs):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                for name, data in [
                    (f"{s:05d}_{i:05d}.json", json.dumps({"texts": [f"caption {i}", f"other {i}"]}).encode()),
                    (f"{s:05d}_{i:05d}.jpg", buf.getvalue()),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def bare_read(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with tarfile.open(p, "r|*") as tar:
            for m in tar:
                if m.isfile():
                    tar.extractfile(m).read()
                    n += 1
    return n // 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tars", default="", help="glob of existing shards instead of synthetic ones")
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads for both sides")
    args = ap.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tars:
            paths = sorted(Path(p).resolve() for p in glob.glob(args.tars))
            if not paths:
                raise SystemExit(f"no shard matches {args.tars}")
            root = Path(tmp) / "data"
            for i, p in enumerate(paths):  # prep's data.train takes a brace pattern: link 0..n-1
                root.mkdir(exist_ok=True)
                (root / f"{i}.tar").symlink_to(p)
            kind = f"shards {args.tars}"
        else:
            root = Path(tmp) / "data"
            make_shards(root, args.shards, args.pairs)
            kind = "synthetic"
        paths = sorted(root.rglob("*.tar"))
        # make_shards puts shard s at root/<s % 100>/<s>.tar, which data.train's layout finds.
        cfg = load_config(None, [f"run.root={tmp}/runs", f"data.train={root}/{{0..{len(paths) - 1}}}.tar",
                                 "run.workers=1"])
        runs = Path(tmp) / "runs"
        n_pairs = bare_read(paths)
        result = paired(
            lambda: run_stage(cfg, "prep", progress=False),
            lambda: bare_read(paths),
            args.repeats,
            between=lambda: shutil.rmtree(runs, ignore_errors=True),
        )
    summary = result.summary(n_pairs, "pairs/s")
    print(f"{'method':<22}{'median s':>10}{'pairs/s':>12}")
    print(f"{'bare tarfile read':<22}{summary['peer_s_median']:>10.3f}{summary['peer_rate_median']:>12.0f}")
    print(f"{'prep (1 worker)':<22}{summary['ours_s_median']:>10.3f}{summary['ours_rate_median']:>12.0f}")
    print(f"prep / bare: {fmt(summary)}")
    cmd = f"python benchmarks/bench_prep.py --repeats {args.repeats} --threads {args.threads} " + (
        f"--tars '{args.tars}'" if args.tars else f"--shards {args.shards} --pairs {args.pairs}")
    record("prep", {"data": kind, "pairs": n_pairs, "prep_vs_bare_tar": summary}, cmd)


if __name__ == "__main__":
    main()
