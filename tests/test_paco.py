"""PaCo / GPaCo (methods/paco.py): the loss by hand on a tiny batch (centres as extra positives and
negatives), its reductions to balanced-softmax CE and to SupCon, float64 gradcheck, the steps of
both variants against their parts, the momentum encoder and the queue, 2-epoch runs that resume
bitwise, `longtail dlsa` on a tiny PaCo run, the 'mocov2' view, and bad parameters."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.errors import ConfigError
from longtail.methods.bcl import balanced_supcon
from longtail.methods.paco import paco_loss


def _by_hand(feats, labels, z, A, alpha, beta, gamma, T, log_prior=None, smooth=0.0):
    """Loops straight from the formula: columns = C centres, then the N features."""
    N, C = feats.shape[0], z.shape[1]
    total = 0.0
    for i in range(A):
        y = int(labels[i])
        cols, w_pos, w_den = [], [], []
        for c in range(C):
            cols.append(float(z[i, c]) + (0.0 if log_prior is None else float(log_prior[c])))
            w_pos.append(beta * ((1 - smooth) if c == y else smooth / (C - 1)))
            w_den.append(1.0)
        for j in range(N):
            cols.append(float(feats[i] @ feats[j]) / T)
            w_pos.append(alpha if (j != i and int(labels[j]) == y) else 0.0)
            w_den.append(0.0 if j == i else gamma)
        den = sum(w * math.exp(v) for w, v in zip(w_den, cols))
        total += -sum(w * (v - math.log(den)) for w, v in zip(w_pos, cols)) / sum(w_pos)
    return total / A


def _data(seed=0, N=7, C=3, d=4, A=3):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    z = torch.randn(A, C, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0, 1, 2, 0][:N])
    return f, labels, z


@pytest.mark.parametrize("alpha,beta,gamma,smooth,prior", [
    (0.01, 1.0, 1.0, 0.0, True), (0.5, 2.0, 0.3, 0.0, True), (1.0, 1.0, 1.0, 0.1, False), (0.2, 0.0, 1.0, 0.0, True)])
def test_loss_by_hand(alpha, beta, gamma, smooth, prior):
    f, y, z = _data()
    log_prior = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64) + 1e-9) if prior else None
    got = paco_loss(f, y, z, num_anchors=3, alpha=alpha, beta=beta, gamma=gamma, temperature=0.2,
                    log_prior=log_prior, smooth=smooth)
    want = _by_hand(f, y, z, 3, alpha, beta, gamma, 0.2, log_prior, smooth)
    assert abs(float(got) - want) < 1e-9


def test_hand_value_centres_as_positive_and_negatives():
    """One anchor of class 0, one other feature of class 0 (similarity 1) and one of class 1
    (similarity 0), T = 1, centre logits (2, 0), no prior: the centre of class 0 is a positive of
    weight beta, the class-1 centre a negative, the class-0 sample a positive of weight alpha."""
    e = torch.eye(2, dtype=torch.float64)
    f = torch.stack([e[0], e[0], e[1]])
    z = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    got = paco_loss(f, torch.tensor([0, 0, 1]), z, num_anchors=1, alpha=0.5, beta=1.0, gamma=1.0, temperature=1.0)
    den = math.exp(2) + math.exp(0) + math.exp(1) + math.exp(0)
    want = -(1.0 * (2 - math.log(den)) + 0.5 * (1 - math.log(den))) / 1.5
    assert abs(float(got) - want) < 1e-12


def test_alpha_gamma_zero_is_balanced_softmax_ce():
    """No sample terms: the loss is CE of the centre logits + log(prior + 1e-9) (Balanced Softmax)."""
    f, y, z = _data(seed=1)
    prior = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    log_prior = torch.log(prior + 1e-9)
    got = paco_loss(f, y, z, num_anchors=3, alpha=0.0, beta=1.0, gamma=0.0, temperature=0.1, log_prior=log_prior)
    assert torch.allclose(got, F.cross_entropy(z + log_prior, y[:3]), atol=1e-10)


def test_beta_zero_without_centres_is_supcon():
    """beta = 0 and centre logits at -inf (exp 0 in the denominator): SupCon's L_out over two views,
    all 2B rows anchors (GPaCo's layout without a queue); equal to BCL's balanced_supcon with
    class-averaging and class-complement off."""
    g = torch.Generator().manual_seed(3)
    views = F.normalize(torch.randn(4, 2, 5, generator=g, dtype=torch.float64), dim=2)
    y = torch.tensor([0, 1, 0, 2])
    feats = torch.cat([views[:, 0], views[:, 1]])
    z = torch.full((8, 3), -1e4, dtype=torch.float64)
    got = paco_loss(feats, y.repeat(2), z, num_anchors=8, alpha=1.0, beta=0.0, gamma=1.0, temperature=0.07)
    want = balanced_supcon(views, y, None, num_classes=3, temperature=0.07, class_averaging=False)
    assert torch.allclose(got, want, atol=1e-10)


def test_gradcheck_float64():
    f, y, z = _data(seed=2)
    f.requires_grad_(True)
    z.requires_grad_(True)
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b: paco_loss(a, y, b, num_anchors=3, alpha=0.3, beta=1.0, gamma=0.7, temperature=0.5,
                               log_prior=log_prior, smooth=0.05), (f, z))


def _step_inputs():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x2 = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return x, x2, torch.tensor([0, 1, 2, 3, 0, 0])


def _with_view(method, view):
    from longtail.methods.base import TrainBatches
    method.batches = TrainBatches(fetch=None, views=(view,))


def test_paco_step_is_the_loss_of_its_parts_then_queue_and_ema():
    cfg, data, recipe = tiny_recipe(**{"method.name": "paco", "method.params": {"queue_size": 8, "feat_dim": 4}})
    model, method = recipe.model, recipe.method
    assert method.views == ("mocov2",) and method.temperature == 0.05 and method.alpha == 0.01
    x, x2, y = _step_inputs()
    _with_view(method, x2)
    model.eval()  # no BN statistics move: the parts can be recomputed
    queued, queued_labels = (t.clone() for t in model.paco_queue.contents())
    with torch.no_grad():
        step = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator())
        pooled, logits = split_forward(model)(x)
        q = model.paco_projection(pooled)
        key = model.paco_key.module
        k = key.paco_projection(key.forward_head(key.forward_features(x2), pre_logits=True))
        counts = torch.tensor(data.class_counts, dtype=torch.float64)
        want = paco_loss(torch.cat([q, k, queued]), torch.cat([y, y, queued_labels]), logits, num_anchors=6,
                         alpha=0.01, beta=1.0, gamma=1.0, temperature=0.05,
                         log_prior=torch.log(counts / counts.sum() + 1e-9).float())
    assert torch.allclose(step.loss, want, atol=1e-5) and torch.equal(step.logits, logits)
    feats, labels = model.paco_queue.contents()  # pushed after the loss: the keys are the newest rows
    assert torch.allclose(feats[-6:], k) and torch.equal(labels[-6:], y)
    # the momentum encoder: theta_k <- 0.999 theta_k + 0.001 theta_q after each step
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    before = key.fc.weight.clone()
    method.after_step(model)
    assert torch.allclose(key.fc.weight, 0.999 * before + 0.001 * model.fc.weight, atol=1e-7)
    assert not any(p.requires_grad for p in key.parameters())
    assert all(p.requires_grad is False for n, p in model.named_parameters() if n.startswith("paco_key."))


def test_gpaco_step_both_views_are_anchors():
    cfg, data, recipe = tiny_recipe(**{"method.name": "gpaco", "method.params": {"queue_size": 8, "feat_dim": 4}})
    model, method = recipe.model, recipe.method
    assert not hasattr(model, "paco_key") and method.temperature == 0.07
    assert [type(m).__name__ for m in model.paco_projection.mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    x, x2, y = _step_inputs()
    _with_view(method, x2)
    model.eval()
    queued, queued_labels = (t.clone() for t in model.paco_queue.contents())
    with torch.no_grad():
        step = method.training_step(model, split_forward(model), x, y, recipe.loss, torch.Generator())
        (pq, lq), (pk, lk) = split_forward(model)(x), split_forward(model)(x2)
        q, k = model.paco_projection(pq), model.paco_projection(pk)
        counts = torch.tensor(data.class_counts, dtype=torch.float64)
        want = paco_loss(torch.cat([q, k, queued]), torch.cat([y, y, queued_labels]), torch.cat([lq, lk]),
                         num_anchors=12, alpha=0.01, beta=1.0, gamma=1.0, temperature=0.07,
                         log_prior=torch.log(counts / counts.sum() + 1e-9).float())
    assert torch.allclose(step.loss, want, atol=1e-5)
    assert torch.allclose(model.paco_queue.contents()[0][-6:], k)


@pytest.mark.parametrize("name", ["paco", "gpaco"])
def test_two_epochs_resume_exactly(name, tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": name, "method.params": {"queue_size": 16, "feat_dim": 4},
                         "train.deterministic": True})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(), evaluate=False)
    a, b = last_checkpoints(full, cut)
    assert any(k.startswith("paco_queue.") for k in a["model"]) and any(k.startswith("fc.") for k in a["model"])
    assert (name == "paco") == any(k.startswith("paco_key.") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_dlsa_on_a_tiny_paco_run(tmp_path, monkeypatch, capsys):
    """DLSA (seed paper 002) runs on PaCo backbones: `longtail dlsa RUN` on a 1-epoch PaCo run."""
    import json

    import longtail.features
    from longtail.cli import main
    from longtail.config import config_from_dict
    from longtail.runs import train_run

    run = tmp_path / "paco"
    cfg = tiny_config(**{"method.name": "paco", "method.params": {"queue_size": 16, "feat_dim": 4},
                         "train.epochs": 1})
    train_run(config_from_dict(cfg), run, arrays=tiny_arrays(), evaluate=False)
    real = longtail.features.extract_features
    monkeypatch.setattr(longtail.features, "extract_features",
                        lambda *a, **k: real(*a, **{**k, "arrays": tiny_arrays()}))
    args = ["dlsa", str(run), "--out", str(tmp_path / "out"), "--clusters", "4", "--depth", "1",
            "--flow-epochs", "1", "--flow-batch", "32", "--cls-epochs", "1", "--eval-every", "1"]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "dlsa.json").read_text())
    assert result["config"]["depth"] == 1


def test_mocov2_view_is_simclr_with_crop_scale_0_2():
    from longtail.data.augment import BatchAugment
    from longtail.data.simclr_augment import simclr_view

    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    raw = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    got = BatchAugment(mean=mean, std=std).view("mocov2")(raw, torch.Generator().manual_seed(5))
    want = simclr_view(raw.permute(0, 3, 1, 2), torch.Generator().manual_seed(5), scale=(0.2, 1.0))
    want = (want.float() / 255 - 0.5) / 0.25
    assert torch.allclose(got, want)


@pytest.mark.parametrize("over,msg", [
    ({"method.params": {"alpha": -1}}, "alpha"), ({"method.params": {"temperature": 0}}, "temperature"),
    ({"method.params": {"alpha": 0, "beta": 0}}, "no positive"), ({"method.params": {"queue_size": 0}}, "queue_size"),
    ({"method.params": {"feat_dim": 1.5}}, "feat_dim"), ({"method.params": {"momentum": 2}}, "momentum"),
    ({"method.params": {"view": "mocov9"}}, "mocov9"), ({"method.params": {"smooth": 0.1}}, "gpaco"),
    ({"method.params": {"gama": 1}}, "gama"), ({"model.head": "cosine"}, "linear classifier"),
    ({"loss.name": "focal"}, "own PaCo loss"), ({"train.mixup_alpha": 1.0}, "mixup_alpha"),
    ({"reweight": {"scheme": "inverse_frequency"}}, "reweight"),
])
def test_bad_params(over, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        tiny_recipe(**{"method.name": "paco", **over})
    assert "\n" not in str(err.value)


def test_gpaco_smooth_and_bad_smooth():
    assert tiny_recipe(**{"method.name": "gpaco", "method.params": {"smooth": 0.1}})[2].method.smooth == 0.1
    with pytest.raises(ConfigError, match="smooth"):
        tiny_recipe(**{"method.name": "gpaco", "method.params": {"smooth": 1.0}})
