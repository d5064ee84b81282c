"""LFME (methods/lfme.py) and data.class_subset: the self-paced expert weight, the KL term, the
curriculum weights by hand; neutral settings equal CE; subset data; a 2-epoch student with two tiny
experts that resumes exactly; expert path errors and bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError, LongtailError
from longtail.methods import build_recipe
from longtail.methods.lfme import (class_floors, distill_kl, expert_weight, initial_instance_weights,
                                   scheduled_weights)
from longtail.runs import train_run

VAL = {"data.val_per_class": 2}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two 1-epoch plain-CE experts: classes 0-1 and classes 2-3 of the tiny data."""
    root = tmp_path_factory.mktemp("lfme_experts")
    for name, subset in (("head", [0, 1]), ("tail", [2, 3])):
        cfg = tiny_config(**{**VAL, "train.epochs": 1, "data.class_subset": subset})
        train_run(config_from_dict(cfg), root / name, arrays=tiny_arrays(), evaluate=False)
    return [str(root / "head"), str(root / "tail")]


def _lfme(paths, **params):
    return {**VAL, "method.name": "lfme", "method.params": {"experts": paths, **params}}


def _one_line(err: Exception, *words):
    text = str(err)
    assert "\n" not in text and all(w in text for w in words), text


# ----------------------------------------------------------------------------- the math by hand


def test_self_paced_expert_weight_by_hand():
    # a = 0.8, thresh 0.3: below 0.24 -> 1; at 0.24 -> (0.56 / 0.8) / 0.7 = 1 (continuous)
    assert expert_weight(0.2, 0.8, 0.3) == 1.0
    assert math.isclose(expert_weight(0.24, 0.8, 0.3), 1.0)
    assert math.isclose(expert_weight(0.4, 0.8, 0.3), (0.4 / 0.8) / 0.7)  # 0.714285...
    assert math.isclose(expert_weight(0.6, 0.8, 0.3), (0.2 / 0.8) / 0.7)
    assert expert_weight(0.8, 0.8, 0.3) == 0.0 and expert_weight(0.95, 0.8, 0.3) == 0.0  # clipped at 0
    assert expert_weight(0.0, 0.0, 0.3) == 0.0  # an expert that knows nothing teaches nothing


def test_kl_term_by_hand():
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    T = 2.0
    expected = 0.0
    for si, ti in zip(s, t):
        ps, pt = torch.softmax(si / T, 0), torch.softmax(ti / T, 0)
        expected += float((pt * (pt.log() - ps.log())).sum())
    expected /= 2  # batch mean, no T^2 factor (official kl_div element mean x |S_k|)
    assert math.isclose(float(distill_kl(s, t, T)), expected, rel_tol=1e-6)
    # row 1: p_s = (e/(1+e), 1/(1+e)), p_t = (1/2, 1/2) -> 0.5 log(0.5 (1+e)/e) + 0.5 log(0.5 (1+e))
    e = math.e
    row1 = 0.5 * math.log(0.5 * (1 + e) / e) + 0.5 * math.log(0.5 * (1 + e))
    assert math.isclose(float(distill_kl(s[:1], t[:1], T)), row1, rel_tol=1e-6)
    assert float(distill_kl(t, t, T)) == pytest.approx(0.0, abs=1e-7)


def test_curriculum_weights_by_hand():
    counts = np.array([200, 100, 20, 10])
    floors = class_floors(counts, [np.array([0, 1]), np.array([2, 3])])
    assert np.allclose(floors, [15 / 150, 15 / 150, 1.0, 1.0])  # m_min / m_g: head 150, tail 15
    labels = np.array([0, 0, 0, 1, 2, 2, 3])
    h = np.array([0.9, 0.5, 0.1, 0.7, 0.3, 0.6, 0.4])
    v0 = initial_instance_weights(h, labels, floors)
    # class 0 scaled into [0.1, 1]: (0.9, 0.5, 0.1) -> (1, 0.55, 0.1); class 1 one image -> 1; tail floor 1 -> 1
    assert np.allclose(v0, [1.0, 0.55, 0.1, 1.0, 1.0, 1.0, 1.0])
    v = scheduled_weights(torch.tensor([0.1, 1.0]), epoch=5, half_epochs=10, clip=False)
    assert torch.allclose(v, torch.tensor([0.1 + 0.9 * 0.5, 1.0]))
    late = scheduled_weights(torch.tensor([0.1]), epoch=20, half_epochs=10, clip=False)
    assert torch.allclose(late, torch.tensor([1.9]))  # official: no clamp, 2 - v0 at the end
    assert float(scheduled_weights(torch.tensor([0.1]), epoch=20, half_epochs=10, clip=True)) == 1.0


# ----------------------------------------------------------------------------- data.class_subset


def test_class_subset_keeps_the_long_tailed_images_of_its_classes():
    full = build_data(config_from_dict(tiny_config(**VAL)).data, arrays=tiny_arrays())
    cut = build_data(config_from_dict(tiny_config(**VAL, **{"data.class_subset": ["2", 3]})).data,
                     arrays=tiny_arrays())
    assert cut.class_names == [full.class_names[2], full.class_names[3]]
    assert cut.class_counts.tolist() == full.class_counts[[2, 3]].tolist()
    for a, b in ((cut.train, full.train), (cut.val, full.val), (cut.test, full.test)):
        rows = np.isin(b.labels, [2, 3])
        assert np.array_equal(a.index, b.index[rows]) and np.array_equal(a.labels, b.labels[rows] - 2)
    assert cut.mean == full.mean and cut.std == full.std


@pytest.mark.parametrize("subset, words", [([0], "at least 2"), ([1, 1], "distinct"), ("0,1", "list"),
                                           ([0, True], "class indices"), ([0, 9], "unknown class 9"),
                                           ([0, "zebra"], "unknown class 'zebra'")])
def test_bad_class_subset(subset, words):
    with pytest.raises(ConfigError) as err:
        cfg = config_from_dict(tiny_config(**{"data.class_subset": subset}))
        build_data(cfg.data, arrays=tiny_arrays())
    _one_line(err.value, "data.class_subset", words)


# ----------------------------------------------------------------------------- neutral settings


def _step(over: dict):
    cfg = config_from_dict(tiny_config(**over))
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    model = recipe.model
    pos = np.arange(12)
    images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(data.train.labels[pos])
    recipe.method.on_epoch_start(0, recipe.loss)
    model.train()
    out = recipe.method.training_step(model, split_forward(model), images, target, recipe.loss,
                                      torch.Generator().manual_seed(0))
    return out, model, images, target, recipe


def test_neutral_settings_equal_ce(experts):
    for over in (_lfme([]), _lfme(experts, distill_weight=0.0, curriculum=False)):
        out, model, images, target, _ = _step(over)
        model.train()
        ce = F.cross_entropy(split_forward(model)(images)[1], target)
        assert torch.allclose(out.loss, ce, atol=1e-6), over


def test_step_adds_the_weighted_kl_of_each_expert(experts):
    out, model, images, target, recipe = _step(_lfme(experts, curriculum=False))
    method = recipe.method
    assert method.expert_acc is not None and len(method.expert_acc) == 2
    logits = split_forward(model)(images)[1]
    expected = F.cross_entropy(logits, target)
    for e in method.experts:
        expected = expected + distill_kl(logits[:, e.classes], method.expert_logits(e, images), 2.0)
    assert torch.allclose(out.loss, expected, atol=1e-5)  # epoch 0: every w_k = 1
    assert [e.classes.tolist() for e in method.experts] == [[0, 1], [2, 3]]


# ----------------------------------------------------------------------------- a tiny run


def test_tiny_student_run_resumes_exactly(experts, tmp_path, monkeypatch):
    cfg = tiny_config(**_lfme(experts), **{"sampler.name": "class_aware"})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state = a["method"]
    assert set(state) == {"expert_acc", "student_acc", "init_weight"}
    assert all(torch.equal(state[k], b["method"][k]) for k in state)
    v0 = state["init_weight"]
    assert len(v0) == len(build_data(config_from_dict(cfg).data, arrays=tiny_arrays()).train)  # one per image
    assert float(v0.min()) > 0 and float(v0.max()) <= 1.0


# ----------------------------------------------------------------------------- errors


def test_expert_path_errors(experts, tmp_path):
    cases = {"missing": tmp_path / "nope.pt", "folder": tmp_path / "empty_dir", "garbage": tmp_path / "bad.pt"}
    cases["folder"].mkdir()
    cases["garbage"].write_bytes(b"not a checkpoint")
    for name, path in cases.items():
        with pytest.raises(LongtailError) as err:
            train_run(config_from_dict(tiny_config(**_lfme([experts[0], str(path)]))), tmp_path / f"run_{name}",
                      arrays=tiny_arrays(), evaluate=False)
        _one_line(err.value, "method.params.experts", str(path))
        assert not (tmp_path / f"run_{name}" / "checkpoints").exists()


def test_expert_from_a_checkpoint_file_and_overlap(experts, tmp_path):
    ckpt = experts[1] + "/checkpoints/last.pt"  # a checkpoint file: classes from its config's class_subset
    cfg = config_from_dict(tiny_config(**_lfme([experts[0], ckpt])))
    recipe = build_recipe(cfg, build_data(cfg.data, arrays=tiny_arrays()))
    assert [e.classes.tolist() for e in recipe.method.experts] == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError) as err:
        cfg = config_from_dict(tiny_config(**_lfme([experts[0], experts[0] + "/checkpoints/last.pt"])))
        build_recipe(cfg, build_data(cfg.data, arrays=tiny_arrays()))
    _one_line(err.value, "disjoint")


@pytest.mark.parametrize("params, words", [
    ({"experts": 3}, "experts must be"), ({"temperature": 0}, "temperature"), ({"decay_thresh": 1.0}, "decay_thresh"),
    ({"distill_weight": -1}, "distill_weight"), ({"curriculum": "yes"}, "curriculum"),
    ({"curriculum_epochs": 0}, "curriculum_epochs"), ({"tau": 1}, "tau")])
def test_bad_params(experts, params, words):
    over = _lfme(experts)
    over["method.params"] = {**over["method.params"], **params}
    with pytest.raises(ConfigError) as err:
        cfg = config_from_dict(tiny_config(**over))
        build_recipe(cfg, build_data(cfg.data, arrays=tiny_arrays()))
    _one_line(err.value, words)


def test_needs_a_validation_split(experts):
    over = _lfme(experts)
    over["data.val_per_class"] = 0
    with pytest.raises(ConfigError) as err:
        cfg = config_from_dict(tiny_config(**over))
        build_recipe(cfg, build_data(cfg.data, arrays=tiny_arrays()))
    _one_line(err.value, "validation split")


def test_loop_steps_get_their_images_curriculum_weights(experts, tmp_path, monkeypatch):
    from longtail.methods.lfme import LFME

    seen = []
    original = LFME.batch_instance_weights

    def record(self, target):
        v = original(self, target)
        # the weights of this step's images: the recorded order at the loop's step
        b = self.batches
        pos = self.sampler.order[b.step * self.cfg.train.batch_size:][:len(target)]
        assert v is not None and torch.equal(torch.from_numpy(self.data.train.labels[pos]), target.cpu())
        seen.append(torch.allclose(v.double(), scheduled_weights(self.init_weight[pos], 1, 0.5, False), atol=1e-6))
        return v

    monkeypatch.setattr(LFME, "batch_instance_weights", record)
    cfg = tiny_config(**_lfme(experts), **{"train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "s", arrays=tiny_arrays(), evaluate=False)
    assert seen and all(seen)
