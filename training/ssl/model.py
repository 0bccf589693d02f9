"""Backbone (torchvision or timm, random init) + SogCLR / MoCo v3 projection head."""

from __future__ import annotations

import torch
from torch import nn


def build_backbone(arch: str, small_stem: bool = False) -> tuple[nn.Module, int]:
    """(backbone returning pooled features, feature width); never downloads weights.

    Args:
        arch: torchvision model name (``resnet50``) or ``timm:<name>`` (``timm:resnet18``).
        small_stem: 3x3 stride-1 first conv and no max-pool (CIFAR-style; small images).
    """
    if arch.startswith("timm:"):
        import timm

        model = timm.create_model(arch[5:], pretrained=False, num_classes=0)
        dim = model.num_features
        if small_stem and hasattr(model, "conv1") and isinstance(model.conv1, nn.Conv2d):
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model, dim
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"ssl.arch: {arch!r} is not a torchvision classification model (or use timm:<name>)")
    model = torchvision.models.get_model(arch, weights=None)
    if not hasattr(model, "fc"):
        raise ValueError(f"ssl.arch: {arch!r} has no 'fc' head; use a ResNet-like model or timm:<name>")
    dim = model.fc.in_features
    model.fc = nn.Identity()
    if small_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model, dim


def projection_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int) -> nn.Sequential:
    """MoCo v3 ``_build_mlp`` (SogCLR uses 2 layers): Linear(no bias)-BN-ReLU ..., Linear, BN(affine=False)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


class SSLModel(nn.Module):
    """``backbone`` → ``projector``; ``forward(x)`` returns the projections, ``features(x)`` the
    backbone features the linear evaluation uses."""

    def __init__(self, arch: str, mlp_dim: int, proj_dim: int, small_stem: bool = False) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch, small_stem)
        self.projector = projection_mlp(2, self.feature_dim, mlp_dim, proj_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections [n, proj_dim] (not normalised; the loss normalises)."""
        return self.projector(self.backbone(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [n, feature_dim]."""
        return self.backbone(images)
