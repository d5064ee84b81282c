"""Strong augmentation as batched tensor ops: AutoAugment (CIFAR-10 policy), RandAugment, Cutout.

Every op works on a uint8 (B, C, H, W) batch on the training device and gives each image its
own parameters; the random draws come from an explicit CPU `torch.Generator`, made for the
whole global batch and sliced rows rank::world_size (`shard`, as random_crop), so a
distributed run and a resumed run augment exactly as one uninterrupted process.

The ops follow the PIL definitions the reference implementations call (Pillow's
ImageOps / ImageEnhance / Image.transform), in uint8 with PIL's rounding:

- AutoAugment: the CIFAR-10 policy of Cubuk et al., CVPR 2019, as the `CIFAR10Policy` of
  PaCo's `PaCo/LT/autoaug.py` (github.com/dvlab-research/Parametric-Contrastive-Learning,
  commit fe56535ecd716e56a72e75c4e818f2059e557584), the implementation long-tail codebases
  (PaCo, GPaCo, BCL, ProCo) copy: 25 sub-policies of two (probability, op, magnitude level)
  pairs, level ranges `linspace` over 10 levels, a random sign for shear / translate /
  colour / contrast / sharpness / brightness, fill colour (128, 128, 128).
- RandAugment: Cubuk et al., NeurIPS 2020, as the timm-style `rand_augment_transform` of
  PaCo's `PaCo/LT/randaugment.py` (same commit): n ops drawn uniformly with replacement
  from 15, each applied with probability 0.5 at magnitude m of 10 (optionally m + N(0,
  mstd) clipped to [0, 10] per op, timm's `mstd`).
- Cutout: DeVries & Taylor 2017, as `Cutout(n_holes=1, length=16)` of the same autoaug.py:
  a centre uniform over the image, the hole [c - L//2, c + L//2) clipped, set to 0 after
  ToTensor and before Normalize (here: uint8 0 before normalisation, the same values).

Readings (docs/training.md, "Strong augmentation"): affine ops sample nearest (PIL NEAREST
semantics, exact); the reference shears with PIL BICUBIC and timm picks bilinear / bicubic
at random, so shears differ from the reference by interpolation only. The reference's
rotate has no random sign (always counter-clockwise); kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FILL = 128  # the reference's fillcolor (128, 128, 128)


# ----------------------------------------------------------------------------- geometric ops

def affine_nearest(images: torch.Tensor, coeffs: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL `Image.transform(size, AFFINE, (a, b, c, d, e, f), NEAREST, fillcolor=fill)` per image.

    Output pixel (x, y) reads input pixel (floor(a (x+.5) + b (y+.5) + c), floor(d (x+.5) +
    e (y+.5) + f)), or `fill` where that lies outside (PIL's affine_transform, in float64).

    Args:
        images: uint8 (B, C, H, W). coeffs: (B, 6) float64, PIL's (a, b, c, d, e, f).
    """
    B, C, H, W = images.shape
    coeffs = coeffs.to(device=images.device, dtype=torch.float64)
    ys = torch.arange(H, device=images.device, dtype=torch.float64).view(1, H, 1) + 0.5
    xs = torch.arange(W, device=images.device, dtype=torch.float64).view(1, 1, W) + 0.5
    a, b, c, d, e, f = (coeffs[:, i].view(B, 1, 1) for i in range(6))
    src_x = torch.floor(a * xs + b * ys + c)
    src_y = torch.floor(d * xs + e * ys + f)
    valid = (src_x >= 0) & (src_x < W) & (src_y >= 0) & (src_y < H)  # (B, H, W)
    index = (src_y.clamp(0, H - 1) * W + src_x.clamp(0, W - 1)).long().view(B, 1, H * W)
    out = images.reshape(B, C, H * W).gather(2, index.expand(B, C, H * W)).view(B, C, H, W)
    return torch.where(valid[:, None], out, torch.full_like(out, fill))


def _coeffs(*columns) -> torch.Tensor:
    return torch.stack([torch.as_tensor(c, dtype=torch.float64).expand_as(columns[0]) for c in columns], 1)


def shear_x(images: torch.Tensor, shear: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL AFFINE (1, s, 0, 0, 1, 0): x_in = x + s * y (shear about the top-left corner). shear: (B,)."""
    s = shear.to(torch.float64).cpu()
    return affine_nearest(images, _coeffs(torch.ones_like(s), s, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(images: torch.Tensor, shear: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL AFFINE (1, 0, 0, s, 1, 0): y_in = s * x + y. shear: (B,)."""
    s = shear.to(torch.float64).cpu()
    return affine_nearest(images, _coeffs(torch.ones_like(s), 0.0, 0.0, s, 1.0, 0.0), fill)


def translate_x(images: torch.Tensor, pixels: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL AFFINE (1, 0, t, 0, 1, 0): x_in = x + t (t > 0 moves the content left). pixels: (B,)."""
    t = pixels.to(torch.float64).cpu()
    return affine_nearest(images, _coeffs(torch.ones_like(t), 0.0, t, 0.0, 1.0, 0.0), fill)


def translate_y(images: torch.Tensor, pixels: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL AFFINE (1, 0, 0, 0, 1, t): y_in = y + t. pixels: (B,)."""
    t = pixels.to(torch.float64).cpu()
    return affine_nearest(images, _coeffs(torch.ones_like(t), 0.0, 0.0, 0.0, 1.0, t), fill)


def rotate(images: torch.Tensor, degrees: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL `Image.rotate(degrees)` (counter-clockwise about (W/2, H/2), NEAREST) with `fill`
    outside, the matrix PIL builds (cos / sin rounded to 15 decimals). degrees: (B,)."""
    H, W = images.shape[2:]
    angle = -torch.deg2rad(degrees.to(torch.float64).cpu() % 360.0)
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    a, b, d, e = cos, sin, -sin, cos
    cx, cy = W / 2.0, H / 2.0
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return affine_nearest(images, torch.stack([a, b, c, d, e, f], 1), fill)


# ----------------------------------------------------------------------------- colour / histogram ops

def _gray(images: torch.Tensor) -> torch.Tensor:
    """PIL convert('L'): (R 19595 + G 38470 + B 7471 + 0x8000) >> 16 for RGB; (B, 1, H, W) uint8."""
    if images.shape[1] != 3:
        return images[:, :1]
    x = images.to(torch.int32)
    return ((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16).to(torch.uint8)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, image, factor) = degenerate + factor (image - degenerate),
    in float32, clipped to [0, 255] and truncated (ImageEnhance's enhance). factor: (B,)."""
    f = factor.to(device=images.device, dtype=torch.float64).to(torch.float32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.float32)
    return (d + f * (images.to(torch.float32) - d)).clamp_(0, 255).to(torch.uint8)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the grey (L) image. factor 1: identity."""
    return _blend(_gray(images).expand_as(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the constant int(mean of L + 0.5)."""
    mean = torch.floor(_gray(images).to(torch.float64).mean(dim=(1, 2, 3)) + 0.5).to(torch.uint8)
    return _blend(mean.view(-1, 1, 1, 1).expand_as(images), images, factor)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(images), images, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13,
    rounded; the one-pixel border kept as is, as PIL's 3x3 filter does)."""
    B, C, H, W = images.shape
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device)
    x = images.reshape(B * C, 1, H, W).to(torch.float32)
    smooth = torch.floor(F.conv2d(x, kernel.view(1, 1, 3, 3)) / 13.0 + 0.5)  # exact integer sums
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate.view(B, C, H, W).to(torch.uint8), images, factor)


def _apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """lut: (B, C, 256) integer -> images[b, c, y, x] = lut[b, c, images[b, c, y, x]] (uint8)."""
    B, C, H, W = images.shape
    index = images.reshape(B, C, H * W).long()
    return lut.clamp(0, 255).to(torch.uint8).gather(2, index).view(B, C, H, W)


def _histogram(images: torch.Tensor) -> torch.Tensor:
    """(B, C, 256) int64 per-image, per-channel histogram (one bincount over offset values)."""
    B, C, H, W = images.shape
    offset = torch.arange(B * C, device=images.device).view(B * C, 1) * 256
    flat = (images.reshape(B * C, H * W).long() + offset).flatten()
    return torch.bincount(flat, minlength=B * C * 256).view(B, C, 256)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0) per channel: lo / hi the smallest / largest value
    present, lut = clip(int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))); identity where hi <= lo."""
    hist = _histogram(images)
    present = hist > 0
    levels = torch.arange(256, device=images.device)
    lo = torch.where(present, levels, 256).amin(2, keepdim=True)
    hi = torch.where(present, levels, -1).amax(2, keepdim=True)
    span = (hi - lo).to(torch.float64)
    scale = torch.full_like(span, 255.0) / span.clamp(min=1)  # not 255.0 / span: torch takes a reciprocal then
    offset = -lo.to(torch.float64) * scale
    lut = torch.trunc(levels.to(torch.float64) * scale + offset).long()
    lut = torch.where(hi > lo, lut, levels.expand_as(lut))
    return _apply_lut(images, lut)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel: step = (N - count of the last value present) // 256,
    lut[i] = (step // 2 + #pixels below i) // step; identity with under two values or step 0."""
    hist = _histogram(images)
    levels = torch.arange(256, device=images.device)
    last = torch.where(hist > 0, levels, -1).amax(2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - hist.gather(2, last.clamp(min=0))) // 256
    below = torch.cumsum(hist, 2) - hist
    lut = (step // 2 + below) // step.clamp(min=1)
    keep = ((hist > 0).sum(2, keepdim=True) <= 1) | (step == 0)
    return _apply_lut(images, torch.where(keep, levels.expand_as(lut), lut))


def invert(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.invert: 255 - v."""
    return 255 - images


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: v < threshold ? v : 255 - v. threshold: (B,) (256: identity)."""
    t = threshold.to(device=images.device, dtype=torch.float64).view(-1, 1, 1, 1)
    return torch.where(images.to(torch.float64) < t, images, 255 - images)


def solarize_add(images: torch.Tensor, add: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """timm's solarize_add: v < threshold ? min(255, v + add) : v. add: (B,) integer (0: identity)."""
    a = add.to(device=images.device, dtype=torch.int32).view(-1, 1, 1, 1)
    x = images.to(torch.int32)
    return torch.where(x < threshold, (x + a).clamp(max=255), x).to(torch.uint8)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: keep the `bits` high bits, v & ~(2^(8 - bits) - 1). bits: (B,) in [0, 8]."""
    shift = (8 - bits.to(device=images.device, dtype=torch.int32)).view(-1, 1, 1, 1)
    mask = (255 << shift) & 255
    return (images.to(torch.int32) & mask).to(torch.uint8)


# ----------------------------------------------------------------------------- policies

# op name -> function(images, argument (B,) tensor)
OPS = {
    "shearX": shear_x, "shearY": shear_y, "translateX": translate_x, "translateY": translate_y,
    "rotate": rotate, "color": color, "posterize": posterize, "solarize": solarize,
    "contrast": contrast, "sharpness": sharpness, "brightness": brightness,
    "autocontrast": lambda x, _: auto_contrast(x), "equalize": lambda x, _: equalize(x),
    "invert": lambda x, _: invert(x), "solarize_add": solarize_add,
}

# PaCo autoaug.py CIFAR10Policy: (p1, op1, level1, p2, op2, level2)
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7), (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9), (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0), (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6), (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)

_SIGNED = ("shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness")


def autoaugment_level(name: str, level: int) -> float:
    """The reference's magnitude of `name` at level 0..9 (SubPolicy's `ranges`)."""
    def lin(lo, hi):
        return lo + (hi - lo) * level / 9  # np.linspace(lo, hi, 10)[level]
    return {"shearX": lin(0, 0.3), "shearY": lin(0, 0.3), "translateX": lin(0, 150 / 331),
            "translateY": lin(0, 150 / 331), "rotate": lin(0, 30), "color": lin(0.0, 0.9),
            "posterize": float(round(lin(8, 4))), "solarize": lin(256, 0), "contrast": lin(0.0, 0.9),
            "sharpness": lin(0.0, 0.9), "brightness": lin(0.0, 0.9)}.get(name, 0.0)


def _autoaugment_argument(name: str, magnitude: torch.Tensor, sign: torch.Tensor, size: int) -> torch.Tensor:
    """SubPolicy's lambda arguments: shear m * s, translate m * size * s, colour ops 1 + m * s."""
    if name in ("shearX", "shearY"):
        return magnitude * sign
    if name in ("translateX", "translateY"):
        return magnitude * size * sign
    if name in ("color", "contrast", "sharpness", "brightness"):
        return 1 + magnitude * sign
    return magnitude


def _apply_per_image(images: torch.Tensor, names: list, choice: torch.Tensor, apply: torch.Tensor,
                     argument) -> torch.Tensor:
    """images[i] = OPS[names[choice[i]]](images[i], argument(name, rows)) where apply[i]; one
    batched call per op over the rows that chose it (CPU index bookkeeping, no device sync)."""
    out = images
    for k, name in enumerate(names):
        rows = torch.nonzero(apply & (choice == k)).flatten()
        if len(rows) == 0:
            continue
        dev_rows = rows.to(images.device)
        if out is images:
            out = images.clone()
        out[dev_rows] = OPS[name](out[dev_rows], argument(name, rows))
    return out


def _draws(shape, generator, shard, kind, **kw):
    """A (..., total) draw sliced to this rank's rows (the last dimension)."""
    if kind == "rand":
        x = torch.rand(*shape, generator=generator)
    elif kind == "randn":
        x = torch.randn(*shape, generator=generator)
    else:
        x = torch.randint(kw["low"], kw["high"], shape, generator=generator)
    rank, world, _ = shard
    return x[..., rank::world]


def autoaugment_cifar10(images: torch.Tensor, generator: torch.Generator, shard: tuple | None = None
                        ) -> torch.Tensor:
    """The CIFAR-10 AutoAugment policy per image: a uniform sub-policy of 25, each of its two
    ops applied with its probability (`u < p`), signed ops with a random sign each.

    Args:
        images: uint8 (B, C, H, W). shard: (rank, world_size, global batch size) as random_crop.
    Draws, for the global batch in this order: sub-policy (B,), uniforms (2, B), signs (2, B).
    """
    B, _, H, W = images.shape
    shard = shard or (0, 1, B)
    total = shard[2]
    policy = _draws((total,), generator, shard, "int", low=0, high=len(CIFAR10_POLICY))
    uniform = _draws((2, total), generator, shard, "rand")
    sign = _draws((2, total), generator, shard, "int", low=0, high=2).to(torch.float64) * 2 - 1
    for slot in range(2):
        names = sorted({p[1 + 3 * slot] for p in CIFAR10_POLICY})
        op_of = torch.tensor([names.index(p[1 + 3 * slot]) for p in CIFAR10_POLICY])
        prob = torch.tensor([p[3 * slot] for p in CIFAR10_POLICY], dtype=torch.float64)
        level = torch.tensor([autoaugment_level(p[1 + 3 * slot], p[2 + 3 * slot]) for p in CIFAR10_POLICY],
                             dtype=torch.float64)
        choice, apply, magnitude = op_of[policy], uniform[slot].double() < prob[policy], level[policy]

        def argument(name, rows, slot=slot, magnitude=magnitude):
            size = W if name == "translateX" else H
            return _autoaugment_argument(name, magnitude[rows], sign[slot, rows], size)

        images = _apply_per_image(images, names, choice, apply, argument)
    return images


# timm's _RAND_TRANSFORMS (PaCo randaugment.py), in its order; PosterizeTpu, TranslateXRel / YRel
RANDAUGMENT_OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
                   "color", "contrast", "brightness", "sharpness", "shearX", "shearY", "translateX", "translateY")


def _randaugment_argument(name: str, magnitude: torch.Tensor, sign: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """timm's level_to_arg at magnitude m of 10 (float): rotate +-30 m/10, shear +-0.3 m/10,
    translate +-0.45 m/10 of the size, enhance 1.8 m/10 + 0.1 (unsigned), posterize
    int(4 m/10) bits, solarize int(256 m/10), solarize_add int(110 m/10)."""
    level = magnitude / 10.0
    if name == "rotate":
        return level * 30.0 * sign
    if name in ("shearX", "shearY"):
        return level * 0.3 * sign
    if name == "translateX":
        return level * 0.45 * sign * W
    if name == "translateY":
        return level * 0.45 * sign * H
    if name in ("color", "contrast", "brightness", "sharpness"):
        return level * 1.8 + 0.1
    if name == "posterize":
        return torch.trunc(level * 4)
    if name == "solarize":
        return torch.trunc(level * 256)
    if name == "solarize_add":
        return torch.trunc(level * 110)
    return level


def check_randaugment(num_ops, magnitude, magnitude_std, *, names=("num_ops", "magnitude", "magnitude_std")) -> None:
    """ValueError naming the parameter (under `names`) unless num_ops >= 1, 0 <= magnitude <= 10 and
    magnitude_std >= 0."""
    if num_ops < 1:
        raise ValueError(f"{names[0]} must be >= 1, got {num_ops}")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"{names[1]} must be in [0, 10], got {magnitude}")
    if not magnitude_std >= 0:
        raise ValueError(f"{names[2]} must be >= 0, got {magnitude_std}")


def rand_augment(images: torch.Tensor, generator: torch.Generator, shard: tuple | None = None, *,
                 num_ops: int = 2, magnitude: float = 10.0, magnitude_std: float = 0.0) -> torch.Tensor:
    """RandAugment per image: `num_ops` ops uniform with replacement from the 15 of
    RANDAUGMENT_OPS, each applied with probability 0.5 (timm: skipped when u > 0.5) at
    `magnitude` (0..10), or clip(magnitude + magnitude_std N(0, 1), 0, 10) per op when
    magnitude_std > 0. Draws per layer for the global batch: op (B,), uniform (B,), sign (B,),
    normal (B,)."""
    check_randaugment(num_ops, magnitude, magnitude_std)
    B, _, H, W = images.shape
    shard = shard or (0, 1, B)
    total = shard[2]
    for _ in range(num_ops):
        choice = _draws((total,), generator, shard, "int", low=0, high=len(RANDAUGMENT_OPS))
        apply = _draws((total,), generator, shard, "rand") <= 0.5
        sign = _draws((total,), generator, shard, "int", low=0, high=2).to(torch.float64) * 2 - 1
        noise = _draws((total,), generator, shard, "randn").to(torch.float64)
        mag = (magnitude + magnitude_std * noise).clamp(0, 10) if magnitude_std > 0 else torch.full_like(noise, magnitude)

        def argument(name, rows, sign=sign, mag=mag):
            return _randaugment_argument(name, mag[rows], sign[rows], H, W)

        images = _apply_per_image(images, list(RANDAUGMENT_OPS), choice, apply, argument)
    return images


def cutout(images: torch.Tensor, size: int, generator: torch.Generator, shard: tuple | None = None
           ) -> torch.Tensor:
    """One square hole per image set to 0 (the reference's Cutout(1, size) after ToTensor,
    before Normalize): centre (cy, cx) uniform over the pixels, rows [cy - size//2, cy +
    size//2) and columns likewise, clipped to the image. Draws: centres (2, global B)."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        return images
    B, C, H, W = images.shape
    shard = shard or (0, 1, B)
    cy = _draws((shard[2],), generator, shard, "int", low=0, high=H).to(images.device)
    cx = _draws((shard[2],), generator, shard, "int", low=0, high=W).to(images.device)
    rows = torch.arange(H, device=images.device).view(1, H)
    cols = torch.arange(W, device=images.device).view(1, W)
    in_rows = (rows >= cy.view(B, 1) - size // 2) & (rows < cy.view(B, 1) + size // 2)
    in_cols = (cols >= cx.view(B, 1) - size // 2) & (cols < cx.view(B, 1) + size // 2)
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
    return images.masked_fill(hole[:, None], 0)


POLICIES = ("none", "autoaugment", "randaugment")
