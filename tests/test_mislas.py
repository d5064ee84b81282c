"""MiSLAS stage 2: stage-1 classifier + LWS scales, frozen backbone, shift-BN, lr_factor."""

import pytest
import torch

from conftest import full_and_resumed, tiny_arrays, tiny_config
from longtail.config import config_from_dict
from longtail.errors import CheckpointError, ConfigError
from longtail.optim import ParamGroup, build_optimizer, set_learning_rate
from longtail.runs import train_run
from longtail.io import atomic_torch_save, safe_torch_load


@pytest.mark.parametrize("nesterov", [False, True])
def test_lr_scale_group_trains_like_a_model_at_the_scaled_rate(nesterov):
    """A group at lr_scale k under the schedule's rate lr steps exactly as SGD at k * lr."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    lr, wd, k = 0.1, 0.05, 0.5
    opt_a = build_optimizer("sgd", [ParamGroup("classifier", a.parameters(), lr_scale=k)], lr=1.0, weight_decay=wd,
                            params={"momentum": 0.9, "nesterov": nesterov})
    set_learning_rate(opt_a, lr)
    opt_b = torch.optim.SGD(b.parameters(), lr=k * lr, momentum=0.9, weight_decay=wd, nesterov=nesterov)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    for _ in range(4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("mislas_stage1")
    cfg = config_from_dict(tiny_config(**{"train.mixup_alpha": 1.0, "train.epochs": 2}))
    train_run(cfg, root / "s1", arrays=tiny_arrays(), evaluate=False)
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
    groups = method.param_groups(model)
    assert [(g.name, g.lr_scale) for g in groups] == [("classifier", 0.5), ("scales", 1.0)]
    assert [id(p) for p in groups[0].params] == [id(p) for p in model.head.linear.parameters()]
    assert [id(p) for p in groups[1].params] == [id(model.head.scales)]
    train_run(cfg, tmp_path / "m", arrays=tiny_arrays(), evaluate=False)
    after = safe_torch_load(tmp_path / "m/checkpoints/last.pt")["model"]
    assert not torch.equal(before["fc.weight"], after["fc.linear.weight"])
    assert not torch.equal(after["fc.scales"], torch.ones(4))
    for k, v in before.items():
        if not k.startswith("fc."):  # weights and BN statistics untouched without shift_bn
            assert torch.equal(v, after[k]), k


def test_shift_bn_reestimates_statistics_only(tmp_path, stage1):
    train_run(config_from_dict(_cfg(stage1, shift_bn=True)), tmp_path / "m", arrays=tiny_arrays(), evaluate=False)
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
    result = train_run(config_from_dict(_cfg(bare)), tmp_path / "m", arrays=tiny_arrays())
    assert 0 <= result["top1"] <= 100


def test_bad_inputs_fail_before_writing(tmp_path, stage1):
    wrong = _cfg(stage1)
    wrong["model"]["params"] = {"width": 8}
    with pytest.raises(ConfigError, match="differs from the stage-1 run"):
        train_run(config_from_dict(wrong), tmp_path / "a", arrays=tiny_arrays())
    with pytest.raises(CheckpointError, match="not found"):
        train_run(config_from_dict(_cfg(tmp_path / "none.pt")), tmp_path / "b", arrays=tiny_arrays())
    with pytest.raises(ConfigError, match="method.params.lr_factor"):
        train_run(config_from_dict(_cfg(stage1, lr_factor=0)), tmp_path / "c", arrays=tiny_arrays())
    with pytest.raises(ConfigError, match="needs method.params.stage1"):
        train_run(config_from_dict(tiny_config(**{"method.name": "mislas"})), tmp_path / "d", arrays=tiny_arrays())
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_stage2_run_evaluates_and_loads_after_its_stage1_file_is_gone(tmp_path, stage1):
    """The stage-2 checkpoint is self-contained: the stage-1 config is method state."""
    import shutil

    import longtail
    from longtail.runs import evaluate_run

    own_stage1 = tmp_path / "s1.pt"
    shutil.copyfile(stage1, own_stage1)
    cfg = config_from_dict(_cfg(own_stage1))
    first = train_run(cfg, tmp_path / "m", arrays=tiny_arrays())
    assert "stage1_config" in safe_torch_load(tmp_path / "m/checkpoints/last.pt")["method"]
    own_stage1.unlink()
    again = evaluate_run(tmp_path / "m", arrays=tiny_arrays())
    assert again["top1"] == first["top1"] and again["per_class"] == first["per_class"]
    model = longtail.load(tmp_path / "m", device="cpu")
    assert model.num_classes == 4
