import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef, normalized_mutual_info_score

from longtail.eval.metrics import (compute_metrics, expected_calibration_error, format_summary, shot_groups,
                                   top_k_accuracy)


def test_shot_groups_thresholds():
    counts = [500, 101, 100, 20, 19, 10, 9, 1]
    g = shot_groups(counts)
    assert g["many"].tolist() == [0, 1] and g["medium"].tolist() == [2, 3] and g["few"].tolist() == [4, 5, 6, 7]
    g4 = shot_groups(counts, rare_threshold=10)
    assert g4["few"].tolist() == [4, 5] and g4["rare"].tolist() == [6, 7]


def test_metrics_by_hand():
    # 3 classes, counts many/medium/few; 2 test samples per class
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 0, 0, 2])
    logits = np.eye(3)[preds] * 5.0
    m = compute_metrics(logits, labels, [200, 50, 5])
    assert m["top1"] == pytest.approx(400 / 6)
    assert m["per_class"] == [100.0, 50.0, 50.0]
    assert (m["many"], m["medium"], m["few"]) == (100.0, 50.0, 50.0)
    assert m["confusion"] == [[2, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, preds))
    assert m["four_group"]["rare"] == 50.0 and m["four_group"]["few"] is None


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # 2 bins: [0, .5], (.5, 1]; all confidences (0.9, 0.8, 0.6, 0.7) fall in bin 2, accuracy 3/4
    ece, rel = expected_calibration_error(probs, labels, bins=2)
    assert ece == pytest.approx(abs(0.75 - 0.75))
    ece10, _ = expected_calibration_error(probs, labels, bins=10)
    # bins (0.5, 0.6], (0.6, 0.7], (0.7, 0.8], (0.8, 0.9]: |1-.6| + |1-.7| + |0-.8| + |1-.9| over 4
    assert ece10 == pytest.approx((0.4 + 0.3 + 0.8 + 0.1) / 4)
    assert rel["bin_count"] == [0, 4]


def test_class_without_test_images_is_null_and_left_out():
    """Class 2 (the only few class) has training images but no test image: null, not NaN, everywhere."""
    import json

    labels = np.array([0, 0, 1, 1, 3, 3])
    preds = np.array([0, 2, 1, 1, 3, 0])  # one image predicted as class 2
    logits = np.eye(4)[preds] * 3.0
    m = compute_metrics(logits, labels, [200, 50, 5, 50], class_names=["a", "b", "c", "d"])
    assert m["per_class"] == [50.0, 100.0, None, 50.0]
    assert m["mean_per_class"] == pytest.approx(200 / 3)  # over the three classes with test images
    assert m["groups"]["few"] == [2] and m["few"] is None and m["four_group"]["rare"] is None
    assert m["many"] == 50.0 and m["medium"] == 75.0
    assert m["confusion"][2] == [0, 0, 0, 0] and m["top1"] == pytest.approx(400 / 6)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, preds))
    assert m["ece"] == pytest.approx(expected_calibration_error(_softmax(logits), labels)[0])
    assert m["warnings"] == ["class 'c' has no test images: its accuracy is undefined (null) and it is left out of "
                             "mean_per_class and the shot-group means"]
    json.dumps(m, allow_nan=False)  # strict JSON
    assert compute_metrics(np.eye(3)[[0, 1, 2]], [0, 1, 2], [9, 9, 9])["warnings"] == []


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_top5_by_hand():
    """7 classes: the label ranks 5th (in), 6th (out); all-equal logits rank classes by index (as argmax)."""
    ramp = np.arange(7, 0, -1, dtype=np.float64)  # class 0 highest ... class 6 lowest
    logits = np.stack([ramp, ramp, np.ones(7), np.ones(7), ramp])
    labels = np.array([4, 5, 4, 6, 0])
    m = compute_metrics(logits, labels, [200, 150, 120, 50, 30, 10, 5])
    assert m["top5"] == pytest.approx(60.0) and m["top1"] == pytest.approx(20.0)
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(m["top1"])
    assert top_k_accuracy(logits, labels, 6) == pytest.approx(80.0) and top_k_accuracy(logits, labels, 7) == 100.0
    with pytest.raises(ValueError, match="k must be in"):
        top_k_accuracy(logits, labels, 8)
    line = format_summary("last", m)
    assert "top1  20.0  top5  60.0  many" in line


def test_top5_is_left_out_with_five_classes_or_fewer():
    """With C <= 5 every label is among the top 5: no 'top5' key, and the summary does not show it."""
    five = compute_metrics(np.eye(5) * 3.0, np.arange(5), [100, 50, 30, 20, 10])
    assert "top5" not in five and "top5" not in format_summary("last", five)
    six = compute_metrics(np.eye(6) * 3.0, np.arange(6), [100, 50, 30, 20, 10, 5])
    assert six["top5"] == 100.0


def test_top5_in_eval_json_val_and_best_val_blocks(tmp_path, capsys):
    from conftest import tiny_arrays, tiny_config
    from longtail.cli import _print_eval
    from longtail.config import config_from_dict
    from longtail.runs import train_run

    cfg = tiny_config(**{"data.val_per_class": 2, "train.epochs": 1})
    ev = train_run(config_from_dict(cfg), tmp_path / "run", arrays=tiny_arrays(num_classes=6))
    for block in (ev, ev["val"], ev["best_val"]):
        assert 0.0 <= block["top5"] <= 100.0 and block["top5"] >= block["top1"]
    _print_eval(ev)
    assert capsys.readouterr().out.count(" top5 ") == 2  # last and best-val lines
