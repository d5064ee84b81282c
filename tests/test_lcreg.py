"""LCReg (seed paper 004): latent categories, reconstruction and latent augmentation losses."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.errors import ConfigError
from longtail.inference import load
from longtail.methods import build_method
from longtail.methods.isda import isda_logits
from longtail.methods.lcreg import (LatentCategories, LatentCategoryClassifier, latent_augmentation_loss,
                                    part_features, reconstruction_loss)
from longtail.models import build_model
from longtail.runs import train_run
from longtail.io import safe_torch_load


def _method(**params):
    cfg = config_from_dict(tiny_config(**{"method.name": "lcreg", "method.params": params}))
    data = SimpleNamespace(num_classes=4, channels=3, class_counts=np.array([40, 20, 10, 5]))
    return build_method(cfg, data)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name, size, d, hw", [("resnet32", 32, 64, (8, 8)), ("resnet10", 64, 512, (2, 2))])
def test_shapes_on_cifar_and_imagenet_resnets(name, size, d, hw):
    torch.manual_seed(0)
    backbone = build_model(name, num_classes=10)
    model = LatentCategoryClassifier(backbone, LatentCategories(num_features=d, num_latents=40)).train()
    model.keep_latent_output = True
    images = torch.randn(2, 3, size, size)
    logits = model(images)
    out = model.pop_latent_output()
    n = hw[0] * hw[1]
    assert logits.shape == (2, 10)
    assert out.features.shape == (2, d, n) and out.encoded.shape == (40, d)
    assert out.logits.shape == out.weights.shape == (2, 40, n)
    assert out.reconstruction.shape == (2, d, n)
    assert torch.allclose(out.weights.sum(1), torch.ones(2, n), atol=1e-6)
    assert part_features(out.features, out.weights).shape == (2, 40, d)
    assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (2, d)


def test_similarity_and_reconstruction_by_hand():
    # Eq. 1-3 written out with loops on a 1x2 map, D = 2, M = 2, FC = identity
    lat = LatentCategories(num_features=2, num_latents=2)
    with torch.no_grad():
        lat.latents.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        lat.encoder.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        lat.encoder.bias.zero_()
    fmap = torch.tensor([[[[1.0, -1.0]], [[0.5, 3.0]]]])  # (1, 2, 1, 2): f(0,0) = (1, .5), f(0,1) = (-1, 3)
    out = lat(fmap)
    e = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    for n, f in enumerate([torch.tensor([1.0, 0.5]), torch.tensor([-1.0, 3.0])]):
        s = torch.stack([torch.sigmoid(f @ e_m) for e_m in e])
        s_hat = torch.exp(s) / torch.exp(s).sum()
        assert torch.allclose(out.weights[0, :, n], s_hat)
        assert torch.allclose(out.reconstruction[0, :, n], s_hat[0] * e[0] + s_hat[1] * e[1])


# ---------------------------------------------------------------------------- Eq. 4


def _orthogonal(d, n, scale, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return scale * q[:, :n]


def test_reconstruction_loss_by_hand_and_smallest_at_f():
    # orthogonal locations of norm r: row j of C_f = f^T f is r^2 at j, 0 elsewhere
    d, n, r = 8, 6, 1.5  # n = 2 x 3 locations: the softmax has h*w classes whatever M is
    f = _orthogonal(d, n, r)[None]
    loss_at_f = reconstruction_loss(f, f)
    assert float(loss_at_f) == pytest.approx(-r**2 + math.log(math.exp(r**2) + n - 1), rel=1e-12)
    # any other mixture of f's own locations, f_hat_j = sum_k P_jk f_k (P row-stochastic), is worse
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = torch.from_numpy(rng.dirichlet(np.full(n, 0.5), size=n))
        assert float(reconstruction_loss(f @ p.t(), f)) > float(loss_at_f)
    shifted = torch.roll(f, 1, dims=2)  # the right features at the wrong places
    assert float(reconstruction_loss(shifted, f)) > float(loss_at_f) + 1
    # cosine reading: scale-free, same ordering
    cos_at_f = reconstruction_loss(f, f, similarity="cosine", temperature=0.5)
    assert float(cos_at_f) == pytest.approx(float(reconstruction_loss(f / r * math.sqrt(2), f / r * math.sqrt(2))),
                                            rel=1e-12)
    assert float(reconstruction_loss(3 * shifted, f, similarity="cosine", temperature=0.5)) > float(cos_at_f)


# ---------------------------------------------------------------------------- Eq. 5-6


def test_latent_augmentation_by_hand():
    # M = D = 2, e_0 = (1, 0), e_1 = (0, 1), Sigma'_0 = diag(2, 3), sample v = (.5, -.5) of latent 0:
    # z = (.5, -.5); (e_1 - e_0)^T Sigma'_0 (e_1 - e_0) = 5, lam = .4: z_1 + .2 * 5 = .5 -> CE = log 2
    encoded = torch.eye(2)
    cov = torch.stack([torch.diag(torch.tensor([2.0, 3.0])), torch.eye(2)])
    v, y = torch.tensor([[0.5, -0.5]]), torch.tensor([0])
    assert float(latent_augmentation_loss(v, y, encoded, cov, lam=0.4)) == pytest.approx(math.log(2), rel=1e-6)
    diag = torch.tensor([[2.0, 3.0], [1.0, 1.0]])
    assert float(latent_augmentation_loss(v, y, encoded, diag, lam=0.4)) == pytest.approx(math.log(2), rel=1e-6)


def test_latent_augmentation_is_isda_and_vanishes_without_covariance():
    g = torch.Generator().manual_seed(0)
    samples, encoded = torch.randn(12, 5, generator=g), torch.randn(4, 5, generator=g)
    target = torch.tensor([0, 1, 2, 3] * 3)
    a = torch.randn(4, 5, 5, generator=g)
    cov = a @ a.transpose(1, 2)
    plain = F.cross_entropy(samples @ encoded.t(), target)
    assert torch.allclose(latent_augmentation_loss(samples, target, encoded, torch.zeros(4, 5, 5), lam=0.5), plain)
    assert torch.allclose(latent_augmentation_loss(samples, target, encoded, cov, lam=0.0), plain)
    # the M x M table equals ISDA's per-sample form
    isda = F.cross_entropy(isda_logits(samples @ encoded.t(), encoded, target, cov, lam=0.5), target)
    assert torch.allclose(latent_augmentation_loss(samples, target, encoded, cov, lam=0.5), isda)
    assert float(isda) > float(plain)  # the upper bound adds a non-negative term to every other class


def test_gradcheck_small_configuration():
    torch.manual_seed(0)
    lat = LatentCategories(num_features=3, num_latents=2).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in lat.named_parameters()}
    fmap = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 3, 3, dtype=torch.float64)
    cov = a @ a.transpose(1, 2)
    names = list(params)

    def objective(fmap, *values):
        out = torch.func.functional_call(lat, dict(zip(names, values)), (fmap,))
        samples = part_features(out.features, out.weights).reshape(-1, 3)
        target = torch.arange(2).repeat(2)
        return (reconstruction_loss(out.reconstruction, out.features)
                + latent_augmentation_loss(samples, target, out.encoded, cov, lam=0.5)
                + reconstruction_loss(out.reconstruction, out.features, similarity="cosine", temperature=0.5))

    assert torch.autograd.gradcheck(objective, (fmap, *params.values()))


# ---------------------------------------------------------------------------- the method


def test_switches_and_fusion():
    torch.manual_seed(0)
    plain = _method(latent_category=False, latent_aug=False, latent_recon=False).build_model()
    torch.manual_seed(0)
    reference = build_model("small_cnn", num_classes=4, in_channels=3, params={"width": 4})
    assert type(plain) is type(reference)  # all off: the backbone itself (MiSLAS stage 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), reference.state_dict().values()))
    images = torch.randn(3, 3, 8, 8)
    aux = _method(latent_category=False).build_model().eval()
    assert aux.fusion == "none" and torch.equal(aux(images), aux.backbone(images))
    res = _method().build_model().eval()
    f = res.backbone.forward_features(images)
    assert torch.allclose(res.forward_features(images), f + res.latent(f).reconstruction.view_as(f))
    rep = _method(fusion="replace").build_model().eval()
    f = rep.backbone.forward_features(images)
    assert torch.allclose(rep.forward_features(images), rep.latent(f).reconstruction.view_as(f))


def test_bf16_autocast_pass_gives_fp32_losses():
    model = _method().build_model().train()
    model.keep_latent_output = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 8, 8))
    out = model.pop_latent_output()
    assert out.reconstruction.dtype == torch.bfloat16
    out = out.float()
    assert reconstruction_loss(out.reconstruction, out.features).dtype == torch.float32


@pytest.mark.parametrize("params, key", [({"num_latents": 1}, "num_latents"), ({"fusion": "sum"}, "fusion"),
                                          ({"alpha": -0.1}, "alpha"), ({"latent_aug": "yes"}, "latent_aug"),
                                          ({"aug_target": "pixel"}, "aug_target"),
                                          ({"recon_temperature": 0}, "recon_temperature")])
def test_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=f"method.params.{key}"):
        _method(**params)


@pytest.mark.parametrize("aug_target", ["part", "location"])
def test_total_loss_is_eq7_and_lambda_rises_per_iteration(aug_target):
    from longtail.engine.loop import TrainForward

    params = {"num_latents": 3, "alpha": 0.3, "beta": 0.2, "gamma": 0.7, "aug_target": aug_target}
    cfg = config_from_dict(tiny_config(**{"method.name": "lcreg", "method.params": params, "train.epochs": 3}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    method = build_method(cfg, data)
    model, loss, sampler = method.build_model(), method.build_loss(), method.build_sampler()
    steps = math.ceil(len(sampler) / cfg.train.batch_size)  # 90 images, batch 16: 6 per epoch
    method.on_epoch_start(1, loss)
    method.set_train_mode(model)
    images, target = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    gen = torch.Generator().manual_seed(0)
    for k in range(2):
        assert method.lam == pytest.approx(0.5 * (steps + k) / (3 * steps))  # lam = lambda0 t / T
        step = method.training_step(model, TrainForward(model), images, target, loss, gen)
        total, logits = step.loss, step.logits
    # recompute Eq. 7 from the same pass (train-mode BN gives the same batch statistics)
    out = model.latent(model.backbone.forward_features(images))
    n = out.features.shape[2]
    if aug_target == "part":
        samples, labels = part_features(out.features, out.weights).reshape(15, -1), torch.arange(3).repeat(5)
        assert torch.equal(method.covariance.estimator.count, torch.full((3,), 10.0))  # 5 images x 2 steps per latent
    else:
        samples, labels = out.features.transpose(1, 2).reshape(5 * n, -1), out.logits.argmax(1).reshape(-1)
        assert float(method.covariance.estimator.count.sum()) == 2 * 5 * n
    lam = 0.5 * (steps + 1) / (3 * steps)
    expected = (0.7 * F.cross_entropy(logits, target)
                + 0.2 * reconstruction_loss(out.reconstruction, out.features)
                + 0.3 * latent_augmentation_loss(samples, labels, out.encoded, method.covariance.estimator.cov, lam))
    assert torch.allclose(total, expected, rtol=1e-5)
    assert set(method.state_dict()) == {"cov", "mean", "count"}


def test_lcreg_run_resumes_exactly_then_mislas_stage2(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "lcreg", "method.params": {"num_latents": 4}, "train.mixup_alpha": 1.0,
                         "train.epochs": 2})
    full, cut, interrupted = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                              evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert {"latent.latents", "latent.encoder.weight"} <= set(a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert interrupted["method"]["cov"].shape == (4, 8, 8) and interrupted["method"]["count"].sum() > 0
    assert torch.equal(a["method"]["cov"], b["method"]["cov"])
    # stage 2 rebuilds the LCReg network from the checkpoint's config; latent pool frozen with the backbone
    stage2 = tiny_config(**{"method.name": "mislas", "method.params": {"stage1": str(full / "checkpoints/last.pt")},
                            "loss.name": "label_aware_smoothing", "sampler.name": "class_aware"})
    train_run(config_from_dict(stage2), tmp_path / "s2", arrays=tiny_arrays())
    after = safe_torch_load(tmp_path / "s2/checkpoints/last.pt")["model"]
    for k, v in a["model"].items():
        if k.startswith("backbone.fc."):
            assert not torch.equal(v, after[k.replace("backbone.fc.", "backbone.fc.linear.")]), k
        else:
            assert torch.equal(v, after[k]), k
    predictor = load(tmp_path / "s2", device="cpu")
    assert isinstance(predictor.model, LatentCategoryClassifier)
