"""Samplers: which training positions an epoch visits, in which order.

A sampler is built from the training labels and `class_counts` and maps an epoch number
to an int64 array of positions (0..N-1). The order depends only on (seed, epoch), so a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from ..registry import SAMPLERS


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


class Sampler:
    """Base class: subclasses implement `indices(epoch)`."""

    def __init__(self, *, labels: np.ndarray, class_counts: np.ndarray, seed: int = 0):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_counts = np.asarray(class_counts, dtype=np.int64)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, epoch: int) -> np.ndarray:
        raise NotImplementedError


@SAMPLERS.register("instance")
class InstanceSampler(Sampler):
    """Instance-balanced sampling: every training image once per epoch, shuffled."""

    def indices(self, epoch: int) -> np.ndarray:
        return epoch_rng(self.seed, epoch).permutation(len(self.labels))


@SAMPLERS.register("class_aware")
class ClassAwareSampler(Sampler):
    """Class-aware sampling (Shen et al. 2016; classifier-balancing `ClassAwareSampler`).

    Classes are visited in a random order, reshuffled each pass; each visit takes
    `samples_per_class` consecutive items from that class's own shuffled, cycling list.
    An epoch has N (the training-set size) items, as in classifier-balancing, which stops
    after N / B steps.
    """

    def __init__(self, *, labels, class_counts, seed: int = 0, samples_per_class: int = 4):
        super().__init__(labels=labels, class_counts=class_counts, seed=seed)
        if not isinstance(samples_per_class, int) or samples_per_class < 1:
            raise ValueError(f"samples_per_class must be a positive integer, got {samples_per_class!r}")
        self.samples_per_class = samples_per_class
        self._by_class = [np.where(self.labels == c)[0] for c in range(len(self.class_counts))]

    def indices(self, epoch: int) -> np.ndarray:
        rng = epoch_rng(self.seed, epoch)
        present = [c for c, idx in enumerate(self._by_class) if len(idx)]
        queues = {c: rng.permutation(self._by_class[c]) for c in present}
        cursor = dict.fromkeys(present, 0)
        out: list[np.ndarray] = []
        total = 0
        while total < len(self.labels):
            for c in rng.permutation(present):
                need = self.samples_per_class
                while need:
                    if cursor[c] == len(queues[c]):  # a pass over the class is done: reshuffle
                        queues[c], cursor[c] = rng.permutation(self._by_class[c]), 0
                    n = min(need, len(queues[c]) - cursor[c])
                    out.append(queues[c][cursor[c]: cursor[c] + n])
                    cursor[c] += n
                    need -= n
                total += self.samples_per_class
                if total >= len(self.labels):
                    break
        return np.concatenate(out)[: len(self.labels)]


def build_sampler(name: str, params: dict, *, labels, class_counts, seed: int) -> Sampler:
    return SAMPLERS.build(name, labels=labels, class_counts=class_counts, seed=seed, **params)
