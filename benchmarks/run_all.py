"""Run every benchmark in this folder with its default (CPU-sized) settings.

    make bench                      # all
    python -m benchmarks.run_all --only prep,cluster

Each benchmark prints a table and a final JSON line; the paired ones append it to
``benchmarks/results.jsonl`` themselves (``benchmarks/paired.record``), the others' lines are
collected here (appended, with a timestamp and the host's CPU count). ``python -m
benchmarks.make_docs`` then regenerates ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated names (prep, embed, cluster, losses, train, scale)")
    ap.add_argument("--config", default="configs/demo.yaml", help="unused; accepted for make symmetry")
    args = ap.parse_args()
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    scripts = sorted(HERE.glob("bench_*.py"))
    failed = 0
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        print(f"== {name}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{script.stem}"], cwd=HERE.parent, capture_output=True, text=True
        )
        print(proc.stdout, end="")
        if proc.returncode != 0:
            failed += 1
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if last and "host" in json.loads(last[-1]):
            continue  # written by benchmarks/paired.record already
        if last:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(), **json.loads(last[-1])}
            with open(HERE / "results.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
