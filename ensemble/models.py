"""The trained CLIP models of a run (data experts, the seed, the baselines) and batched encoding."""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.config import PipelineConfig
from pipeline.errors import UnreadableFileError
from pipeline.safeload import LOAD_ERRORS, first_line, refuse_message
from training.models import register_model_configs

log = logging.getLogger("pipeline")

SEED = "seed"


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the run."""

    name: str
    """Run name (``expert_<k>``, ``seed``, ``dense``, ``random_split_<k>``...): the output file stem."""
    column: str
    """Report column of the model alone: ``expert-<k>``, ``seed``, ``dense``..."""
    path: Path
    """Its ``final.pt``."""
    expert: int | None
    """Expert index, or None for the seed and baseline models."""


def train_dir(cfg: PipelineConfig) -> Path:
    """``<run>/train``."""
    return cfg.run_dir / "train"


def expert_spec(cfg: PipelineConfig, k: int) -> ModelSpec:
    """Expert ``k``'s model."""
    return ModelSpec(f"expert_{k}", f"expert-{k}", train_dir(cfg) / f"expert_{k}" / "final.pt", k)


def seed_spec(cfg: PipelineConfig) -> ModelSpec:
    """The dense seed model the experts branch from (reported as ``seed``)."""
    return ModelSpec(SEED, SEED, train_dir(cfg) / SEED / "final.pt", None)


def run_spec(cfg: PipelineConfig, name: str) -> ModelSpec:
    """A baseline run's model (``dense``, ``random_split_<k>``...)."""
    return ModelSpec(name, name, train_dir(cfg) / name / "final.pt", None)


def baseline_systems(cfg: PipelineConfig, num_experts: int) -> dict[str, list[str]]:
    """``{system: [run names]}`` of the baselines in the report: the configured ones (all required)
    and any other whose runs are all trained."""
    from training.runs import BASELINES, baseline_members

    systems = {}
    for name in BASELINES:
        members = baseline_members(name, num_experts)
        if name in cfg.train.baselines or all(run_spec(cfg, m).path.is_file() for m in members):
            systems[name] = members
    return systems


def model_specs(cfg: PipelineConfig, num_experts: int) -> list[ModelSpec]:
    """Experts ``0..E-1`` and the configured baselines' runs (all required), the seed model when it
    has a ``final.pt``.

    Raises:
        FileNotFoundError: a model has no ``final.pt`` (one line saying how to train it).
    """
    specs = [expert_spec(cfg, k) for k in range(num_experts)]
    seen = set()
    for members in baseline_systems(cfg, num_experts).values():
        specs += [run_spec(cfg, m) for m in members if m not in seen]
        seen.update(members)
    for spec in specs:
        if not spec.path.is_file():
            target = spec.expert if spec.expert is not None else spec.name
            raise FileNotFoundError(
                f"ensemble: {spec.name} has no {spec.path}; train it with `make train EXPERT={target}`"
            )
    seed = seed_spec(cfg)
    return specs + ([seed] if seed.path.is_file() else [])


@dataclass
class ClipBundle:
    """A loaded open_clip model with its eval transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    device: torch.device

    @torch.inference_mode()
    def encode_images(self, images: Iterable[Image.Image], batch_size: int) -> torch.Tensor:
        """L2-normalised float32 image embeddings ``[N, D]`` on the CPU."""
        out = [self._image_batch(batch) for batch in _batches(images, batch_size)]
        if not out:
            raise ValueError("no readable images in the task")
        return torch.cat(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        """L2-normalised float32 text embeddings ``[N, D]`` on the CPU."""
        out = []
        for lo in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[lo : lo + batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        if not out:
            raise ValueError("no texts to encode")
        return torch.cat(out)

    def _image_batch(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(img) for img in batch]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_clip(arch: str, checkpoint: Path, device: torch.device) -> ClipBundle:
    """Load ``final.pt`` into the open_clip architecture ``arch`` (eval mode, fp32).

    Raises:
        ValueError: ``arch`` is not a known open_clip model name.
    """
    import open_clip

    register_model_configs()
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        raise ValueError(f"train.model: '{arch}' is not a registered open_clip model config")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(checkpoint), device=device, weights_only=True
        )
    except pickle.UnpicklingError:
        raise UnreadableFileError(refuse_message("ensemble", checkpoint)) from None
    except LOAD_ERRORS as exc:
        reason = first_line(exc)
        raise UnreadableFileError(f"ensemble: cannot load {checkpoint} into '{arch}': {reason}") from None
    model.eval()
    return ClipBundle(model, preprocess, _tokenizer(arch), device)


@functools.cache
def _tokenizer(arch: str) -> Any:
    """One tokenizer per architecture and process (building the BPE tables takes ~1 s)."""
    import open_clip

    return open_clip.get_tokenizer(arch)
