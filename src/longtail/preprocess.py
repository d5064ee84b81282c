"""A trained run's own preprocessing, for images that do not come from its dataset.

Every input ends as the normalised float (B, C, H, W) batch the network saw in training:

1. channels: converted with Pillow to RGB (C = 3) or L (C = 1) as the run's data.json says,
   exactly as the training images were decoded (`data/images.decode_image`): palette,
   RGBA (alpha dropped), CMYK, 16-bit and grayscale images are all converted;
2. size: resized to the run's (H, W) with Pillow's bilinear filter when the size differs
   (an image of the right size is left untouched);
3. values: x / 255, then (x - mean) / std with the run's mean and std
   (`data/augment.BatchAugment`, the transform of evaluation).

Accepted inputs: file paths, PIL images, uint8 numpy arrays in image layout ((H, W),
(H, W, C) or a (B, H, W, C) batch, C in 1, 3, 4), and torch tensors in torch layout
((C, H, W) or (B, C, H, W)): uint8 tensors are divided by 255, float tensors are taken
as already in [0, 1]. A file, PIL image or uint8 array gives bit-identical results to
the same pixels decoded from a file; a tensor whose size or channel count differs is
converted with torch ops instead of Pillow (bilinear with antialiasing; luma weights
0.299 / 0.587 / 0.114 for RGB -> L), which is close to, not identical with, Pillow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.augment import BatchAugment
from .data.images import decode_image
from .errors import ConfigError, DataError

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, Pillow's RGB -> L weights


@dataclass(frozen=True)
class ImageSpec:
    """What a run's network takes: channels, (height, width) and the normalisation."""

    channels: int
    height: int
    width: int
    mean: tuple
    std: tuple

    @classmethod
    def from_data_info(cls, info: dict) -> "ImageSpec":
        """From a run's data.json content (`channels`, `image_shape`, `mean`, `std`)."""
        h, w = (int(v) for v in info["image_shape"])
        return cls(channels=int(info["channels"]), height=h, width=w,
                   mean=tuple(float(v) for v in info["mean"]), std=tuple(float(v) for v in info["std"]))

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one uint8 image."""
        return self.height, self.width, self.channels


def fit_pil(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """PIL image -> uint8 (H, W, C) in the run's mode and size."""
    img = img.convert(spec.mode)
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def fit_array(array: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) with C in 1, 3, 4 -> uint8 (H, W, C) of the run."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ConfigError(f"image arrays must be uint8, got {array.dtype} "
                          "(pass float images as torch tensors in [0, 1])")
    if array.ndim == 3 and array.shape == spec.shape:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ConfigError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4, got shape {array.shape}")
    return fit_pil(Image.fromarray(np.ascontiguousarray(array)), spec)


def error_text(err: BaseException) -> str:
    """An error's first line, without Pillow's '<_io.BytesIO object at 0x...>' noise."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)


def read_image_file(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """Read and decode one image file -> uint8 (H, W, C); DataError naming the file otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err.strerror or err}") from None
    try:
        array = decode_image(data, str(path), channels=spec.channels)
    except DataError as err:
        raise DataError(error_text(err)) from None
    except Image.DecompressionBombError as err:
        raise DataError(f"cannot decode image {path}: {error_text(err)}") from None
    return array if array.shape == spec.shape else fit_array(array, spec)


def normalise_uint8(batch: np.ndarray, spec: ImageSpec, device="cpu") -> torch.Tensor:
    """uint8 (B, H, W, C) of the run's shape -> normalised float (B, C, H, W) on `device`."""
    transform = BatchAugment(mean=spec.mean, std=spec.std, device=device)
    batch = np.ascontiguousarray(batch)
    if not batch.flags.writeable:  # e.g. a read-only memory map: torch wants a writable buffer
        batch = batch.copy()
    return transform(torch.from_numpy(batch).to(device))


def normalise_tensor(x: torch.Tensor, spec: ImageSpec, device="cpu") -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) tensor (uint8, or float in [0, 1]) -> normalised float (B, C, H, W)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"image tensors must be (C, H, W) or (B, C, H, W) with C in 1, 3, got shape {tuple(x.shape)}")
    x = x.to(device)
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    if x.shape[1] != spec.channels:
        if spec.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            x = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[2:]) != (spec.height, spec.width):
        x = F.interpolate(x, size=(spec.height, spec.width), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _one_uint8(item, spec: ImageSpec) -> np.ndarray:
    if isinstance(item, Image.Image):
        return fit_pil(item, spec)
    if isinstance(item, np.ndarray):
        return fit_array(item, spec)
    if isinstance(item, (str, Path)):
        return read_image_file(item, spec)
    raise ConfigError(f"cannot classify an object of type {type(item).__name__}: "
                      "give PIL images, uint8 arrays, tensors or file paths")


def to_model_input(images, spec: ImageSpec, device="cpu") -> torch.Tensor:
    """Any accepted input (see the module docstring) -> normalised float (B, C, H, W).

    A single image (path, PIL image, 2-/3-d array, 3-d tensor), a batch (4-d array or
    tensor) or a list / tuple of single images.
    """
    if isinstance(images, torch.Tensor):
        return normalise_tensor(images, spec, device)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype == np.uint8 and images.shape[1:] == spec.shape:
            return normalise_uint8(images, spec, device)
        return to_model_input(list(images), spec, device)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ConfigError("no images given")
    parts, pending = [], []
    for item in images:
        if isinstance(item, torch.Tensor):
            if item.dim() != 3:
                raise ConfigError(f"a tensor in a list must be one (C, H, W) image, got shape {tuple(item.shape)}")
            if pending:
                parts.append(normalise_uint8(np.stack(pending), spec, device))
                pending = []
            parts.append(normalise_tensor(item, spec, device))
        else:
            pending.append(_one_uint8(item, spec))
    if pending:
        parts.append(normalise_uint8(np.stack(pending), spec, device))
    return torch.cat(parts) if len(parts) > 1 else parts[0]
