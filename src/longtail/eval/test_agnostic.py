"""The test-agnostic protocol of SADE (Zhang et al., NeurIPS 2022, Sec. 5 and Appendix; official
Vanint/SADE-AgnosticLT @ cba11b8b, `test_training_cifar.py`, `data_loader/imbalance_cifar.py`):
a model trained on long-tailed data is scored on test sets whose class distribution is unknown
to it: long-tailed like the training set ("forward"), uniform, or long-tailed the other way
round ("backward"), each built by subsampling the balanced test set.

A distribution is named `forward<R>`, `backward<R>` (R >= 1, the test set's imbalance ratio)
or `uniform`. SADE's CIFAR list is `SADE_DISTRIBUTIONS` (R = 50, 25, 10, 5, 2).

Class i of C (0-based, in head-to-tail order) keeps n_i = int(n_max * (1 / R)^(i / (C - 1)))
test images for forward-R and n_{C-1-i} for backward-R, as the official `get_img_num_per_cls`
(`imb_factor` = 1 / R, `reverse`). Two readings where the official code assumes CIFAR:
- n_max: the official code takes len(test) / C, which is every class's count on CIFAR's balanced
  test set; here it is the smallest per-class test count, the same number there, and one that
  every class can provide on a test set that is not exactly balanced.
- head-to-tail order: the official code uses the class index, which is the head-to-tail order of
  CIFAR-LT; here the classes are ordered by training count, largest first (ties by index), the
  same order on CIFAR-LT and the right one for a long-tailed training set in any order.
Which n_i images of a class are kept: the first n_i of a permutation of that class's test
images drawn from `numpy.random.RandomState(seed)` class after class (seed 0), as the official
code shuffles after `np.random.seed(0)`; our test set's file order differs from CIFAR's pickle
order, so the subsets are of the same sizes, not the same images.
"""

from __future__ import annotations

import re

import numpy as np

SADE_DISTRIBUTIONS = ("forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
                      "backward2", "backward5", "backward10", "backward25", "backward50")

_NAME = re.compile(r"^(forward|backward)(\d+(?:\.\d+)?)$")


def parse_distribution(name: str) -> tuple[float, bool]:
    """'forward50' -> (50.0, False); 'backward10' -> (10.0, True); 'uniform' -> (1.0, False).
    ValueError naming the bad name otherwise."""
    if name == "uniform":
        return 1.0, False
    match = _NAME.match(name)
    if match is None or float(match.group(2)) < 1:
        raise ValueError(f"unknown test distribution '{name}': use forwardR, backwardR (R >= 1) or uniform, "
                         f"e.g. {','.join(SADE_DISTRIBUTIONS[:2])}")
    return float(match.group(2)), match.group(1) == "backward"


def head_to_tail(train_counts) -> np.ndarray:
    """Class indices ordered by training count, largest first; ties keep the class index order."""
    counts = np.asarray(train_counts)
    return np.argsort(-counts, kind="stable")


def shifted_counts(num_classes: int, n_max: int, ratio: float, reverse: bool) -> np.ndarray:
    """(C,) test images kept per head-to-tail rank: int(n_max * (1/ratio)^(i/(C-1))), reversed
    for a backward distribution (official `get_img_num_per_cls`)."""
    if num_classes == 1:
        return np.array([int(n_max)])
    ranks = np.arange(num_classes)
    if reverse:
        ranks = num_classes - 1 - ranks
    return np.array([int(n_max * (1.0 / ratio) ** (r / (num_classes - 1.0))) for r in ranks])


def shifted_indices(labels: np.ndarray, train_counts, ratio: float, reverse: bool, *,
                    seed: int = 0) -> np.ndarray:
    """Sorted indices into `labels` (N,) of the test subset with imbalance `ratio` (module docstring).

    `train_counts` (C,) give the head-to-tail order. Every class needs at least one test image.
    """
    labels = np.asarray(labels, dtype=np.int64)
    C = len(train_counts)
    present = np.bincount(labels, minlength=C)[:C]
    if present.min() < 1:
        raise ValueError(f"class {int(present.argmin())} has no test image: a shifted test set needs every class")
    order = head_to_tail(train_counts)
    keep = dict(zip(order.tolist(), shifted_counts(C, int(present.min()), ratio, reverse).tolist()))
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(C):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        chosen.append(idx[:keep[c]])
    return np.sort(np.concatenate(chosen))


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) class frequencies of a (shifted) test set: the prior an oracle would adjust to."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    return counts / counts.sum()
