"""FSLwF: the cosine classifier, the attention-based weight generator, the episodic stage 2."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.methods.fslwf import FSLwF
from longtail.models.fslwf import FewShotCosineHead
from longtail.runmodel import load_run_model
from longtail.runs import train_run


def _head(d=2, c=3, novel=(False, False, True), **kw):
    torch.manual_seed(0)
    return FewShotCosineHead(d, c, torch.tensor(novel), **kw)


def test_cosine_classifier_by_hand():
    head = _head()
    with torch.no_grad():
        head.weight_base.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
        head.novel_weight[2] = torch.tensor([-1.0, 0.0])
        head.bias.fill_(0.5)
    x = torch.tensor([[3.0, 4.0]])  # cosines with (1,0), (0,1), novel (-1,0): 0.6, 0.8, -0.6
    assert torch.allclose(head(x), 10 * (torch.tensor([[0.6, 0.8, -0.6]]) + 0.5))


def test_generator_by_hand():
    head = _head(scale_att=1.0)
    with torch.no_grad():
        head.weight_base.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]]))
        head.query.weight.copy_(torch.eye(2))
        head.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]))
        head.phi_avg.fill_(2.0)
        head.phi_att.fill_(3.0)
    z = torch.tensor([[1.0, 0.0]])  # one exemplar: q = (1, 0); cos with keys (1, 0), (0, 1): 1, 0
    a0 = math.exp(1) / (math.exp(1) + 1)
    w = head.generate(z, torch.ones(1, 1), torch.tensor([0, 1]))
    expected = 2 * torch.tensor([1.0, 0.0]) + 3 * torch.tensor([a0, 1 - a0])  # w_att = a0 (1,0) + a1 (0,1)
    assert torch.allclose(w, expected[None])


def test_generator_neutral_is_the_mean_of_normalised_exemplars():
    # phi_att = 0, phi_avg = 1: the official 'none' generator (FeatExemplarAvgBlock on normalised features)
    head = _head(d=3, c=4, novel=(False, False, True, True))
    with torch.no_grad():
        head.phi_att.zero_()
    z = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 1, 0, 1])
    w = head.generate(z, F.one_hot(labels, 2).float(), torch.tensor([0, 1]))
    zn = F.normalize(z, dim=1)
    assert torch.allclose(w, torch.stack([zn[labels == 0].mean(0), zn[labels == 1].mean(0)]))


def test_generator_gradcheck_float64():
    head = _head(d=3, c=4, novel=(False, False, True, True)).double()
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    onehot = F.one_hot(torch.tensor([0, 1, 1, 0, 1]), 2).double()
    base = torch.tensor([0, 1])
    params = (head.weight_base, head.keys, head.scale_att, head.phi_avg, head.phi_att)

    def f(z, wb, k, s, pa, pt):
        zn = F.normalize(z, dim=1)
        per = onehot.t() / onehot.sum(0)[:, None]
        q = F.normalize(head.query(zn), dim=1)
        att = torch.softmax(s * (q @ F.normalize(k[base], dim=1).t()), dim=1)
        return pa * (per @ zn) + pt * (per @ (att @ F.normalize(wb[base], dim=1)))

    assert torch.allclose(f(z, *params), head.generate(z, onehot, base))
    assert torch.autograd.gradcheck(f, (z, *(p.detach().clone().requires_grad_(True) for p in params)))


# -- the stage-2 method (tiny data: counts 40, 25, 15, 10 -> novel_below 20: classes 2, 3 novel)
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("fslwf_stage1")
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), root / "ce", arrays=tiny_arrays(), evaluate=False)
    return root / "ce" / "checkpoints" / "last.pt"


def _config(stage1, params=None, **over):
    return tiny_config(**{"method.name": "fslwf", "method.params": {"stage1": str(stage1), **(params or {})}, **over})


def test_fslwf_novel_split_and_initialisation(stage1):
    cfg, data, recipe = tiny_recipe(**_config(stage1))
    m, model = recipe.method, recipe.model
    assert list(data.class_counts) == [40, 25, 15, 10]
    assert list(m.novel_ids) == [2, 3] and list(m.base_ids) == [0, 1] and m.episode_novel == 1
    assert torch.equal(model.fc.novel, torch.tensor([False, False, True, True]))
    assert torch.equal(model.fc.weight_base, safe_torch_load(stage1)["model"]["fc.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fc.") for n in trainable)  # frozen feature extractor


def test_fslwf_episode_uses_base_classes_only(stage1):
    cfg, data, recipe = tiny_recipe(**_config(stage1, {"novel_below": 12, "exemplars": 3}))
    m = recipe.method
    assert list(m.novel_ids) == [3] and m.episode_novel == 1
    kept, fake, positions, which = m.sample_episode(torch.Generator().manual_seed(0))
    assert len(fake) == 1 and len(kept) == 2 and set(kept) | set(fake) == {0, 1, 2}
    assert len(positions) == 3 and (data.train.labels[positions] == fake[0]).all() and (which == 0).all()
    from conftest import split_forward
    images = torch.randn(16, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3] * 4)
    model = recipe.model
    m.set_train_mode(model)
    out = m.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator().manual_seed(0))
    assert out.logits.shape == (16, 4) and torch.equal(out.target, target)  # accuracy: the full classifier
    kept, fake, _, _ = m.sample_episode(torch.Generator().manual_seed(0))
    feats = model.forward_head(model.forward_features(images), pre_logits=True)
    ex = m._read_plain(positions, "cpu")  # the same episode: same generator seed, no loop reader
    w = model.fc.generate(model.forward_head(model.forward_features(ex), pre_logits=True), torch.ones(3, 1),
                          torch.from_numpy(kept))
    index = {int(c): i for i, c in enumerate(list(kept) + list(fake))}
    rows = target != 3  # class-3 (real novel) images are not in the episode
    episode_logits = model.fc.scores(feats[rows], torch.cat((model.fc.weight_base[torch.from_numpy(kept)], w)))
    episode_target = torch.tensor([index[int(t)] for t in target[rows]])
    assert torch.allclose(out.loss, F.cross_entropy(episode_logits, episode_target), atol=1e-6)
    out.loss.backward()
    assert model.fc.keys.grad is not None and model.fc.weight_base.grad is not None


def test_fslwf_generates_novel_weights_resumes_exactly_and_rebuilds(tmp_path, monkeypatch, stage1):
    full, cut, _ = full_and_resumed(_config(stage1), tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a, b = last_checkpoints(full, cut)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    before = safe_torch_load(stage1)["model"]
    for k, v in before.items():
        if not k.startswith("fc."):
            assert torch.equal(v, a["model"][k]), k  # backbone frozen, BatchNorm statistics kept (eval mode)
    nw = a["model"]["fc.novel_weight"]
    assert nw[2:].abs().sum() > 0 and torch.equal(nw[:2], torch.zeros(2, nw.shape[1]))
    stage1.rename(tmp_path / "gone.pt")
    try:
        model, epoch, _ = load_run_model(full)
    finally:
        (tmp_path / "gone.pt").rename(stage1)
    assert isinstance(model.fc, FewShotCosineHead) and epoch == 2
    assert all(torch.equal(x, a["model"][k]) for k, x in model.state_dict().items())


def test_fslwf_is_a_stage2_method():
    assert FSLwF.stage == 2 and FSLwF.trains and not FSLwF.rebalancing


@pytest.mark.parametrize("params, over, match", [
    ({}, {}, "needs method.params.stage1"),
    ({"stage1": "S", "novel_below": 5}, {}, "novel_below 5 must leave at least one novel class"),
    ({"stage1": "S", "novel_below": 30}, {}, "and two base classes"),
    ({"stage1": "S", "novel_below": 0}, {}, "novel_below must be an integer >= 1"),
    ({"stage1": "S", "episode_novel": 2}, {}, "episode_novel must be below the 2 base classes"),
    ({"stage1": "S", "exemplars": 0}, {}, "exemplars must be an integer >= 1"),
    ({"stage1": "S", "scale_att": -1}, {}, "scale_att must be a finite number > 0"),
    ({"stage1": "S"}, {"loss.name": "focal"}, "set loss.name: ce"),
    # its own training_step never calls the base step, where mixup / CutMix happen: refused, not ignored
    ({"stage1": "S"}, {"train.mixup_alpha": 1.0}, "does not take the loop's mixup / CutMix .*train.mixup_alpha: 0$"),
    ({"stage1": "S"}, {"train.cutmix_alpha": 1.0}, "does not take the loop's mixup / CutMix .*train.cutmix_alpha: 0$"),
])
def test_fslwf_bad_parameters(tmp_path, stage1, params, over, match):
    params = {k: (str(stage1) if v == "S" else v) for k, v in params.items()}
    cfg = config_from_dict(tiny_config(**{"method.name": "fslwf", "method.params": params, **over}))
    with pytest.raises(ConfigError, match=match) as err:
        train_run(cfg, tmp_path / "x", arrays=tiny_arrays())
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
