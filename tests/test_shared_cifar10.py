"""The real CIFAR-10 (JPEG) archive from ../shared: skipped with a reason when it is absent."""

import numpy as np
import pytest

from conftest import CIFAR10_JPEG, needs_shared
from longtail.config import DataConfig
from longtail.data import build_data

pytestmark = [needs_shared(), pytest.mark.shared]


def test_cifar10_lt_from_jpeg_archive():
    cfg = DataConfig(source="imagefolder", root=str(CIFAR10_JPEG), imbalance_ratio=100, val_per_class=20)
    data = build_data(cfg)
    assert data.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"]
    assert data.source_counts.tolist() == [5000] * 10
    # 12,406 long-tailed images; the head's 20 validation images come out of its own subset
    assert data.class_counts.tolist() == [4980, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(data.train) == 12_386 and len(data.val) == 200 and len(data.test) == 10_000
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.image_shape == (32, 32) and data.channels == 3
    no_val = build_data(DataConfig(source="imagefolder", root=str(CIFAR10_JPEG), imbalance_ratio=100))
    assert len(no_val.train) == 12_406
