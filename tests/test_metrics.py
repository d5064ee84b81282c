import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef, normalized_mutual_info_score

from longtail.eval.metrics import compute_metrics, expected_calibration_error, shot_groups


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
