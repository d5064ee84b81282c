"""CDB-W-CE: the `cdb_ce` loss, the CDB weights and the `cdb_ce` method (validation-measured
class difficulty, official hitachi-rd-cv/CDB-loss CIFAR-LT)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.eval.predict import predict
from longtail.io import safe_torch_load
from longtail.losses import build_loss
from longtail.losses.cdb import CDBCrossEntropy, cdb_tau, cdb_weights
from longtail.methods import build_recipe, rebuild_model
from longtail.methods.cdb import class_accuracy
from longtail.runs import train_run

COUNTS = [50, 20, 5]


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 2, 1, 0])


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_cdb_ce_without_weight_is_cross_entropy():
    assert CDBCrossEntropy.neutral_params == {}
    logits, target = _batch()
    for reduction in ("batch_mean", "weighted_mean"):
        loss = build_loss("cdb_ce", {"reduction": reduction}, class_counts=COUNTS)
        assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target), rtol=1e-6)


def test_cdb_ce_reductions_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    w = torch.tensor([0.5, 1.0, 2.0])
    l0 = math.log(math.exp(2) + 2) - 2  # -log softmax of the target
    l1 = math.log(math.e + 2) - 0
    loss = build_loss("cdb_ce", class_counts=COUNTS)
    loss.set_class_weight(w)
    assert float(loss(logits, target)) == pytest.approx((0.5 * l0 + 2.0 * l1) / 2, rel=1e-6)  # official: mean
    loss = build_loss("cdb_ce", {"reduction": "weighted_mean"}, class_counts=COUNTS)
    loss.set_class_weight(w)
    assert float(loss(logits, target)) == pytest.approx((0.5 * l0 + 2.0 * l1) / 2.5, rel=1e-6)


def test_cdb_weights_by_hand():
    d = [0.2, 0.5, 0.9]
    assert torch.allclose(cdb_weights(d, tau=1.0), torch.tensor([0.375, 0.9375, 1.6875]))
    assert torch.equal(cdb_weights(d, tau=0), torch.ones(3))
    b = 0.8 / (0.1 + 0.01)  # A_max / (A_min + 0.01)
    assert cdb_tau(d) == pytest.approx(_sigmoid(b))
    assert cdb_tau(d, dynamic="two_sigmoid") == pytest.approx(2 * _sigmoid(b - 1))
    tau = _sigmoid(b)
    raw = np.power(d, tau)
    assert torch.allclose(cdb_weights(d), torch.tensor(raw / raw.sum() * 3, dtype=torch.float32))
    # epoch 0 (official: difficulty 1 everywhere) is uniform; a perfect class gets weight 0
    assert torch.equal(cdb_weights([1.0, 1.0, 1.0]), torch.ones(3))
    w = cdb_weights([0.0, 0.5, 0.5], tau=1.0)
    assert torch.allclose(w, torch.tensor([0.0, 1.5, 1.5]))
    assert torch.equal(cdb_weights([0.0, 0.0, 0.0]), torch.ones(3))  # official: 0/0


def test_class_accuracy_by_hand_and_a_class_without_samples():
    logits = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    acc = class_accuracy(logits, labels, 3)
    assert acc.tolist() == [0.5, 1.0, 0.75]  # class 2 has no sample: mean of the others


def test_cdb_ce_gradcheck():
    logits, target = _batch(torch.float64)
    logits.requires_grad_(True)
    for reduction in ("batch_mean", "weighted_mean"):
        loss = build_loss("cdb_ce", {"reduction": reduction}, class_counts=COUNTS).double()
        loss.set_class_weight(torch.tensor([0.3, 1.2, 1.5]))
        loss.class_weight = loss.class_weight.double()
        assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))


def _cfg(**over):
    base = {"method.name": "cdb_ce", "loss.name": "cdb_ce", "data.val_per_class": 2, "train.milestones": [3]}
    base.update(over)
    return tiny_config(**base)


def test_cdb_trains_measures_on_validation_and_resumes_exactly(tmp_path, monkeypatch):
    arrays = tiny_arrays()
    full, cut, before = full_and_resumed(_cfg(), tmp_path, monkeypatch, stop_after_epoch=0, arrays=arrays,
                                         evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["method"]["class_accuracy"], b["method"]["class_accuracy"])
    assert torch.equal(a["method"]["class_weight"], b["method"]["class_weight"])
    # the state saved with each epoch is the validation measurement of that epoch's weights
    cfg = config_from_dict(_cfg())
    data = build_data(cfg.data, arrays=arrays)
    for ckpt in (before, a):
        model = rebuild_model(cfg, data.info, ckpt)
        out = predict(model, data.val, mean=data.mean, std=data.std, batch_size=32, channels_last=True)
        acc = class_accuracy(out["logits"], out["labels"], data.num_classes)
        assert np.allclose(ckpt["method"]["class_accuracy"].numpy(), acc)
        assert torch.allclose(ckpt["method"]["class_weight"], cdb_weights(1 - acc))
    # epoch 0 is plain CE: its loss equals a CE run's
    train_run(config_from_dict(tiny_config(**{"data.val_per_class": 2, "train.milestones": [3],
                                              "train.epochs": 1})), tmp_path / "ce", arrays=arrays, evaluate=False)

    def losses(run):
        return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(full)[0] == pytest.approx(losses(tmp_path / "ce")[0], rel=1e-6)


def test_cdb_sets_the_measured_weights_at_the_next_epoch_start():
    cfg = config_from_dict(_cfg())
    data = build_data(cfg.data, arrays=tiny_arrays())
    recipe = build_recipe(cfg, data)
    method, loss = recipe.method, recipe.loss
    method.on_epoch_start(0, loss)
    assert loss.class_weight is None and method.plain_ce_epochs() == 1
    method.on_epoch_end(0, recipe.model, torch.device("cpu"))
    method.on_epoch_start(1, loss)
    assert torch.equal(loss.class_weight, method.class_weight) and loss.class_weight.shape == (4,)
    fresh = build_recipe(cfg, data).method
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.class_weight, method.class_weight)


@pytest.mark.parametrize("over, message", [
    ({"method.params": {"tau": -1}}, "tau must be 'dynamic' or a finite number >= 0"),
    ({"method.params": {"tau": "fixed"}}, "tau must be 'dynamic'"),
    ({"method.params": {"dynamic_tau": "tanh"}}, "dynamic_tau must be one of 'sigmoid', 'two_sigmoid'"),
    ({"loss.params": {"reduction": "sum"}}, "reduction must be one of 'batch_mean', 'weighted_mean'"),
    ({"reweight.scheme": "inverse_frequency"}, "leave reweight.scheme at 'none'"),
    ({"data.val_per_class": 0}, "set data.val_per_class"),
])
def test_cdb_bad_parameters(over, message):
    cfg = config_from_dict(_cfg(**over))
    data = build_data(cfg.data, arrays=tiny_arrays())
    with pytest.raises(ConfigError, match=message) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)
