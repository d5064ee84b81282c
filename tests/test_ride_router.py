"""RIDE stage 2 (expert-assignment router, method `ride_router`) and RIDE distillation (`ride` with
`method.params.teacher`): router features / targets / loss by hand, the routing rule and the expert
count, FLOPs accounting, tiny runs that resume exactly, bad params, teacher path errors, configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import full_and_resumed, last_checkpoints, split_forward, tiny_arrays, tiny_config, tiny_recipe
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError
from longtail.models import build_model
from longtail.models.expert_router import (ExpertRouter, RoutedExperts, route_masked, routed_forward, router_loss,
                                           router_scores, router_targets, routing_flops)
from longtail.runs import train_run

EXPERTS = {"num": 3, "shared_stages": 1, "widths": "ride", "scale": 30.0}
NET = {"model.name": "resnet20", "model.head": "cosine", "model.params": {"experts": EXPERTS}}
RIDE_CFG = {"method.name": "ride", **NET, "loss.name": "ride", "loss.params": {"additional_diversity_factor": -0.45}}


@pytest.fixture(scope="module")
def ride_stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("ride_stage1")
    train_run(config_from_dict(tiny_config(**RIDE_CFG, **{"train.epochs": 1})), root / "s1", arrays=tiny_arrays(),
              evaluate=False)
    return root / "s1"


def router_cfg(stage1, **params):
    return {"method.name": "ride_router", **NET, "method.params": {"stage1": str(stage1), "top_k": 2, **params},
            "sampler.name": "class_aware", "sampler.params": {"samples_per_class": 1}, "train.lr": 0.01,
            "train.lr_schedule": "cosine", "train.warmup_epochs": 0}


def _router(E=3, D=2, k=2):
    r = ExpertRouter(num_experts=E, feature_dim=D, top_k=k, hidden=2).double()
    with torch.no_grad():
        for i, fc in enumerate(r.expert_help_pred_hidden_fcs):
            fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]) * (i + 1))
            fc.bias.copy_(torch.tensor([0.0, 0.5]))
        r.expert_help_pred_fc.weight.copy_(torch.tensor([[0.5, -0.25, 1.0, 2.0]]))
        r.expert_help_pred_fc.bias.fill_(-0.1)
    return r.requires_grad_(False)


def test_router_score_by_hand():
    r = _router()
    f = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||f|| = 5 -> (0.6, 0.8)
    m = torch.tensor([[1.0, 7.0, -2.0]], dtype=torch.float64)  # top-2: 7, 1
    # step 1: hidden = relu(2*0.6, -2*0.8 + 0.5) = (1.2, 0); out = 0.5*7 - 0.25*1 + 1*1.2 + 0 - 0.1
    assert float(r(1, f, m)) == pytest.approx(0.5 * 7 - 0.25 * 1 + 1.2 - 0.1)
    # step 0: hidden = relu(0.6, -0.8 + 0.5) = (0.6, 0)
    assert float(r(0, f, m)) == pytest.approx(3.5 - 0.25 + 0.6 - 0.1)
    assert len(r.expert_help_pred_hidden_fcs) == 2 and r.expert_help_pred_fc.in_features == 2 + 2


def test_router_targets_and_training_scores_by_hand():
    # 3 experts, 2 classes, 4 images; running-sum predictions per image:
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],     # expert 0
                      [[0.0, 3.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.5]],     # expert 1
                      [[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 0.1]]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    # sums: img0: (1,0)->ok, (1,3)->wrong, (1,3) wrong;  img1: wrong, (2,1) ok, ok;
    #       img2: wrong, wrong, (5,2) ok;                  img3: (1,0) wrong, (1,.5) wrong, (1,.6) wrong
    t = router_targets(z, y)
    assert t.tolist() == [[False, True, True, False], [False, False, True, False]]
    r = _router(E=3, D=2, k=2)
    feats = torch.randn(3, 4, 2, dtype=torch.float64)
    s = router_scores(r, z, feats)
    assert torch.allclose(s[1], r(1, feats[1], (z[0] + z[1]) / 2)) and torch.allclose(s[0], r(0, feats[0], z[0]))
    # loss: (1/2) sum_i mean_b BCE(s, t; pos_weight)
    pw = 100.0
    def sig(v):
        return 1 / (1 + math.exp(-v))
    hand = sum(-(pw * tt * math.log(sig(ss)) + (1 - tt) * math.log(1 - sig(ss)))
               for row_s, row_t in zip(s.tolist(), t.float().tolist()) for ss, tt in zip(row_s, row_t)) / 4 / 2
    assert float(router_loss(s, t, pw)) == pytest.approx(float(hand), rel=1e-9)


def _routed_net(threshold=0.5, seed=0):
    torch.manual_seed(seed)
    m = build_model("resnet20", num_classes=4, in_channels=3, head="cosine", params={"experts": EXPERTS}).eval()
    plain = build_model("resnet20", num_classes=4, in_channels=3, head="cosine", params={"experts": EXPERTS}).eval()
    plain.load_state_dict(m.state_dict())
    m.reset_head(RoutedExperts(m.head, ExpertRouter(num_experts=3, feature_dim=m.num_features // 3, top_k=2),
                               threshold=threshold))
    return m, plain


def test_routing_rule_and_expert_count():
    m, plain = _routed_net()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        logits, feats = plain.expert_outputs(x)
        bias = m.head.router.expert_help_pred_fc.bias
        # the rule by hand: go on where sigmoid(r) > 0.5 for the images that reached the expert
        for b in (-50.0, 50.0, None):
            if b is not None:
                m.head.router.expert_help_pred_fc.weight.zero_()
                bias.fill_(b)
            z, n, calls = routed_forward(m, x)
            total, count, active = logits[0].clone(), torch.ones(16, dtype=torch.long), torch.ones(16, dtype=torch.bool)
            for i in (1, 2):
                go = torch.sigmoid(m.head.router(i - 1, feats[i - 1], total / count[:, None])) > 0.5
                active &= go
                total[active] += logits[i][active]
                count += active.long()
            assert torch.equal(n, count)
            torch.testing.assert_close(z, total / count[:, None], rtol=1e-5, atol=1e-5)
            assert torch.equal(calls, torch.clamp(count, max=2))  # the router ran after each consulted expert but the last
            torch.testing.assert_close(m(x), z, rtol=1e-5, atol=1e-5)  # the masked forward (predict / export) agrees
            if b == -50.0:
                assert (n == 1).all()
                torch.testing.assert_close(z, logits[0])
            if b == 50.0:  # all experts: the plain model's output
                assert (n == 3).all()
                torch.testing.assert_close(z, plain(x), rtol=1e-5, atol=1e-5)
        # threshold 1: never go on
        m.head.threshold = 1.0
        assert (routed_forward(m, x)[1] == 1).all()


def test_flops_accounting():
    from torch.utils.flop_counter import FlopCounterMode

    from longtail.methods.ride import routing_summary

    m, plain = _routed_net()
    f = routing_flops(m, (3, 8, 8))
    with FlopCounterMode(display=False) as c:
        with torch.no_grad():
            plain(torch.zeros(1, 3, 8, 8))
    assert f["shared"] + sum(f["experts"]) == c.get_total_flops()  # the parts add up to the plain network
    d = m.num_features // 3
    assert f["router"] == 2 * (d * 16 + (16 + 2))  # hidden layer + shared output, one image
    used = torch.tensor([1, 3, 2, 3]).numpy()
    calls = torch.tensor([1, 2, 2, 2]).numpy()
    s = routing_summary(m, used, calls, image_shape=(3, 8, 8), all_experts={"top1": 1.0}, threshold=0.5)
    e = f["experts"]
    hand = f["shared"] + (e[0] + (e[0] + e[1] + e[2]) + (e[0] + e[1]) + (e[0] + e[1] + e[2])) / 4 + f["router"] * 7 / 4
    assert s["flops"]["per_image_routed"] == pytest.approx(hand)
    assert s["flops"]["per_image_all_experts"] == c.get_total_flops()
    assert s["mean_experts"] == 2.25 and s["share_by_experts"] == [0.25, 0.25, 0.5]
    assert s["all_experts"] == {"top1": 1.0}


def test_masked_route_equals_dynamic_on_random_router():
    m, plain = _routed_net(seed=3)
    with torch.no_grad():
        m.head.router.expert_help_pred_fc.bias.fill_(0.0)
        x = torch.randn(32, 3, 8, 8)
        logits, feats = plain.expert_outputs(x)
        z1, n1 = route_masked(m.head.router, logits, feats, 0.5)
        z2, n2, _ = routed_forward(m, x)
    assert torch.equal(n1, n2)
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)


def test_router_step_freezes_everything_but_the_router(ride_stage1):
    cfg, data, recipe = tiny_recipe(**router_cfg(ride_stage1 / "checkpoints" / "last.pt"))
    model, method = recipe.model, recipe.method
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    assert {id(p) for g in recipe.param_groups for p in g.params} == {id(p) for p in model.head.router.parameters()}
    method.set_train_mode(model)
    assert not any(mod.training for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert model.head.router.training
    images = torch.rand(8, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = method.training_step(model, split_forward(model), images, target, recipe.loss, torch.Generator())
    with torch.no_grad():
        logits, feats = model.expert_outputs(images)
    want = router_loss(router_scores(model.head.router, logits, feats), router_targets(logits, target), 100.0)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.logits, logits.mean(0))


def test_tiny_router_stage_resumes_exactly_and_reports_routing(ride_stage1, tmp_path, monkeypatch):
    cfg = tiny_config(**router_cfg(ride_stage1 / "checkpoints" / "last.pt"))
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays())
    a, b = last_checkpoints(full, cut)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    s1 = torch.load(ride_stage1 / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert torch.equal(a["model"]["layer2s.1.0.conv1.weight"], s1["layer2s.1.0.conv1.weight"])  # frozen
    assert torch.equal(a["model"]["bn1.running_mean"], s1["bn1.running_mean"])  # BatchNorm frozen too
    ev = json.loads((full / "eval.json").read_text())
    r = ev["routing"]
    assert 1 <= r["mean_experts"] <= 3 and sum(r["share_by_experts"]) == pytest.approx(1.0)
    assert r["flops"]["per_image_routed"] <= r["flops"]["per_image_all_experts"] + 2 * r["flops"]["router_call"]
    assert set(r["all_experts"]) >= {"top1", "many", "few"}
    assert ev == json.loads((cut / "eval.json").read_text()) | {"run": ev["run"]}
    import numpy as np
    preds = np.load(full / "predictions.npz")
    assert preds["experts_used"].mean() == pytest.approx(r["mean_experts"])


@pytest.mark.parametrize("over,match", [
    ({"top_k": 5}, "top_k"), ({"top_k": 0}, "top_k"), ({"pos_weight": 0}, "pos_weight"),
    ({"threshold": 1.5}, "threshold"), ({"hidden": 0}, "hidden"), ({"unknown": 1}, "unknown"),
])
def test_bad_router_params(ride_stage1, over, match):
    cfg = router_cfg(ride_stage1 / "checkpoints" / "last.pt", **over)
    with pytest.raises(ConfigError, match=match) as err:
        tiny_recipe(**cfg)
    assert "\n" not in str(err.value)


def test_bad_router_setups(ride_stage1, tmp_path):
    s1 = ride_stage1 / "checkpoints" / "last.pt"
    for over, match in [({"loss.name": "ride"}, "loss.name: ce"), ({"train.mixup_alpha": 0.2}, "mixup"),
                        ({"method.params": {"stage1": ""}}, "stage1"),
                        ({"model.params": {"experts": {**EXPERTS, "num": 1}}}, "at least 2 experts"),
                        ({"model.params": {"experts": {**EXPERTS, "num": 2}}}, "does not fit")]:
        with pytest.raises((ConfigError, CheckpointError), match=match) as err:
            tiny_recipe(**{**router_cfg(s1), **over})
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError) as err:
        tiny_recipe(**router_cfg(tmp_path / "missing.pt"))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- distillation

def test_distill_kl_by_hand():
    from longtail.methods.ride import distill_kl

    s = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    T = 1.5
    p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
    hand = (p * (p.log() - q.log())).sum() * T * T
    out = distill_kl(s, t, T)
    torch.testing.assert_close(out, hand)
    out.backward()
    assert t.grad is None and s.grad is not None
    assert float(distill_kl(s, s.detach(), T).detach()) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ride_teacher")
    over = {**RIDE_CFG, "model.params": {"experts": {**EXPERTS, "num": 4}}, "train.epochs": 1}
    train_run(config_from_dict(tiny_config(**over)), root / "t", arrays=tiny_arrays(), evaluate=False)
    return root / "t"


@pytest.mark.parametrize("repeat", [True, False])
def test_distill_step_is_official(teacher_run, repeat):
    over = {**RIDE_CFG, "method.params": {"teacher": str(teacher_run), "distill_temperature": 1.5,
                                          "distill_weight": 0.7, "repeat_over_experts": repeat}}
    cfg, data, recipe = tiny_recipe(**over)
    method, model, loss = recipe.method, recipe.model, recipe.loss
    teacher = method.teacher
    assert teacher.num_experts == 4 and not any(p.requires_grad for p in teacher.parameters())
    method.on_epoch_start(0, loss)
    model.train()
    images, target = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    out = method.training_step(model, split_forward(model), images, target, loss, torch.Generator())
    assert teacher.training  # official: the teacher runs in train mode (batch statistics)
    from longtail.methods.ride import distill_kl
    with torch.no_grad():
        experts = model.expert_logits(images)
        t = teacher(images)
    want = loss(experts, target) + 0.7 * distill_kl(experts.mean(0), t, 1.5)
    torch.testing.assert_close(out.loss, want * (3 if repeat else 1))


def test_distill_teacher_bn_running_keeps_eval(teacher_run):
    cfg, data, recipe = tiny_recipe(**{**RIDE_CFG, "method.params": {"teacher": str(teacher_run / "checkpoints" / "last.pt"),
                                                                     "teacher_bn": "running"}})
    recipe.method.training_step(recipe.model, split_forward(recipe.model), torch.rand(4, 3, 8, 8),
                                torch.tensor([0, 1, 2, 3]), recipe.loss, torch.Generator())
    assert not recipe.method.teacher.training


def test_tiny_distill_run_resumes_exactly(teacher_run, tmp_path, monkeypatch):
    cfg = tiny_config(**{**RIDE_CFG, "method.params": {"teacher": str(teacher_run)}})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = last_checkpoints(full, cut)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_teacher_path_errors(teacher_run, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other"
    train_run(config_from_dict(tiny_config(**{"train.epochs": 1, "data.imbalance_ratio": 2})), other,
              arrays=tiny_arrays(num_classes=3), evaluate=False)
    for source, match in [(tmp_path / "missing", "teacher"), (junk, "not a longtail checkpoint"), (text, "teacher"),
                          (tmp_path, "teacher"), (other, "does not fit|cannot rebuild")]:
        with pytest.raises(CheckpointError, match=match) as err:
            tiny_recipe(**{**RIDE_CFG, "method.params": {"teacher": str(source)}})
        assert "\n" not in str(err.value) and "method.params.teacher" in str(err.value)


@pytest.mark.parametrize("over,match", [
    ({"distill_temperature": 0}, "distill_temperature"), ({"distill_weight": -1}, "distill_weight"),
    ({"repeat_over_experts": 1}, "repeat_over_experts"), ({"teacher_bn": "eval"}, "teacher_bn"),
    ({"teacher": 3}, "teacher"),
])
def test_bad_distill_params(over, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny_recipe(**{**RIDE_CFG, "method.params": over})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("folder", ["cifar10_lt", "cifar10_lt_full", "cifar100_lt"])
def test_router_configs(folder):
    from longtail.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / folder / "ride_router.yaml"
    assert path.read_text().splitlines()[0] == (f"# longtail train configs/{folder}/ride_router.yaml "
                                                f"--out runs/{folder}_ride_router")
    cfg = load_config(path)
    p = cfg.method.params
    assert cfg.method.name == "ride_router" and p["pos_weight"] == 100 and p.get("threshold", 0.5) == 0.5
    assert p["top_k"] == (30 if folder == "cifar100_lt" else 5)
    assert cfg.train.epochs == 5 and cfg.train.batch_size == 512 and cfg.train.lr == 0.01
    assert cfg.train.lr_schedule == "cosine" and cfg.train.warmup_epochs == 0 and cfg.train.nesterov
    assert cfg.sampler.name == "class_aware" and cfg.sampler.params == {"samples_per_class": 1}
    assert cfg.model.params["experts"] == {"num": 3, "shared_stages": 1, "widths": "ride", "scale": 30.0}
    assert p["stage1"].endswith("ride/checkpoints/last.pt")


def test_routed_network_exports_and_predicts_routed(ride_stage1, tmp_path):
    """predict / export use the network's forward, which routes with masks: the exported program's
    output equals the dynamic routing."""
    from longtail.export import export_run
    from longtail.runmodel import load_run_model

    run = tmp_path / "router"
    train_run(config_from_dict(tiny_config(**{**router_cfg(ride_stage1 / "checkpoints" / "last.pt"), "train.epochs": 1})),
              run, arrays=tiny_arrays(), evaluate=False)
    export_run(run, tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    model = load_run_model(run, which="last")[0].eval()
    meta = json.loads((run / "data.json").read_text()) if (run / "data.json").is_file() else None
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1) if meta else 0
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1) if meta else 1
    x = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(program(images), routed_forward(model, x)[0], rtol=1e-4, atol=1e-4)
