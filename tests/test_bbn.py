"""BBN (methods/bbn.py, models/cifar_resnet.py bbn=True): the network's layers, the cumulative-
learning schedule by hand, the re-balancing sampler's class frequencies, the step's loss against
hand-built logits, the test-time equal-weight pass, the loop's batch service, exact resume, bad
parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.methods.base import TrainBatches
from longtail.methods.bbn import BilateralSampler, bbn_alpha, official_div_epochs, step_seed
from longtail.models import build_model
from longtail.models.cifar_resnet import CifarResNet

BBN_MODEL = {"model.name": "resnet20", "model.params": {"bbn": True}}


def _recipe(**over):
    return tiny_recipe(**{"method.name": "bbn", **BBN_MODEL, **over})


_forward = split_forward


def test_network_shares_all_but_the_last_block():
    plain = build_model("resnet32", num_classes=10)
    bbn = build_model("resnet32", num_classes=10, params={"bbn": True})
    assert sum(p.numel() for p in plain.parameters()) == 464_154  # unchanged without bbn
    # + one 64->64 BasicBlock (2 x 3x3x64x64 convs, 2 BN) and a 128-input head: 464154 + 73984 + 640
    assert sum(p.numel() for p in bbn.parameters()) == 538_778
    assert len(bbn.layer3) == 4 and len(plain.layer3) == 5 and bbn.num_features == 128
    assert bbn.cb_block.conv1.in_channels == bbn.rb_block.conv1.in_channels == 64
    assert bbn.cb_block.conv1.stride == bbn.rb_block.conv1.stride == (1, 1)
    assert not any(k.startswith("layer3.4") for k in bbn.state_dict())
    assert bbn.linear.in_features == 128 and bbn.linear.bias is not None
    shallow = CifarResNet(depth=8, num_classes=4, bbn=True)  # n = 1: the branches are the transition block
    assert len(shallow.layer3) == 0 and shallow.cb_block.conv1.stride == (2, 2)
    assert shallow(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(RuntimeError, match="bbn"):
        with plain.bilateral(0.5):
            pass


def test_alpha_schedule_by_hand():
    # official l = 1 - ((epoch - 1) / div_epoch)^2 with its 1-based epoch = 1 - (t / T)^2, 0-idx t
    assert bbn_alpha(0, 200) == 1.0
    assert bbn_alpha(100, 200) == 0.75
    assert bbn_alpha(199, 200) == pytest.approx(1 - 0.995 ** 2)  # never 0: the last epoch still has 0.00998
    assert bbn_alpha(15, 30) == 0.75
    assert bbn_alpha(100, 200, "linear_decay") == 0.5
    assert bbn_alpha(100, 200, "cosine_decay") == pytest.approx(math.cos(math.pi / 4))
    assert bbn_alpha(100, 200, "parabolic_increment") == 0.25
    assert bbn_alpha(7, 200, "equal") == 0.5
    assert [official_div_epochs(e) for e in (30, 90, 180, 200)] == [30, 100, 200, 200]
    _, _, recipe = _recipe(**{"train.epochs": 4})
    method = recipe.method
    assert method.div_epochs == 4
    for epoch, want in enumerate([1.0, 1 - 1 / 16, 0.75, 1 - 9 / 16]):
        method.on_epoch_start(epoch, recipe.loss)
        assert method.alpha == want


def test_reversed_sampler_frequencies_are_inverse_to_class_sizes():
    counts = np.array([100, 50, 10, 5])
    labels = np.repeat(np.arange(4), counts)[np.random.default_rng(0).permutation(counts.sum())]
    sampler = BilateralSampler(labels, counts, "reverse")
    g = torch.Generator().manual_seed(0)
    pos = sampler.draw(200_000, g)
    freq = np.bincount(labels[pos], minlength=4) / len(pos)
    want = (1 / counts) / (1 / counts).sum()  # official weights n_max / n_c, normalised
    assert np.allclose(freq, want, atol=0.005)
    few = pos[labels[pos] == 3]  # uniform over the images of a class
    per_image = np.bincount(few, minlength=len(labels))[labels == 3] / len(few)
    assert np.allclose(per_image, 1 / 5, atol=0.01)
    again = sampler.draw(200_000, torch.Generator().manual_seed(0))
    assert np.array_equal(pos, again)  # same seed, same batch
    balanced = BilateralSampler(labels, counts, "balance").draw(100_000, torch.Generator().manual_seed(1))
    assert np.allclose(np.bincount(labels[balanced], minlength=4) / 1e5, 0.25, atol=0.006)
    uniform = BilateralSampler(labels, counts, "uniform").draw(100_000, torch.Generator().manual_seed(1))
    assert np.allclose(np.bincount(labels[uniform], minlength=4) / 1e5, counts / counts.sum(), atol=0.006)
    empty = BilateralSampler(labels, np.array([100, 50, 10, 5, 0]), "reverse")  # a class without images
    assert empty.class_prob[4] == 0 and empty.draw(1000, torch.Generator().manual_seed(2)).max() < len(labels)


def _stub_step(recipe, epoch, images_r, target_r):
    """One step with the loop's batch service replaced by a fixed re-balancing batch."""
    method, model = recipe.method, recipe.model
    method.on_epoch_start(epoch, recipe.loss)
    seen = {}

    def fetch(positions, generator):
        seen["size"] = len(positions)
        return images_r, target_r

    method.batches = TrainBatches(fetch=fetch, epoch=epoch, step=0, global_size=images_r.shape[0])
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 1, 2, 3])
    out = method.training_step(model, _forward(model), images, target, recipe.loss, torch.Generator())
    assert seen["size"] == 4
    return out, images, target


def _by_hand_logits(model, images, images_r, alpha):
    f_c = model.cb_block(model._trunk(images)).mean((2, 3))
    f_r = model.rb_block(model._trunk(images_r)).mean((2, 3))
    return model.linear(torch.cat((2 * alpha * f_c, 2 * (1 - alpha) * f_r), 1))


def test_loss_at_alpha_one_is_ce_on_the_conventional_branch():
    _, _, recipe = _recipe(**{"train.epochs": 4})
    model = recipe.model.eval()  # running statistics: the reference passes see the same BN
    images_r = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    target_r = torch.tensor([3, 3, 2, 3])
    out, images, target = _stub_step(recipe, 0, images_r, target_r)
    assert recipe.method.alpha == 1.0
    z = _by_hand_logits(model, images, images_r, 1.0)
    assert torch.allclose(out.logits, z, atol=1e-6)
    assert torch.allclose(out.loss, F.cross_entropy(z, target), atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.rb_block.parameters())  # f_r * 0
    assert model.cb_block.conv1.weight.grad.abs().sum() > 0
    model.zero_grad()
    out, images, target = _stub_step(recipe, 2, images_r, target_r)  # alpha = 0.75: both losses, one z
    z = _by_hand_logits(model, images, images_r, 0.75)
    want = 0.75 * F.cross_entropy(z, target) + 0.25 * F.cross_entropy(z, target_r)
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert torch.equal(out.target, target)  # training accuracy against the conventional labels


def test_eval_logits_are_the_equal_weight_combination():
    _, _, recipe = _recipe()
    model = recipe.model.eval()
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(images)
        out = model._trunk(images)
        f_c, f_r = model.cb_block(out).mean((2, 3)), model.rb_block(out).mean((2, 3))
        assert torch.allclose(logits, model.linear(torch.cat((f_c, f_r), 1)), atol=1e-6)
        with model.bilateral(0.5):  # the training mix at alpha 0.5 on the same images
            assert torch.allclose(logits, model(torch.cat((images, images))), atol=1e-6)
        assert model._bilateral_alpha is None  # the mode ends with the block


def test_the_loop_hands_its_batches_and_the_stream_follows_seed_epoch_step(tmp_path, monkeypatch):
    from longtail.engine.loop import Trainer
    from longtail.methods.bbn import BBN
    from longtail.runs import train_run

    calls = []
    original = BBN.training_step

    def probe(self, model, forward, images, target, loss, generator):
        b = self.batches
        calls.append((b.epoch, b.step, b.global_size, images.shape[0]))
        return original(self, model, forward, images, target, loss, generator)

    fetched = []
    original_batch = Trainer.train_batch

    def record(self, global_pos, generator, order=None):
        fetched.append(np.asarray(global_pos).copy())
        return original_batch(self, global_pos, generator, order)

    monkeypatch.setattr(BBN, "training_step", probe)
    monkeypatch.setattr(Trainer, "train_batch", record)
    cfg = config_from_dict(tiny_config(**{"method.name": "bbn", **BBN_MODEL}))
    train_run(cfg, tmp_path / "run", arrays=tiny_arrays(), evaluate=False)
    data = build_data(cfg.data, arrays=tiny_arrays())
    n, bs = len(data.train), cfg.train.batch_size
    steps = math.ceil(n / bs)
    sizes = [min(bs, n - s * bs) for s in range(steps)]
    assert calls == [(e, s, sizes[s], sizes[s]) for e in range(2) for s in range(steps)]
    # every step reads two batches through the loop: its own, then the re-balancing one of the same size
    sampler = BilateralSampler(data.train.labels, data.class_counts, "reverse")
    for i, (e, s, size, _) in enumerate(calls):
        want = sampler.draw(size, torch.Generator().manual_seed(step_seed(cfg.train.seed, e, s)))
        assert np.array_equal(fetched[2 * i + 1], want)


def test_trains_evaluates_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "bbn", **BBN_MODEL, "data.val_per_class": 2})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a = safe_torch_load(full / "checkpoints/last.pt")
    b = safe_torch_load(cut / "checkpoints/last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("rb_block") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())
    assert (full / "eval.json").exists()


@pytest.mark.parametrize("over, key", [
    ({"method.params": {"alpha_schedule": "exp"}}, "alpha_schedule"),
    ({"method.params": {"div_epochs": 0}}, "div_epochs"),
    ({"method.params": {"second_sampler": "reversed"}}, "second_sampler"),
    ({"method.params": {"alpha": 0.5}}, "alpha"),
    ({"model.params": {}}, "model.params.bbn"),
    ({"model.name": "small_cnn", "model.params": {"width": 4}}, "model.params.bbn"),
    ({"train.mixup_alpha": 1.0}, "mixup_alpha"),
    ({"train.cutmix_alpha": 1.0}, "cutmix_alpha"),
])
def test_bad_params(over, key):
    with pytest.raises(ConfigError, match=key) as err:
        _recipe(**over)
    assert "\n" not in str(err.value) and "method 'bbn'" in str(err.value)


def test_bad_model_option():
    with pytest.raises(ConfigError, match="model 'resnet20': bbn must be true or false"):
        _recipe(**{"method.name": "standard", "model.params": {"bbn": "yes"}})
    with pytest.raises(ConfigError, match="bbn"):  # a model without a two-branch mode
        _recipe(**{"model.name": "small_cnn", "model.params": {"width": 4, "bbn": True}})
