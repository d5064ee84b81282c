"""The expert split of the ResNets (models/experts.py, model.params.experts): the plain networks are
unchanged without it, E = 1 with full widths is the plain network, shapes / names / parameter counts
of RIDE's networks, the plain forward is the expert mean, bad parameters."""

from __future__ import annotations

import pytest
import torch

from longtail.models import build_model

RIDE3 = {"num": 3, "shared_stages": 1, "widths": "ride", "scale": 30}


def _build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, num_classes=7, **kw).double().eval()


@pytest.mark.parametrize("name,size,param_sum,out_sum", [
    # measured before the option existed (float64 init, seed 0, 7 classes): the plain nets must not move
    ("resnet32", 32, 1109.5502775042517, -42.92793262718948),
    ("resnet10", 64, 2786.8257896039327, 0.9680341886745623),
])
def test_plain_networks_unchanged(name, size, param_sum, out_sum):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build_model(name, num_classes=7).eval()
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        assert sum(p.sum().item() for p in model.parameters()) == pytest.approx(param_sum, rel=1e-13)
        assert model(images).sum().item() == pytest.approx(out_sum, rel=1e-10)
        assert model.num_experts == 0
        with pytest.raises(RuntimeError, match="no experts"):
            model.expert_logits(images)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name,size,shared", [("resnet32", 16, 1), ("resnet32", 16, 2), ("resnet10", 64, 1),
                                               ("resnet10", 64, 3)])
def test_one_full_width_expert_is_the_plain_network(name, size, shared):
    plain = _build(name)
    single = _build(name, params={"experts": {"num": 1, "shared_stages": shared}})
    p_state, s_state = plain.state_dict(), single.state_dict()
    assert len(p_state) == len(s_state)
    rename = {"linears.0.": "linear." if name == "resnet32" else "fc."}
    rename.update({f"layer{k}s.0.": f"layer{k}." for k in range(1, 5)})
    for key, value in s_state.items():
        plain_key = key
        for new, old in rename.items():
            plain_key = plain_key.replace(new, old)
        assert torch.equal(p_state[plain_key], value), key  # same init draws, same order
    images = torch.rand(3, 3, size, size, dtype=torch.float64)
    assert torch.equal(plain(images), single(images))


def test_ride_cifar_network_shapes_names_and_counts():
    model = _build("resnet32", head="cosine", params={"experts": RIDE3})
    assert model.num_experts == 3 and model.head_name == "linears" and model.num_features == 3 * 48
    names = model.state_dict()
    assert "layer1.0.conv1.weight" in names and "layer2.0.conv1.weight" not in names
    assert names["layer2s.2.0.conv1.weight"].shape == (24, 16, 3, 3)  # official reduce_dimension widths
    assert names["layer3s.0.4.conv2.weight"].shape == (48, 48, 3, 3)
    assert names["linears.1.weight"].shape == (48, 7)  # NormedLinear, stored (in, out) as the official
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    logits, feats = model.expert_outputs(images)
    assert logits.shape == (3, 4, 7) and feats.shape == (3, 4, 48)
    assert logits.abs().max() <= 30 + 1e-9  # s * cosine
    torch.testing.assert_close(model(images), logits.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.forward_head(model.forward_features(images), pre_logits=True),
                               feats.permute(1, 0, 2).reshape(4, -1))
    shared = model.shared_features(images)
    assert shared.shape == (4, 16, 32, 32)
    for e in range(3):
        pooled = model.expert_branch(shared, e).mean(dim=(2, 3))
        torch.testing.assert_close(model.expert_head(e, pooled), logits[e])
    # parameter count with 10 classes: 770,896 (ResNet-32: 464,154)
    ten = build_model("resnet32", num_classes=10, head="cosine", params={"experts": RIDE3})
    assert sum(p.numel() for p in ten.parameters()) == 770_896


def test_ride_imagenet_network_shapes():
    model = _build("resnet10", params={"experts": {"num": 2, "shared_stages": 2, "widths": "ride"}})
    names = model.state_dict()
    assert names["layer3s.1.0.conv1.weight"].shape == (192, 128, 3, 3)
    assert names["layer4s.0.0.downsample.0.weight"].shape == (384, 192, 1, 1)
    assert "layer3.0.conv1.weight" not in names and "layer2.0.conv1.weight" in names
    logits, feats = model.expert_outputs(torch.rand(2, 3, 64, 64, dtype=torch.float64))
    assert logits.shape == (2, 2, 7) and feats.shape == (2, 2, 384)
    custom = _build("resnet10", params={"experts": {"num": 2, "shared_stages": 3, "widths": [100]}})
    assert custom.expert_logits(torch.rand(1, 3, 64, 64, dtype=torch.float64)).shape == (2, 1, 7)


def test_odd_ride_widths_need_even_padding():
    # 16 -> 24 pads 4 channels each side (official (planes - in_planes) // 2), not planes // 4 = 6
    model = _build("resnet20", params={"experts": {"num": 2, "shared_stages": 1, "widths": [24, 48]}})
    assert model.layer2s[0][0].shortcut.pad == 4 and model.layer3s[0][0].shortcut.pad == 12


@pytest.mark.parametrize("experts,match", [
    ({"num": 0}, "experts.num"),
    ({"num": True}, "experts.num"),
    ({"num": 2, "shared_stages": 0}, "experts.shared_stages"),
    ({"num": 2, "shared_stages": 3}, "experts.shared_stages"),
    ({"num": 2, "widths": [24]}, "experts.widths"),
    ({"num": 2, "widths": "half"}, "experts.widths"),
    ({"num": 2, "widths": [25, 48]}, "experts.widths"),
    ({"num": 2, "widths": [8, 48]}, "experts.widths"),
    ({"num": 2, "scale": 0}, "experts.scale"),
    ({"num": 2, "experts": 3}, "unknown key"),
    (3, "mapping"),
])
def test_bad_expert_params(experts, match):
    with pytest.raises(ValueError, match=match):  # the method builder turns it into a one-line ConfigError
        build_model("resnet32", num_classes=10, params={"experts": experts})


def test_bbn_and_experts_exclusive():
    with pytest.raises(ValueError, match="bbn and experts"):
        build_model("resnet32", num_classes=10, params={"experts": {"num": 2}, "bbn": True})
