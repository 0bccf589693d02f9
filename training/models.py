"""open_clip models and tokenizers by name, including the tiny configs of ``training/model_configs``.

Importing this module registers our JSON model configs with open_clip (``mode-tiny-vit``,
``mode-tiny-rn``, ``mode-micro-vit``), so any code that imports it (the trainer, the ensemble
stage, a notebook) can do ``open_clip.create_model_and_transforms("mode-tiny-vit",
pretrained="runs/demo/train/expert_0/final.pt")``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.safeload import LOAD_ERRORS, first_line

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
    name: str,
    pretrained: str = "",
    device: torch.device | str = "cpu",
    key: str = "train.pretrained",
    *,
    force_patch_dropout: float | None = None,
    force_image_size: int | None = None,
) -> ModelBundle:
    """Build an open_clip model (random init, or weights from a local file) with its transforms.

    Args:
        name: open_clip model name (``ViT-B-32``, ``mode-tiny-vit``, ``local-dir:/path``...).
        pretrained: Local checkpoint (see :func:`read_state_dict`); empty for random init.
        device: Where the model goes.
        key: The config key ``pretrained`` came from (named in errors).
        force_patch_dropout: Override the model config's ``patch_dropout`` (None = keep).
        force_image_size: Override the image tower's input size (None = keep).

    Returns:
        The model in train mode, open_clip's train/val transforms and the tokenizer.

    Raises:
        ConfigError: the file is missing, unsafe (a pickle that could run code), unreadable, or
            holds weights of another architecture (one line naming both).
    """
    check_model_name(name)
    if pretrained and not Path(pretrained).is_file():
        raise ConfigError(f"{key}: no such file {pretrained} (no downloads: give a local file)")
    state = read_state_dict(pretrained, key) if pretrained else None
    with quiet_open_clip():
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            name, pretrained=None, device=device, force_patch_dropout=force_patch_dropout,
            force_image_size=force_image_size,
        )
        tokenizer = open_clip.get_tokenizer(name)
    if state is not None:
        load_weights(model, state, name, pretrained, key)
    return ModelBundle(model, train_tf, val_tf, tokenizer, name)


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict in a local file, read without running code (``weights_only``).

    Accepts a plain state dict, ``open_clip_train``'s checkpoint (``{"epoch", "name", "state_dict",
    "optimizer", ...}`` with DDP's ``module.`` prefixes) and our training checkpoints (``model``).
    """
    from pipeline.errors import UnreadableFileError
    from pipeline.safeload import torch_load

    try:
        obj = torch_load(path, key)
    except UnreadableFileError as exc:
        raise ConfigError(str(exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "step" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key}: {path} holds no open_clip state dict (expected tensors by parameter name)")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A short architecture summary of an open_clip state dict (for mismatch errors)."""

    def layers(prefix: str) -> int:
        found = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
        return len([f for f in found if f.isdigit()])

    parts = []
    conv = state.get("visual.conv1.weight")
    if conv is not None and "visual.positional_embedding" in state:
        tokens = state["visual.positional_embedding"].shape[0] - 1
        side = int(round(tokens**0.5)) * int(conv.shape[-1])
        parts.append(
            f"ViT width {conv.shape[0]} x {layers('visual.transformer.resblocks.')} layers, "
            f"patch {conv.shape[-1]}, {side} px"
        )
    elif conv is not None:
        parts.append(f"ResNet stem width {conv.shape[0]}")
    elif any(k.startswith("visual.trunk.") for k in state):
        parts.append("timm image tower")
    token = state.get("token_embedding.weight")
    if token is not None:
        parts.append(f"text width {token.shape[1]} x {layers('transformer.resblocks.')} layers")
    proj = state.get("text_projection")
    if proj is not None:
        parts.append(f"embed {proj.shape[-1]}")
    return ", ".join(parts) or f"{len(state)} tensors"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: str | Path, key: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is one line naming both architectures."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    state = dict(state)
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != model.logit_scale.ndim:
        state["logit_scale"] = scale.reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(state, model)  # force_image_size / another input size: interpolate
        resize_text_pos_embed(state, model)
    except LOAD_ERRORS:
        pass  # the shape check below reports it
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (
            f"{wrong[0]} is {list(state[wrong[0]].shape)} there, {list(own[wrong[0]].shape)} here"
            if wrong
            else f"{(missing or unexpected)[0]} {'missing' if missing else 'unexpected'}"
        )
        raise ConfigError(
            f"{key}: {path} holds another architecture ({describe_state_dict(state)}) than '{name}' "
            f"({describe_state_dict(own)}): {first}; {len(wrong)} shape mismatch(es), {len(missing)} missing, "
            f"{len(unexpected)} unexpected key(s)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except LOAD_ERRORS as exc:
        raise ConfigError(f"{key}: cannot load {path} into '{name}': {first_line(exc)}") from None


def lock_towers(model: nn.Module, cfg) -> list[str]:
    """OpenCLIP's tower locking from ``train.lock_*`` (``--lock-image``, ``--lock-text``...).

    Returns:
        The names of the parameters left frozen (``requires_grad=False``).
    """
    if cfg.lock_image:
        model.lock_image_tower(
            unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats
        )
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True)
    return [n for n, p in model.named_parameters() if not p.requires_grad]


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
        raise ConfigError(f"train.teacher: no such checkpoint {path} (for the reference model '{name}')")
    bundle = create_model(name, path, device, key="train.teacher")
    bundle.model.eval().requires_grad_(False)
    return bundle


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)
