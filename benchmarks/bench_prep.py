"""prep throughput (pairs/s, one worker) against a bare `tarfile` read of the same shards.

    python benchmarks/bench_prep.py [--shards 10 --pairs 1000 --repeats 3]

Both sides read every member of every shard from the page cache (one warm-up pass first); the
bare read only iterates members and reads their bytes, prep also groups pairs, picks a caption,
checks the image header and writes Parquet. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402


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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_shards(root, args.shards, args.pairs)
        paths = sorted(root.rglob("*.tar"))
        n_pairs = bare_read(paths)  # warm the page cache
        bare, ours = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            bare_read(paths)
            bare.append(time.perf_counter() - t0)
            cfg = load_config(
                None,
                [f"run.root={tmp}/runs{r}", f"data.train={root}/{{0..{args.shards - 1}}}.tar", "run.workers=1"],
            )
            t0 = time.perf_counter()
            run_stage(cfg, "prep", progress=False)
            ours.append(time.perf_counter() - t0)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{'method':<22}{'median s':>10}{'pairs/s':>12}")
    print(f"{'bare tarfile read':<22}{b:>10.3f}{n_pairs / b:>12.0f}")
    print(f"{'prep (1 worker)':<22}{o:>10.3f}{n_pairs / o:>12.0f}")
    print(json.dumps({"bench": "prep", "pairs": n_pairs, "bare_pairs_s": n_pairs / b, "prep_pairs_s": n_pairs / o,
                      "ratio_prep_over_bare": b / o}))


if __name__ == "__main__":
    main()
