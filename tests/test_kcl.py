"""KCL (methods/kcl.py): the k-positive loss by hand, its neutral setting (k = 0: MoCo's InfoNCE),
gradcheck, the queue and momentum encoder through a step, a 2-epoch run that resumes exactly, stage 2
(crt) on the stage-1 checkpoint, bad parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.methods.kcl import kcl_loss

KCL = {"method.name": "kcl", "method.params": {"queue_size": 8, "dim": 4, "k": 2}}


def _case():
    q = torch.tensor([[1.0, 0.0]])
    key = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    return q, key, torch.tensor([0]), queue, torch.tensor([0, 0, 1])


def test_loss_by_hand():
    q, key, target, queue, labels = _case()
    # logits [q.k, q.Q] / T = [1, 1, 0.6, -1]; k = 1: own key + the first same-class queue key
    lse = math.log(math.e + math.e + math.exp(0.6) + math.exp(-1))
    got = kcl_loss(q, key, target, queue, labels, k=1, temperature=1.0)
    assert math.isclose(float(got), lse - 1.0, rel_tol=1e-6)
    # k = 2: both same-class queue keys, soft labels 1/3 each
    got = kcl_loss(q, key, target, queue, labels, k=2, temperature=1.0)
    assert math.isclose(float(got), lse - (1 + 1 + 0.6) / 3, rel_tol=1e-6)
    # v2: the unused positive's logit becomes 0 (multiplied by 0, not removed)
    lse2 = math.log(math.e + math.e + 1.0 + math.exp(-1))
    got = kcl_loss(q, key, target, queue, labels, k=1, temperature=1.0, loss_type="v2")
    assert math.isclose(float(got), lse2 - 1.0, rel_tol=1e-6)
    # temperature divides every logit
    got = kcl_loss(q, key, target, queue, labels, k=1, temperature=0.5)
    lse_t = math.log(2 * math.exp(2) + math.exp(1.2) + math.exp(-2))
    assert math.isclose(float(got), lse_t - 2.0, rel_tol=1e-6)


def test_k0_is_moco_infonce_and_empty_queue_is_zero():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 3, generator=g), dim=1)
    key = F.normalize(torch.randn(5, 3, generator=g), dim=1)
    queue = F.normalize(torch.randn(7, 3, generator=g), dim=1)
    labels, target = torch.randint(0, 2, (7,), generator=g), torch.randint(0, 2, (5,), generator=g)
    logits = torch.cat([(q * key).sum(1, keepdim=True), q @ queue.T], 1) / 0.07
    want = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(kcl_loss(q, key, target, queue, labels, k=0, temperature=0.07), want, atol=1e-5)
    empty = kcl_loss(q, key, target, queue[:0], labels[:0], k=6, temperature=0.07)
    assert float(empty) == 0.0


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    key = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1)
    labels, target = torch.tensor([0, 1, 0, 1, 0, 0]), torch.tensor([0, 1, 1, 0])
    for loss_type in ("v1", "v2"):
        assert torch.autograd.gradcheck(
            lambda x: kcl_loss(F.normalize(x, dim=1), key, target, queue, labels, k=2, temperature=0.5,
                               loss_type=loss_type), (q,))


def test_step_fills_queue_and_momentum_follows():
    _, _, recipe = tiny_recipe(**KCL)
    method, model = recipe.method, recipe.model
    assert not any(p.requires_grad for p in model.head.parameters())
    assert all(not p.requires_grad for p in model.kcl_key.parameters())
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 0, 2, 0])
    out = method.training_step(model.train(), split_forward(model), images, target, recipe.loss, torch.Generator())
    assert torch.isfinite(out.loss) and int(model.kcl_queue.filled) == 5
    assert torch.equal(model.kcl_queue.labels[:5], target)
    out.loss.backward()
    assert model.kcl_projection.weight.grad is not None
    with torch.no_grad():
        for p in model.kcl_projection.parameters():
            p.add_(1.0)
    before = model.kcl_key.module.kcl_projection.weight.clone()
    method.after_step(model)
    after = model.kcl_key.module.kcl_projection.weight
    assert torch.allclose(after, 0.999 * before + 0.001 * model.kcl_projection.weight)


def test_trains_resumes_exactly_and_crt_reads_it(tmp_path, monkeypatch):
    from longtail.config import config_from_dict
    from longtail.runs import train_run

    cfg = tiny_config(**KCL)
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert int(a["model"]["kcl_queue.filled"]) == 8
    # stage 2: crt with class-balanced sampling on the frozen KCL representation
    stage2 = tiny_config(**{"method.name": "crt", "method.params": {"stage1": str(full / "checkpoints/last.pt")},
                            "sampler.name": "class_aware", "train.epochs": 1})
    train_run(config_from_dict(stage2), tmp_path / "crt", arrays=tiny_arrays(), evaluate=False)
    from longtail.io import safe_torch_load
    s2 = safe_torch_load(tmp_path / "crt/checkpoints/last.pt")["model"]
    assert not any(k.startswith("kcl_") for k in s2)
    backbone = [k for k in s2 if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    assert backbone and all(torch.equal(s2[k], a["model"][k]) for k in backbone)


@pytest.mark.parametrize("params, key", [
    ({"k": -1}, "k"), ({"k": 1.5}, "k"), ({"temperature": 0}, "temperature"), ({"dim": 0}, "dim"),
    ({"queue_size": 0}, "queue_size"), ({"momentum": 1.5}, "momentum"), ({"mlp": "yes"}, "mlp"),
    ({"loss_type": "v3"}, "loss_type"), ({"view": "weird"}, "view"), ({"posk": 6}, "posk"),
])
def test_bad_params(params, key):
    with pytest.raises(ConfigError, match=key) as err:
        tiny_recipe(**{"method.name": "kcl", "method.params": params})
    assert "\n" not in str(err.value)


def test_refuses_mixing():
    with pytest.raises(ConfigError, match="mixup_alpha"):
        tiny_recipe(**KCL, **{"train.mixup_alpha": 1.0})
