"""Optimizers as a registry over parameter groups (lr scale, weight decay, no decay on norms and biases)."""

from __future__ import annotations

import pytest
import torch

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.cli import main
from longtail.errors import ConfigError
from longtail.io import safe_torch_load
from longtail.optim import OPTIMIZERS, ParamGroup, build_optimizer, no_decay_split, set_learning_rate


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 2))


def _steps(net, opt, n=3):
    x, y = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1])
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_registry_names():
    assert OPTIMIZERS.names() == ["adamw", "sgd"]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_one_group_is_torch_sgd_bitwise(nesterov):
    a, b = _net(), _net()
    opt_a = build_optimizer("sgd", [ParamGroup("model", a.parameters())], lr=0.1, weight_decay=5e-4,
                            params={"momentum": 0.9, "nesterov": nesterov})
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    _steps(a, opt_a)
    _steps(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_fused_sgd_is_the_same_update():
    a, b = _net(), _net()
    opt_a = build_optimizer("sgd", [ParamGroup("model", a.parameters())], lr=0.1, weight_decay=5e-4,
                            params={"momentum": 0.9, "fused": True})
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=False)
    assert opt_a.defaults["fused"] is True
    _steps(a, opt_a)
    _steps(b, opt_b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_with_one_group_is_torch_adamw_bitwise():
    a, b = _net(), _net()
    opt_a = build_optimizer("adamw", [ParamGroup("model", a.parameters())], lr=1e-3, weight_decay=0.05,
                            params={"betas": [0.9, 0.95]})
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    _steps(a, opt_a)
    _steps(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_groups_carry_lr_scale_and_their_own_weight_decay():
    net = _net()
    groups = [ParamGroup("body", net[0].parameters()), ParamGroup("head", net[3].parameters(), lr_scale=0.5,
                                                                   weight_decay=0.0)]
    opt = build_optimizer("sgd", groups, lr=0.1, weight_decay=1e-3, params={"momentum": 0.9})
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("body", 0.1, 1e-3),
                                                                                  ("head", 0.05, 0.0)]
    set_learning_rate(opt, 0.02)  # the schedule's rate, every epoch
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.01]


def test_no_decay_split_takes_norm_layers_and_biases():
    net = _net()
    parts = no_decay_split(ParamGroup("model", net.parameters(), lr_scale=2.0), net)
    assert [p.name for p in parts] == ["model", "model (no decay)"]
    decay, rest = ({id(p) for p in g.params} for g in parts)
    assert decay == {id(net[0].weight), id(net[3].weight)}
    assert rest == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert parts[1].weight_decay == 0.0 and parts[1].lr_scale == 2.0 and parts[0].weight_decay is None


@pytest.mark.parametrize("name, params, match", [
    ("sgd", {"momentum": 1.5}, "momentum must be in"),
    ("sgd", {"fused": "yes"}, "fused must be true or false"),
    ("adamw", {"betas": [0.9]}, "betas must be two numbers"),
    ("adamw", {"eps": 0}, "eps must be > 0"),
    ("adamw", {"betta": 0.9}, "has no parameter 'betta'"),
])
def test_bad_optimizer_parameters(name, params, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        build_optimizer(name, [ParamGroup("m", _net().parameters())], lr=0.1, weight_decay=0.0, params=params)


def test_bad_group_values():
    with pytest.raises(ValueError, match="lr_scale must be > 0"):
        ParamGroup("m", [], lr_scale=0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        ParamGroup("m", [], weight_decay=-1.0)


def test_adamw_run_with_no_decay_resumes_exactly_and_records_its_groups(tmp_path, monkeypatch):
    cfg = tiny_config(**{"optimizer": {"name": "adamw", "params": {"betas": [0.9, 0.99]}, "no_decay_norm_bias": True},
                         "train.lr": 0.003, "train.epochs": 3})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = (safe_torch_load(r / "checkpoints/last.pt") for r in (full, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    groups = a["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["model", "model (no decay)"]
    assert groups[1]["weight_decay"] == 0.0 and tuple(groups[0]["betas"]) == (0.9, 0.99)


def test_bad_optimizer_in_a_config_is_one_line_and_creates_nothing(tmp_path, capsys):
    import yaml

    cfg = tiny_config(**{"optimizer": {"name": "adamw", "params": {"eps": -1}}, "data": {"source": "digits"}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer 'adamw': eps must be > 0" in err
    assert not (tmp_path / "run").exists()
    cfg["optimizer"] = {"name": "sgd", "params": {"momentum": 0.5}}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "set train.momentum instead" in capsys.readouterr().err
