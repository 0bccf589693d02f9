"""Images for self-supervised training and linear evaluation, and the SimCLR / MoCo v3 augmentations.

Sources (``ssl.data``):

* an ImageNet-layout folder: ``<root>/train/<class>/*.JPEG`` (labels are unused for training; the
  linear evaluation reads ``train/`` and ``val/`` with labels from the sorted class folder names);
  a folder of class folders without ``train/`` is read as the training split itself;
* webdataset shards of images (a brace list, a folder of tars or MoDE's sharded pattern, as
  ``data.train``): every member with an image extension; a ``.cls`` member gives the label.

Sample ``i`` of the listing is image id ``i`` (the row of SogCLR's u table). The two views of a visit
are drawn with a torch RNG seeded by ``(seed, epoch, i)``, so a step decodes to the same tensors on
any rank, worker or resume.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision import transforms

from stages.sources import expand_sources
from training.data import TarIndex

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ImageFile.LOAD_TRUNCATED_IMAGES = True


@dataclass(frozen=True)
class ImageRef:
    """Where one image is: a file, or (tar index position, key, ext)."""

    path: str
    key: str = ""
    ext: str = ""
    label: int = -1


def _folder_images(root: Path) -> tuple[list[ImageRef], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    refs = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        refs += [ImageRef(str(p), label=label) for p in files]
    return refs, classes


def _tar_images(spec: str) -> list[ImageRef]:
    shards, _ = expand_sources(spec)
    refs = []
    for shard in shards:
        index = TarIndex.build(shard.path)
        for key in index.order:
            members = index.members[key]
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), "")
            if ext:
                refs.append(ImageRef(shard.path, key, ext, -2 if "cls" in members else -1))
    return refs


def list_images(source: str, split: str = "train") -> tuple[list[ImageRef], list[str]]:
    """(images, class names) of a source's split; tars have no class names (labels from ``.cls``)."""
    root = Path(source)
    if root.is_dir() and (root / split).is_dir():
        return _folder_images(root / split)
    if root.is_dir() and not any(root.rglob("*.tar")):
        return _folder_images(root)
    refs = _tar_images(source)
    if not refs:
        raise FileNotFoundError(f"ssl.data: no images in {source}")
    return refs, []


class ImageReader:
    """Decodes an :class:`ImageRef` (tar indexes are built lazily per process and cached)."""

    def __init__(self) -> None:
        self._tars: dict[str, TarIndex] = {}

    def bytes_and_label(self, ref: ImageRef) -> tuple[bytes, int]:
        """Encoded image and label (-1 when unknown)."""
        if not ref.key:
            return Path(ref.path).read_bytes(), ref.label
        index = self._tars.get(ref.path)
        if index is None:
            index = self._tars[ref.path] = TarIndex.build(ref.path)
        members = index.read(ref.key)
        label = int(members["cls"].decode().strip()) if "cls" in members else ref.label
        return members[ref.ext], label

    def image(self, ref: ImageRef) -> tuple[Image.Image, int]:
        """RGB image and label."""
        data, label = self.bytes_and_label(ref)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), label


def two_view_transforms(size: int, crop_min: float) -> tuple[transforms.Compose, transforms.Compose]:
    """MoCo v3 / SogCLR's asymmetric augmentations (blur p=1.0 / 0.1, solarize only in view 2)."""
    normalize = transforms.Normalize(MEAN, STD)
    kernel = 2 * max(1, round(0.05 * size)) + 1  # SimCLR: ~10 % of the image side

    def build(blur_p: float, solarize_p: float) -> transforms.Compose:
        ops = [
            transforms.RandomResizedCrop(size, scale=(crop_min, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        ]
        if solarize_p:
            ops.append(transforms.RandomSolarize(128, p=solarize_p))
        ops += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
        return transforms.Compose(ops)

    return build(1.0, 0.0), build(0.1, 0.2)


def eval_transform(size: int) -> transforms.Compose:
    """Resize to size * 256/224, centre crop, normalise (the linear-evaluation transform)."""
    return transforms.Compose(
        [
            transforms.Resize(int(round(size * 256 / 224))),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


class TwoViewDataset(Dataset):
    """``(view_a, view_b, index)`` per image; augmentation seeded by ``(seed, epoch, index)``."""

    def __init__(self, refs: list[ImageRef], size: int, crop_min: float, seed: int) -> None:
        self.refs, self.seed, self.epoch = refs, seed, 0
        self.aug_a, self.aug_b = two_view_transforms(size, crop_min)
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = item
        image, _ = self.reader.image(self.refs[index])
        state = torch.get_rng_state()
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        try:
            return self.aug_a(image), self.aug_b(image), index
        finally:
            torch.set_rng_state(state)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's ``(epoch, index)`` items from global step ``start``: per epoch a permutation seeded
    by ``(seed, epoch)``, cut into global batches (last partial batch dropped); rank r takes rows
    ``[r b, (r+1) b)`` of each. The same global batches for any number of ranks."""

    def __init__(self, size: int, global_batch: int, rank: int, world: int, seed: int, start: int) -> None:
        if global_batch % world:
            raise ValueError(f"ssl.batch_size: {global_batch} is not divisible by {world} processes")
        self.steps_per_epoch = size // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"ssl.batch_size: {global_batch} is larger than the {size} training images")
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.start = seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step, local = self.start, self.global_batch // self.world
        while True:
            epoch, pos = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            for s in range(pos, self.steps_per_epoch):
                lo = s * self.global_batch + self.rank * local
                for index in order[lo : lo + local].tolist():
                    yield epoch, index
            step = (epoch + 1) * self.steps_per_epoch
