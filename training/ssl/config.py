"""Config sections of self-supervised image training (``ssl``) and linear evaluation (``linear_eval``).

No torch import here: ``pipeline.config`` includes these sections. The SogCLR README's flags map to
keys as follows: ``--lr`` → ``lr``, ``--epochs`` → ``epochs``, ``--batch-size`` → ``batch_size``
(global, over all ranks), ``--learning-rate-scaling`` → ``learning_rate_scaling``, ``--loss_type`` →
``loss_type``, ``--gamma`` → ``gamma``, ``--crop-min`` → ``crop_min``, ``--wd`` → ``wd``,
``--workers`` → ``workers``, ``--data_name`` → ``data_name``, ``--data`` → ``data``, ``--save_dir`` →
``save_dir``, ``--print-freq`` → ``print_freq``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    precision: Literal["auto", "fp32", "amp_bf16", "amp"] = "auto"
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
