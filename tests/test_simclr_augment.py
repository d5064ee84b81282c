"""SimCLR view pipeline (data/simclr_augment.py): each op against a hand computation or colorsys /
Pillow on a few pixels, RandomResizedCrop boxes against torchvision's algorithm re-run with the same
draws, determinism, per-rank shards, named views, and the loop's extra views leaving plain methods
bitwise unchanged."""

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_arrays, tiny_config
from longtail.data import simclr_augment as sc
from longtail.data.augment import VIEWS, BatchAugment

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _imgs(n=5, h=6, w=7, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, (n, 3, h, w)).astype(np.float32))


def test_brightness_contrast_saturation_by_hand():
    x = _imgs()
    f = torch.tensor([0.6, 1.0, 1.4, 0.0, 1.2], dtype=torch.float64)
    assert torch.allclose(sc.adjust_brightness(x, f), (x * f.float().view(-1, 1, 1, 1)).clamp(0, 255))
    g = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    want = (f.float().view(-1, 1, 1, 1) * x + (1 - f.float().view(-1, 1, 1, 1)) * g.mean((1, 2, 3), keepdim=True))
    assert torch.allclose(sc.adjust_contrast(x, f), want.clamp(0, 255), atol=1e-4)
    want = f.float().view(-1, 1, 1, 1) * x + (1 - f.float().view(-1, 1, 1, 1)) * g
    assert torch.allclose(sc.adjust_saturation(x, f), want.clamp(0, 255), atol=1e-4)
    assert torch.equal(sc.adjust_saturation(x, torch.ones(5)), x)
    one = x[:, :1]
    assert torch.equal(sc.adjust_saturation(one, f), one) and torch.equal(sc.adjust_hue(one, f), one)


def test_hsv_and_hue_against_colorsys():
    x = _imgs(n=3, h=4, w=4, seed=1)
    x[0, :, 0, 0] = torch.tensor([50.0, 50.0, 50.0])  # gray pixel
    x[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])
    hsv = sc.rgb_to_hsv(x / 255)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                r, g, bb = (x[b, :, i, j] / 255).tolist()
                assert np.allclose(hsv[b, :, i, j].tolist(), colorsys.rgb_to_hsv(r, g, bb), atol=1e-6)
    back = sc.hsv_to_rgb(hsv) * 255
    assert torch.allclose(back, x, atol=1e-3)
    shift = torch.tensor([0.1, -0.05, 0.5], dtype=torch.float64)
    out = sc.adjust_hue(x, shift)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*(x[b, :, i, j] / 255).tolist())
                want = colorsys.hsv_to_rgb((h + float(shift[b])) % 1.0, s, v)
                assert np.allclose((out[b, :, i, j] / 255).tolist(), want, atol=1e-5)


def test_grayscale_matches_pillow_within_rounding():
    x = _imgs(n=2, seed=2)
    ours = sc.to_grayscale(x)
    for b in range(2):
        ref = np.asarray(Image.fromarray(x[b].permute(1, 2, 0).numpy().astype(np.uint8)).convert("L"), np.float32)
        assert np.abs(ours[b, 0].numpy() - ref).max() <= 0.5 + 1e-4  # PIL rounds the same luma to uint8
        assert torch.equal(ours[b, 0], ours[b, 1]) and torch.equal(ours[b, 0], ours[b, 2])


def _torchvision_box(H, W, frac, aspect, corner, scale, ratio):
    """torchvision RandomResizedCrop.get_params with the given uniform draws."""
    area = H * W
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * frac[t])
        ar = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * aspect[t])
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            return int(corner[0] * (H - h + 1)), int(corner[1] * (W - w + 1)), h, w
    return (H - H) // 2, 0, H, W  # square-ish images: the whole image


def test_resized_crop_boxes_follow_torchvision():
    H, W, total = 32, 30, 64
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    gen = torch.Generator().manual_seed(3)
    boxes = sc.resized_crop_boxes(H, W, gen, (0, 1, total), scale=scale, ratio=ratio)
    gen = torch.Generator().manual_seed(3)
    frac, aspect = torch.rand(10, total, generator=gen).double(), torch.rand(10, total, generator=gen).double()
    corner = torch.rand(2, total, generator=gen).double()
    for k in range(total):
        want = _torchvision_box(H, W, frac[:, k].tolist(), aspect[:, k].tolist(), corner[:, k].tolist(), scale, ratio)
        assert tuple(boxes[k].tolist()) == want
    # the fallback: no try fits (scale forcing w > W) -> the central crop
    boxes = sc.resized_crop_boxes(8, 8, torch.Generator().manual_seed(0), (0, 1, 4), scale=(1.0, 1.0), ratio=(2.0, 3.0))
    assert boxes.tolist() == [[2, 0, 4, 8]] * 4  # ratio > 1: w = W, h = round(W / 2)


def test_resized_crop_identity_box_and_bilinear_by_hand():
    x = _imgs(n=2, h=4, w=4)
    full = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]])
    assert torch.allclose(sc.resized_crop(x, full), x, atol=1e-4)
    # a 2 x 2 box upsampled to 4 x 4: sample points at (x + .5) / 2 - .5 = -.25, .25, .75, 1.25, edges repeated
    box = torch.tensor([[1, 1, 2, 2], [0, 0, 2, 2]])
    out = sc.resized_crop(x, box)
    patch = x[0, 0, 1:3, 1:3]
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])  # row / column interpolation weights
    assert torch.allclose(out[0, 0], w @ patch @ w.T, atol=1e-3)


def test_color_jitter_applies_four_ops_in_drawn_order():
    x = _imgs(n=6, seed=4)
    gen = torch.Generator().manual_seed(5)
    out = sc.color_jitter(x, gen, (0, 1, 6), jitter=(0.4, 0.4, 0.4, 0.1), p=0.8)
    gen = torch.Generator().manual_seed(5)
    apply = torch.rand(6, generator=gen) < 0.8
    order = torch.rand(6, 4, generator=gen).argsort(1)
    u = torch.rand(4, 6, generator=gen).double()
    factors = [0.6 + 0.8 * u[0], 0.6 + 0.8 * u[1], 0.6 + 0.8 * u[2], -0.1 + 0.2 * u[3]]
    for i in range(6):
        y = x[i:i + 1]
        if apply[i]:
            for k in order[i].tolist():
                y = sc.JITTER_OPS[k](y, factors[k][i:i + 1])
        assert torch.allclose(out[i:i + 1], y, atol=1e-4)
    assert not apply.all()  # the seed covers a skipped image


def test_simclr_view_deterministic_uint8_and_sharded():
    raw = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (8, 3, 10, 10)).astype(np.uint8))
    a = sc.simclr_view(raw, torch.Generator().manual_seed(1))
    b = sc.simclr_view(raw, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == raw.shape and torch.equal(a, b)
    parts = [sc.simclr_view(raw[r::2], torch.Generator().manual_seed(1), (r, 2, 8)) for r in range(2)]
    assert torch.equal(parts[0], a[0::2]) and torch.equal(parts[1], a[1::2])


def test_crop_jitter_view_is_the_crop_then_jitter_and_grayscale():
    """'crop_jitter' (SADE's test-time view): the regular crop / flip with the same draws, then
    colour jitter and grayscale drawn after them, rounded to uint8 once."""
    from longtail.data.augment import random_crop, random_flip

    raw = torch.from_numpy(np.random.RandomState(3).randint(0, 256, (6, 8, 8, 3)).astype(np.uint8))
    base = BatchAugment(mean=MEAN, std=STD, crop_padding=2, flip=True)
    view = base.view("crop_jitter")
    got = view(raw, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    shard = (0, 1, 6)
    x = random_flip(random_crop(raw.permute(0, 3, 1, 2), 2, g, shard), g, shard)
    x = sc.random_grayscale(sc.color_jitter(x.float(), g, shard), g, shard).round().clamp(0, 255).to(torch.uint8)
    want = (x.float() / 255 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, base(raw, torch.Generator().manual_seed(5)))  # jitter / grayscale changed it


def test_named_views_and_bad_parameters():
    base = BatchAugment(mean=MEAN, std=STD, crop_padding=2, flip=True, randaugment_n=1, randaugment_m=5)
    assert base.view("regular") is base
    assert base.view("crop_jitter").crop_jitter and base.view("crop_jitter").crop_padding == 2
    assert set(VIEWS) == {"regular", "simclr", "simclr_randaugment", "randaugment", "crop_jitter", "mocov2"}
    assert base.view("simclr").simclr and base.view("simclr").policy == "none"
    assert base.view("simclr_randaugment").policy == "randaugment"
    assert base.view("randaugment").randaugment["num_ops"] == 1 and base.view("randaugment").crop_padding == 2
    raw = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    for name in VIEWS:
        out = base.view(name)(raw, torch.Generator().manual_seed(0))
        assert out.shape == (4, 3, 8, 8) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="view must be one of"):
        base.view("mocov3")
    for kw, msg in (({"color_jitter": (0.4, 0.4, 0.4)}, "color_jitter"), ({"color_jitter": (0.4, 0.4, 0.4, 0.7)}, "hue"),
                    ({"jitter_p": 1.5}, "jitter_p"), ({"grayscale_p": -0.1}, "grayscale_p"),
                    ({"resized_crop_scale": (0.0, 1.0)}, "resized_crop_scale")):
        with pytest.raises(ValueError, match=msg):
            BatchAugment(mean=MEAN, std=STD, simclr=True, **kw)


def test_plain_method_steps_bitwise_unchanged_by_views(tmp_path):
    """A CE run draws nothing for extra views: its first epoch equals the same loop with the views
    machinery bypassed (train_batch, the path of before), and a method asking for views gets them
    drawn after the main view from the same generator."""
    from longtail.config import config_from_dict
    from longtail.data.build import build_data
    from longtail.engine.loop import Trainer

    cfg = config_from_dict(tiny_config())
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    trainer = Trainer(cfg, data, tmp_path / "a")
    assert trainer.views == []
    pos = np.arange(16)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a, ta = trainer.train_batch(pos, g1)
    b, tb, views = trainer.train_views(pos, g2)
    assert views == () and torch.equal(a, b) and torch.equal(ta, tb)
    assert torch.equal(g1.get_state(), g2.get_state())
    # a method with views: the main view is unchanged, the views follow from the same generator
    trainer.views = [trainer.augment.view("simclr"), trainer.augment.view("simclr")]
    g3 = torch.Generator().manual_seed(9)
    c, _, (v1, v2) = trainer.train_views(pos, g3)
    assert torch.equal(a, c) and not torch.equal(v1, v2)
    g4 = torch.Generator().manual_seed(9)
    trainer.train_batch(pos, g4)
    raw = torch.from_numpy(data.train.batch(pos))
    assert torch.equal(trainer.views[0](raw, g4, (0, 1, 16)), v1)


def test_resized_crop_matches_pillow_bilinear():
    raw = np.random.RandomState(7).randint(0, 256, (3, 12, 10, 3)).astype(np.uint8)
    boxes = torch.tensor([[2, 1, 5, 7], [0, 3, 12, 4], [4, 4, 3, 3]])
    ours = sc.resized_crop(torch.from_numpy(raw).permute(0, 3, 1, 2), boxes).round().permute(0, 2, 3, 1).numpy()
    for k, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = np.asarray(Image.fromarray(raw[k]).crop((l, t, l + w, t + h)).resize((10, 12), Image.BILINEAR), np.float32)
        assert np.abs(ours[k] - ref).max() <= 1  # PIL's fixed-point rounding
