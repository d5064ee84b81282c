"""Samplers: which training positions an epoch visits, in which order.

A sampler is built from the training labels and `class_counts` and maps an epoch number
to an int64 array of N positions (0..N-1, N = training-set size). The order depends only
on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one, and
every rank of a distributed run computes the same global order and takes its own shard
(`shard_indices`).

Class-level sampling (Kang et al., ICLR 2020, Eq. 1): class j is drawn with probability
p_j = n_j^q / sum_i n_i^q; q = 1 is instance-balanced, q = 0 class-balanced, q = 1/2
square-root. Weighted samplers draw N positions with replacement.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import SAMPLERS


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def stream_seed(seed: int, epoch: int, step: int, stream: int) -> int:
    """The seed of a method's own draws at (0-idx) `epoch`, `step`: the same on every rank and on
    resume, `stream` keeping each method's draws apart from the loop's and from each other's
    (BBN's re-balancing batch, CMO's minority batch, GLMC's re-balanced batch, MetaSAug's meta batch)."""
    return int(np.random.SeedSequence([seed, epoch, step, stream]).generate_state(1)[0])


class ClassThenImage:
    """`draw(size, generator)` -> training positions (size,): a class from `class_prob` (C,), then a
    uniform image of it; independent draws with replacement (a WeightedRandomSampler over images),
    from a torch generator. Not an epoch order (`Sampler`): the per-step extra batches of BBN, CMO
    and GLMC, whose subclasses set `class_prob` from `counts` (C,) int64, each class's images."""

    def __init__(self, labels, num_classes: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(self.labels, minlength=num_classes).astype(np.int64)
        self.counts = torch.from_numpy(counts)
        self.by_class = np.argsort(self.labels, kind="stable")  # positions grouped by class
        self.starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
        self.class_prob: torch.Tensor | None = None

    def draw(self, size: int, generator: torch.Generator) -> np.ndarray:
        cls = torch.multinomial(self.class_prob, size, replacement=True, generator=generator)
        n = self.counts[cls]
        within = torch.minimum((torch.rand(size, generator=generator, dtype=torch.float64) * n).long(), n - 1)
        return self.by_class[(self.starts[cls] + within).numpy()]


class Sampler:
    """Base class: subclasses implement `indices(epoch)`."""

    def __init__(self, *, labels: np.ndarray, class_counts: np.ndarray, seed: int = 0, epochs: int = 1):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_counts = np.asarray(class_counts, dtype=np.int64)
        self.seed = int(seed)
        self.epochs = int(epochs)

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

    def __init__(self, *, labels, class_counts, seed: int = 0, epochs: int = 1, samples_per_class: int = 4):
        super().__init__(labels=labels, class_counts=class_counts, seed=seed, epochs=epochs)
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


class WeightedSampler(Sampler):
    """Draws N positions with replacement from per-sample weights (`sample_weights(epoch)`)."""

    def sample_weights(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def indices(self, epoch: int) -> np.ndarray:
        w = np.asarray(self.sample_weights(epoch), dtype=np.float64)
        return epoch_rng(self.seed, epoch).choice(len(self.labels), size=len(self.labels), replace=True, p=w / w.sum())


def _class_power_weights(labels: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """Per-sample weights giving class probabilities p_j proportional to n_j^q."""
    n = np.maximum(counts.astype(np.float64), 1.0)
    return (n ** (q - 1.0))[labels]


@SAMPLERS.register("square_root")
class SquareRootSampler(WeightedSampler):
    """Square-root sampling (Mahajan et al. 2018; Kang et al. 2020): p_j ~ n_j^(1/2)."""

    def sample_weights(self, epoch: int) -> np.ndarray:
        return _class_power_weights(self.labels, self.class_counts, 0.5)


@SAMPLERS.register("progressive")
class ProgressiveSampler(WeightedSampler):
    """Progressively-balanced sampling (Kang et al. 2020, Eq. 2):
    p_j(t) = (1 - t/T) * p_j^IB + (t/T) * p_j^CB with t the 0-idx epoch and T = train.epochs."""

    def sample_weights(self, epoch: int) -> np.ndarray:
        t = min(epoch / max(self.epochs, 1), 1.0)
        n = np.maximum(self.class_counts.astype(np.float64), 1.0)
        p_class = (1 - t) * n / n.sum() + t / len(n)
        return (p_class / n)[self.labels]


@SAMPLERS.register("resample")
class EffectiveNumberResampler(WeightedSampler):
    """Re-sampling (RS) of LDAM-DRW (`ImbalancedDatasetSampler` in `cifar_train.py`).

    Per-sample weight (1 - beta) / (1 - beta^n_y), beta = 0.9999 (not 1/n); N draws with
    replacement. Before `start_epoch` it samples instance-balanced (deferred re-sampling,
    DRS, when start_epoch > 0). Unlike the official script, which builds this sampler but
    never passes it to its DataLoader (LDAM-DRW issue #7), the loop really uses it.
    """

    def __init__(self, *, labels, class_counts, seed: int = 0, epochs: int = 1, beta: float = 0.9999,
                 start_epoch: int = 0):
        super().__init__(labels=labels, class_counts=class_counts, seed=seed, epochs=epochs)
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be a non-negative integer, got {start_epoch!r}")
        self.beta, self.start_epoch = float(beta), start_epoch

    def sample_weights(self, epoch: int) -> np.ndarray:
        n = self.class_counts.astype(np.float64)
        per_class = (1.0 - self.beta) / (1.0 - np.power(self.beta, n))
        return per_class[self.labels]

    def indices(self, epoch: int) -> np.ndarray:
        if epoch < self.start_epoch:
            return epoch_rng(self.seed, epoch).permutation(len(self.labels))
        return super().indices(epoch)


def split_batch(global_batch: np.ndarray, rank: int, world_size: int, order: np.ndarray) -> np.ndarray:
    """This rank's part of one global batch: positions rank, rank + W, rank + 2W, ...

    Every process walks the same global order in global batches of train.batch_size, so the
    union of the ranks' parts is exactly the single-process batch and every sample is seen
    once per epoch. Only when the last global batch is smaller than the number of processes
    is it filled up from the start of the epoch's order, so that no rank gets an empty batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(global_batch) < world_size:
        global_batch = np.concatenate([global_batch, order[: world_size - len(global_batch)]])
    return global_batch[rank::world_size]


def build_sampler(name: str, params: dict, *, labels, class_counts, seed: int, epochs: int = 1) -> Sampler:
    return SAMPLERS.build(name, labels=labels, class_counts=class_counts, seed=seed, epochs=epochs, **params)
