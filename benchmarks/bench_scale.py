"""Scale run: prep → embed → cluster → assign at growing N; wall, CPU seconds and peak RSS per stage.

    python -m benchmarks.bench_scale --sizes 5000,10000,20000 --k 256 --workdir /tmp/s1     # minutes
    python -m benchmarks.bench_scale --sizes 250000,500000,1000000 --k 1024 --mode incremental \
        --workdir /work/scale/w                                                             # the issue's run

Generates ``max(sizes)`` synthetic pairs once (captions from varied templates and a word list,
seeded per shard; 16 px JPEG images; 10k pairs per tar shard; ``--procs`` writer processes), then
for each N runs every stage in its own ``python -m pipeline <stage>`` process on the first N/10k
shards and records its wall time, CPU seconds (``ru_utime + ru_stime`` of that process and its
children, from ``os.wait4``: less sensitive to a shared machine's load than wall time), peak
resident memory (``ru_maxrss``), the 1-minute load average when it started, and how many shards it
ran and skipped (parsed from the stage's own summary line).

Two modes:

* ``fresh`` (default): one run folder per N (``runs/n<N>``), which must not exist yet — a folder
  left by an earlier run would make the runner skip its finished shards and the figures would
  measure nothing (that is what once showed embed 80k in 62 s after 40k in 280 s). Every stage
  must run every shard; the run stops with an error otherwise. ``growth`` is the exponent ``b`` of
  ``cpu ~ N^b`` between consecutive sizes (1 = linear).
* ``incremental``: one run folder (``runs/scale``) for all sizes in increasing order, so each
  larger N reuses the prep and embed shards of the smaller and runs only the new ones (ran +
  skipped must be all shards); cluster (a fit on a fixed ``--cluster-sample``) and assign (every
  pair against the new centres) run from scratch at every N: their folders from the smaller N
  are removed first (otherwise the pipeline keeps the clustering as the data grow and assigns
  only the new shards, docs/growth.md). Rates are per 100k pairs a stage actually
  processed (its ``ran`` shards): a flat rate is linear growth.

Each finished stage's figure is appended to ``<workdir>/figures.jsonl``; a later invocation with
the same settings takes the sizes found complete there instead of rerunning them, so a long run
can be stopped between sizes and continued. ``--deadline HH:MM`` (UTC) starts no new size after
that time and records the sizes done (``not_run`` lists the others).

The cluster stage fits on a fixed-size sample (MoDE fits on a sample too), so its memory is
bounded; prep, embed and assign stream shard by shard. Appends one line to
``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.paired import record

REPO = Path(__file__).resolve().parents[1]

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
PER_SHARD_STAGES = ("prep", "embed")
"""Stages whose finished shards a larger N reuses in ``incremental`` mode."""
_SUMMARY = re.compile(r"ran (\d+) shard\(s\), skipped (\d+)|nothing to do \((\d+) shard\(s\)")


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


def _write_shard(job: tuple[Path, int, int, int]) -> None:
    """One shard ``root/<s % 100>/<s>.tar`` of ``count`` pairs, seeded by ``(seed, s)``."""
    root, s, count, seed = job
    path = root / str(s % 100) / f"{s}.tar"
    if path.exists():
        return
    rng = random.Random(seed * 1_000_003 + s)
    images = make_images()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w") as tar:
        for i in range(count):
            key = f"{s:05d}_{i:05d}"
            for name, data in (
                (f"{key}.json", json.dumps({"texts": [caption(rng), caption(rng)]}).encode()),
                (f"{key}.jpg", images[rng.randrange(len(images))]),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)


def make_shards(root: Path, total: int, seed: int = 0, procs: int = 1) -> int:
    """Writes ``ceil(total / 10k)`` shards (existing ones are kept); returns the shard count."""
    shards = math.ceil(total / PAIRS_PER_SHARD)
    jobs = [(root, s, min(PAIRS_PER_SHARD, total - s * PAIRS_PER_SHARD), seed) for s in range(shards)]
    if procs > 1:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            pool.map(_write_shard, jobs, chunksize=1)
    else:
        for job in jobs:
            _write_shard(job)
    return shards


def _ran_skipped(text: str) -> tuple[int, int]:
    """``(ran, skipped)`` from the last summary line a stage command printed."""
    found = _SUMMARY.findall(text)
    if not found:
        return -1, -1
    ran, skipped, nothing = found[-1]
    return (0, int(nothing)) if nothing else (int(ran), int(skipped))


def run_stage_process(stage: str, overrides: list[str], log: Path) -> dict[str, float]:
    """One stage in its own process: wall and CPU seconds, peak RSS (MiB), shards ran/skipped."""
    cmd = [sys.executable, "-m", "pipeline", stage]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load = os.getloadavg()[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{stage} failed (rc {os.waitstatus_to_exitcode(status)}); see {log}")
    ran, skipped = _ran_skipped(log.read_text(errors="replace"))
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "load_1m": load,
        "ran": ran,
        "skipped": skipped,
    }


def _overrides(args: argparse.Namespace, work: Path, data: Path, n: int, run_name: str) -> list[str]:
    shards = math.ceil(n / PAIRS_PER_SHARD)
    train = f"{data}/{{0..{shards - 1}}}.tar" if n >= PAIRS_PER_SHARD else _partial_shard(work, data, n)
    return [
        f"run.root={work / 'runs'}",
        f"run.name={run_name}",
        f"data.train={train}",
        "run.workers=1",
        f"cluster.num_fine={args.k}",
        f"cluster.num_experts={args.experts}",
        f"cluster.max_iter={args.iters}",
        f"cluster.sample_size={min(n, args.cluster_sample)}",
        f"embed.batch_size={args.embed_batch}",
        f"embed.precision={args.embed_precision}",
    ]


def _check_ran(stage: str, fig: dict[str, float], n: int, mode: str) -> None:
    """Every stage must have done the work its figure claims (no silently reused shards).

    ``fresh``: every shard ran, none skipped. ``incremental``: prep and embed ran what earlier
    sizes left (ran + skipped = all shards); cluster and assign ran in full.
    """
    shards = 1 if stage == "cluster" else math.ceil(n / PAIRS_PER_SHARD)
    reuses = mode == "incremental" and stage in PER_SHARD_STAGES
    ok = fig["ran"] + fig["skipped"] == shards if reuses else (fig["ran"] == shards and fig["skipped"] == 0)
    if not ok:
        raise SystemExit(
            f"bench_scale: {stage} at N={n} ran {fig['ran']} shard(s) and skipped {fig['skipped']} of "
            f"{shards}: finished shards from an earlier run were reused; use a new --workdir"
        )


def _load_figures(path: Path, key: dict) -> dict[str, dict]:
    """Stage figures a previous invocation with the same settings stored (size -> stage -> figure)."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("key") == key:
                done.setdefault(str(row["n"]), {})[row["stage"]] = row["figure"]
    return {n: stages for n, stages in done.items() if all(st in stages for st in STAGES)}


def _past(deadline: str) -> bool:
    """Whether the UTC clock is past ``HH:MM`` (empty: never)."""
    return bool(deadline) and time.strftime("%H:%M", time.gmtime()) >= deadline


def run_sizes(args: argparse.Namespace, work: Path, data: Path, sizes: list[int]) -> dict[str, dict]:
    """Every stage at every N (see the module docstring); figures persist in ``<workdir>/figures.jsonl``."""
    key = {k: v for k, v in vars(args).items() if k not in ("sizes", "deadline", "procs")}
    store = work / "figures.jsonl"
    results = _load_figures(store, key)
    for n in sizes:
        if n % PAIRS_PER_SHARD and n > PAIRS_PER_SHARD:
            raise SystemExit(f"--sizes: {n} is not a multiple of {PAIRS_PER_SHARD}")
        if str(n) in results:
            print(f"N={n:>8} figures from {store}", flush=True)
            continue
        if _past(args.deadline):
            print(f"past --deadline {args.deadline} UTC: N={n} and larger not run", flush=True)
            break
        run_name = "scale" if args.mode == "incremental" else f"n{n}"
        if args.mode == "fresh" and (work / "runs" / run_name).exists():
            raise SystemExit(f"bench_scale: {work / 'runs' / run_name} exists; use a new --workdir")
        overrides = _overrides(args, work, data, n, run_name)
        results[str(n)] = {}
        for stage in STAGES:
            if stage not in PER_SHARD_STAGES:  # from scratch at every N (incremental: remove the last N's)
                shutil.rmtree(work / "runs" / run_name / stage, ignore_errors=True)
            fig = run_stage_process(stage, overrides, work / "logs" / f"n{n}_{stage}.log")
            _check_ran(stage, fig, n, args.mode)
            results[str(n)][stage] = fig
            with open(store, "a") as fh:
                fh.write(json.dumps({"key": key, "n": n, "stage": stage, "figure": fig}) + "\n")
            print(
                f"N={n:>8} {stage:<8} wall {fig['wall_s']:8.1f} s  cpu {fig['cpu_s']:8.1f} s  "
                f"peak {fig['peak_rss_mib']:6.0f} MiB  ran {fig['ran']:>3}  load {fig['load_1m']:.1f}",
                flush=True,
            )
    return {n: results[n] for n in sorted(results, key=int) if int(n) in sizes}


def _work_pairs(results: dict[str, dict], n: int, stage: str) -> int:
    """Pairs a stage processed at size ``n``: the shards it ran (prep, embed, assign); 0 for the fit."""
    if stage == "cluster":
        return 0
    return min(n, int(results[str(n)][stage]["ran"]) * PAIRS_PER_SHARD)


def rates(results: dict[str, dict], sizes: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Wall and CPU seconds per 100k pairs the stage processed, per size and stage."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in sizes:
        out[str(n)] = {}
        for stage in STAGES:
            pairs = _work_pairs(results, n, stage)
            fig = results[str(n)][stage]
            if pairs:
                out[str(n)][stage] = {
                    "pairs": pairs,
                    "wall_s_per_100k": fig["wall_s"] * 1e5 / pairs,
                    "cpu_s_per_100k": fig["cpu_s"] * 1e5 / pairs,
                }
    return out


def linear_fit(results: dict[str, dict], sizes: list[int]) -> dict[str, dict[str, float]]:
    """``cpu = a + b * pairs`` per stage by least squares: ``a`` fixed start-up, ``b`` per pair."""
    fit = {}
    for stage in STAGES:
        xs = [float(n if stage == "cluster" else _work_pairs(results, n, stage)) for n in sizes]
        ys = [results[str(n)][stage]["cpu_s"] for n in sizes]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        fit[stage] = {"startup_cpu_s": my - b * mx, "cpu_s_per_1M_pairs": b * 1e6}
        print(f"{stage:<8} cpu ~ {my - b * mx:.1f} s + {b * 1e6:.0f} s per 1M pairs processed")
    return fit


def growth(results: dict[str, dict], sizes: list[int]) -> dict[str, dict[str, float]]:
    """Exponent ``b`` of ``cpu ~ N^b`` between consecutive sizes (fresh runs only)."""
    out = {}
    for a, b in zip(sizes, sizes[1:], strict=False):
        out[f"{a}->{b}"] = {
            stage: round(math.log(results[str(b)][stage]["cpu_s"] / results[str(a)][stage]["cpu_s"]) / math.log(b / a), 2)
            for stage in STAGES
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,10000,20000", help="comma-separated pair counts")
    ap.add_argument("--mode", choices=("fresh", "incremental"), default="fresh")
    ap.add_argument("--k", type=int, default=256, help="fine clusters")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10, help="fine k-means iterations")
    ap.add_argument("--cluster-sample", type=int, default=50_000, help="pairs the fine fit uses (at most N)")
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--embed-precision", default="auto", help="embed.precision (auto: bf16 where native)")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="shard-writer processes")
    ap.add_argument("--workdir", required=True, help="data, runs and per-stage logs go here")
    ap.add_argument("--deadline", default="", help="HH:MM UTC: start no new size after it, record what is done")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every stage (0: default)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.workdir)
    data = work / "data"
    began = time.perf_counter()
    make_shards(data, sizes[-1], procs=args.procs)
    gen_s = time.perf_counter() - began
    print(f"generated {sizes[-1]} pairs in {gen_s:.0f} s", flush=True)
    results = run_sizes(args, work, data, sizes)
    done = [int(n) for n in results]
    if not done:
        raise SystemExit("bench_scale: no size finished; nothing recorded")
    payload = {
        "mode": args.mode,
        "sizes": results,
        "not_run": [n for n in sizes if n not in done],
        "rates": rates(results, done),
        "linear_fit": linear_fit(results, done) if len(done) > 1 else {},
        "generate_s": gen_s,
        "config": vars(args),
    }
    if args.mode == "fresh":
        payload["growth"] = growth(results, done)
        print(f"growth exponents (cpu): {payload['growth']}")
    cmd = (f"python -m benchmarks.bench_scale --sizes {args.sizes} --mode {args.mode} --k {args.k} "
           f"--iters {args.iters} --cluster-sample {args.cluster_sample}")
    record("scale", payload, cmd)
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
