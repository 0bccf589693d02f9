"""prep throughput (pairs/s, one worker) against a bare `tarfile` read of the same shards.

    python -m benchmarks.bench_prep [--sets synthetic,demo --repeats 5]
    python -m benchmarks.bench_prep --sets synthetic --shards 10 --pairs 1000
    python -m benchmarks.bench_prep --sets demo --demo-pairs 20000          # generated like `make demo`
    python -m benchmarks.bench_prep --tars 'data/demo/train/*/*.tar'       # existing shards

Two shard sets by default: the demo's (``pipeline.demo``: 20 shards x 1000 pairs, 32-px JPEGs, the
demo config's prep settings) and a synthetic set (64-px noise JPEGs, ``texts`` lists). Both sides
read every member of every shard from the page cache; the bare read only iterates members with
``tarfile`` and reads their bytes; prep (``run_stage(cfg, "prep")``, the whole stage) also groups
pairs, picks a caption, checks the image header, counts bad input, writes Parquet and its records.
``--peer wds`` instead pairs prep with a bare read through its own member reader
(``pipeline.wds.iter_members``): what prep costs on top of reading. Paired (``benchmarks/paired.py``): a warm-up of each side, then ``--repeats`` rounds alternating
which side runs first; the median per-round speed ratio prep ÷ bare with its min–max. Prints a table
per set and a JSON line per set (appended to ``benchmarks/results.jsonl``).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.paired import fmt, paired, record, set_threads
from pipeline import wds
from pipeline.config import load_config
from pipeline.runner import run_stage

ROOT = Path(__file__).resolve().parents[1]


def make_shards(root: Path, shards: int, pairs: int, size: int = 64) -> None:
    """Synthetic shards in MoDE's layout (shard ``s`` at ``root/<s % 100>/<s>.tar``)."""
    import io

    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(root / str(s % 100) / f"{s}.tar") as tar:
            for i in range(pairs):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                meta = json.dumps({"texts": [f"caption {i}", f"other {i}"]})
                tar.add_sample(f"{s:05d}_{i:05d}", {"json": meta, "jpg": buf.getvalue()})


def bare_read(paths: list[Path]) -> int:
    """The peer: every member's bytes with ``tarfile`` (stream mode), nothing else."""
    n = 0
    for p in paths:
        with tarfile.open(p, "r|*") as tar:
            for m in tar:
                if m.isfile():
                    tar.extractfile(m).read()
                    n += 1
    return n // 2


def bare_wds_read(paths: list[Path]) -> int:
    """The other peer (``--peer wds``): every member's bytes with prep's own reader, nothing else."""
    return sum(1 for p in paths for _ in wds.iter_members(p)) // 2


PEERS = {"tarfile": bare_read, "wds": bare_wds_read}


def _shard_set(name: str, args: argparse.Namespace, tmp: Path) -> tuple[Path, list[str], str]:
    """(data root with shards 0..n-1 in MoDE's layout, config overrides, description) of one set."""
    root = tmp / name
    if name == "synthetic":
        make_shards(root, args.shards, args.pairs)
        return root, [], f"synthetic {args.shards}x{args.pairs}, 64 px"
    if name == "demo":
        from pipeline.demo import generate_demo_data

        generate_demo_data(tmp / "demo_data", num_pairs=args.demo_pairs, image_size=32, pairs_per_shard=1000,
                           eval_per_class=1, retrieval_pairs=0, workers=2, progress=False)
        return tmp / "demo_data" / "train", ["prep.label_field=domain"], f"demo {args.demo_pairs} pairs, 32 px"
    paths = sorted(Path(p).resolve() for p in glob.glob(args.tars))
    if not paths:
        raise SystemExit(f"no shard matches {args.tars}")
    for i, p in enumerate(paths):  # prep's data.train takes a brace pattern: link them as 0..n-1
        (root / str(i % 100)).mkdir(parents=True, exist_ok=True)
        (root / str(i % 100) / f"{i}.tar").symlink_to(p)
    return root, [], f"shards {args.tars}"


def bench_set(name: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, extra, kind = _shard_set(name, args, Path(tmp))
        paths = sorted(root.rglob("*.tar"), key=lambda p: int(p.stem))
        cfg = load_config(None, [f"run.root={tmp}/runs", f"data.train={root}/{{0..{len(paths) - 1}}}.tar",
                                 "data.layout=mode", "run.workers=1", *extra])
        runs = Path(tmp) / "runs"
        peer = PEERS[args.peer]
        n_pairs = peer(paths)
        result = paired(
            lambda: run_stage(cfg, "prep", progress=False),
            lambda: peer(paths),
            args.repeats,
            between=lambda: shutil.rmtree(runs, ignore_errors=True),
        )
    summary = result.summary(n_pairs, "pairs/s")
    print(f"{kind}\n{'method':<22}{'median s':>10}{'pairs/s':>12}")
    print(f"{'bare ' + args.peer + ' read':<22}{summary['peer_s_median']:>10.3f}{summary['peer_rate_median']:>12.0f}")
    print(f"{'prep (1 worker)':<22}{summary['ours_s_median']:>10.3f}{summary['ours_rate_median']:>12.0f}")
    print(f"prep / bare: {fmt(summary)}")
    opts = {"synthetic": f"--shards {args.shards} --pairs {args.pairs}", "demo": f"--demo-pairs {args.demo_pairs}",
            "tars": f"--tars '{args.tars}'"}[name]
    cmd = (f"python -m benchmarks.bench_prep --sets {name} --peer {args.peer} --repeats {args.repeats} "
           f"--threads {args.threads} {opts}")
    key = "prep_vs_bare_tar" if args.peer == "tarfile" else "prep_vs_bare_wds_read"
    record("prep", {"data": kind, "pairs": n_pairs, key: summary}, cmd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="synthetic,demo", help="comma list of: synthetic, demo")
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--demo-pairs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tars", default="", help="glob of existing shards instead of --sets")
    ap.add_argument("--peer", choices=sorted(PEERS), default="tarfile",
                    help="tarfile: a bare tarfile read (the target); wds: prep's own member reader (its overhead)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads for both sides")
    args = ap.parse_args()
    set_threads(args.threads)
    for name in ["tars"] if args.tars else [s.strip() for s in args.sets.split(",") if s.strip()]:
        bench_set(name, args)


if __name__ == "__main__":
    main()
