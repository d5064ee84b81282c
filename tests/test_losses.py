import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.errors import ConfigError
from longtail.losses import build_loss, effective_number_weights, inverse_frequency_weights
from longtail.registry import LOSSES

COUNTS = [50, 20, 5]


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 2, 1, 0])


def test_ce_equals_f_cross_entropy():
    logits, target = _batch()
    assert torch.allclose(build_loss("ce", class_counts=COUNTS)(logits, target), F.cross_entropy(logits, target))


def test_class_balanced_beta_zero_is_ce():
    logits, target = _batch()
    loss = build_loss("class_balanced", {"beta": 0.0}, class_counts=COUNTS)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target))


def test_effective_number_weights_by_hand():
    # beta = 0.9: E_n = (1 - 0.9^n) / 0.1; w = 1/E_n normalised to sum C
    e = [(1 - 0.9**n) / 0.1 for n in COUNTS]
    w = [1 / v for v in e]
    s = sum(w)
    expected = [v / s * 3 for v in w]
    assert np.allclose(effective_number_weights(COUNTS, 0.9).numpy(), expected, atol=1e-6)
    assert effective_number_weights(COUNTS, 0.9).sum().item() == pytest.approx(3.0)
    assert np.allclose(inverse_frequency_weights([1, 2, 4]).numpy(), np.array([4, 2, 1]) / 7 * 3)


def test_class_balanced_hand_computed():
    # two samples, two classes with counts [3, 1], beta 0.5:
    # E = [(1 - 0.125) / 0.5, (1 - 0.5) / 0.5] = [1.75, 1.0]; w ~ [1/1.75, 1] normalised to sum 2
    w0, w1 = (1 / 1.75) / (1 / 1.75 + 1) * 2, 1 / (1 / 1.75 + 1) * 2
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    ce0 = math.log(1 + math.exp(-2.0))
    ce1 = math.log(1 + math.exp(-1.0))
    loss = build_loss("class_balanced", {"beta": 0.5}, class_counts=[3, 1])
    assert loss(logits, target).item() == pytest.approx((w0 * ce0 + w1 * ce1) / 2, rel=1e-6)  # official: / B
    loss_w = build_loss("class_balanced", {"beta": 0.5, "reduction": "weights"}, class_counts=[3, 1])
    assert loss_w(logits, target).item() == pytest.approx((w0 * ce0 + w1 * ce1) / (w0 + w1), rel=1e-6)


def test_weighted_ce_is_pytorch_weighted_mean():
    logits, target = _batch()
    loss = build_loss("ce", class_counts=COUNTS)
    w = torch.tensor([0.2, 0.8, 2.0])
    loss.set_class_weight(w)
    per = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(loss(logits, target), (per * w[target]).sum() / w[target].sum())
    with pytest.raises(ValueError, match="shape"):
        loss.set_class_weight(torch.ones(4))


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradcheck_every_loss(name):
    logits, target = _batch(dtype=torch.float64)
    logits.requires_grad_(True)
    loss = build_loss(name, class_counts=COUNTS).double()
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


@pytest.mark.parametrize("name", LOSSES.names())
def test_contract_every_loss(name):
    logits, target = _batch()
    logits.requires_grad_(True)
    value = build_loss(name, class_counts=COUNTS)(logits, target)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_bad_parameters():
    with pytest.raises(ConfigError, match="has no parameter 'betta' \\(did you mean 'beta'\\?\\)"):
        build_loss("class_balanced", {"betta": 0.9}, class_counts=COUNTS)
    with pytest.raises(ValueError, match="beta must be"):
        build_loss("class_balanced", {"beta": 1.0}, class_counts=COUNTS)
    with pytest.raises(ConfigError, match="unknown loss 'focall'"):
        build_loss("focall", class_counts=COUNTS)
