"""CMO (methods/cmo.py): the minority sampler's class frequencies, the paste of a partner batch by
hand, the step's loss against hand-built logits, the active epochs, neutral settings equal to the
plain method, the loop's batch service, exact resume, bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.data.mixup import cutmix_batch
from longtail.errors import ConfigError
from longtail.methods.base import TrainBatches
from longtail.methods.cmo import MinoritySampler, minority_class_prob, minority_seed

CMO = {"method.name": "cmo", "train.cutmix_alpha": 1.0}


def test_minority_class_probabilities_by_hand():
    counts = [100, 50, 10, 5]
    # official image weights n_c^-1: every class is drawn with probability n_c * n_c^-1 / 4
    assert np.allclose(minority_class_prob(counts, 1.0), 0.25)
    assert np.allclose(minority_class_prob(counts, 0.0), np.array(counts) / 165)  # instance sampling
    assert np.allclose(minority_class_prob(counts, 2.0), [1 / 100, 1 / 50, 1 / 10, 1 / 5] / np.float64(0.33))
    assert np.allclose(minority_class_prob(counts, 1.0, "class"), [1 / 100, 1 / 50, 1 / 10, 1 / 5] / np.float64(0.33))
    assert minority_class_prob([4, 0, 1], 1.0)[1] == 0  # a class without images is never drawn


def test_sampler_frequencies_and_same_seed_same_batch():
    counts = np.array([100, 50, 10, 5])
    labels = np.repeat(np.arange(4), counts)[np.random.default_rng(0).permutation(counts.sum())]
    sampler = MinoritySampler(labels, 4, weighted_alpha=1.0)
    pos = sampler.draw(200_000, torch.Generator().manual_seed(0))
    assert np.allclose(np.bincount(labels[pos], minlength=4) / len(pos), 0.25, atol=0.005)
    few = pos[labels[pos] == 3]  # uniform over the images of a class
    assert np.allclose(np.bincount(few, minlength=len(labels))[labels == 3] / len(few), 1 / 5, atol=0.01)
    assert np.array_equal(pos, sampler.draw(200_000, torch.Generator().manual_seed(0)))
    inverse = MinoritySampler(labels, 4, weighted_alpha=1.0, weighting="class").draw(100_000, torch.Generator())
    want = (1 / counts) / (1 / counts).sum()
    assert np.allclose(np.bincount(labels[inverse], minlength=4) / 1e5, want, atol=0.006)


def test_partner_paste_by_hand():
    images = torch.zeros(2, 1, 4, 4)
    partner = torch.ones(2, 1, 4, 4) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    target, target2 = torch.tensor([0, 1]), torch.tensor([3, 2])
    g = torch.Generator().manual_seed(5)  # a 2 x 2 box
    mixed, t2, lam = cutmix_batch(images, target, alpha=1.0, generator=g, partner=(partner, target2))
    box = mixed[0, 0] != 0
    assert torch.equal(t2, target2) and box.any()
    assert box.sum() == 4 and lam == 0.75  # kept pixel fraction of the background  # kept pixel fraction of the background
    assert torch.equal(mixed[1, 0][box], torch.full((int(box.sum()),), 2.0))  # image i's box from partner i
    assert torch.equal(mixed[:, :, ~box], images[:, :, ~box]) and images.abs().sum() == 0  # input untouched
    with pytest.raises(ValueError, match="partner"):
        cutmix_batch(images, target, alpha=1.0, generator=g, partner=(partner[:1], target2[:1]))


def _stub(recipe, epoch, images2, target2, step=0):
    method = recipe.method
    method.on_epoch_start(epoch, recipe.loss)
    seen = []

    def fetch(positions, generator):
        seen.append(np.asarray(positions))
        return images2, target2

    method.batches = TrainBatches(fetch=fetch, epoch=epoch, step=step, global_size=images2.shape[0])
    return seen


def test_step_loss_by_hand_and_active_epochs():
    cfg, _, recipe = tiny_recipe(**CMO, **{"train.cutmix_prob": 1.0, "train.epochs": 6,
                                           "method.params": {"start_data_aug": 1, "end_data_aug": 2}})
    method, model = recipe.method, recipe.model.eval()
    assert [method.active(e) for e in range(6)] == [False, False, True, True, False, False]  # 1 < e < 6 - 2
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 0, 1, 0])
    images2 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target2 = torch.tensor([3, 2, 3, 3])
    seen = _stub(recipe, 2, images2, target2, step=5)
    out = method.training_step(model, split_forward(model), images, target, recipe.loss,
                               torch.Generator().manual_seed(9))
    # by hand: the same generator draws (apply, then CutMix with the minority batch as partner)
    g = torch.Generator().manual_seed(9)
    assert float(torch.rand(1, generator=g)) < 1.0
    mixed, _, lam = cutmix_batch(images, target, alpha=1.0, generator=g, partner=(images2, target2))
    z = model(mixed)
    assert torch.allclose(out.logits, z, atol=1e-6) and torch.equal(out.target, target)
    assert torch.allclose(out.loss, lam * F.cross_entropy(z, target) + (1 - lam) * F.cross_entropy(z, target2),
                          atol=1e-6)
    # the minority positions are the (seed, epoch, step) stream's
    want = method.minority_sampler().draw(4, torch.Generator().manual_seed(minority_seed(cfg.train.seed, 2, 5)))
    assert len(seen) == 1 and np.array_equal(seen[0], want)
    seen = _stub(recipe, 4, images2, target2)  # inactive epoch: plain loss, no minority batch
    out = method.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator())
    assert seen == [] and torch.allclose(out.loss, F.cross_entropy(model(images), target), atol=1e-6)


def test_never_active_equals_the_plain_method(tmp_path):
    from longtail.runs import train_run
    from longtail.io import safe_torch_load

    plain = tiny_config()
    never = tiny_config(**CMO, **{"method.params": {"start_data_aug": 5}})  # 5 < e never holds in 2 epochs
    train_run(config_from_dict(plain), tmp_path / "plain", arrays=tiny_arrays(), evaluate=False)
    train_run(config_from_dict(never), tmp_path / "never", arrays=tiny_arrays(), evaluate=False)
    a = safe_torch_load(tmp_path / "plain/checkpoints/last.pt")["model"]
    b = safe_torch_load(tmp_path / "never/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trains_through_the_loop_and_resumes_exactly(tmp_path, monkeypatch):
    from longtail.engine.loop import Trainer

    fetched = []
    original = Trainer.train_batch

    def record(self, global_pos, generator, order=None):
        fetched.append(len(global_pos))
        return original(self, global_pos, generator, order)

    monkeypatch.setattr(Trainer, "train_batch", record)
    cfg = tiny_config(**CMO, **{"train.cutmix_prob": 0.5, "method.params": {"start_data_aug": -1, "end_data_aug": 0},
                                "data.val_per_class": 2, "loss.name": "focal", "loss.params": {"gamma": 1.0}})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    from longtail.data.build import build_data

    n = len(build_data(config_from_dict(cfg).data, arrays=tiny_arrays()).train)
    loop_batches = 2 * 2 * int(np.ceil(n / 16))  # full run + (cut + resumed) run, 2 epochs each
    assert len(fetched) > loop_batches  # plus a minority batch on each mixed step
    assert (full / "eval.json").exists()


@pytest.mark.parametrize("over, key", [
    ({"method.params": {"weighted_alpha": -1}}, "weighted_alpha"),
    ({"method.params": {"weighted_alpha": True}}, "weighted_alpha"),
    ({"method.params": {"start_data_aug": 1.5}}, "start_data_aug"),
    ({"method.params": {"end_data_aug": -1}}, "end_data_aug"),
    ({"method.params": {"weighting": "classes"}}, "weighting"),
    ({"method.params": {"mix_prob": 0.5}}, "mix_prob"),
    ({"train.cutmix_alpha": 0.0}, "cutmix_alpha"),
])
def test_bad_params(over, key):
    with pytest.raises(ConfigError, match=key) as err:
        tiny_recipe(**{**CMO, **over})
    assert "\n" not in str(err.value) and "method 'cmo'" in str(err.value)
