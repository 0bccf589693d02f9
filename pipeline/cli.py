"""One command line for every stage: ``python -m pipeline <command> --config configs/<name>.yaml``.

``main(argv)`` is callable in-process (tests do), returns an exit code, and prints one clear line
for configuration and input errors instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from pipeline.config import PipelineConfig, add_config_args, load_config
from pipeline.errors import ConfigError, CorruptArtifactError, StageError
from pipeline.lineage import remember_invocation, suggest
from pipeline.runner import STAGE_MODULES, run_stage, stage_status

log = logging.getLogger("pipeline")

DEFAULT_CONFIG = "configs/demo.yaml"
RUN_ORDER = ["prep", "embed", "cluster", "assign", "train", "ensemble"]


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p, default=DEFAULT_CONFIG)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--launcher",
        choices=["local", "torchrun", "slurm"],
        default=None,
        help="override launcher.kind (slurm submits submitit jobs; torchrun: train only)",
    )


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="redo shards made with another config/inputs")
    p.add_argument("--shards", default=None, metavar="LO:HI", help="only run shards [LO, HI) of the listing")
    p.add_argument("--workers", type=int, default=None, help="process-pool size (default run.workers)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="generate the embedded demo dataset")
    _common(p)
    for name, help_text in [
        ("prep", "captions + pair ids → Parquet"),
        ("embed", "caption features (sentence-transformers)"),
        ("cluster", "fine balanced k-means, coarse experts"),
        ("assign", "nearest fine centre for every pair"),
        ("ensemble", "evaluate experts, route, report"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _common(p)
        _stage_args(p)
    p = sub.add_parser("train", help="train the seed model or a data expert")
    _common(p)
    p.add_argument("--expert", default="0", help="k, seed, experts, baselines, all or a run name (default 0)")
    p.add_argument("--resume", default="latest", help="'latest' (default), 'none' or a checkpoint path")
    p.add_argument("--force", action="store_true", help="retrain from scratch (same as --resume none)")
    p = sub.add_parser("add-experts", help="new experts: cluster the shards no clustering has seen (growth)")
    _common(p)
    p.add_argument("--num-experts", type=int, default=1, help="experts to add (default 1)")
    p.add_argument("--num-fine", type=int, default=None, help="their fine centres (default cluster.num_fine)")
    p = sub.add_parser("ssl", help="self-supervised image training (SogCLR dcl / SimCLR), docs/ssl.md")
    _common(p)
    p.add_argument("--resume", default="latest", help="'latest' (default), 'none' or a checkpoint path")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    p = sub.add_parser("linear-eval", help="linear evaluation of SSL backbones on cached frozen features")
    _common(p)
    p.add_argument("--runs", nargs="+", default=None, help="ssl run names, checkpoint paths or 'random'")
    p = sub.add_parser("linear-probe", help="linear probe of the experts' concatenated features vs dense")
    _common(p)
    p = sub.add_parser("run", help="every stage in order, skipping finished work")
    _common(p)
    p.add_argument("--until", choices=RUN_ORDER, default="ensemble", help="last stage to run")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("shard", help="convert a CSV or an image folder into webdataset tars")
    _common(p)
    p.add_argument("--input", required=True, help="a .csv/.tsv (OpenCLIP columns) or a folder of images + .txt/.json")
    p.add_argument("--out", required=True, help="output folder for 000000.tar, 000001.tar, ...")
    p.add_argument("--max-size-mb", type=float, default=1000.0, help="size target per shard (default 1000)")
    p.add_argument("--max-count", type=int, default=10000, help="pairs per shard at most (default 10000)")
    p.add_argument("--csv-separator", default=None, help="default prep.csv_separator")
    p.add_argument("--csv-img-key", default=None, help="default prep.csv_img_key")
    p.add_argument("--csv-caption-key", default=None, help="default prep.csv_caption_key")
    p.add_argument("--force", action="store_true", help="overwrite tars already in --out")
    p = sub.add_parser("status", help="what is done, counts, what is stale")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _eval_args(sub.add_parser("eval", help="score an open_clip checkpoint or a run's models on task folders (JSON)"))
    return parser


def _eval_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="open_clip model name or model config .json")
    who.add_argument("--run", help="a run folder: scores its seed, experts and baselines (train/*/final.pt)")
    p.add_argument("--pretrained", default=None, help="local checkpoint for --model (default: random init)")
    p.add_argument("--tasks", nargs="+", default=[], help="task folders or folders of tasks (default data.eval_root)")
    p.add_argument("--output", default=None, help="also write the results as one JSON list to this file")


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--shards {text}: expected LO:HI") from None
    return lo, hi


def cmd_demo_data(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Generate the demo data set (idempotent)."""
    from pipeline.demo import generate_demo_data

    d = cfg.demo_data
    summary = generate_demo_data(
        Path(d.out),
        num_pairs=d.num_pairs,
        image_size=d.image_size,
        pairs_per_shard=d.pairs_per_shard,
        eval_per_class=d.eval_per_class,
        retrieval_pairs=d.retrieval_pairs,
        seed=cfg.run.seed,
        workers=cfg.run.workers,
        domains=tuple(d.domains),
        progress=not args.quiet,
    )
    print(f"demo data: {summary['train']['num_pairs']} pairs in {d.out}")
    return 0


def cmd_stage(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Run one sharded/global stage with the configured launcher."""
    kind = args.launcher or cfg.launcher.kind
    if kind == "slurm":
        from pipeline.launch import submit_stage

        submit_stage(cfg, args.command, force=args.force, config_path=args.config)
        return 0
    summary = run_stage(
        cfg,
        args.command,
        force=args.force,
        shard_range=_parse_range(args.shards),
        workers=args.workers,
        progress=not args.quiet,
    )
    if summary["ran"] == 0 and "manifest" in summary:
        print(f"{args.command}: nothing to do ({summary['skipped']} shard(s) already done)")
    else:
        print(f"{args.command}: ran {summary['ran']} shard(s), skipped {summary['skipped']}")
    return 0


def cmd_train(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Train in this process (one rank); DDP runs go through ``torchrun -m training.main``."""
    kind = args.launcher or cfg.launcher.kind
    if args.force:
        args.resume = "none"
    if kind == "slurm":
        from training.launch import submit_train

        submit_train(cfg, args.expert, args.config, args.overrides, resume=args.resume)
        return 0
    if kind == "torchrun":
        from training.launch import train_command

        return _launch_torchrun(train_command(cfg, args.config, args.expert, args.overrides, resume=args.resume))
    from training.main import train_experts

    train_experts(cfg, args.expert, resume=args.resume, progress=not args.quiet)
    return 0


def _launch_torchrun(cmd: list[str]) -> int:
    """Run a torchrun command with this environment's ``torchrun``; returns its exit code."""
    import subprocess

    cmd = [str(Path(sys.executable).with_name("torchrun")), *cmd[1:]]
    print("launching: " + shlex.join(cmd))
    return subprocess.call(cmd)


def cmd_ssl(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Self-supervised training in this process; ``--launcher torchrun|slurm`` for DDP."""
    kind = args.launcher or cfg.launcher.kind
    if kind == "slurm":
        from training.ssl.main import submit_ssl

        submit_ssl(cfg, resume=args.resume)
        return 0
    if kind == "torchrun":
        from pipeline.launch import torchrun_command

        ssl_args = ["--config", args.config, "--resume", args.resume]
        nproc = cfg.launcher.nproc_per_node
        return _launch_torchrun(torchrun_command("training.ssl.main", ssl_args, args.overrides, nproc_per_node=nproc))
    from training.ssl.main import train_ssl

    train_ssl(cfg, resume=args.resume, progress=not args.quiet, stop_at_step=args.stop_at_step)
    return 0


def cmd_linear_eval(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Linear evaluation; prints one line per model and task."""
    from training.ssl.linear import run_linear_eval

    for row in run_linear_eval(cfg, args.runs):
        print(f"{row['model']:<14} {row['task']:<10} top1 {row['top1']:6.2f}  top5 {row['top5']:6.2f}")
    return 0


def cmd_linear_probe(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """MoDE Table 9: linear probe of the experts' concatenated image features vs the dense model."""
    from ensemble.linear_probe import run_linear_probe

    for row in run_linear_probe(cfg, progress=not args.quiet):
        print(f"{row['model']:<16} {row['task']:<10} top1 {row['top1']:6.2f}  top5 {row['top5']:6.2f}")
    return 0


def cmd_eval(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """clip_benchmark-style JSON scores of checkpoints on task folders (training/evaluation/command.py)."""
    from training.evaluation.command import run_eval

    run_eval(cfg, model=args.model, pretrained=args.pretrained, tasks=args.tasks, run=args.run, output=args.output)
    return 0


def cmd_run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Every stage in order up to ``--until``; finished work is skipped."""
    if cfg.launcher.kind == "slurm":
        raise StageError(
            "run: launcher.kind is slurm; submit stages one by one (make prep LAUNCHER=slurm, ...), "
            "see docs/cluster.md, or pass --launcher local"
        )
    for stage in RUN_ORDER[: RUN_ORDER.index(args.until) + 1]:
        if stage == "train":
            from training.main import train_experts

            train_experts(cfg, "all", resume="latest", progress=not args.quiet)  # seed first, then the rest
            continue
        run_stage(cfg, stage, force=args.force, progress=not args.quiet)
    return 0


def cmd_shard(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Convert a CSV file or an image folder into webdataset tars (``stages/shard.py``)."""
    from stages.shard import write_shards

    summary = write_shards(
        args.input,
        args.out,
        max_size_mb=args.max_size_mb,
        max_count=args.max_count,
        csv_separator=args.csv_separator or cfg.prep.csv_separator,
        csv_img_key=args.csv_img_key or cfg.prep.csv_img_key,
        csv_caption_key=args.csv_caption_key or cfg.prep.csv_caption_key,
        force=args.force,
        progress=not args.quiet,
    )
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    print(f"shard: {summary['num_pairs']} pairs in {summary['num_shards']} tar(s); skipped: {skipped}")
    if summary["data_train"]:
        print(f"train on them with: --set data.train='{summary['data_train']}'")
    return 0


def cmd_status(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Print per-stage progress from the completion records."""
    from training.main import training_status  # the CLI dispatch may import training (lazily)

    rows = [stage_status(cfg, name) for name in STAGE_MODULES]
    rows[-1:-1] = training_status(cfg)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"run: {cfg.run_dir}")
    for row in rows:
        done = row.get("shards_done")
        progress = f"{done}/{row['shards_total']}" if done is not None else ""
        extra = f"  stale={row['stale']}" if row.get("stale") else ""
        counts = row.get("counts") or {}
        out = f"  out={counts['out']}" if "out" in counts else ""
        detail = f"  {row['detail']}" if row.get("detail") else ""
        detail += f"  ({row['note']})" if row.get("note") else ""
        print(f"  {row['stage']:<16} {row['state']:<12} {progress:>11}{out}{extra}{detail}")
    _print_slurm_jobs(cfg)
    return 0


def cmd_add_experts(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Fit a new generation of experts on the grown data (docs/growth.md, "New experts")."""
    from stages.generations import add_experts

    num_fine = cfg.cluster.num_fine if args.num_fine is None else args.num_fine
    done = add_experts(cfg, args.num_experts, num_fine)
    ids = ", ".join(map(str, done["experts"]))
    print(
        f"add-experts: generation {done['generation']}: expert(s) {ids} with {done['num_fine']} fine centres "
        f"fitted on {done['pairs']} pairs of {len(done['shards'])} new shard(s); the run has "
        f"{done['total_experts']} experts. Next: {suggest(cfg, 'assign')}, then "
        f"{suggest(cfg, 'train --expert all')}"
    )
    return 0


def _print_slurm_jobs(cfg: PipelineConfig) -> None:
    """The latest SLURM jobs of every stage as squeue/sacct report them (nothing without SLURM)."""
    from pipeline.slurm import slurm_jobs

    jobs = slurm_jobs(cfg)
    if jobs:
        print("slurm jobs (latest submission per stage, from squeue/sacct):")
    for job in jobs:
        print(f"  {job['stage']:<10} {job['job_id']:<12} {job['state']:<11} {job['reason']:<12} {job['label']}")
        if job["error"]:
            print(f"      error: {job['error']}")
        if job["failed"]:
            print(f"      log: {job['log']}")


COMMANDS = {
    "add-experts": cmd_add_experts,
    "demo-data": cmd_demo_data,
    "train": cmd_train,
    "ssl": cmd_ssl,
    "linear-eval": cmd_linear_eval,
    "linear-probe": cmd_linear_probe,
    "eval": cmd_eval,
    "run": cmd_run,
    "status": cmd_status,
    "shard": cmd_shard,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss", "matplotlib", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = remember_invocation(load_config(args.config, args.overrides), args.config, args.overrides)
        if getattr(args, "launcher", None):
            cfg.launcher.kind = args.launcher
        handler = COMMANDS.get(args.command, cmd_stage)
        return handler(cfg, args)
    except (ConfigError, StageError, FileNotFoundError, CorruptArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
