"""The SimCLR / MoCo-v2 view pipeline as batched tensor ops: RandomResizedCrop, ColorJitter in a
random order, RandomGrayscale (Chen et al. 2020; the `augmentation_sim` of BCL's main.py,
FlamieZhu/Balanced-Contrastive-Learning commit f72d0703794bcec8b00da86774c9d780dc721701).

Every op works on a whole (B, C, H, W) batch on the training device, each image with its own
parameters; the random draws come from an explicit CPU `torch.Generator` for the whole global
batch and are sliced rows rank::world_size (`shard`, as data/augment.random_crop), so resumed
and distributed runs augment exactly as one uninterrupted process. No torchvision, no PIL.

Definitions (torchvision 0.15+ semantics, the tensor path of its functional ops):

- `resized_crop_boxes`: RandomResizedCrop.get_params - up to 10 tries of area = H W U(scale),
  aspect = exp(U(log ratio)), w = round(sqrt(area aspect)), h = round(sqrt(area / aspect)),
  the first try with 0 < w <= W and 0 < h <= H wins, its corner uniform over the positions;
  else the central crop of the image clamped to the ratio range. All 10 tries are drawn for
  every image (a fixed number of draws), the first valid one is used.
- `resized_crop`: the box resized to (H, W) bilinearly (half-pixel centres, edge pixels
  repeated). A crop is never larger than the image, so this only ever upsamples, where PIL's
  and torchvision's bilinear filter (antialias or not) are this interpolation.
- colour ops on float values in [0, 255], clamped after each op (torchvision's `_blend`):
  brightness b x; contrast c x + (1 - c) mean(gray); saturation s x + (1 - s) gray; hue:
  RGB -> HSV, h + f mod 1, HSV -> RGB; gray = 0.299 R + 0.587 G + 0.114 B. One-channel images:
  saturation, hue and grayscale leave them as they are (torchvision), contrast uses their mean.
- `color_jitter`: ColorJitter(b, c, s, h).get_params per image - a random order of the four
  ops (a permutation), factors U(max(0, 1 - b), 1 + b), ..., hue U(-h, h) - applied to the
  images whose RandomApply draw is < p.
- `random_grayscale`: the gray image in every channel with probability p.

Reading: the reference pipeline runs on PIL images, which round to uint8 after every op (and
PIL's HSV is 8-bit); here the values stay float through crop, flip and colour and are rounded
to uint8 once at the end of the pipeline (`simclr_view`), as the tensor path of torchvision
does, then the uint8 ops (RandAugment) and normalisation follow as for the regular view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAY = (0.299, 0.587, 0.114)  # torchvision rgb_to_grayscale (ITU-R 601-2 luma)


def _draw(shape, generator, shard, kind="rand"):
    x = torch.rand(*shape, generator=generator) if kind == "rand" else torch.randn(*shape, generator=generator)
    rank, world, _ = shard
    return x[..., rank::world]


def resized_crop_boxes(height: int, width: int, generator: torch.Generator, shard: tuple, *,
                       scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, h, w) of RandomResizedCrop for this rank's rows.

    Draws for the global batch, in this order: area fractions (10, total), log aspects
    (10, total), corner uniforms (2, total)."""
    total = shard[2]
    area = height * width
    frac = scale[0] + (scale[1] - scale[0]) * _draw((10, total), generator, shard).double()
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * _draw((10, total), generator, shard).double())
    corner = _draw((2, total), generator, shard).double()
    w = torch.round(torch.sqrt(area * frac * aspect))
    h = torch.round(torch.sqrt(area * frac / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (10, B)
    first = torch.where(ok.any(0), ok.to(torch.int64).argmax(0), torch.full_like(ok[0], -1, dtype=torch.int64))
    rows = torch.arange(first.numel())
    pick = first.clamp_min(0)
    w_t, h_t = w[pick, rows], h[pick, rows]
    top = torch.floor(corner[0] * (height - h_t + 1))
    left = torch.floor(corner[1] * (width - w_t + 1))
    # fallback: the central crop, clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    fallback = first < 0
    h_t = torch.where(fallback, torch.tensor(float(fh), dtype=torch.float64), h_t)
    w_t = torch.where(fallback, torch.tensor(float(fw), dtype=torch.float64), w_t)
    top = torch.where(fallback, torch.tensor(float((height - fh) // 2), dtype=torch.float64), top)
    left = torch.where(fallback, torch.tensor(float((width - fw) // 2), dtype=torch.float64), left)
    return torch.stack([top, left, h_t, w_t], 1).to(torch.int64)


def _taps(start: torch.Tensor, size: torch.Tensor, out: int, device):
    """Bilinear taps of `out` output pixels over [start, start + size): source centres (x + .5)
    size / out - .5, clamped into the box (PIL crops first, so the box's edge pixels repeat)."""
    c = start[:, None] + (torch.arange(out, dtype=torch.float64) + 0.5)[None] * size[:, None] / out - 0.5
    last = (start + size - 1)[:, None]
    c = torch.minimum(torch.maximum(c, start[:, None]), last)
    c0 = torch.floor(c)
    c1 = torch.minimum(c0 + 1, last)
    return c0.long().to(device), c1.long().to(device), (c - c0).to(device=device, dtype=torch.float32)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each (C, H, W) image to its box (top, left, h, w) and resize it back to (H, W) with
    bilinear interpolation (half-pixel centres, the box's edge pixels repeated); float32 out."""
    B, C, H, W = images.shape
    b = boxes.to(torch.float64)
    y0, y1, wy = _taps(b[:, 0], b[:, 2], H, images.device)
    x0, x1, wx = _taps(b[:, 1], b[:, 3], W, images.device)
    x = images.to(torch.float32)
    rows = lambda i: x.gather(2, i[:, None, :, None].expand(B, C, H, W))  # noqa: E731
    x = rows(y0) * (1 - wy)[:, None, :, None] + rows(y1) * wy[:, None, :, None]
    cols = lambda i: x.gather(3, i[:, None, None, :].expand(B, C, H, W))  # noqa: E731
    return cols(x0) * (1 - wx)[:, None, None, :] + cols(x1) * wx[:, None, None, :]


# ----------------------------------------------------------------------------- colour (float, 0..255)

def gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): 0.299 R + 0.587 G + 0.114 B (the image itself when it has one channel)."""
    if images.shape[1] != 3:
        return images[:, :1]
    return GRAY[0] * images[:, 0:1] + GRAY[1] * images[:, 1:2] + GRAY[2] * images[:, 2:3]


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp_(0, 255)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(b x). factor: (B,)."""
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(c x + (1 - c) mean of the gray image). factor: (B,)."""
    return _blend(images, gray(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(s x + (1 - s) gray). factor: (B,). One channel: unchanged."""
    if images.shape[1] != 3:
        return images
    return _blend(images, gray(images), factor)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (h of a gray pixel: 0), as colorsys / torchvision."""
    r, g, b = rgb.unbind(1)
    maxc, minc = rgb.amax(1), rgb.amin(1)
    flat = maxc == minc
    span = maxc - minc
    s = span / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), torch.remainder(h / 6.0, 1.0))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1] (the six sectors of colorsys.hsv_to_rgb)."""
    h, s, v = hsv.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6).to(torch.int64)
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 0) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)  # (6, 3, B, H, W)
    out = table.gather(0, i.unsqueeze(0).unsqueeze(0).expand(1, 3, *i.shape)).squeeze(0)  # (3, B, H, W)
    return out.permute(1, 0, 2, 3)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotated by `shift` (B,) in [-0.5, 0.5] turns: RGB -> HSV, h + shift mod 1, back. One
    channel: unchanged."""
    if images.shape[1] != 3:
        return images
    hsv = rgb_to_hsv(images / 255.0)
    sh = shift.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)
    hsv = torch.stack([torch.remainder(hsv[:, 0] + sh, 1.0), hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv) * 255.0


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """The gray image in every channel (one channel: unchanged)."""
    return gray(images).expand_as(images).clone() if images.shape[1] == 3 else images


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def check_jitter(jitter, p, grayscale_p, scale) -> None:
    """ValueError naming the bad value of a SimCLR view's parameters."""
    if len(jitter) != 4 or any(not v >= 0 for v in jitter):
        raise ValueError(f"color_jitter must be 4 numbers >= 0 (brightness, contrast, saturation, hue), got {jitter!r}")
    if not jitter[3] <= 0.5:
        raise ValueError(f"color_jitter hue must be in [0, 0.5], got {jitter[3]}")
    for name, v in (("jitter_p", p), ("grayscale_p", grayscale_p)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"resized_crop_scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")


def color_jitter(images: torch.Tensor, generator: torch.Generator, shard: tuple, *, jitter=(0.4, 0.4, 0.4, 0.1),
                 p: float = 0.8) -> torch.Tensor:
    """RandomApply([ColorJitter(*jitter)], p) per image, the four ops in a random order per image.

    Draws for the global batch, in this order: apply uniforms (total,), order keys (total, 4)
    (argsort: a uniform permutation), factor uniforms (4, total)."""
    total = shard[2]
    apply = _draw((total,), generator, shard) < p
    order = torch.rand(total, 4, generator=generator)[shard[0]::shard[1]].argsort(1)
    u = _draw((4, total), generator, shard).double()
    low = [max(0.0, 1.0 - v) for v in jitter[:3]]  # torchvision: factor U(max(0, 1 - v), 1 + v)
    factors = torch.stack([low[k] + (1.0 + jitter[k] - low[k]) * u[k] for k in range(3)]
                          + [-jitter[3] + 2.0 * jitter[3] * u[3]])  # hue U(-h, h)
    out = images
    for slot in range(4):
        for k, op in enumerate(JITTER_OPS):
            rows = torch.nonzero(apply & (order[:, slot] == k)).flatten()
            if len(rows) == 0 or jitter[k] == 0:
                continue
            dev_rows = rows.to(images.device)
            if out is images:
                out = images.clone()
            out[dev_rows] = op(out[dev_rows], factors[k, rows])
    return out


def random_grayscale(images: torch.Tensor, generator: torch.Generator, shard: tuple, p: float = 0.2) -> torch.Tensor:
    """RandomGrayscale(p) per image. Draws: uniforms (total,)."""
    pick = (_draw((shard[2],), generator, shard) < p).to(images.device)
    return torch.where(pick[:, None, None, None], to_grayscale(images), images)


def simclr_view(images: torch.Tensor, generator: torch.Generator, shard: tuple | None = None, *,
                scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), flip: bool = True, jitter=(0.4, 0.4, 0.4, 0.1),
                jitter_p: float = 0.8, grayscale_p: float = 0.2) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, H, W): RandomResizedCrop(scale, ratio), horizontal flip
    (p 0.5), RandomApply(ColorJitter(*jitter), jitter_p), RandomGrayscale(grayscale_p), rounded
    to uint8 once at the end. Draws in that order (flip: uniforms (total,))."""
    B, _, H, W = images.shape
    shard = shard or (0, 1, B)
    x = resized_crop(images, resized_crop_boxes(H, W, generator, shard, scale=scale, ratio=ratio))
    if flip:
        f = (_draw((shard[2],), generator, shard) < 0.5).to(images.device)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    x = color_jitter(x, generator, shard, jitter=jitter, p=jitter_p)
    x = random_grayscale(x, generator, shard, grayscale_p)
    return x.round_().clamp_(0, 255).to(torch.uint8)
