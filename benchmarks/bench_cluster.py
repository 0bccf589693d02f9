"""Fine clustering and assignment speed/quality of ``stages.kmeans`` against faiss on CPU.

Run: ``python benchmarks/bench_cluster.py [--n 100000 --dim 384 --k 1024 --iters 20]``

Data: a fixed-seed mixture of Gaussians with skewed (log-normal) component weights, L2-normalised
like the stage's caption embeddings. Compared on the same sample:

* fit time of ``fit_kmeans`` (balanced and unbalanced, ``tol=0`` so both run ``--iters``
  iterations) against ``fit_faiss_kmeans`` (``faiss.Kmeans``, same iterations);
* inertia of each centre set, computed identically as the sum of squared ``assign_nearest``
  distances of the sample, and its ratio to faiss;
* max/min cluster size: of the fit's own labels (balanced labels for ours), and under nearest
  assignment (what the assign stage does with the centres);
* assignment throughput (point-centre pairs/s) of ``assign_nearest`` (faiss and torch backends)
  against a bare ``faiss.IndexFlatL2`` search.

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from stages.kmeans import assign_nearest, fit_faiss_kmeans, fit_kmeans  # noqa: E402


def make_data(n: int, dim: int, components: int, seed: int) -> torch.Tensor:
    """L2-normalised mixture of Gaussians with log-normal component weights."""
    gen = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(components, dim, generator=gen), dim=1)
    weights = torch.exp(torch.randn(components, generator=gen))
    comp = torch.multinomial(weights, n, replacement=True, generator=gen)
    # Noise of norm ~0.8 against unit means: cos(point, its mean) is about 0.8, embedding-like.
    noise = torch.randn(n, dim, generator=gen) * (0.8 / dim**0.5)
    return F.normalize(means[comp] + noise, dim=1)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def nearest_stats(x: torch.Tensor, centers: torch.Tensor, k: int) -> tuple[float, float]:
    """(inertia, max/min size) of ``x`` under nearest assignment to ``centers``."""
    ids, dist = assign_nearest(x, centers, backend="faiss")
    sizes = torch.bincount(ids, minlength=k)
    return float(dist.double().pow(2).sum()), size_ratio(sizes)


def size_ratio(sizes: torch.Tensor) -> float:
    return float(sizes.max()) / max(float(sizes.min()), 1.0)


def bench_fits(x: torch.Tensor, args: argparse.Namespace) -> dict:
    runs = {
        "ours_balanced": lambda: fit_kmeans(
            x, args.k, balanced=True, max_iter=args.iters, tol=0.0, seed=args.seed
        ),
        "ours_unbalanced": lambda: fit_kmeans(
            x, args.k, balanced=False, max_iter=args.iters, tol=0.0, seed=args.seed
        ),
        "faiss": lambda: fit_faiss_kmeans(x, args.k, niter=args.iters, seed=args.seed),
    }
    out = {}
    for name, fn in runs.items():
        result, seconds = timed(fn)
        inertia, nearest_ratio = nearest_stats(x, result.centers, args.k)
        out[name] = {
            "time_s": seconds,
            "inertia_nearest": inertia,
            "inertia_own_labels": result.inertia,
            "max_min_own": size_ratio(result.sizes),
            "max_min_nearest": nearest_ratio,
        }
    for name in ("ours_balanced", "ours_unbalanced"):
        out[name]["time_ratio"] = out[name]["time_s"] / out["faiss"]["time_s"]
        out[name]["inertia_ratio"] = out[name]["inertia_nearest"] / out["faiss"]["inertia_nearest"]
    return out


def bench_assign(x: torch.Tensor, k: int, seed: int) -> dict:
    centers = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]]
    pairs = x.shape[0] * k
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centers.numpy())
    data = np.ascontiguousarray(x.numpy())
    _, bare = timed(lambda: index.search(data, 1))
    _, via_faiss = timed(lambda: assign_nearest(x, centers, backend="faiss"))
    _, via_torch = timed(lambda: assign_nearest(x, centers, backend="torch"))
    return {
        "bare_faiss_pairs_per_s": pairs / bare,
        "assign_faiss_pairs_per_s": pairs / via_faiss,
        "assign_torch_pairs_per_s": pairs / via_torch,
    }


def print_table(fits: dict, assign: dict) -> None:
    print(
        f"{'method':<16}{'time s':>9}{'x faiss':>9}{'inertia':>12}{'x faiss':>9}"
        f"{'max/min own':>13}{'max/min nn':>12}"
    )
    for name, row in fits.items():
        print(
            f"{name:<16}{row['time_s']:>9.2f}{row.get('time_ratio', 1.0):>9.2f}"
            f"{row['inertia_nearest']:>12.1f}{row.get('inertia_ratio', 1.0):>9.4f}"
            f"{row['max_min_own']:>13.2f}{row['max_min_nearest']:>12.2f}"
        )
    for name, value in assign.items():
        print(f"{name:<28}{value / 1e6:>10.1f} M pairs/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--components", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and faiss CPU threads (0: library default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    x = make_data(args.n, args.dim, args.components, args.seed)
    fits = bench_fits(x, args)
    assign = bench_assign(x, args.k, args.seed)
    print_table(fits, assign)
    print(
        json.dumps(
            {"config": vars(args), "torch_threads": torch.get_num_threads(), "fits": fits, "assign": assign}
        )
    )


if __name__ == "__main__":
    main()
