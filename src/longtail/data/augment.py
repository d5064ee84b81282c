"""Batched augmentation as tensor ops on the training device.

Equivalent, image for image, to torchvision's RandomCrop(size, padding=p, fill=0),
RandomHorizontalFlip(0.5), ToTensor and Normalize(mean, std) as used by LDAM-DRW, but
applied to a whole uint8 batch at once with offsets and flips drawn from an explicit
`torch.Generator`. Optional strong augmentation (AutoAugment, RandAugment, Cutout) after the
flip: data/strong_augment.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .simclr_augment import check_jitter, color_jitter as jitter_colors, random_grayscale, simclr_view
from .strong_augment import POLICIES, autoaugment_cifar10, check_randaugment, cutout, rand_augment

VIEWS = ("regular", "simclr", "simclr_randaugment", "randaugment", "crop_jitter", "mocov2")


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator, shard: tuple | None = None
                ) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to (H, W) at a random offset per image.

    Args:
        images: (B, C, H, W) any dtype.
        shard: (rank, world_size, global_batch_size): the offsets are drawn for the
            whole global batch and this rank takes rows rank::world_size, so a
            distributed run crops exactly as one process would. None: (0, 1, B).
    """
    if padding == 0:
        return images
    B, C, H, W = images.shape
    rank, world, total = shard or (0, 1, B)
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, total), generator=generator)[:, rank::world]
    offsets = offsets.to(images.device)
    rows = offsets[0, :, None] + torch.arange(H, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(W, device=images.device)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def random_flip(images: torch.Tensor, generator: torch.Generator, shard: tuple | None = None) -> torch.Tensor:
    """Flip each (B, C, H, W) image horizontally with probability 0.5 (draws sharded as random_crop)."""
    rank, world, total = shard or (0, 1, images.shape[0])
    flip = (torch.rand(total, generator=generator)[rank::world] < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class BatchAugment:
    """Train-time (crop, flip, [AutoAugment | RandAugment], [Cutout], normalise) or test-time
    (normalise) batch transform; the order of PaCo's CIFAR pipeline (RandomCrop, flip,
    CIFAR10Policy, ToTensor, Cutout, Normalize). policy 'none' and cutout 0 draw nothing more
    than crop / flip: bitwise the results of before (data/strong_augment.py)."""

    def __init__(self, *, mean, std, crop_padding: int = 0, flip: bool = False, device="cpu",
                 channels_last: bool = False, policy: str = "none", randaugment_n: int = 2,
                 randaugment_m: float = 10.0, randaugment_mstd: float = 0.0, cutout: int = 0,
                 simclr: bool = False, resized_crop_scale=(0.08, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, crop_jitter: bool = False):
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        check_randaugment(randaugment_n, randaugment_m, randaugment_mstd,
                          names=("randaugment_n", "randaugment_m", "randaugment_mstd"))
        if cutout < 0:
            raise ValueError(f"cutout must be >= 0, got {cutout}")
        check_jitter(tuple(color_jitter), jitter_p, grayscale_p, tuple(resized_crop_scale))
        self.simclr = bool(simclr)
        self.crop_jitter = bool(crop_jitter)  # padded crop + flip, then colour jitter and grayscale (SADE's test views)
        self.simclr_params = dict(scale=tuple(resized_crop_scale), jitter=tuple(color_jitter), jitter_p=jitter_p,
                                  grayscale_p=grayscale_p)
        self.policy = policy
        self.randaugment = dict(num_ops=randaugment_n, magnitude=randaugment_m, magnitude_std=randaugment_mstd)
        self.cutout = cutout
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.crop_padding = crop_padding
        self.flip = flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 shard: tuple | None = None) -> torch.Tensor:
        """uint8 (B, H, W, C) on the device -> float (B, C, H, W)."""
        x = images.permute(0, 3, 1, 2)
        if generator is not None:
            if self.simclr:  # RandomResizedCrop, flip, colour jitter, grayscale (uint8 out)
                x = simclr_view(x, generator, shard, flip=self.flip, **self.simclr_params)
            else:
                x = random_crop(x, self.crop_padding, generator, shard)
                if self.flip:
                    x = random_flip(x, generator, shard)
                if self.crop_jitter:  # RandomApply(ColorJitter, jitter_p), RandomGrayscale (uint8 out)
                    shard_ = shard or (0, 1, x.shape[0])
                    p = self.simclr_params
                    x = jitter_colors(x.float(), generator, shard_, jitter=p["jitter"], p=p["jitter_p"])
                    x = random_grayscale(x, generator, shard_, p["grayscale_p"]).round_().clamp_(0, 255).to(torch.uint8)
            if self.policy == "autoaugment":
                x = autoaugment_cifar10(x, generator, shard)
            elif self.policy == "randaugment":
                x = rand_augment(x, generator, shard, **self.randaugment)
            x = cutout(x, self.cutout, generator, shard)
        x = x.float().div_(255.0)
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x.contiguous(memory_format=self.memory_format)

    def view(self, name: str) -> "BatchAugment":
        """The named view pipeline (`VIEWS`) built on this one's normalisation, device, memory format,
        crop padding and RandAugment parameters; 'regular' is this pipeline itself; 'mocov2' the
        SimCLR view with RandomResizedCrop scale (0.2, 1) (PaCo / GPaCo's CIFAR sim view; their
        GaussianBlur is not applied)."""
        if name == "regular":
            return self
        if name not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {name!r}")
        kw = dict(mean=self.mean.tolist(), std=self.std.tolist(), device=self.mean.device, flip=True,
                  channels_last=self.memory_format == torch.channels_last, randaugment_n=self.randaugment["num_ops"],
                  randaugment_m=self.randaugment["magnitude"], randaugment_mstd=self.randaugment["magnitude_std"])
        if name == "randaugment":
            return BatchAugment(crop_padding=self.crop_padding, policy="randaugment", **kw)
        if name == "crop_jitter":
            return BatchAugment(crop_padding=self.crop_padding, crop_jitter=True, **kw)
        if name == "mocov2":  # PaCo's CIFAR `augmentation_sim_cifar` without its Gaussian blur
            return BatchAugment(simclr=True, resized_crop_scale=(0.2, 1.0), **kw)
        return BatchAugment(simclr=True, policy="randaugment" if name == "simclr_randaugment" else "none", **kw)

    def two_views(self, images: torch.Tensor, generator: torch.Generator, shard: tuple | None = None,
                  second: "BatchAugment | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented views of the same uint8 (B, H, W, C) batch, for
        contrastive methods: this pipeline, then `second` (default: this one again), drawing
        one after the other from `generator` (so resume / sharding stay exact as for one view)."""
        first = self(images, generator, shard)
        return first, (second or self)(images, generator, shard)
