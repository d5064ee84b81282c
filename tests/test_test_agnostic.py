"""SADE's test-agnostic protocol (eval/test_agnostic.py): the shifted test sets by hand."""

import numpy as np
import pytest

from longtail.eval.test_agnostic import (SADE_DISTRIBUTIONS, class_prior, head_to_tail, parse_distribution,
                                         shifted_counts, shifted_indices)


def test_parse():
    assert parse_distribution("forward50") == (50.0, False)
    assert parse_distribution("backward2.5") == (2.5, True)
    assert parse_distribution("uniform") == (1.0, False)
    for bad in ("sideways5", "forward", "forward0.5", "Forward5", "backward-2"):
        with pytest.raises(ValueError, match=f"unknown test distribution '{bad}'"):
            parse_distribution(bad)
    assert [parse_distribution(n)[1] for n in SADE_DISTRIBUTIONS] == [False] * 6 + [True] * 5


def test_counts_by_hand():
    # CIFAR-10 test set (1000 per class), ratio 100: int(1000 * 0.01 ** (i / 9)), the official get_img_num_per_cls
    assert shifted_counts(10, 1000, 100, False).tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert shifted_counts(10, 1000, 100, True).tolist() == [10, 16, 27, 46, 77, 129, 215, 359, 599, 1000]
    assert shifted_counts(3, 100, 1, False).tolist() == [100, 100, 100]
    assert shifted_counts(3, 100, 4, False).tolist() == [100, 50, 25]
    assert shifted_counts(1, 7, 50, True).tolist() == [7]


def test_head_to_tail_follows_training_counts():
    assert head_to_tail([5, 50, 20, 50]).tolist() == [1, 3, 2, 0]  # ties keep the index order


def test_indices():
    labels = np.repeat(np.arange(3), [10, 12, 11])  # not exactly balanced: n_max is the smallest count, 10
    train = [20, 80, 40]  # head-to-tail: class 1, class 2, class 0
    idx = shifted_indices(labels, train, 4, False)
    assert np.bincount(labels[idx]).tolist() == [2, 10, 5]  # ranks 2, 0, 1: int(10/4), 10, int(10/2)
    assert (np.diff(idx) > 0).all()
    back = shifted_indices(labels, train, 4, True)
    assert np.bincount(labels[back]).tolist() == [10, 2, 5]
    again = shifted_indices(labels, train, 4, False)
    assert idx.tolist() == again.tolist()  # seeded
    other = [shifted_indices(labels, train, 4, False, seed=s) for s in range(1, 6)]
    assert any(o.tolist() != idx.tolist() for o in other) and all(np.bincount(labels[o]).tolist() == [2, 10, 5]
                                                                  for o in other)
    uniform = shifted_indices(labels, train, 1, False)
    assert np.bincount(labels[uniform]).tolist() == [10, 10, 10]
    with pytest.raises(ValueError, match="class 2 has no test image"):
        shifted_indices(np.array([0, 1, 1]), [5, 3, 1], 2, False)


def test_class_prior():
    assert class_prior(np.array([0, 0, 2, 2, 2, 2]), 4).tolist() == [2 / 6, 0, 4 / 6, 0]
