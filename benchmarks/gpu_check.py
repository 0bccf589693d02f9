"""GPU figures that the CPU machine cannot measure, in one script (``make bench-gpu``).

    python -m benchmarks.gpu_check [--quick]

Never run yet (no GPU was available when it was written). Each part is independent, prints its
figures and appends one ``gpu`` line to ``benchmarks/results.jsonl`` (a part that fails records
its error instead of stopping the others); ``python -m benchmarks.make_docs`` then puts them in
docs/benchmarks.md. Parts:

1. ``fit``: balanced fine fit 1M×768 → 1024 (``--quick``: 200k) on the GPU, paired against our
   unbalanced torch k-means on the GPU and, when the faiss GPU build is installed, faiss.Kmeans
   on the GPU; same iterations; inertia ratio; sizes under nearest assignment.
2. ``assign``: assign_nearest (auto → torch on GPU) vs faiss GPU / torch, pairs/s.
3. ``embed``: ``benchmarks/bench_embed.py --device cuda`` (stage vs bare encode, fp32 / bf16).
4. ``train``: ``benchmarks/bench_train.py --device cuda --model ViT-B-32 --precision amp_bf16``
   (ours vs open_clip_train, steady and whole-process samples/s), plus MFU = 3 × forward FLOPs
   per sample (counted with ``torch.utils.flop_counter`` on one batch) × samples/s ÷ the GPU's
   dense bf16 peak (``--peak-tflops``, default 989 for H100/H200 SXM).
5. ``ddp``: the seed model trained by ``torchrun --nproc_per_node 2`` (NCCL) on the one GPU vs
   one process, same global batch, same steps: loss curves and samples/s. NCCL refuses two
   ranks on one device in most versions ("Duplicate GPU detected"); that outcome is recorded.

The pytest part (tests marked ``gpu``) runs from the Makefile target before this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.paired import fmt, paired, record

REPO = Path(__file__).resolve().parents[1]


def part_fit(args: argparse.Namespace) -> dict:
    from benchmarks.bench_cluster import make_data
    from stages import clustering as kmeans

    n = 200_000 if args.quick else 1_000_000
    x = make_data(n, 768, 4000, 0)
    k, iters = 1024, 20

    def ours():
        r = kmeans.fit_kmeans(x, k, balanced=True, max_iter=iters, tol=0.0, device="cuda")
        torch.cuda.synchronize()
        return r

    def torch_unbalanced():
        r = kmeans.fit_kmeans(x, k, balanced=False, max_iter=iters, tol=0.0, device="cuda")
        torch.cuda.synchronize()
        return r

    out: dict = {"n": n, "dim": 768, "k": k, "iters": iters}
    run = paired(ours, torch_unbalanced, args.repeats)
    out["balanced_vs_torch_unbalanced_gpu"] = run.summary()
    ids, dist = kmeans.assign_nearest(x, run.ours_out.centers, device="cuda")
    sizes = torch.bincount(ids, minlength=k)
    out["ours_nearest_sizes"] = {"max": int(sizes.max()), "min": int(sizes.min()), "empty": int((sizes == 0).sum())}
    _, dist_u = kmeans.assign_nearest(x, run.peer_out.centers, device="cuda")
    out["inertia_ratio_vs_torch_unbalanced"] = float(dist.double().pow(2).sum() / dist_u.double().pow(2).sum())
    from stages.clustering.faiss_backend import faiss

    if faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        run_f = paired(ours, lambda: kmeans.fit_faiss_kmeans(x, k, niter=iters, gpu=True), args.repeats)
        out["balanced_vs_faiss_gpu"] = run_f.summary()
    else:
        out["faiss_gpu"] = "not installed (pip install faiss-gpu-cu12): compared with torch k-means only"
    print("fit:", fmt(out["balanced_vs_torch_unbalanced_gpu"]), flush=True)
    return out


def part_assign(args: argparse.Namespace) -> dict:
    from benchmarks.bench_cluster import make_data
    from stages import clustering as kmeans

    x = make_data(200_000 if args.quick else 1_000_000, 768, 4000, 1)
    c = x[:1024].clone()
    pairs = x.shape[0] * c.shape[0]

    def auto():
        out = kmeans.assign_nearest(x, c, backend="auto", device="cuda")
        torch.cuda.synchronize()
        return out

    def cpu_faiss():
        return kmeans.assign_nearest(x, c, backend="faiss")

    return {"auto_gpu_vs_faiss_cpu": paired(auto, cpu_faiss, args.repeats).summary(pairs, "pairs/s"),
            "auto_backend_cuda": kmeans.auto_backend("cuda")}


def _sub(cmd: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def part_embed(args: argparse.Namespace) -> dict:
    out = _sub([sys.executable, "-m", "benchmarks.bench_embed", "--device", "cuda", "--captions",
                "16384" if args.quick else "65536", "--batch-size", "1024", "--repeats", str(args.repeats)], 1800)
    return {"stdout_tail": out[-1500:]}


def forward_flops(model_name: str, batch: int) -> float:
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model(model_name).cuda()
    image = torch.randn(batch, 3, 224, 224, device="cuda")
    text = torch.randint(0, 49408, (batch, 77), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        model(image, text)
    return counter.get_total_flops() / batch


def part_train(args: argparse.Namespace) -> dict:
    steps = 60 if args.quick else 200
    out = _sub([sys.executable, "-m", "benchmarks.bench_train", "--device", "cuda", "--model", "ViT-B-32",
                "--precision", "amp_bf16", "--batch-size", "256", "--workers", "8", "--steps", str(steps),
                "--threads", "8", "--repeats", str(args.repeats), "--pairs", "4096"], 3600)
    last = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    per_sample = forward_flops("ViT-B-32", 32)
    res: dict = {"forward_gflops_per_sample": per_sample / 1e9, "peak_tflops": args.peak_tflops}
    for threads, row in last["threads"].items():
        for fig in ("steady", "whole"):
            for side in ("ours", "peer"):
                rate = row[fig][f"{side}_rate_median"]
                res[f"mfu_{fig}_{side}_t{threads}"] = 3 * per_sample * rate / (args.peak_tflops * 1e12)
    return res


def part_ddp(args: argparse.Namespace) -> dict:
    from pipeline.config import dump_yaml
    from training.synthetic import make_synthetic_run

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_synthetic_run(root, num_shards=8, per_shard=1024, image_size=64, with_txt=True, overrides=[
            "train.model=mode-tiny-vit", "train.precision=amp_bf16", "train.batch_size=128", "train.steps=100",
            "train.seed_steps=100", "train.log_every=10", "train.eval_every=0", "train.device=cuda",
            "train.data_split=shards"])
        config = root / "config.yaml"
        config.write_text(dump_yaml(run.cfg))
        for nproc in (1, 2):
            cmd = ["torchrun", f"--nproc_per_node={nproc}", "-m", "training.main", "--config", str(config),
                   "--expert", "seed", "--quiet", "--set", f"run.root={root}/ddp{nproc}"]
            env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "0"}
            began = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
            res[f"nproc{nproc}"] = {"rc": proc.returncode, "wall_s": time.perf_counter() - began,
                                    "stderr_tail": proc.stderr[-800:] if proc.returncode else ""}
            metrics = list((root / f"ddp{nproc}").rglob("metrics.jsonl"))
            if metrics:
                rows = [json.loads(x) for x in metrics[0].read_text().splitlines()]
                res[f"nproc{nproc}"]["loss"] = [r.get("loss") for r in rows if "loss" in r]
                res[f"nproc{nproc}"]["samples_per_s"] = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return res


PARTS = {"fit": part_fit, "assign": part_assign, "embed": part_embed, "train": part_train, "ddp": part_ddp}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (fits a short device session)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    failed = 0
    for name in args.parts.split(","):
        began = time.perf_counter()
        try:
            payload = {"part": name, **PARTS[name](args)}
        except Exception:  # noqa: BLE001 - record and go on with the other parts
            failed += 1
            payload = {"part": name, "error": traceback.format_exc()[-3000:]}
        payload["part_wall_s"] = time.perf_counter() - began
        record("gpu", payload, f"python -m benchmarks.gpu_check --parts {name}" + (" --quick" if args.quick else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
