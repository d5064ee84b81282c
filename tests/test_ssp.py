"""SSP: balanced rotation labels, rot90 by hand, rotation evaluation, the pre-training
checkpoint as the start of fine-tuning (backbone loaded, head fresh), end-to-end runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import full_and_resumed, tiny_arrays, tiny_config
import longtail
from longtail.cli import main
from longtail.config import config_from_dict
from longtail.data.build import Split, build_data
from longtail.errors import CheckpointError, ConfigError
from longtail.methods import build_method
from longtail.methods.ssp import balanced_rotation_labels, rotate_batch, rotation_predictions
from longtail.models import build_model, load_weights
from longtail.report import build_report
from longtail.runs import evaluate_run, train_run
from longtail.io import safe_torch_load


DIGITS = {"source": "digits", "imbalance_ratio": 5, "test_per_class": 10, "val_per_class": 2}


@pytest.mark.parametrize("batch", [128, 12, 4])
def test_rotation_labels_are_exactly_balanced_when_four_divides_the_batch(batch):
    labels = balanced_rotation_labels(batch, generator=torch.Generator().manual_seed(1))
    assert labels.dtype == torch.int64 and torch.bincount(labels, minlength=4).tolist() == [batch // 4] * 4


def test_rotation_labels_otherwise_differ_by_one_and_follow_the_generator():
    for batch in (1, 2, 3, 10, 118):
        counts = torch.bincount(balanced_rotation_labels(batch, generator=torch.Generator().manual_seed(0)),
                                minlength=4)
        assert counts.sum() == batch and counts.max() - counts.min() <= (1 if batch % 4 else 0)
        assert int((counts == batch // 4 + 1).sum()) == batch % 4  # B % 4 rotations get one more
    a = balanced_rotation_labels(64, generator=torch.Generator().manual_seed(3))
    b = balanced_rotation_labels(64, generator=torch.Generator().manual_seed(3))
    c = balanced_rotation_labels(64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    extra = {tuple(torch.bincount(balanced_rotation_labels(2, generator=torch.Generator().manual_seed(s)),
                                  minlength=4).tolist()) for s in range(30)}
    assert len(extra) > 2  # which rotations get the leftover is random, not always 0 and 1
    assert balanced_rotation_labels(0).shape == (0,)


def test_rot90_of_a_hand_made_two_by_two_image():
    # [[1, 2], [3, 4]] turned counter-clockwise (torch.rot90 from the H axis to the W axis)
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    expected = {0: [[1, 2], [3, 4]], 1: [[2, 4], [1, 3]], 2: [[4, 3], [2, 1]], 3: [[3, 1], [4, 2]]}
    batch = torch.cat([image, -image]).repeat(4, 1, 1, 1)  # 8 images, two per rotation
    rotations = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = rotate_batch(batch, rotations)
    for i, k in enumerate(rotations.tolist()):
        sign = 1 if i % 2 == 0 else -1
        assert out[i, 0].tolist() == (sign * torch.tensor(expected[k], dtype=torch.float32)).tolist()
    assert torch.equal(batch, torch.cat([image, -image]).repeat(4, 1, 1, 1))  # input untouched
    three = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2).contiguous(
        memory_format=torch.channels_last)
    turned = rotate_batch(three, torch.tensor([1, 3]))
    assert turned.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(turned[0], torch.rot90(three[0], 1, dims=(1, 2)))  # the official per-image call
    assert torch.equal(turned[1], torch.rot90(three[1], 3, dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 1, 2, 3), torch.tensor([1]))


class CornerOracle(torch.nn.Module):
    """Reads the four corners of channel 0: the one bright corner tells the rotation."""

    def forward(self, images):
        x = images[:, 0]
        return torch.stack([x[:, 0, 0], x[:, -1, 0], x[:, -1, -1], x[:, 0, -1]], dim=1)


def test_rotation_predictions_cover_every_image_in_four_rotations():
    images = np.zeros((3, 5, 5, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = 255  # a bright top-left corner: rotation k moves it counter-clockwise
    split = Split(images=images, index=np.array([2, 0, 1]), labels=np.array([7, 8, 9]))
    out = rotation_predictions(CornerOracle(), split, mean=[0.0], std=[1.0], batch_size=2)
    assert out["logits"].shape == (12, 4)
    assert out["labels"].tolist() == [0, 1, 2, 3] * 3
    assert out["class_labels"].tolist() == [7] * 4 + [8] * 4 + [9] * 4
    assert (out["logits"].argmax(1) == out["labels"]).all()  # the oracle is right on every rotation


def test_training_step_scores_rotations_not_classes():
    cfg = config_from_dict(tiny_config(**{"method.name": "ssp"}))
    data = build_data(cfg.data, arrays=tiny_arrays())
    method = build_method(cfg, data)
    model = method.build_model()
    assert model.head.out_features == 4
    images = torch.randn(8, 3, 8, 8)
    forward = (lambda x: (None, model(x)))
    step = method.training_step(model, forward, images, torch.zeros(8, dtype=torch.int64), method.build_loss(),
                                torch.Generator().manual_seed(0))
    loss, logits, rotations = step.loss, step.logits, step.target
    assert logits.shape == (8, 4) and torch.bincount(rotations, minlength=4).tolist() == [2, 2, 2, 2]
    again = rotations.clone()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model(rotate_batch(images, again)), again))


def test_pretraining_checkpoint_starts_fine_tuning_with_a_fresh_head(tmp_path):
    """Four classes, so the rotation head and the class head have the same shape: only the
    checkpoint's declaration keeps the rotation head out."""
    arrays = tiny_arrays(num_classes=4)
    cfg = tiny_config(**{"method.name": "ssp", "train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "ssp", arrays=arrays, evaluate=False)
    ckpt = safe_torch_load(tmp_path / "ssp/checkpoints/last.pt")
    assert ckpt["method"] == {"pretext": "rotation", "pretext_head": ["fc.bias", "fc.weight"]}
    torch.manual_seed(5)
    fresh = build_model("small_cnn", num_classes=4, in_channels=3, params={"width": 4})
    model = build_model("small_cnn", num_classes=4, in_channels=3, params={"width": 4})
    model.load_state_dict(fresh.state_dict())
    report = load_weights(model, tmp_path / "ssp/checkpoints/last.pt")
    assert report["head"] == "re-initialised" and report["missing"] == ["fc.bias", "fc.weight"]
    saved = ckpt["model"]
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert torch.equal(value, fresh.state_dict()[key]) and not torch.equal(value, saved[key])
        else:
            assert torch.equal(value, saved[key]), key  # every backbone tensor, BN statistics included
    # the same file through the config key of any run: `model.weights`
    ft = config_from_dict(tiny_config(**{"model.weights": str(tmp_path / "ssp/checkpoints/last.pt")}))
    built = build_method(ft, build_data(ft.data, arrays=arrays)).build_model()
    assert torch.equal(built.features[0].weight, saved["features.0.weight"])
    assert not torch.equal(built.fc.weight, saved["fc.weight"])


def test_a_pretraining_checkpoint_of_another_backbone_is_refused(tmp_path):
    arrays = tiny_arrays(num_classes=4)
    cfg = tiny_config(**{"method.name": "ssp", "train.epochs": 1})
    train_run(config_from_dict(cfg), tmp_path / "ssp", arrays=arrays, evaluate=False)
    wider = build_model("small_cnn", num_classes=4, in_channels=3, params={"width": 8})
    with pytest.raises(CheckpointError, match="does not fit model 'SmallCNN'"):
        load_weights(wider, tmp_path / "ssp/checkpoints/last.pt")
    # a plain state_dict (no pretext declaration) keeps the old rule: shapes decide
    plain = build_model("small_cnn", num_classes=4, in_channels=3, params={"width": 4})
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    assert load_weights(build_model("small_cnn", num_classes=4, in_channels=3, params={"width": 4}),
                        tmp_path / "plain.pt")["head"] == "loaded"


def test_ssp_then_fine_tuning_end_to_end_on_digits(tmp_path, capsys):
    ssp = tmp_path / "ssp"
    cfg = tiny_config(**{"data": DIGITS, "method.name": "ssp", "train.epochs": 1})
    result = train_run(config_from_dict(cfg), ssp)
    ev = json.loads((ssp / "eval.json").read_text())
    assert ev == json.loads(json.dumps(result))
    assert ev["task"] == "rotation" and ev["num_samples"] == 4 * 100 and len(ev["per_class"]) == 4
    assert ev["class_names"] == ["0 deg", "90 deg", "180 deg", "270 deg"] and len(ev["confusion"]) == 4
    assert sum(ev["train_counts"]) == json.loads((ssp / "data.json").read_text())["num_train"]
    per_class = ev["rotation_per_class"]
    assert len(per_class["top1"]) == 10 and per_class["train_counts"][0] > per_class["train_counts"][-1]
    assert ev["best_val"]["selected_on"] == "validation top1" and ev["val"]["num_samples"] == 4 * 20
    preds = np.load(ssp / "predictions.npz")
    assert preds["logits"].shape == (400, 4)
    assert ev["top1"] == pytest.approx(float((preds["logits"].argmax(1) == preds["labels"]).mean() * 100))
    rows = [json.loads(line) for line in (ssp / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["train_top1"] <= 100 and rows[0]["val_top1"] == ev["val"]["top1"]
    # the report reads it as a 4-"class" rotation run
    info = build_report([ssp], tmp_path / "report.html")
    assert info["runs"] == 1 and info["figures"] == 6
    # fine-tuning: any recipe of the zoo, here CE-DRW, from the pre-training checkpoint
    ft = tmp_path / "ft"
    cfg = tiny_config(**{"data": DIGITS, "model.weights": str(ssp / "checkpoints/last.pt"), "train.epochs": 1,
                         "reweight": {"scheme": "effective_number", "beta": 0.99, "start_epoch": 0}})
    result = train_run(config_from_dict(cfg), ft)
    assert "task" not in result and len(result["per_class"]) == 10 and result["num_samples"] == 100
    assert main(["eval", str(ssp), "--logit-adjust-tau", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predicts 4 outputs for 10 classes" in err
    with pytest.raises(CheckpointError, match="predicts rotations, not classes"):
        longtail.load(ssp)  # no class predictor to load


def test_pretraining_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(**{"method.name": "ssp", "train.epochs": 3})
    full, cut, _ = full_and_resumed(cfg, tmp_path, monkeypatch, stop_after_epoch=0, arrays=tiny_arrays(),
                                    evaluate=False)
    a = safe_torch_load(full / "checkpoints/last.pt")["model"]
    b = safe_torch_load(cut / "checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, message", [
    ({"loss.name": "focal"}, "set loss.name ce without params, got 'focal'"),
    ({"reweight.scheme": "effective_number"}, "set reweight.scheme none"),
    ({"train.mixup_alpha": 1.0}, "set train.mixup_alpha 0"),
    ({"train.cutmix_alpha": 1.0}, "set train.cutmix_alpha 0"),  # its own step ignored CutMix before
    ({"model.head": "cosine"}, "set model.head linear"),
])
def test_what_the_pretext_task_does_not_use_is_refused(override, message, tmp_path, capsys):
    cfg = tiny_config(**{"data": DIGITS, "method.name": "ssp", **override})
    with pytest.raises(ConfigError, match=message):
        train_run(config_from_dict(cfg), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtail: error: method 'ssp'") and err.count("\n") == 1


def test_non_square_images_are_refused(tmp_path):
    arrays = tiny_arrays()
    arrays = {k: (v[:, :, :6] if k.endswith("images") else v) for k, v in arrays.items()}
    cfg = tiny_config(**{"method.name": "ssp"})
    with pytest.raises(ConfigError, match="needs square images, got 8x6"):
        train_run(config_from_dict(cfg), tmp_path / "run", arrays=arrays)


def test_evaluating_a_pretraining_run_again_gives_the_same_file(tmp_path):
    cfg = tiny_config(**{"method.name": "ssp", "train.epochs": 1})
    arrays = tiny_arrays()
    first = train_run(config_from_dict(cfg), tmp_path / "ssp", arrays=arrays)
    again = evaluate_run(tmp_path / "ssp", arrays=arrays)
    assert first == again and again["task"] == "rotation"
