import numpy as np
import torch
import torch.nn.functional as F

from longtail.data.augment import BatchAugment, random_crop, random_flip


def test_random_crop_matches_per_image_crop():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = random_crop(images, 2, g)
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(0))
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(2):
        oy, ox = offsets[0, i], offsets[1, i]
        assert torch.equal(out[i], padded[i, :, oy:oy + 5, ox:ox + 5])


def test_random_flip_flips_about_half():
    images = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    out = random_flip(images, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == images[:, 0, 0, 3])
    assert 400 < int(flipped.sum()) < 600
    assert torch.equal(out[~flipped], images[~flipped])


def test_normalise_like_totensor_normalize():
    images = torch.randint(0, 256, (3, 4, 4, 3), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    out = BatchAugment(mean=mean, std=std)(images)
    ref = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert out.shape == (3, 3, 4, 4)


def test_padding_is_zero_pixels_before_normalisation():
    images = torch.full((64, 6, 6, 1), 255, dtype=torch.uint8)
    out = BatchAugment(mean=(0.5,), std=(0.5,), crop_padding=4)(images, torch.Generator().manual_seed(1))
    assert set(np.unique(out.numpy()).tolist()) <= {-1.0, 1.0}
    assert (out == -1).any()
