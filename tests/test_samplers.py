import numpy as np
import pytest

from longtail.data.samplers import build_sampler
from longtail.errors import ConfigError
from longtail.registry import SAMPLERS

LABELS = np.repeat(np.arange(4), [40, 20, 8, 2])
COUNTS = np.bincount(LABELS)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_same_seed_and_epoch_same_order(name):
    a = build_sampler(name, {}, labels=LABELS, class_counts=COUNTS, seed=1)
    b = build_sampler(name, {}, labels=LABELS, class_counts=COUNTS, seed=1)
    assert np.array_equal(a.indices(3), b.indices(3))
    assert not np.array_equal(a.indices(3), a.indices(4))
    assert len(a.indices(0)) == len(a) == len(LABELS)
    assert a.indices(0).min() >= 0 and a.indices(0).max() < len(LABELS)


def test_instance_sampler_visits_every_sample_once():
    s = build_sampler("instance", {}, labels=LABELS, class_counts=COUNTS, seed=0)
    assert sorted(s.indices(5).tolist()) == list(range(len(LABELS)))


def test_class_aware_is_balanced():
    labels = np.repeat(np.arange(4), [400, 200, 80, 20])
    s = build_sampler("class_aware", {"samples_per_class": 4}, labels=labels, class_counts=np.bincount(labels), seed=0)
    freq = np.bincount(labels[s.indices(0)], minlength=4) / len(labels)
    assert np.allclose(freq, 0.25, atol=0.02)
    # within a class, a full pass over its images happens before any repeats
    tail = [i for i in s.indices(0) if labels[i] == 3]
    assert sorted(tail[:20]) == list(range(680, 700))


def test_unknown_sampler():
    with pytest.raises(ConfigError, match="unknown sampler 'instanse' \\(did you mean 'instance'\\?\\)"):
        build_sampler("instanse", {}, labels=LABELS, class_counts=COUNTS, seed=0)
