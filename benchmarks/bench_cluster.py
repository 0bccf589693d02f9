"""Fine clustering and assignment speed/quality of ``stages.clustering`` against faiss on CPU.

Run: ``python -m benchmarks.bench_cluster [--n 50000 --dim 384 --k 256 --iters 20 --repeats 5]``
(the issue's full size: ``--n 200000 --k 1024``; about 20 min on a quiet 2-core CPU).

Every comparison is paired (``benchmarks/paired.py``): one warm-up of each side, then
``--repeats`` rounds alternating which side runs first, equal torch/faiss threads, and the
median per-round ratio with its min–max.

Data: a fixed-seed mixture of Gaussians with skewed (log-normal) component weights, L2-normalised
like the stage's caption embeddings. Compared on the same sample:

* fit time of the balanced ``fit_kmeans`` (``tol=0`` so it runs ``--iters`` iterations) against
  ``fit_faiss_kmeans`` (``faiss.Kmeans``, same iterations); ``--unbalanced`` adds ours unbalanced;
* inertia of each centre set, computed identically as the sum of squared ``assign_nearest``
  distances of the sample, and its ratio to faiss;
* cluster sizes (max, min, max/min, empty clusters): of the fit's own labels, under nearest
  assignment (the headline: what ``assign.capacity: none`` does with the centres) and under the
  capacity-aware ``assign_capacity`` (``assign.capacity: fit_bounds``);
* assignment throughput (point-centre pairs/s) of ``assign_nearest`` (auto, faiss, torch) against
  a bare ``faiss.IndexFlatL2`` search, and of the whole ``assign`` stage (reading the features
  and captions, writing Parquet) against a bare loop doing the same reads, the search and the
  same Parquet write, and against the bare search alone.

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from benchmarks.paired import fmt, paired, record, set_threads
from pipeline import artifacts
from pipeline.config import load_config
from pipeline.runner import run_stage
from stages.clustering import (
    assign_capacity,
    assign_nearest,
    auto_backend,
    balanced_bounds,
    fit_faiss_kmeans,
    fit_kmeans,
)


def make_data(n: int, dim: int, components: int, seed: int) -> torch.Tensor:
    """L2-normalised mixture of Gaussians with log-normal component weights."""
    gen = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(components, dim, generator=gen), dim=1)
    weights = torch.exp(torch.randn(components, generator=gen))
    comp = torch.multinomial(weights, n, replacement=True, generator=gen)
    # Noise of norm ~0.8 against unit means: cos(point, its mean) is about 0.8, embedding-like.
    noise = torch.randn(n, dim, generator=gen) * (0.8 / dim**0.5)
    return F.normalize(means[comp] + noise, dim=1)


def sizes_of(ids: torch.Tensor, k: int) -> dict:
    sizes = torch.bincount(ids, minlength=k)
    return {
        "max": int(sizes.max()),
        "min": int(sizes.min()),
        "max_over_min": float(sizes.max()) / max(float(sizes.min()), 1.0),
        "empty": int((sizes == 0).sum()),
    }


def inertia_nearest(x: torch.Tensor, centers: torch.Tensor) -> tuple[float, torch.Tensor]:
    ids, dist = assign_nearest(x, centers, backend="faiss")
    return float(dist.double().pow(2).sum()), ids


def bench_fit(x: torch.Tensor, args: argparse.Namespace) -> dict:
    def ours():
        return fit_kmeans(x, args.k, balanced=True, max_iter=args.iters, tol=0.0, seed=args.seed)

    def peer():
        return fit_faiss_kmeans(x, args.k, niter=args.iters, seed=args.seed)

    run = paired(ours, peer, args.repeats)
    out = {"balanced_vs_faiss": run.summary()}
    ours_res, peer_res = run.ours_out, run.peer_out
    ours_inertia, ours_ids = inertia_nearest(x, ours_res.centers)
    peer_inertia, peer_ids = inertia_nearest(x, peer_res.centers)
    cap_ids, _ = assign_capacity(x, ours_res.centers, balance_slack=0.1)
    out["inertia_ratio_nearest"] = ours_inertia / peer_inertia
    out["sizes"] = {
        "ours_fit_labels": sizes_of(ours_res.labels, args.k),
        "ours_nearest": sizes_of(ours_ids, args.k),
        "ours_capacity_fit_bounds": sizes_of(cap_ids, args.k),
        "faiss_nearest": sizes_of(peer_ids, args.k),
    }
    out["fit_bounds"] = list(balanced_bounds(x.shape[0], args.k, 0.1))
    if args.unbalanced:
        run_u = paired(
            lambda: fit_kmeans(x, args.k, balanced=False, max_iter=args.iters, tol=0.0, seed=args.seed),
            peer,
            args.repeats,
        )
        out["unbalanced_vs_faiss"] = run_u.summary()
        out["inertia_ratio_unbalanced"] = inertia_nearest(x, run_u.ours_out.centers)[0] / peer_inertia
    return out


def bench_assign_calls(x: torch.Tensor, centers: torch.Tensor, repeats: int) -> dict:
    """In-memory assignment: assign_nearest (auto / torch / capacity) vs a bare IndexFlatL2 search."""
    pairs = x.shape[0] * centers.shape[0]
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centers.numpy())
    data = np.ascontiguousarray(x.numpy())

    def bare():
        return index.search(data, 1)

    out = {"auto_backend_here": auto_backend("cpu")}
    for name, fn in {
        "auto": lambda: assign_nearest(x, centers, backend="auto"),
        "torch": lambda: assign_nearest(x, centers, backend="torch"),
        "capacity": lambda: assign_capacity(x, centers),
    }.items():
        out[name] = paired(fn, bare, repeats).summary(pairs, "pairs/s")
    return out


def make_run(root: Path, x: torch.Tensor, k: int, shards: int) -> tuple[list, list[Path]]:
    """Prep captions + embed features (fp16, as the embed stage writes) + cluster outputs."""
    overrides = [f"run.root={root}", "run.name=bench", f"cluster.num_fine={k}", "cluster.num_experts=4",
                 "cluster.max_iter=2", f"cluster.sample_size={min(x.shape[0], 20 * k)}"]
    cfg = load_config(None, overrides)
    pdir, edir = cfg.run_dir / "prep", cfg.run_dir / "embed"
    (pdir / "captions").mkdir(parents=True)
    (edir / "features").mkdir(parents=True)
    bounds = np.linspace(0, x.shape[0], shards + 1).astype(int)
    caps, feats = [], []
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = f"s0_{s}"
        table = pa.table({"pair_id": pa.array(range(lo, hi), pa.int64()),
                          "shard": pa.array([name] * (hi - lo)),
                          "key": pa.array([f"{i:09d}" for i in range(lo, hi)]),
                          "caption": pa.array(["c"] * (hi - lo)),
                          "source": pa.array([0] * (hi - lo), pa.int16())})
        pq.write_table(table, pdir / "captions" / f"{name}.parquet")
        np.save(edir / "features" / f"{name}.npy", x[lo:hi].numpy().astype(np.float16))
        caps.append(pdir / "captions" / f"{name}.parquet")
        feats.append(edir / "features" / f"{name}.npy")
    artifacts.write_json(pdir / "manifest.json", {"stage": "prep", "outputs": [f"captions/{p.name}" for p in caps],
                                                 "num_pairs": x.shape[0]})
    artifacts.write_json(edir / "manifest.json", {"stage": "embed", "outputs": [f"features/{p.name}" for p in feats],
                                                 "dim": x.shape[1]})
    run_stage(cfg, "cluster", progress=False, workers=1)
    return cfg, list(zip(caps, feats, strict=True))


def bench_assign_stage(x: torch.Tensor, k: int, shards: int, repeats: int) -> dict:
    """The whole assign stage vs bare loops over the same files (both write to a scratch dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, files = make_run(root, x, k, shards)
        fine = torch.load(cfg.run_dir / "cluster" / "fine_centers.pth")["center"].numpy()
        coarse_map = torch.load(cfg.run_dir / "cluster" / "coarse.pth")["assign"].numpy()
        bare_dir = root / "bare"

        def clean():
            shutil.rmtree(cfg.run_dir / "assign", ignore_errors=True)
            shutil.rmtree(bare_dir, ignore_errors=True)
            bare_dir.mkdir()

        def stage():
            return run_stage(cfg, "assign", progress=False, workers=1)

        def bare(write: bool = True):
            index = faiss.IndexFlatL2(fine.shape[1])
            index.add(np.ascontiguousarray(fine))
            for cap, feat in files:
                f = np.load(feat).astype(np.float32)
                f /= np.linalg.norm(f, axis=1, keepdims=True)
                sq, ids = index.search(f, 1)
                if write:
                    keys = pq.read_table(cap, columns=["pair_id", "key"])
                    ids = ids[:, 0]
                    pq.write_table(pa.table({"pair_id": keys.column("pair_id"), "key": keys.column("key"),
                                             "fine": ids.astype(np.int32), "coarse": coarse_map[ids].astype(np.int16),
                                             "dist": np.sqrt(np.maximum(sq[:, 0], 0)).astype(np.float32)}),
                                   bare_dir / f"{feat.stem}.parquet")

        def bare_search():
            index = faiss.IndexFlatL2(fine.shape[1])
            index.add(np.ascontiguousarray(fine))
            data = [np.load(f).astype(np.float32) for _, f in files]
            t = time.perf_counter()
            for d in data:
                index.search(d, 1)
            return time.perf_counter() - t

        pairs = x.shape[0] * k
        out = {
            "stage_vs_bare_io": paired(stage, bare, repeats, between=clean).summary(x.shape[0], "pairs/s"),
        }
        # Against the bare search alone (no reads, no writes): the stage pays all its I/O here.
        search_only = [bare_search() for _ in range(repeats)]
        stage_run = paired(stage, lambda: None, repeats, between=clean)
        ratios = sorted(s / t for s, t in zip(search_only, stage_run.ours, strict=True))
        out["stage_vs_bare_search_only"] = {
            "repeats": repeats, "speed_ratio_median": float(np.median(ratios)),
            "speed_ratio_min": ratios[0], "speed_ratio_max": ratios[-1],
            "unit": "point-centre pairs/s",
            "ours_rate_median": pairs / float(np.median(stage_run.ours)),
            "peer_rate_median": pairs / float(np.median(search_only)),
            "note": "search timed apart from the stage runs; only the stage includes I/O",
        }
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--components", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shards", type=int, default=8, help="feature files of the assign-stage run")
    parser.add_argument("--threads", type=int, default=0, help="torch and faiss CPU threads (0: torch's default)")
    parser.add_argument("--only", default="fit,assign,stage", help="comma-separated parts: fit, assign, stage")
    parser.add_argument("--unbalanced", action="store_true", help="also pair our unbalanced fit with faiss")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    parts = set(args.only.split(","))
    x = make_data(args.n, args.dim, args.components, args.seed)
    result: dict = {"config": vars(args), "threads": threads}
    if "fit" in parts:
        result["fit"] = bench_fit(x, args)
        f = result["fit"]
        print(f"balanced fit speed vs faiss.Kmeans: {fmt(f['balanced_vs_faiss'])}  "
              f"inertia {f['inertia_ratio_nearest']:.4f}x faiss")
        for name, s in f["sizes"].items():
            print(f"  sizes {name:<26} max {s['max']:>6} min {s['min']:>6} max/min {s['max_over_min']:>7.2f} "
                  f"empty {s['empty']}")
    centers = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.k]]
    if "assign" in parts:
        result["assign"] = a = bench_assign_calls(x, centers, args.repeats)
        for name in ("auto", "torch", "capacity"):
            print(f"assign_nearest {name:<9} vs bare IndexFlatL2: {fmt(a[name])}  "
                  f"({a[name]['ours_rate_median'] / 1e6:.0f} vs {a[name]['peer_rate_median'] / 1e6:.0f} M pairs/s)")
    if "stage" in parts:
        result["stage"] = st = bench_assign_stage(x, args.k, args.shards, args.repeats)
        print(f"assign stage vs bare load+search+write: {fmt(st['stage_vs_bare_io'])}")
        print(f"assign stage vs bare search only:      {fmt(st['stage_vs_bare_search_only'])}")
    cmd = "python -m benchmarks.bench_cluster " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("unbalanced",)) + (
        " --unbalanced" if args.unbalanced else "")
    record("cluster", result, cmd)


if __name__ == "__main__":
    main()
