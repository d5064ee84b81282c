import numpy as np
import pytest

from conftest import tiny_arrays
from longtail.config import DataConfig
from longtail.data import build_data
from longtail.errors import ConfigError, DataError


def _arrays(per_class=50, num_classes=5):
    return tiny_arrays(num_classes=num_classes, per_class=per_class, test_per_class=3, size=4)


def test_counts_follow_profile_and_head_is_class_zero():
    data = build_data(DataConfig(source="arrays", imbalance_ratio=10), arrays=_arrays())
    assert data.class_counts.tolist() == [int(50 * 0.1 ** (i / 4)) for i in range(5)]
    assert data.source_counts.tolist() == [50] * 5


def test_subsampling_is_seeded_and_reproducible():
    cfg = DataConfig(source="arrays", imbalance_ratio=10, seed=3)
    a, b = build_data(cfg, arrays=_arrays()), build_data(cfg, arrays=_arrays())
    assert np.array_equal(a.train.index, b.train.index)
    c = build_data(DataConfig(source="arrays", imbalance_ratio=10, seed=4), arrays=_arrays())
    assert not np.array_equal(a.train.index, c.train.index)
    assert np.array_equal(a.class_counts, c.class_counts)


def test_matches_ldam_gen_imbalanced_data():
    """Same indices as LDAM-DRW: np.random.seed(0), then shuffle each class's indices in order."""
    arrays = _arrays()
    labels = arrays["train_labels"]
    counts = [int(50 * 0.1 ** (i / 4)) for i in range(5)]
    np.random.seed(0)
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected.extend(idx[:n])
    data = build_data(DataConfig(source="arrays", imbalance_ratio=10, seed=0), arrays=arrays)
    assert data.train.index.tolist() == sorted(expected)


def test_class_order_puts_named_head_first():
    data = build_data(DataConfig(source="arrays", imbalance_ratio=10, class_order=[4, 3, 2, 1, 0]), arrays=_arrays())
    assert data.class_counts.tolist() == [int(50 * 0.1 ** (i / 4)) for i in range(5)][::-1]
    with pytest.raises(ConfigError, match="every class exactly once"):
        build_data(DataConfig(source="arrays", class_order=[0, 1]), arrays=_arrays())


def test_validation_split_from_leftovers_and_head_shortfall():
    data = build_data(DataConfig(source="arrays", imbalance_ratio=10, val_per_class=4), arrays=_arrays())
    # the head keeps all 50, so its 4 validation images come out of its own subset
    assert data.class_counts.tolist()[0] == 46
    assert data.class_counts.tolist()[1:] == [int(50 * 0.1 ** (i / 4)) for i in range(1, 5)]
    assert np.bincount(data.val.labels).tolist() == [4] * 5
    assert not set(data.val.index) & set(data.train.index)
    assert not set(data.val.index) & set(data.test.index.tolist() if data.test.images is data.train.images else [])


def test_digits_carves_a_balanced_test_split():
    data = build_data(DataConfig(source="digits", imbalance_ratio=10, test_per_class=50))
    assert np.bincount(data.test.labels).tolist() == [50] * 10
    assert not set(data.test.index) & set(data.train.index)
    assert data.class_counts[0] == 128 and data.class_counts[-1] == 12
    assert data.channels == 1 and data.image_shape == (8, 8)


def test_zero_images_after_subsampling():
    with pytest.raises(DataError, match="class '4' is left with zero training images"):
        build_data(DataConfig(source="arrays", imbalance_ratio=100), arrays=_arrays(per_class=50))


def test_class_without_images():
    arrays = _arrays()
    arrays["class_names"] = ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(DataError, match="class 'f' has no training images"):
        build_data(DataConfig(source="arrays"), arrays=arrays)


def test_label_out_of_range():
    arrays = _arrays()
    arrays["class_names"] = ["a", "b", "c"]
    with pytest.raises(DataError, match=r"label 3 out of range \[0, 3\) in train_labels"):
        build_data(DataConfig(source="arrays"), arrays=arrays)


def test_not_enough_images_for_profile():
    with pytest.raises(DataError, match="needs 80 training images .* has 50; lower data.max_count"):
        build_data(DataConfig(source="arrays", max_count=80), arrays=_arrays())


def test_normalisation_from_training_subset():
    data = build_data(DataConfig(source="arrays", profile="none"), arrays=_arrays())
    x = data.train.batch(np.arange(len(data.train))).astype(np.float64) / 255
    assert np.allclose(data.mean, x.mean(axis=(0, 1, 2)))


def test_class_without_test_images_is_a_warning_naming_it(caplog):
    arrays = _arrays()
    keep = arrays["test_labels"] != 3
    arrays["test_images"], arrays["test_labels"] = arrays["test_images"][keep], arrays["test_labels"][keep]
    arrays["class_names"] = ["a", "b", "c", "d", "e"]
    with caplog.at_level("WARNING", logger="longtail.data.build"):
        data = build_data(DataConfig(source="arrays", imbalance_ratio=10), arrays=arrays)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("class 'd' has training images but no test images")
    assert data.class_counts[3] > 0 and 3 not in data.test.labels
    caplog.clear()
    build_data(DataConfig(source="arrays", imbalance_ratio=10), arrays=_arrays())
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
