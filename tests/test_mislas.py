"""MiSLAS stage 2: stage-1 classifier + LWS scales, frozen backbone, shift-BN, lr_factor."""

import pytest
import torch

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError
from longtail.methods.mislas import scale_learning_rate
from longtail.runs import train_run
from longtail.train.checkpoint import atomic_torch_save, safe_torch_load


def quiet(*a):
    pass


@pytest.mark.parametrize("nesterov", [False, True])
def test_lr_factor_hook_equals_a_param_group_with_scaled_lr(nesterov):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    scales_a, scales_b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    lr, wd, k = 0.1, 0.05, 0.5
    scale_learning_rate(a.parameters(), factor=k, weight_decay=wd)
    opt_a = torch.optim.SGD([*a.parameters(), scales_a], lr=lr, momentum=0.9, weight_decay=wd, nesterov=nesterov)
    opt_b = torch.optim.SGD([{"params": b.parameters(), "lr": k * lr}, {"params": [scales_b]}], lr=lr,
                            momentum=0.9, weight_decay=wd, nesterov=nesterov)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    for _ in range(4):
        for model, s, opt in ((a, scales_a, opt_a), (b, scales_b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x) * s, y).backward()
            opt.step()
    for p, q in zip([*a.parameters(), scales_a], [*b.parameters(), scales_b]):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("mislas_stage1")
    cfg = config_from_dict(tiny_config(**{"train.mixup_alpha": 1.0, "train.epochs": 2}))
    train_run(cfg, root / "s1", arrays=tiny_arrays(), evaluate=False, log=quiet)
    return root / "s1" / "checkpoints" / "last.pt"


def _cfg(stage1, **params):
    return tiny_config(**{"method.name": "mislas", "method.params": {"stage1": str(stage1), **params},
                          "loss.name": "label_aware_smoothing", "sampler.name": "class_aware"})


def test_classifier_starts_from_stage1_and_only_it_and_scales_train(tmp_path, stage1):
    from longtail.data.build import build_data
    from longtail.methods import build_method

    cfg = config_from_dict(_cfg(stage1))
    method = build_method(cfg, build_data(cfg.data, arrays=tiny_arrays()))
    model = method.build_model()
    before = safe_torch_load(stage1)["model"]
    assert torch.equal(model.head.linear.weight, before["fc.weight"]) and torch.equal(model.head.scales, torch.ones(4))
    assert {id(p) for p in method.parameters(model)} == {id(p) for p in model.head.parameters()}
    train_run(cfg, tmp_path / "m", arrays=tiny_arrays(), evaluate=False, log=quiet)
    after = safe_torch_load(tmp_path / "m/checkpoints/last.pt")["model"]
    assert not torch.equal(before["fc.weight"], after["fc.linear.weight"])
    assert not torch.equal(after["fc.scales"], torch.ones(4))
    for k, v in before.items():
        if not k.startswith("fc."):  # weights and BN statistics untouched without shift_bn
            assert torch.equal(v, after[k]), k


def test_shift_bn_reestimates_statistics_only(tmp_path, stage1):
    train_run(config_from_dict(_cfg(stage1, shift_bn=True)), tmp_path / "m", arrays=tiny_arrays(), evaluate=False,
              log=quiet)
    before = safe_torch_load(stage1)["model"]
    after = safe_torch_load(tmp_path / "m/checkpoints/last.pt")["model"]
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])
    for k in ("features.0.weight", "features.1.weight", "features.1.bias"):
        assert torch.equal(before[k], after[k])


def test_stage2_resumes_exactly(tmp_path, monkeypatch, stage1):
    cfg = _cfg(stage1, shift_bn=True)
    cfg["train"]["epochs"] = 3
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a, b = safe_torch_load(full / "checkpoints/last.pt"), safe_torch_load(cut / "checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bare_state_dict_stage1(tmp_path, stage1):
    bare = tmp_path / "bare.pt"
    atomic_torch_save(safe_torch_load(stage1)["model"], bare)
    result = train_run(config_from_dict(_cfg(bare)), tmp_path / "m", arrays=tiny_arrays(), log=quiet)
    assert 0 <= result["top1"] <= 100


def test_bad_inputs_fail_before_writing(tmp_path, stage1):
    wrong = _cfg(stage1)
    wrong["model"]["params"] = {"width": 8}
    with pytest.raises(ConfigError, match="differs from the stage-1 run"):
        train_run(config_from_dict(wrong), tmp_path / "a", arrays=tiny_arrays(), log=quiet)
    with pytest.raises(CheckpointError, match="not found"):
        train_run(config_from_dict(_cfg(tmp_path / "none.pt")), tmp_path / "b", arrays=tiny_arrays(), log=quiet)
    with pytest.raises(ConfigError, match="method.params.lr_factor"):
        train_run(config_from_dict(_cfg(stage1, lr_factor=0)), tmp_path / "c", arrays=tiny_arrays(), log=quiet)
    with pytest.raises(ConfigError, match="needs method.params.stage1"):
        train_run(config_from_dict(tiny_config(**{"method.name": "mislas"})), tmp_path / "d", arrays=tiny_arrays(),
                  log=quiet)
    assert not any((tmp_path / n).exists() for n in "abcd")
