"""Contrastive building blocks (models/contrastive.py): the projection head's layout, the feature
queue's FIFO order and wrap-around, the momentum encoder's EMA by hand, state round trips,
bad parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.methods import build_recipe
from longtail.models.contrastive import FeatureQueue, MomentumEncoder, ProjectionHead


def test_projection_head_layout_and_normalised_output():
    head = ProjectionHead(64, 32)  # PaCo's CIFAR ResNet-32: 64 -> 64 -> 32
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.mlp[0].weight.shape == (64, 64) and head.mlp[3].weight.shape == (32, 64)
    out = head(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (5, 32) and torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    plain = ProjectionHead(8, 4, hidden_features=16, batch_norm=False, normalize=False)
    assert [type(m) for m in plain.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = plain.mlp[2](torch.relu(plain.mlp[0](x)))
    assert torch.equal(plain(x), want)


def _rows(start, n, dim=2):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queue_fifo_order_and_wrap_around():
    q = FeatureQueue(5, 2)
    assert q.contents()[0].shape == (0, 2)  # empty at the start
    q.push(_rows(0, 3), torch.tensor([0, 1, 2]))
    feats, labels = q.contents()
    assert feats[:, 0].tolist() == [0, 1, 2] and labels.tolist() == [0, 1, 2] and int(q.ptr) == 3
    q.push(_rows(3, 4), torch.tensor([3, 4, 5, 6]))  # wraps: slots 3, 4, 0, 1
    assert q.features[:, 0].tolist() == [5, 6, 2, 3, 4] and q.labels.tolist() == [5, 6, 2, 3, 4]
    feats, labels = q.contents()
    assert feats[:, 0].tolist() == [2, 3, 4, 5, 6] and labels.tolist() == [2, 3, 4, 5, 6]  # oldest first
    assert int(q.ptr) == 2 and int(q.filled) == 5
    q.push(_rows(7, 7), torch.arange(7, 14))  # larger than the queue: the newest 5 rows survive
    feats, labels = q.contents()
    assert labels.tolist() == [9, 10, 11, 12, 13] and feats[:, 0].tolist() == [9, 10, 11, 12, 13]
    assert int(q.ptr) == (2 + 7) % 5
    q.push(_rows(14, 5), torch.arange(14, 19))  # exactly K rows (PaCo's K % B == 0 case)
    assert q.contents()[1].tolist() == [14, 15, 16, 17, 18] and int(q.ptr) == 4


def test_queue_detaches_and_checks_shapes():
    q = FeatureQueue(4, 3)
    x = torch.randn(2, 3, requires_grad=True)
    q.push(x, torch.tensor([1, 0]))
    assert not q.features.requires_grad
    with pytest.raises(ValueError, match=r"features \(B, 3\)"):
        q.push(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        q.push(torch.randn(2, 3), torch.tensor([0]))


def test_queue_randomize_is_paco_start():
    q = FeatureQueue(6, 3)
    q.randomize(10, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(6, 3, generator=g), dim=0)  # along the K slots (sic)
    assert torch.equal(q.features, feats) and torch.equal(q.labels, torch.randint(0, 10, (6,), generator=g))
    assert int(q.filled) == 6 and int(q.ptr) == 0


def test_queue_state_round_trip():
    q = FeatureQueue(5, 2)
    q.push(_rows(0, 7), torch.arange(7))
    r = FeatureQueue(5, 2)
    r.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q.contents(), r.contents()))
    assert int(r.ptr) == int(q.ptr) and int(r.filled) == int(q.filled)
    q.push(_rows(7, 2), torch.tensor([7, 8]))
    r.push(_rows(7, 2), torch.tensor([7, 8]))
    assert torch.equal(q.features, r.features) and torch.equal(q.labels, r.labels)


def _model():
    cfg = config_from_dict(tiny_config())
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    return build_recipe(cfg, data).model


def test_momentum_encoder_ema_by_hand():
    model = _model()
    enc = MomentumEncoder(model, momentum=0.9)
    assert all(not p.requires_grad for p in enc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(enc.module.parameters(), model.parameters()))  # a copy
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a "step"
    enc.update(model)
    for k, s, q in zip(enc.module.parameters(), start, model.parameters()):
        assert torch.allclose(k, 0.9 * s + 0.1 * q, rtol=0, atol=1e-6)  # = s + 0.1
        assert torch.allclose(k, s + 0.1, atol=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    enc.update(model)  # k = 0.9 (s + 0.1) + 0.1 (s + 2) = s + 0.29
    for k, s in zip(enc.module.parameters(), start):
        assert torch.allclose(k, s + 0.29, atol=1e-5)
    # buffers: 'own' leaves the copy's BN statistics alone, 'copy' takes the model's
    bn_model = [b for b in model.buffers() if b.is_floating_point()]
    assert bn_model  # the tiny CNN has BatchNorm statistics
    with torch.no_grad():
        for b in bn_model:
            b.add_(3.0)
    enc.update(model)
    assert not any(torch.equal(a, b) for a, b in zip(
        [b for b in enc.module.buffers() if b.is_floating_point()], bn_model))
    copying = MomentumEncoder(model, momentum=0.5, buffers="copy")
    with torch.no_grad():
        for b in bn_model:
            b.add_(1.0)
    copying.update(model)
    assert all(torch.equal(a, b) for a, b in zip(copying.module.buffers(), model.buffers()))
    # momentum 0: the copy follows the model exactly; momentum 1: frozen
    follow, frozen = MomentumEncoder(_model(), momentum=0.0), MomentumEncoder(_model(), momentum=1.0)
    frozen_start = [p.clone() for p in frozen.module.parameters()]
    follow.update(model)
    frozen.update(model)
    assert all(torch.equal(a, b) for a, b in zip(follow.module.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(frozen.module.parameters(), frozen_start))


def test_momentum_encoder_state_round_trip_and_forward():
    model = _model()
    enc = MomentumEncoder(model, momentum=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    enc.update(model)
    other = MomentumEncoder(_model(), momentum=0.99)
    other.load_state_dict(enc.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), enc.state_dict().values()))
    x = torch.rand(2, 3, 8, 8)
    enc.eval(), other.eval()
    assert torch.equal(enc(x), other(x)) and torch.equal(enc(x), enc.module(x))


def test_bad_parameters():
    with pytest.raises(ValueError, match="out_features"):
        ProjectionHead(8, 0)
    with pytest.raises(ValueError, match="batch_norm"):
        ProjectionHead(8, 4, batch_norm="yes")
    with pytest.raises(ValueError, match="size"):
        FeatureQueue(0, 4)
    with pytest.raises(ValueError, match="dim"):
        FeatureQueue(4, 2.0)
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(model, momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(model, momentum=True)
    with pytest.raises(ValueError, match="buffers"):
        MomentumEncoder(model, buffers="ema")
    with pytest.raises(ValueError, match="different parameters"):
        MomentumEncoder(model).update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
