"""open_clip models and tokenizers by name, including the tiny configs of ``training/model_configs``.

Importing this module registers our JSON model configs with open_clip (``mode-tiny-vit``,
``mode-tiny-rn``, ``mode-micro-vit``), so any code that imports it (the trainer, the ensemble
stage, a notebook) can do ``open_clip.create_model_and_transforms("mode-tiny-vit",
pretrained="runs/demo/train/expert_0/final.pt")``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.safeload import LOAD_ERRORS, first_line, refuse_message

log = logging.getLogger("training")

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
"""Our open_clip model configs (one ``<name>.json`` per model)."""


def register_model_configs() -> list[str]:
    """Register ``training/model_configs/*.json`` with open_clip (idempotent).

    Returns:
        The names of our model configs.
    """
    names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    if any(name not in open_clip.list_models() for name in names):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return names


register_model_configs()


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger chatter (INFO lines, "no pretrained weights" for random init)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass
class ModelBundle:
    """A model with the transforms and tokenizer that belong to it."""

    model: nn.Module
    train_transform: Callable
    val_transform: Callable
    tokenizer: Callable
    name: str


def check_model_name(name: str) -> None:
    """Raise ValueError with the known names when ``name`` is not an open_clip model config."""
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return
    ours = ", ".join(register_model_configs())
    raise ConfigError(f"train.model: unknown open_clip model '{name}' (ours: {ours}; or ViT-B-32, RN50, ...)")


def create_model(
    name: str, pretrained: str = "", device: torch.device | str = "cpu", key: str = "train.pretrained"
) -> ModelBundle:
    """Build an open_clip model (random init, or weights from a local file) with its transforms.

    Args:
        name: open_clip model name (``ViT-B-32``, ``mode-tiny-vit``, ``local-dir:/path``...).
        pretrained: Local checkpoint (state dict, or a dict with ``state_dict``); empty for random init.
        device: Where the model goes.
        key: The config key ``pretrained`` came from (named in errors).

    Returns:
        The model in train mode, open_clip's train/val transforms and the tokenizer.

    Raises:
        ConfigError: the file is missing, unsafe (a pickle that could run code), unreadable, or
            holds weights of another architecture.
    """
    check_model_name(name)
    if pretrained and not Path(pretrained).is_file():
        raise ConfigError(f"{key}: no such file {pretrained} (no downloads: give a local file)")
    with quiet_open_clip():
        try:
            model, train_tf, val_tf = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device, weights_only=True
            )
        except pickle.UnpicklingError:
            raise ConfigError(refuse_message(key, pretrained)) from None
        except LOAD_ERRORS as exc:
            if not pretrained:
                raise
            raise ConfigError(f"{key}: cannot load {pretrained} into '{name}': {first_line(exc)}") from None
        tokenizer = open_clip.get_tokenizer(name)
    return ModelBundle(model, train_tf, val_tf, tokenizer, name)


def parse_teacher(spec: str) -> tuple[str, str]:
    """Split ``<model name>:<checkpoint path>`` (the path follows the last colon)."""
    name, sep, path = spec.rpartition(":")
    if not sep or not name or not path:
        raise ConfigError(f"train.teacher: expected '<model>:<checkpoint path>', got '{spec}'")
    return name, path


def create_teacher(spec: str, device: torch.device | str) -> ModelBundle:
    """Load the frozen reference model of ``train.teacher`` (eval mode, no gradients)."""
    name, path = parse_teacher(spec)
    if not Path(path).is_file():
        raise ConfigError(f"train.teacher: no such checkpoint {path}")
    bundle = create_model(name, path, device, key="train.teacher")
    bundle.model.eval().requires_grad_(False)
    return bundle


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
