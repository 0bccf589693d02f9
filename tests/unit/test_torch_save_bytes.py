"""Saved torch artifacts are byte-identical whatever their temporary file name (content digests
of identical runs must agree: lineage, SLURM-vs-local comparisons)."""

from __future__ import annotations

import torch

from pipeline import artifacts


def test_same_object_same_bytes_under_different_names(tmp_path):
    obj = {"center": torch.arange(12.0).view(3, 4), "assign": torch.tensor([0, 1, 1])}
    for name in ("a.pth", ".fine_centers.pth.x1y2.tmp"):
        with artifacts.atomic_path(tmp_path / name) as tmp:
            artifacts.torch_save(obj, tmp)
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / ".fine_centers.pth.x1y2.tmp").read_bytes()
    assert artifacts.content_digest(tmp_path / "a.pth") == artifacts.content_digest(tmp_path / ".fine_centers.pth.x1y2.tmp")
    assert torch.equal(torch.load(tmp_path / "a.pth", weights_only=True)["center"], obj["center"])
