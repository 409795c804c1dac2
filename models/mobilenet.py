"""A small MobileNet(v1)-style network: depthwise 3x3 + pointwise 1x1 blocks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DepthwiseSeparable", "MobileNetSmall", "mobilenet_small"]

# (out_channels, stride) per depthwise-separable block
_CFG = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2))


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.dw(x)))
        return self.relu2(self.bn2(self.pw(x)))


class MobileNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, cfg=_CFG) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        blocks = []
        c = 16
        for out_ch, stride in cfg:
            blocks.append(DepthwiseSeparable(c, out_ch, stride))
            c = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenet_small(num_classes: int = 10, in_channels: int = 1) -> MobileNetSmall:
    return MobileNetSmall(num_classes=num_classes, in_channels=in_channels)
