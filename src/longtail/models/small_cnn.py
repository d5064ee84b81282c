"""A small CNN for tiny images (scikit-learn digits, MNIST-sized inputs) and quick tests."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import MODELS
from .base import Classifier
from .heads import build_head


def _block(i: int, o: int, norm: str) -> list[nn.Module]:
    if norm == "none":
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True)]
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


@MODELS.register("small_cnn")
class SmallCNN(Classifier):
    """Three 3x3 conv-BN-ReLU layers (width w, 2w, 2w) with one 2x2 max-pool; linear head.

    `norm='none'` drops BatchNorm (convolutions get a bias): a model whose output does not
    depend on how a batch is split, used to test distributed training exactly.
    """

    head_name = "fc"

    def __init__(self, *, num_classes: int, in_channels: int = 1, head: str = "linear", width: int = 32,
                 norm: str = "batch"):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        self.features = nn.Sequential(*_block(in_channels, width, norm), *_block(width, 2 * width, norm),
                                      nn.MaxPool2d(2), *_block(2 * width, 2 * width, norm))
        self.num_features = 2 * width
        self.fc = build_head(head, in_features=self.num_features, num_classes=num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)
