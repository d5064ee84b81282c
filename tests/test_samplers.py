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


def _freq(name, params, labels, epoch=0, epochs=1):
    s = build_sampler(name, params, labels=labels, class_counts=np.bincount(labels), seed=0, epochs=epochs)
    return np.bincount(labels[s.indices(epoch)], minlength=labels.max() + 1) / len(labels)


BIG = np.repeat(np.arange(4), [4000, 1600, 400, 100])


def test_square_root_frequencies():
    n = np.array([4000, 1600, 400, 100.0])
    assert np.allclose(_freq("square_root", {}, BIG), np.sqrt(n) / np.sqrt(n).sum(), atol=0.01)


def test_progressive_moves_from_instance_to_balanced():
    n = np.array([4000, 1600, 400, 100.0])
    assert np.allclose(_freq("progressive", {}, BIG, epoch=0, epochs=10), n / n.sum(), atol=0.01)
    # t = 5/10: halfway between instance-balanced and class-balanced
    assert np.allclose(_freq("progressive", {}, BIG, epoch=5, epochs=10), 0.5 * n / n.sum() + 0.125, atol=0.01)


def test_resample_is_really_rebalanced_and_deferrable():
    n = np.array([4000, 1600, 400, 100.0])
    eff = (1 - 0.9999) / (1 - 0.9999 ** n)
    target = eff * n / (eff * n).sum()
    assert np.allclose(_freq("resample", {}, BIG), target, atol=0.01)
    assert np.allclose(_freq("resample", {"start_epoch": 3}, BIG, epoch=2), n / n.sum(), atol=1e-9)  # DRS
    with pytest.raises(ValueError, match="beta"):
        build_sampler("resample", {"beta": 1.5}, labels=BIG, class_counts=np.bincount(BIG), seed=0)


@pytest.mark.parametrize("world", [2, 3])
def test_split_batches_cover_the_epoch_exactly_once(world):
    from longtail.data.samplers import split_batch

    order = build_sampler("instance", {}, labels=LABELS, class_counts=COUNTS, seed=0).indices(1)
    batch = 16
    per_rank = [[split_batch(order[s:s + batch], r, world, order) for s in range(0, len(order), batch)]
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # same number of steps on every rank
    for step in range(len(per_rank[0])):  # the ranks' parts of a step are the single-process batch
        union = np.sort(np.concatenate([per_rank[r][step] for r in range(world)]))
        assert union.tolist() == sorted(order[step * batch:(step + 1) * batch].tolist())
    seen = np.concatenate([np.concatenate(p) for p in per_rank])
    assert sorted(seen.tolist()) == list(range(len(LABELS)))  # 70 = 4 * 16 + 6: no padding needed
    short = split_batch(order[:1], 1, world, order)  # a last batch smaller than the world is filled up
    assert len(short) == 1
