"""A loaded CLIP model for evaluation: open_clip model, eval transform, tokenizer, batched encoding."""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.safeload import LOAD_ERRORS, UnreadableFileError, first_line, refuse_message
from training.models import register_model_configs


@dataclass
class ClipBundle:
    """A loaded open_clip model with its eval transform and tokenizer (no_grad, not inference_mode: the
    training-time evaluator encodes with the live model, which trains on afterwards)."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    device: torch.device
    autocast: Callable[[], Any] = contextlib.nullcontext
    """Context-manager factory around forward passes (mixed precision during training)."""

    @torch.no_grad()
    def encode_images(self, images: Iterable[Image.Image], batch_size: int) -> torch.Tensor:
        """L2-normalised float32 image embeddings ``[N, D]`` on the CPU."""
        out = [self._image_batch(torch.stack([self.preprocess(img) for img in batch])) for batch in _batches(images, batch_size)]
        if not out:
            raise ValueError("no readable images in the task")
        return torch.cat(out)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Like :meth:`encode_images` for images already through ``preprocess`` (``[N, 3, H, W]``)."""
        if not len(pixels):
            raise ValueError("no readable images in the task")
        return torch.cat([self._image_batch(pixels[lo : lo + batch_size]) for lo in range(0, len(pixels), batch_size)])

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        """L2-normalised float32 text embeddings ``[N, D]`` on the CPU."""
        out = []
        for lo in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[lo : lo + batch_size])).to(self.device)
            with self.autocast():
                features = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        if not out:
            raise ValueError("no texts to encode")
        return torch.cat(out)

    def _image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            features = self.model.encode_image(pixels.to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_clip(arch: str, checkpoint: Path | str | None, device: torch.device, owner: str = "ensemble") -> ClipBundle:
    """Load ``checkpoint`` (a ``final.pt``; None: random init) into the open_clip architecture
    ``arch`` (eval mode, fp32).

    Raises:
        ValueError: ``arch`` is not a known open_clip model name.
        UnreadableFileError: the checkpoint cannot be loaded safely into ``arch``.
    """
    import open_clip

    register_model_configs()
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        raise ValueError(f"train.model: '{arch}' is not a registered open_clip model config")
    pretrained = str(checkpoint) if checkpoint else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device, weights_only=True
        )
    except pickle.UnpicklingError:
        raise UnreadableFileError(refuse_message(owner, Path(str(checkpoint)))) from None
    except LOAD_ERRORS as exc:
        reason = first_line(exc)
        raise UnreadableFileError(f"{owner}: cannot load {checkpoint} into '{arch}': {reason}") from None
    model.eval()
    return ClipBundle(model, preprocess, _tokenizer(arch), device)


@functools.cache
def _tokenizer(arch: str) -> Any:
    """One tokenizer per architecture and process (building the BPE tables takes ~1 s)."""
    import open_clip

    return open_clip.get_tokenizer(arch)
