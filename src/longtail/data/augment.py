"""Batched augmentation as tensor ops on the training device.

Equivalent, image for image, to torchvision's RandomCrop(size, padding=p, fill=0),
RandomHorizontalFlip(0.5), ToTensor and Normalize(mean, std) as used by LDAM-DRW, but
applied to a whole uint8 batch at once with offsets and flips drawn from an explicit
`torch.Generator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, C, H, W)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to (H, W) at a random offset per image.

    Args:
        images: (B, C, H, W) any dtype.
    """
    if padding == 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, B), generator=generator).to(images.device)
    rows = offsets[0, :, None] + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(W, device=images.device)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each (B, C, H, W) image horizontally with probability 0.5."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class BatchAugment:
    """Train-time (crop, flip, normalise) or test-time (normalise) batch transform."""

    def __init__(self, *, mean, std, crop_padding: int = 0, flip: bool = False, device="cpu",
                 channels_last: bool = False):
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.crop_padding = crop_padding
        self.flip = flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, H, W, C) on the device -> float (B, C, H, W)."""
        x = images.permute(0, 3, 1, 2)
        if generator is not None:
            x = random_crop(x, self.crop_padding, generator)
            if self.flip:
                x = random_flip(x, generator)
        x = x.float().div_(255.0)
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x.contiguous(memory_format=self.memory_format)
