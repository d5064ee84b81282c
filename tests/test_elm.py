"""ELM (Jitkrittum et al. 2022): the embedding-margin loss and the `elm` method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.losses.embedding_margin import embedding_margin_loss
from longtail.methods import build_recipe


def _by_hand(features, target, margins, temperature, denominator):
    """Loop version of L_EM on python floats."""
    u = [np.asarray(f, dtype=np.float64) / np.linalg.norm(f) for f in features]
    per_anchor = []
    for i, yi in enumerate(target):
        pos = [j for j, yj in enumerate(target) if j != i and yj == yi]
        neg = [j for j, yj in enumerate(target) if yj != yi]
        if not pos:
            continue
        a = {j: (float(u[i] @ u[j]) - margins[yi]) / temperature for j in pos}
        s = [float(u[i] @ u[j]) / temperature for j in neg]
        terms = []
        for p in pos:
            others = [a[p]] if denominator == "positive_and_negatives" else [a[q] for q in pos]
            denom = sum(math.exp(v) for v in others + s)
            terms.append(-math.log(math.exp(a[p]) / denom))
        per_anchor.append(sum(terms) / len(terms))
    return sum(per_anchor) / len(per_anchor)


FEATS = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0]]
LABELS = [0, 0, 1, 1, 0]
MARGINS = [0.2, 0.5]


@pytest.mark.parametrize("denominator", ["positive_and_negatives", "all"])
def test_embedding_margin_by_hand(denominator):
    got = embedding_margin_loss(torch.tensor(FEATS, dtype=torch.float64), torch.tensor(LABELS),
                                torch.tensor(MARGINS, dtype=torch.float64), temperature=0.5, denominator=denominator)
    assert float(got) == pytest.approx(_by_hand(FEATS, LABELS, MARGINS, 0.5, denominator), rel=1e-10)


def test_embedding_margin_small_case_exact():
    # two samples of class 0 at right angles, one of class 1 opposite the first: T = 1, rho_0 = 0.5
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    got = embedding_margin_loss(feats, torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.0], dtype=torch.float64),
                                temperature=1.0)
    # anchor 0: a = 0 - 0.5, negative cos -1 -> softplus(-1 + 0.5); anchor 1: negative cos 0 -> softplus(0 + 0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_embedding_margin_grows_with_the_margin_and_has_no_positive_case():
    f, y = torch.tensor(FEATS), torch.tensor(LABELS)
    small = embedding_margin_loss(f, y, torch.zeros(2))
    large = embedding_margin_loss(f, y, torch.full((2,), 0.5))
    assert float(large) > float(small)
    lone = torch.randn(3, 4, requires_grad=True)
    zero = embedding_margin_loss(lone, torch.tensor([0, 1, 2]), torch.zeros(3))
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert torch.equal(lone.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("denominator", ["positive_and_negatives", "all"])
def test_embedding_margin_gradcheck(denominator):
    f = torch.tensor(FEATS, dtype=torch.float64, requires_grad=True)
    y, m = torch.tensor(LABELS), torch.tensor(MARGINS, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: embedding_margin_loss(z, y, m, temperature=0.3,
                                                                    denominator=denominator), (f,))


def _cfg(**over):
    base = {"method.name": "elm", "loss.name": "logit_adjustment", "train.milestones": [3]}
    base.update(over)
    return tiny_config(**base)


def _step(cfg_dict):
    cfg = config_from_dict(cfg_dict)
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    model, method = recipe.model, recipe.method
    pos = recipe.sampler.indices(0)[:16]
    images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(data.train.labels[pos])

    def forward(x):
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        return pooled, model.head(pooled)

    out = method.training_step(model, forward, images, target, recipe.loss, torch.Generator().manual_seed(0))
    feats, logits = forward(images)
    return out, feats, logits, target, recipe, data


def test_elm_lam_zero_is_the_logit_margin_loss_and_lam_adds_the_embedding_term():
    out, _, logits, target, recipe, _ = _step(_cfg(**{"method.params": {"lam": 0.0}, "loss.name": "ce"}))
    assert torch.allclose(out.loss, F.cross_entropy(logits, target), rtol=1e-6)
    assert recipe.method.plain_ce_epochs() == math.inf
    out, feats, logits, target, recipe, data = _step(_cfg(**{"method.params": {"lam": 0.7}}))
    margins = recipe.method.margins
    n = np.asarray(data.class_counts, dtype=np.float64)
    assert float(margins[int(n.argmin())]) == pytest.approx(0.5) and float(margins.max()) == pytest.approx(0.5)
    expected = recipe.loss(logits, target) + 0.7 * embedding_margin_loss(feats, target, margins, temperature=0.1)
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert recipe.method.plain_ce_epochs() == 0


def test_elm_trains_and_resumes_exactly(tmp_path, monkeypatch):
    full, cut, _ = full_and_resumed(_cfg(), tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["method"] == {}


@pytest.mark.parametrize("over, message", [
    ({"method.params": {"lam": -1}}, "lam must be a finite number >= 0"),
    ({"method.params": {"temperature": 0}}, "temperature must be a finite number > 0"),
    ({"method.params": {"embed_max_m": -0.1}}, "embed_max_m must be a finite number >= 0 and <= 2"),
    ({"method.params": {"denominator": "out"}}, "denominator must be one of 'positive_and_negatives', 'all'"),
    ({"train.mixup_alpha": 0.2}, "does not take the loop's mixup / CutMix .*; set train.mixup_alpha: 0$"),
    # ELM's own training_step never calls the base step, where CutMix happens: refused, not ignored
    ({"train.cutmix_alpha": 1.0}, "does not take the loop's mixup / CutMix .*; set train.cutmix_alpha: 0$"),
])
def test_elm_bad_parameters(over, message):
    cfg = config_from_dict(_cfg(**over))
    data = build_data(cfg.data, arrays=tiny_arrays())
    with pytest.raises(ConfigError, match=message) as err:
        build_recipe(cfg, data)
    assert "\n" not in str(err.value)
