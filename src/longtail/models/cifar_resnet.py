"""CIFAR ResNets of LDAM-DRW (`models/resnet_cifar.py`, He et al. 2016 Sec. 4.2).

Depth 6n+2 with BasicBlocks x[n, n, n] and widths 16/32/64; option-A shortcuts
(x[:, :, ::2, ::2] zero-padded by planes//4 channels on each side, no parameters) where
the stride or width changes; kaiming_normal_ on every Conv2d and Linear weight.
ResNet-32 (n = 5) has 464,154 parameters with a 10-class linear head.
Parameter names match the official code (conv1, bn1, layer1..3, linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .base import Classifier
from .heads import build_head


class _ShortcutA(nn.Module):
    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    head_name = "linear"

    def __init__(self, *, depth: int = 32, num_classes: int = 10, in_channels: int = 3, head: str = "linear"):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = 64
        self.linear = build_head(head, in_features=64, num_classes=num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(images)))
        return self.layer3(self.layer2(self.layer1(out)))


def _register(depth: int) -> None:
    def build(*, num_classes: int, in_channels: int = 3, head: str = "linear") -> CifarResNet:
        return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels, head=head)

    build.__doc__ = f"CIFAR ResNet-{depth} (LDAM-DRW, option-A shortcuts, widths 16/32/64)."
    MODELS.register(f"resnet{depth}")(build)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
