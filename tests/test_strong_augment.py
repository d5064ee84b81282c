"""Strong augmentation (data/strong_augment.py, BatchAugment policy / cutout / two_views) and
CutMix: each op against Pillow (the definition the reference implementations call), magnitude
0 = identity, the CIFAR-10 AutoAugment policy against a per-image PIL re-run of the reference
SubPolicy with the same draws, determinism, per-image independence, DDP shards, CutMix's lambda,
policy none unchanged, config errors, a tiny run with AutoAugment + Cutout that resumes bitwise."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data import strong_augment as sa
from longtail.data.augment import BatchAugment, random_crop, random_flip
from longtail.data.mixup import cutmix_batch
from longtail.errors import ConfigError
from longtail.io import safe_torch_load

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _images(seed=0):
    """Seven tiny 9 x 7 RGB images: random, few levels, constant, narrow range."""
    rs = np.random.RandomState(seed)
    imgs = [rs.randint(0, 256, (9, 7, 3)).astype(np.uint8) for _ in range(4)]
    imgs.append((rs.randint(0, 4, (9, 7, 3)) * 40 + 30).astype(np.uint8))
    imgs.append(np.full((9, 7, 3), 77, np.uint8))
    imgs.append(rs.randint(100, 140, (9, 7, 3)).astype(np.uint8))
    return imgs


def _batch(imgs):
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _pil(imgs, fn):
    return _batch([np.asarray(fn(Image.fromarray(i))) for i in imgs])


def _full(value, n=7):
    return torch.full((n,), float(value), dtype=torch.float64)


def _rotate_with_fill(img, degrees):  # the reference's rotate_with_fill
    rot = img.convert("RGBA").rotate(degrees)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)


FILL = (128, 128, 128)


@pytest.mark.parametrize("name,ours,ref", [
    ("invert", lambda x: sa.invert(x), ImageOps.invert),
    ("autocontrast", lambda x: sa.auto_contrast(x), ImageOps.autocontrast),
    ("equalize", lambda x: sa.equalize(x), ImageOps.equalize),
])
def test_histogram_ops_equal_pil(name, ours, ref):
    imgs = _images()
    assert torch.equal(ours(_batch(imgs)), _pil(imgs, ref))


@pytest.mark.parametrize("threshold", [256, 227.55, 128, 28.4, 0])
def test_solarize_equals_pil(threshold):
    imgs = _images()
    assert torch.equal(sa.solarize(_batch(imgs), _full(threshold)), _pil(imgs, lambda im: ImageOps.solarize(im, threshold)))


@pytest.mark.parametrize("bits", [8, 7, 5, 4, 1])
def test_posterize_equals_pil(bits):
    imgs = _images()
    assert torch.equal(sa.posterize(_batch(imgs), _full(bits)), _pil(imgs, lambda im: ImageOps.posterize(im, bits)))


def test_posterize_zero_bits_is_black_and_solarize_add_by_hand():
    x = torch.tensor([0, 100, 127, 128, 200, 255], dtype=torch.uint8).view(1, 1, 1, 6)
    assert int(sa.posterize(x, _full(0, 1)).max()) == 0  # Pillow < 10 allowed 0 bits: all black
    out = sa.solarize_add(x, torch.tensor([30]))
    assert out.flatten().tolist() == [30, 130, 157, 128, 200, 255]


@pytest.mark.parametrize("factor", [0.1, 0.5, 1.0, 1.3, 1.9])
@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops_equal_pil(name, factor):
    imgs = _images()
    ours = getattr(sa, name.lower())(_batch(imgs), _full(factor))
    assert torch.equal(ours, _pil(imgs, lambda im: getattr(ImageEnhance, name)(im).enhance(factor)))


@pytest.mark.parametrize("value", [0.0, 0.1, -0.3, 0.2333])
def test_shears_equal_pil_nearest(value):
    imgs = _images()
    assert torch.equal(sa.shear_x(_batch(imgs), _full(value)),
                       _pil(imgs, lambda im: im.transform(im.size, Image.AFFINE, (1, value, 0, 0, 1, 0), fillcolor=FILL)))
    assert torch.equal(sa.shear_y(_batch(imgs), _full(value)),
                       _pil(imgs, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, value, 1, 0), fillcolor=FILL)))


@pytest.mark.parametrize("pixels", [0.0, 3.0, -2.5, 4.53])
def test_translations_equal_pil(pixels):
    imgs = _images()
    assert torch.equal(sa.translate_x(_batch(imgs), _full(pixels)),
                       _pil(imgs, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, pixels, 0, 1, 0), fillcolor=FILL)))
    assert torch.equal(sa.translate_y(_batch(imgs), _full(pixels)),
                       _pil(imgs, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, pixels), fillcolor=FILL)))


@pytest.mark.parametrize("degrees", [0.0, 3.33, 10.0, 30.0, -20.0])
def test_rotate_equals_the_reference_rotate_with_fill(degrees):
    imgs = _images()
    ours = sa.rotate(_batch(imgs), _full(degrees))
    ref = _pil(imgs, lambda im: _rotate_with_fill(im, degrees))
    assert torch.equal(ours, ref)  # PIL's NEAREST affine map, exactly (float64 coordinates)


def test_magnitude_zero_is_identity_and_parameters_are_per_image():
    x = _batch(_images())
    for op, neutral in [(sa.shear_x, 0), (sa.shear_y, 0), (sa.translate_x, 0), (sa.translate_y, 0), (sa.rotate, 0),
                        (sa.color, 1), (sa.contrast, 1), (sa.brightness, 1), (sa.sharpness, 1), (sa.solarize, 256),
                        (sa.posterize, 8), (sa.solarize_add, 0)]:
        assert torch.equal(op(x, _full(neutral)), x), op.__name__
    # per image: each row equals the op applied to that image alone with its own magnitude
    mags = torch.tensor([0.0, 3.0, -2.0, 5.5, 1.0, 7.0, -4.0], dtype=torch.float64)
    out = sa.translate_x(x, mags)
    for i in range(7):
        assert torch.equal(out[i:i + 1], sa.translate_x(x[i:i + 1], mags[i:i + 1]))


def test_autoaugment_levels_are_the_reference_ranges():
    assert sa.autoaugment_level("translateX", 9) == pytest.approx(150 / 331)
    assert sa.autoaugment_level("rotate", 2) == pytest.approx(np.linspace(0, 30, 10)[2])
    assert [sa.autoaugment_level("posterize", i) for i in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert sa.autoaugment_level("solarize", 2) == pytest.approx(np.linspace(256, 0, 10)[2])
    assert len(sa.CIFAR10_POLICY) == 25


def _reference_subpolicy(img, policy, u, sign):
    """PaCo autoaug.py SubPolicy.__call__ with the draws given (shears with NEAREST instead of BICUBIC)."""
    funcs = {
        "shearX": lambda im, m, s: im.transform(im.size, Image.AFFINE, (1, m * s, 0, 0, 1, 0), fillcolor=FILL),
        "shearY": lambda im, m, s: im.transform(im.size, Image.AFFINE, (1, 0, 0, m * s, 1, 0), fillcolor=FILL),
        "translateX": lambda im, m, s: im.transform(im.size, Image.AFFINE, (1, 0, m * im.size[0] * s, 0, 1, 0), fillcolor=FILL),
        "translateY": lambda im, m, s: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, m * im.size[1] * s), fillcolor=FILL),
        "rotate": lambda im, m, s: _rotate_with_fill(im, m),
        "color": lambda im, m, s: ImageEnhance.Color(im).enhance(1 + m * s),
        "posterize": lambda im, m, s: ImageOps.posterize(im, int(m)),
        "solarize": lambda im, m, s: ImageOps.solarize(im, m),
        "contrast": lambda im, m, s: ImageEnhance.Contrast(im).enhance(1 + m * s),
        "sharpness": lambda im, m, s: ImageEnhance.Sharpness(im).enhance(1 + m * s),
        "brightness": lambda im, m, s: ImageEnhance.Brightness(im).enhance(1 + m * s),
        "autocontrast": lambda im, m, s: ImageOps.autocontrast(im),
        "equalize": lambda im, m, s: ImageOps.equalize(im),
        "invert": lambda im, m, s: ImageOps.invert(im),
    }
    p1, op1, l1, p2, op2, l2 = sa.CIFAR10_POLICY[policy]
    if u[0] < p1:
        img = funcs[op1](img, sa.autoaugment_level(op1, l1), sign[0])
    if u[1] < p2:
        img = funcs[op2](img, sa.autoaugment_level(op2, l2), sign[1])
    return img


def test_autoaugment_equals_the_reference_subpolicies_with_the_same_draws():
    rs = np.random.RandomState(3)
    imgs = [rs.randint(0, 256, (10, 12, 3)).astype(np.uint8) for _ in range(200)]
    out = sa.autoaugment_cifar10(_batch(imgs), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    policy = torch.randint(0, 25, (200,), generator=g)
    u = torch.rand(2, 200, generator=g)
    sign = torch.randint(0, 2, (2, 200), generator=g) * 2 - 1
    ref = _batch([np.asarray(_reference_subpolicy(Image.fromarray(im), int(policy[i]), u[:, i].tolist(),
                                                  sign[:, i].tolist())) for i, im in enumerate(imgs)])
    assert torch.equal(out, ref)
    assert len(set(policy.tolist())) == 25  # every sub-policy exercised


def test_randaugment_is_deterministic_changes_images_and_magnitude_std_varies_it():
    x = _batch(_images() * 10)
    a = sa.rand_augment(x, torch.Generator().manual_seed(1), num_ops=2, magnitude=9)
    b = sa.rand_augment(x, torch.Generator().manual_seed(1), num_ops=2, magnitude=9)
    c = sa.rand_augment(x, torch.Generator().manual_seed(2), num_ops=2, magnitude=9)
    d = sa.rand_augment(x, torch.Generator().manual_seed(1), num_ops=2, magnitude=9, magnitude_std=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert (a != x).flatten(1).any(1).float().mean() > 0.3
    with pytest.raises(ValueError, match="magnitude"):
        sa.rand_augment(x, torch.Generator(), magnitude=11)


def test_randaugment_arguments_follow_timm_levels():
    one, m = torch.ones(1, dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64)
    assert float(sa._randaugment_argument("rotate", m, -one, 32, 32)) == -30.0
    assert float(sa._randaugment_argument("translateX", m, one, 32, 32)) == pytest.approx(0.45 * 32)
    assert float(sa._randaugment_argument("color", m * 0.5, -one, 32, 32)) == pytest.approx(1.0)  # unsigned
    assert float(sa._randaugment_argument("posterize", m * 0.9, one, 32, 32)) == 3  # int(3.6)
    assert float(sa._randaugment_argument("solarize_add", m, one, 32, 32)) == 110


def test_cutout_is_the_reference_hole():
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = sa.cutout(x, 16, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(0, 32, (64,), generator=g), torch.randint(0, 32, (64,), generator=g)
    for i in range(64):
        mask = np.ones((32, 32), np.float32)  # the reference's Cutout with these centres
        y, xx = int(cy[i]), int(cx[i])
        mask[np.clip(y - 8, 0, 32):np.clip(y + 8, 0, 32), np.clip(xx - 8, 0, 32):np.clip(xx + 8, 0, 32)] = 0
        assert torch.equal(out[i], (x[i].float() * torch.from_numpy(mask)).to(torch.uint8))
    assert torch.equal(sa.cutout(x, 0, torch.Generator()), x)


def test_policy_none_draws_and_returns_exactly_the_crop_flip_path():
    images = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = BatchAugment(mean=MEAN, std=STD, crop_padding=2, flip=True)(images, g1)
    x = random_flip(random_crop(images.permute(0, 3, 1, 2), 2, g2), g2)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(out, ref)
    assert torch.equal(g1.get_state(), g2.get_state())  # nothing more drawn


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment"])
def test_two_ranks_shards_equal_the_single_process_rows(policy):
    images = torch.randint(0, 256, (12, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchAugment(mean=MEAN, std=STD, crop_padding=2, flip=True, policy=policy, cutout=4)
    whole = aug(images, torch.Generator().manual_seed(9))
    for rank in range(2):
        part = aug(images[rank::2], torch.Generator().manual_seed(9), (rank, 2, 12))
        assert torch.equal(part, whole[rank::2])


def test_two_views_are_independent_draws_of_the_same_batch():
    images = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchAugment(mean=MEAN, std=STD, crop_padding=2, flip=True, policy="autoaugment", cutout=4)
    v1, v2 = aug.two_views(images, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(v1, aug(images, g)) and torch.equal(v2, aug(images, g))
    assert not torch.equal(v1, v2)
    plain = BatchAugment(mean=MEAN, std=STD)
    w1, w2 = aug.two_views(images, torch.Generator().manual_seed(1), second=plain)
    assert torch.equal(w1, v1) and torch.equal(w2, plain(images))


def test_cutmix_lambda_is_the_kept_area_and_partners_fill_the_box():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 10, 10).contiguous()
    target = torch.arange(6)
    for seed in range(20):
        mixed, target_b, lam = cutmix_batch(images, target, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        own = (mixed == images).all(1)  # (B, H, W): pixels still the image's own
        partner = (mixed == images[:, :1, :1, :1].flatten()[target_b].view(6, 1, 1, 1)).all(1)
        assert (own | partner).all()  # every pixel is the image's or its partner's
        moved = target_b != target
        kept = own.float().mean(dim=(1, 2))
        assert torch.allclose(kept[moved], torch.full_like(kept[moved], lam))  # lambda = kept area fraction
        assert 0.0 <= lam <= 1.0
    with pytest.raises(ValueError, match="alpha"):
        cutmix_batch(images, target, alpha=0.0, generator=torch.Generator())


@pytest.mark.parametrize("key,value,match", [
    ("train.augment.policy", "autoaug", "train.augment.policy"),
    ("train.augment.cutout", -1, "train.augment.cutout"),
    ("train.augment.randaugment_m", 12, "train.augment.randaugment_m"),
    ("train.augment.randaugment_n", 0, "train.augment.randaugment_n"),
    ("train.cutmix_prob", 0.0, "train.cutmix_prob"),
    ("train.cutmix_alpha", -1.0, "train.cutmix_alpha"),
])
def test_bad_keys_are_one_line_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        config_from_dict(tiny_config(**{key: value}))
    assert "\n" not in str(err.value)


def test_cutmix_and_mixup_are_mutually_exclusive():
    with pytest.raises(ConfigError, match="mutually exclusive"):
        config_from_dict(tiny_config(**{"train.cutmix_alpha": 1.0, "train.mixup_alpha": 1.0}))


def _same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_autoaugment_cutout_cutmix_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.augment.policy": "autoaugment", "train.augment.cutout": 4,
                         "train.cutmix_alpha": 1.0, "train.cutmix_prob": 0.5})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert a["epoch"] == b["epoch"] == 2 and _same_weights(a, b)
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())


def test_randaugment_run_differs_from_the_plain_run(tmp_path):
    from longtail.runs import train_run
    arrays = tiny_arrays()
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), tmp_path / "plain", arrays=arrays, evaluate=False)
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1, "train.augment.policy": "randaugment"})),
              tmp_path / "ra", arrays=arrays, evaluate=False)
    a = safe_torch_load(tmp_path / "plain/checkpoints/last.pt")
    b = safe_torch_load(tmp_path / "ra/checkpoints/last.pt")
    assert not _same_weights(a, b)
