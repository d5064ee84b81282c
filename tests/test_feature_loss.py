"""Feature losses added to CE: range loss, lifted structured loss (method feature_loss) and DRO-LT
(methods dro_lt / dro_lt_classifier)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses.feature import build_feature_loss, dro_loss, lifted_structured_loss, range_loss
from longtail.methods import build_recipe
from longtail.runs import train_run


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a)


# -- hand computations on 4-sample batches

def test_range_loss_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [1.0, 2.0]])
    y = torch.tensor([0, 0, 1, 1])
    # one pair per class (k_c = 1): intra = 25 + 4; centres (1.5, 2), (1, 1): squared distance 1.25
    assert range_loss(x, y, k=2, alpha=1.0, beta=1.0, margin=10.0).item() == pytest.approx(29 + 8.75)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 0, 1])
    # class 0 squared distances 1, 4, 5: harmonic mean of the 2 largest = 2 / (1/5 + 1/4); class 1 alone adds 0
    intra = 2 / (1 / 5 + 1 / 4)
    inter = 50 - ((5 - 1 / 3) ** 2 + (5 - 2 / 3) ** 2)
    assert range_loss(x, y, k=2, alpha=1.0, beta=0.5, margin=50.0).item() == pytest.approx(intra + 0.5 * inter)
    assert range_loss(x, y, k=2, alpha=1.0, beta=0.5, margin=1.0).item() == pytest.approx(intra)  # hinge off


def test_lifted_loss_by_hand():
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    y = torch.tensor([0, 0, 1, 1])
    # pair (0, 1): negatives of 0 at 3, 5 and of 1 at 2, 4; pair (2, 3): of 2 at 3, 2 and of 3 at 5, 4
    s = math.log(math.exp(-2) + math.exp(-4) + math.exp(-1) + math.exp(-3))
    j01, j23 = s + 1.0, s + 2.0
    expected = (max(j01, 0) ** 2 + max(j23, 0) ** 2) / (2 * 2)
    assert lifted_structured_loss(x, y, margin=1.0).item() == pytest.approx(expected, rel=1e-6)


def _official_dro(feats, targets, centroids, epsilons, temperature):
    """The official DROLoss.forward (dvirsamuel/DRO-LT losses.py), one centroid per class."""
    classes = torch.unique(targets)
    centroid_classes = torch.arange(centroids.shape[0])
    pairwise = -torch.cdist(centroids, feats)
    mask = torch.eq(centroid_classes.view(-1, 1), targets.view(-1, 1).T)
    a = pairwise.clone()
    pairwise[mask] = a[mask] - epsilons[targets]
    logits = pairwise / temperature
    log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    log_prob = torch.stack([log_prob[:, torch.where(targets == c)[0]].mean(1) for c in classes], dim=1)
    m = torch.eq(centroid_classes.view(-1, 1), classes.view(-1, 1).T).float()
    return -(m * log_prob).sum(1).sum() / len(classes)


def test_dro_loss_by_hand_and_as_the_official():
    mu = torch.tensor([[0.0], [4.0]])
    x = torch.tensor([[1.0], [2.0], [3.0], [5.0]])
    y = torch.tensor([0, 0, 1, 1])
    eps = torch.tensor([0.5, 1.0])
    # rows: centroid 0 -> [1.5, 2.5, 3, 5] (positives + 0.5), centroid 1 -> [3, 2, 2, 2] (positives + 1)
    lse0 = math.log(sum(math.exp(-v) for v in (1.5, 2.5, 3.0, 5.0)))
    lse1 = math.log(sum(math.exp(-v) for v in (3.0, 2.0, 2.0, 2.0)))
    expected = 2.0 + (lse0 + lse1) / 2
    for order in ("official", "per_sample"):  # a class-sorted batch: both orders agree
        assert dro_loss(x, y, mu, eps, temperature=1.0, epsilon_order=order).item() == pytest.approx(expected)
    assert _official_dro(x, y, mu, eps, 1.0).item() == pytest.approx(expected)
    # an unsorted batch: the official pairs epsilons in batch order with positives in class order
    gen = torch.Generator().manual_seed(0)
    feats, target = torch.randn(12, 3, generator=gen), torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 2, 1])
    cents, eps3 = torch.randn(3, 3, generator=gen), torch.tensor([0.2, 1.0, 3.0])
    for t in (1.0, 0.5):
        ours = dro_loss(feats, target, cents, eps3, temperature=t, epsilon_order="official")
        assert ours.item() == pytest.approx(_official_dro(feats, target, cents, eps3, t).item(), rel=1e-5)
    fixed = dro_loss(feats, target, cents, eps3, temperature=1.0, epsilon_order="per_sample")
    assert abs(fixed.item() - ours.item()) > 1e-4  # this batch is not sorted by class
    sorted_idx = torch.sort(target, stable=True).indices
    assert dro_loss(feats[sorted_idx], target[sorted_idx], cents, eps3, epsilon_order="per_sample").item() == \
        pytest.approx(_official_dro(feats[sorted_idx], target[sorted_idx], cents, eps3, 1.0).item(), rel=1e-5)
    # the paper's reading: softmax over the centroids per sample
    per_sample = -(F.log_softmax(-(torch.cdist(mu, x) + torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 1, 1]])), 0)
                   [y, torch.arange(4)])
    paper = (per_sample[:2].mean() + per_sample[2:].mean()) / 2
    assert dro_loss(x, y, mu, eps, softmax_over="classes").item() == pytest.approx(paper.item())


# -- gradients

def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    assert torch.autograd.gradcheck(lambda f: range_loss(f, y, k=2, alpha=0.5, beta=0.3, margin=40.0), (x,))
    assert torch.autograd.gradcheck(lambda f: lifted_structured_loss(f, y, margin=1.0), (x,))
    mu = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    eps = torch.tensor([0.3, 1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    for order in ("official", "per_sample"):
        for axis in ("batch", "classes"):
            assert torch.autograd.gradcheck(
                lambda f, e: dro_loss(f, y, mu, e, temperature=0.7, epsilon_order=order, softmax_over=axis), (x, eps))


@pytest.mark.parametrize("y", [[1, 1, 1, 1], [0, 1, 2, 3], [0, 0, 0, 2]])
def test_single_class_or_singleton_classes_give_no_nan(y):
    y = torch.tensor(y)
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], requires_grad=True)  # two identical rows
    mu, eps = torch.randn(4, 2), torch.ones(4, requires_grad=True)
    for value in (range_loss(x, y), lifted_structured_loss(x, y), dro_loss(x, y, mu, eps),
                  dro_loss(x, y, mu, eps, softmax_over="classes")):
        x.grad, eps.grad = None, None
        value.backward()
        assert math.isfinite(value.item()) and torch.isfinite(x.grad).all()
        assert eps.grad is None or torch.isfinite(eps.grad).all()


# -- methods

def _recipe(**over):
    cfg = config_from_dict(tiny_config(**over))
    return cfg, build_data(cfg.data, arrays=tiny_arrays())


def _step(recipe, data, n=8):
    model, method = recipe.model, recipe.method
    method.on_epoch_start(0, recipe.loss)
    method.set_train_mode(model)
    pos = recipe.sampler.indices(0)[:n]
    images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(data.train.labels[pos]).long()

    def forward(imgs):
        pooled = model.forward_head(model.forward_features(imgs), pre_logits=True)
        return pooled, model.head(pooled)

    out = method.training_step(model, forward, images, target, recipe.loss, torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = forward(images)[1]
    return out, logits, target


@pytest.mark.parametrize("name", ["range", "lifted"])
def test_weight_zero_is_exactly_ce(name):
    cfg, data = _recipe(**{"method.name": "feature_loss", "method.params": {"feature_loss": name, "weight": 0.0}})
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    out, _, target = _step(recipe, data)
    assert torch.equal(out.loss, F.cross_entropy(out.logits, target))
    assert recipe.method.plain_ce_epochs() == math.inf


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("dro_stage1")
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1})), root / "ce", arrays=tiny_arrays(), evaluate=False)
    return root / "ce" / "checkpoints" / "last.pt"


def test_dro_lt_weight_zero_unweighted_is_ce_and_head_is_frozen(stage1):
    cfg, data = _recipe(**{"method.name": "dro_lt",
                           "method.params": {"stage1": str(stage1), "weight": 0.0, "ce_weight": "none"}})
    recipe = build_recipe(cfg, data)
    assert not any(p.requires_grad for p in recipe.model.head.parameters())
    names = [g.name for g in recipe.param_groups]
    assert names == ["backbone", "epsilons"]
    out, _, target = _step(recipe, data)
    assert torch.equal(out.loss, F.cross_entropy(out.logits, target))
    # 'count' (the official ce_lt): CE weighted by n_c / n_max
    cfg, data = _recipe(**{"method.name": "dro_lt", "method.params": {"stage1": str(stage1), "weight": 0.0}})
    recipe = build_recipe(cfg, data)
    out, _, target = _step(recipe, data)
    counts = torch.as_tensor(data.class_counts, dtype=torch.float32)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, target, weight=counts / counts.max()))
    # the centroids are the class means of the eval-mode training features
    from longtail.eval.predict import predict
    recipe.method.update_centroids(recipe.model, torch.device("cpu"))  # the step moved the BN statistics
    assert recipe.model.training and not recipe.model.head.training
    feats = predict(recipe.model, data.train, mean=data.mean, std=data.std, features=True)
    y = torch.from_numpy(feats["labels"])
    expect = torch.stack([torch.from_numpy(feats["features"])[y == c].double().mean(0) for c in range(data.num_classes)])
    assert torch.allclose(recipe.loss.centroids, expect.float(), atol=1e-6)


@pytest.mark.parametrize("name", ["range", "lifted"])
def test_feature_loss_trains_and_resumes_exactly(name, tmp_path, monkeypatch):
    params = {"feature_loss": name, "weight": 0.5,
              "feature_params": {"alpha": 0.1, "beta": 0.1, "margin": 5.0} if name == "range" else {"margin": 1.0}}
    cfg = tiny_config(**{"method.name": "feature_loss", "method.params": params})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(), evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert a["epoch"] == 2 and _same(a["model"], b["model"])
    ce = tmp_path / "ce"
    train_run(config_from_dict(tiny_config()), ce, arrays=tiny_arrays(), evaluate=False)
    assert not _same(safe_torch_load(ce / "checkpoints/last.pt")["model"], a["model"])  # the feature loss acts


def test_dro_lt_trains_resumes_exactly_then_classifier_stage(stage1, tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "dro_lt", "method.params": {"stage1": str(stage1)},
                         "sampler.name": "class_aware", "train.lr_schedule": "constant", "train.warmup_epochs": 0})
    full, cut, before = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                         evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert _same(a["model"], b["model"]) and _same(a["loss"], b["loss"])
    assert bool(before["loss"]["centroids_ready"])
    assert not torch.equal(a["loss"]["epsilons"], torch.ones_like(a["loss"]["epsilons"]))  # learned
    s1 = safe_torch_load(stage1)["model"]
    head = [k for k in s1 if k.startswith("fc.")]  # small_cnn's classifier
    assert head and all(torch.equal(s1[k], a["model"][k]) for k in head)  # the classifier stayed frozen
    # stage 3: the same classifier on the frozen feature extractor
    cls = tiny_config(**{"method.name": "dro_lt_classifier",
                         "method.params": {"stage1": str(full / "checkpoints/last.pt")}, "train.epochs": 1})
    train_run(config_from_dict(cls), tmp_path / "cls", arrays=tiny_arrays(), evaluate=False)
    c = safe_torch_load(tmp_path / "cls" / "checkpoints/last.pt")["model"]
    assert all(torch.equal(a["model"][k], c[k]) for k in a["model"] if k not in head)
    assert any(not torch.equal(a["model"][k], c[k]) for k in head)


@pytest.mark.parametrize("params, needle", [
    ({"feature_loss": "triplet"}, "feature_loss must be one of 'range', 'lifted'"),
    ({"weight": -1}, "weight must be a finite number >= 0"),
    ({"feature_params": {"k": 0}}, "k must be an integer >= 1"),
    ({"feature_params": {"margin": -1.0}}, "margin must be a finite number >= 0"),
    ({"feature_params": {"gamma": 1.0}}, "unexpected keyword argument 'gamma'"),
    ({"feature_loss": "lifted", "feature_params": {"k": 2}}, "unexpected keyword argument 'k'"),
])
def test_feature_loss_bad_parameters(params, needle):
    cfg, data = _recipe(**{"method.name": "feature_loss", "method.params": params})
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["mixup_alpha", "cutmix_alpha"])
def test_feature_loss_rejects_mixup_and_cutmix(key):
    # its own training_step never calls the base step, where CutMix happens: refused, not ignored
    cfg, data = _recipe(**{"method.name": "feature_loss", f"train.{key}": 0.2})
    with pytest.raises(ConfigError, match=f"set train.{key}: 0$") as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("params, needle", [
    ({"temperature": 0}, "temperature must be a finite number > 0"),
    ({"weight": "x"}, "weight must be a finite number >= 0"),
    ({"epsilon_order": "sorted"}, "epsilon_order must be one of 'official', 'per_sample'"),
    ({"softmax_over": "samples"}, "softmax_over must be one of 'batch', 'classes'"),
    ({"ce_weight": "balanced"}, "ce_weight must be one of 'count', 'none'"),
    ({"learn_epsilons": "yes"}, "learn_epsilons must be true or false"),
    ({"epsilon_init": float("nan")}, "epsilon_init must be a finite number"),
    # DRO-LT's own training_step never calls the base step, where mixup / CutMix happen: refused, not ignored
    ({"train.mixup_alpha": 0.2}, "does not take the loop's mixup / CutMix .*; set train.mixup_alpha: 0$"),
    ({"train.cutmix_alpha": 1.0}, "does not take the loop's mixup / CutMix .*; set train.cutmix_alpha: 0$"),
])
def test_dro_lt_bad_parameters(params, needle, stage1):
    train = {k: v for k, v in params.items() if k.startswith("train.")}
    params = {k: v for k, v in params.items() if k not in train}
    cfg, data = _recipe(**{"method.name": "dro_lt", "method.params": {"stage1": str(stage1), **params}, **train})
    with pytest.raises(ConfigError, match=needle) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)


def test_build_feature_loss_names():
    assert type(build_feature_loss("range")).__name__ == "RangeLoss"
    assert build_feature_loss("lifted", {"margin": 2.0}).margin == 2.0
