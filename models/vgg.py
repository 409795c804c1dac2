"""A small VGG-style network: 3x3 conv + BN + ReLU blocks with max pooling."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGGSmall", "vgg_small"]

# channels per conv; "M" is a 2x2 max pool
_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, cfg=_CFG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def vgg_small(num_classes: int = 10, in_channels: int = 1) -> VGGSmall:
    return VGGSmall(num_classes=num_classes, in_channels=in_channels)
