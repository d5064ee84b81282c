"""BCL (methods/bcl.py): the balanced supervised contrastive loss by hand on a tiny batch, equal to
SupCon with class-averaging and class-complement off, float64 gradcheck, a tiny 2-epoch run that
resumes bitwise, and bad parameters as one-line ConfigErrors."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.methods.bcl import balanced_supcon


def _by_hand(features, target, prototypes, C, T, averaging=True):
    """Loops over anchors and contrast rows, straight from the formula."""
    B, V, _ = features.shape
    anchors = [features[b, v] for v in range(V) for b in range(B)]
    labels = [int(target[b]) for v in range(V) for b in range(B)]
    rows, row_labels = list(anchors), list(labels)
    if prototypes is not None:
        rows += [prototypes[c] for c in range(C)]
        row_labels += list(range(C))
    counts = {c: row_labels.count(c) for c in range(C)}
    total = 0.0
    for i, (z, y) in enumerate(zip(anchors, labels)):
        denom = 0.0
        for j, (r, c) in enumerate(zip(rows, row_labels)):
            if j == i:
                continue
            weight = (counts[c] - (1 if c == y else 0)) if averaging else 1
            denom += math.exp(float(z @ r) / T) / weight
        pos = [j for j, c in enumerate(row_labels) if c == y and j != i]
        total += -sum(float(z @ rows[p]) / T - math.log(denom) for p in pos) / len(pos)
    return total / len(anchors)


def _data(seed=0, B=5, C=3, d=4):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(B, 2, d, generator=g, dtype=torch.float64), dim=2)
    p = F.normalize(torch.randn(C, d, generator=g, dtype=torch.float64), dim=1)
    return f, torch.tensor([0, 1, 0, 2, 0][:B]), p


@pytest.mark.parametrize("averaging,complement", [(True, True), (False, True), (True, False), (False, False)])
def test_balanced_supcon_by_hand(averaging, complement):
    f, y, p = _data()
    got = balanced_supcon(f, y, p if complement else None, num_classes=3, temperature=0.1, class_averaging=averaging)
    assert abs(float(got) - _by_hand(f, y, p if complement else None, 3, 0.1, averaging)) < 1e-10


def test_neutral_setting_is_supcon():
    """class_averaging and class_complement off: SupCon (Khosla et al. 2020, L_out) over the two views."""
    f, y, _ = _data(seed=1)
    z = torch.cat([f[:, 0], f[:, 1]])
    labels = y.repeat(2)
    sim = z @ z.T / 0.07
    eye = torch.eye(len(z), dtype=torch.bool)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, -math.inf), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None]) & ~eye
    supcon = -((log_prob * pos).sum(1) / pos.sum(1)).mean()
    got = balanced_supcon(f, y, None, num_classes=3, temperature=0.07, class_averaging=False)
    assert torch.allclose(got, supcon, atol=1e-12)


def test_official_shapes_hand_value():
    """Two anchors of class 0 and one of class 1, orthogonal unit features, prototypes on the axes."""
    e = torch.eye(3, dtype=torch.float64)
    f = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]])])
    got = balanced_supcon(f, torch.tensor([0, 0, 1]), e[:2], num_classes=2, temperature=1.0)
    # class-0 anchor: 4 positives (3 other rows of class 0 + prototype) of similarity 1, 3 class-1 rows of 0;
    # counts: class 0 has 5 rows, class 1 has 3; denominator 4 e / 4 + 3 / 3 = e + 1
    l0 = -(1 - math.log(math.e + 1))
    # class-1 anchor: 2 positives (other view + prototype) of 1, 5 class-0 rows of 0: 2 e / 2 + 5 / 5 = e + 1
    l1 = -(1 - math.log(math.e + 1))
    assert abs(float(got) - (4 * l0 + 2 * l1) / 6) < 1e-12


def test_gradcheck_float64():
    f, y, p = _data(seed=2)
    f.requires_grad_(True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: balanced_supcon(a, y, b, num_classes=3, temperature=0.2), (f, p))


def test_step_loss_is_alpha_ce_plus_beta_contrastive():
    cfg, data, recipe = tiny_recipe(**{"method.name": "bcl", "model.head": "cosine", "loss.name": "logit_adjustment",
                                       "method.params": {"feat_dim": 8, "alpha": 2.0, "beta": 0.5}})
    model, method = recipe.model, recipe.method
    assert method.views == ("simclr", "simclr")
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 0])
    torch.manual_seed(0)
    model.train()
    out = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator())
    assert out.logits.shape == (6, 4)
    model.eval()  # same numbers without batch statistics moving: recompute in eval mode both ways
    with torch.no_grad():
        step = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator()).loss
        pooled, logits = split_forward(model)(torch.cat([x, x, x]))
        proj = model.contrastive_head(pooled)
        feats = torch.stack([proj[6:12], proj[12:]], 1)
        protos = model.prototype_head(model.head.weight.T)
        con = balanced_supcon(feats, y, protos, num_classes=4, temperature=0.07)
        want = 2.0 * recipe.loss(30 * logits[:6], y) + 0.5 * con
    assert torch.allclose(step, want, atol=1e-5)


def test_two_epochs_resume_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "bcl", "model.head": "cosine", "loss.name": "logit_adjustment",
                         "method.params": {"feat_dim": 8}, "train.deterministic": True})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(), evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert any(k.startswith("contrastive_head.") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("params,msg", [
    ({"beta": -1}, "beta"), ({"temperature": 0}, "temperature"), ({"feat_dim": 0}, "feat_dim"),
    ({"views": ["simclr"]}, "views"), ({"views": ["simclr", "mocov9"]}, "mocov9"),
    ({"class_averaging": "yes"}, "class_averaging"), ({"scale": 0}, "scale"),
])
def test_bad_params(params, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        tiny_recipe(**{"method.name": "bcl", "method.params": params})
    assert "\n" not in str(err.value)


def test_no_batch_mixing():
    with pytest.raises(ConfigError, match="mixup_alpha"):
        tiny_recipe(**{"method.name": "bcl", "train.mixup_alpha": 1.0})
