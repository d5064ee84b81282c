import pytest
import torch

from longtail.models import build_model, load_weights
from longtail.registry import MODELS
from longtail.io import atomic_torch_save


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet32_parameter_count():
    # LDAM-DRW's ResNet-32 with a 10-class linear head: about 0.46M
    assert n_params(build_model("resnet32", num_classes=10)) == 464_154


@pytest.mark.parametrize("name, count", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
                                         ("resnet101", 44_549_160), ("resnet152", 60_192_808)])
def test_imagenet_resnets_match_torchvision_sizes(name, count):
    # torchvision's published parameter counts for 1000 classes
    assert n_params(build_model(name, num_classes=1000)) == count


def test_torchvision_key_names():
    keys = set(build_model("resnet50", num_classes=1000).state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
              "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"):
        assert k in keys
    assert len(keys) == 320
    assert len(build_model("resnet18", num_classes=1000).state_dict()) == 122


def test_ldam_key_names_and_option_a():
    model = build_model("resnet32", num_classes=10, head="cosine")
    sd = model.state_dict()
    assert "linear.weight" in sd and sd["linear.weight"].shape == (64, 10)  # NormedLinear stores (in, out)
    assert not any("shortcut" in k for k in sd)  # option A has no parameters


@pytest.mark.parametrize("name", MODELS.names())
def test_contract_every_model(name):
    small = name in ("small_cnn",) or name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
    size = 8 if name == "small_cnn" else (16 if small else 64)
    model = build_model(name, num_classes=5, in_channels=3)
    images = torch.randn(2, 3, size, size)
    features = model.forward_features(images)
    assert features.dim() == 4 and features.shape[1] == model.num_features
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    logits = model(images)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cosine_head_outputs_cosines():
    model = build_model("resnet20", num_classes=4, head="cosine")
    logits = model(torch.randn(3, 3, 16, 16))
    assert logits.abs().max() <= 1 + 1e-5
    w = model.linear.weight
    assert torch.allclose(w.norm(dim=0), torch.ones(4), atol=1e-4)


def test_reset_head_and_load_weights(tmp_path):
    source = build_model("resnet18", num_classes=1000)
    atomic_torch_save(source.state_dict(), tmp_path / "w.pt")
    target = build_model("resnet18", num_classes=7)
    report = load_weights(target, tmp_path / "w.pt")
    assert report["skipped"] == ["fc.bias", "fc.weight"]  # other class count
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    target.reset_head(torch.nn.Linear(512, 3))
    assert target.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
