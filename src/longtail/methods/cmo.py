"""CMO: context-rich minority oversampling (Park, Hong, Heo, Yun, Choi, "The Majority Can Help The
Minority: Context-rich Minority Oversampling for Long-tailed Classification", CVPR 2022).

Official code read: naver-ai/cmo, commit 10d2d0988df03f06605a3007be548129b6f0f5b8
(`cifar_train.py` `train` / `rand_bbox`, `imbalance_data/imbalance_cifar.py`
`get_weighted_sampler`, `opts.py`).

One training step, with (x, y) the loop's batch (instance-sampled: the majority-dominated
"background" batch) and, in the active epochs, with probability train.cutmix_prob:

    (x2, y2) ~ the minority sampler, B images                 (a second batch, same size)
    lam ~ Beta(a, a), a = train.cutmix_alpha; a box of side int(S sqrt(1 - lam)) per dimension,
    centred uniformly, clipped; x[:, :, box] <- x2[:, :, box]    (data/mixup.py cutmix_batch)
    lam <- 1 - box area / image area
    L = lam L(z, y) + (1 - lam) L(z, y2)                         (L: the configured loss)

otherwise L(z, y). The minority sampler is the official `get_weighted_sampler`: a
WeightedRandomSampler over the training images, with replacement, image i weighted by
n_{y_i}^(-r) (r = `weighted_alpha`, official 1), so a class is drawn with probability
proportional to n_c^(1 - r): class-balanced at r = 1, instance-balanced at r = 0. Each draw is
independent; the positions and the batch's augmentation (the loop's BatchAugment, through
`Method.batches`) come from a generator seeded by (train.seed, epoch, step) only, so --resume is
exact. The apply-or-not draw and the box come from the loop's generator.

Active epochs (official `start_data_aug < epoch < epochs - end_data_aug`, 0-idx epoch, strict):
with the official 3 / 3 of 200 epochs, 0-idx epochs 4 ... 196.

Quirks kept: the minority batch is drawn even when its class equals the background's (no
filtering); the CutMix Beta draw and box of the official `rand_bbox` (side int(W sqrt(1 - lam)),
centre uniform, clipped, lam recomputed); the whole batch shares one box and one lam.
Differences: the official draws the minority batch every step of an active epoch (an iterator
over a weighted DataLoader, restarted each epoch) and throws it away when it does not mix; here it
is read only when the step mixes (the stream is seeded per step, so nothing else changes).

Option (method.params `weighting`): 'image' (default, the official sampler: image weights
n_c^-r) or 'class' (class c drawn with probability proportional to n_c^-r, then a uniform image:
the paper's q(r, k) read as a class distribution, not verified against the paper's text).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.mixup import cutmix_batch
from ..data.samplers import ClassThenImage, stream_seed
from ..losses._checks import choice, integer, number
from ..registry import METHODS
from .base import Method, StepResult

WEIGHTINGS = ("image", "class")
_STREAM = 2022  # tags the minority stream's seeds apart from the loop's and BBN's


def minority_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the minority batch of (0-idx) `epoch`, `step`."""
    return stream_seed(seed, epoch, step, _STREAM)


def minority_class_prob(class_counts, weighted_alpha: float, weighting: str = "image") -> np.ndarray:
    """(C,) probabilities of drawing each class: n_c^(1 - r) (weighting 'image', official) or
    n_c^(-r) ('class'), normalised; 0 for a class without training images."""
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    safe = np.where(present, counts, 1.0)
    w = safe ** -weighted_alpha * (safe if weighting == "image" else 1.0)
    w = np.where(present, w, 0.0)
    return w / w.sum()


class MinoritySampler(ClassThenImage):
    """`draw(size, generator)` -> training positions (size,): a class from `minority_class_prob`,
    then a uniform image of it; independent draws with replacement (= WeightedRandomSampler).
    CMO's minority batch, and GLMC's re-balanced batch (weighting 'image')."""

    def __init__(self, labels, num_classes: int, *, weighted_alpha: float = 1.0, weighting: str = "image"):
        super().__init__(labels, num_classes)
        self.class_prob = torch.from_numpy(minority_class_prob(self.counts.numpy(), weighted_alpha, weighting))


@METHODS.register("cmo")
class CMO(Method):
    """CMO (Park et al., CVPR 2022): a minority batch CutMixed onto the loop's batch, with any loss.

    Parameters (method.params):
        weighted_alpha: r of the minority sampler's weights n_c^-r (official 1.0), >= 0.
        start_data_aug: CMO mixes in 0-idx epochs e with start_data_aug < e (official 3).
        end_data_aug: ... and e < train.epochs - end_data_aug (official 3).
        weighting: 'image' (official image weights) or 'class' (the paper's class reading).
    The CutMix Beta parameter is train.cutmix_alpha (official --beta 1.0, required > 0) and the
    share of mixed steps train.cutmix_prob (official --mixup_prob 0.5).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "CMO: the minority batch drawn on the host and CutMix's box and lam drawn on the host every step",
    )

    def __init__(self, *, cfg, data, weighted_alpha: float = 1.0, start_data_aug: int = 3, end_data_aug: int = 3,
                 weighting: str = "image"):
        super().__init__(cfg=cfg, data=data)
        self.weighted_alpha = number("weighted_alpha", weighted_alpha, low=0)
        self.start_data_aug = integer("start_data_aug", start_data_aug, low=-1)
        self.end_data_aug = integer("end_data_aug", end_data_aug, low=0)
        self.weighting = choice("weighting", weighting, WEIGHTINGS)
        if not cfg.train.cutmix_alpha > 0:
            raise ValueError("CMO pastes the minority batch with CutMix: set train.cutmix_alpha > 0 (official 1.0); "
                             "train.cutmix_prob is its share of mixed steps (official 0.5)")
        self._sampler: MinoritySampler | None = None

    def active(self, epoch: int) -> bool:
        """Whether 0-idx `epoch` mixes (official `start_data_aug < epoch < epochs - end_data_aug`)."""
        return self.start_data_aug < epoch < self.cfg.train.epochs - self.end_data_aug

    def minority_sampler(self) -> MinoritySampler:
        if self._sampler is None:  # built on first use: a rebuilt run's DataInfo has no training labels
            self._sampler = MinoritySampler(self.data.train.labels, self.data.num_classes,
                                            weighted_alpha=self.weighted_alpha, weighting=self.weighting)
        return self._sampler

    def training_step(self, model, forward, images, target, loss, generator) -> StepResult:
        t = self.cfg.train
        epoch, step, size = self.step_position(images)
        if self.active(epoch) and float(torch.rand(1, generator=generator)) < t.cutmix_prob:
            fetch = self.extra_fetch(images.device)
            g = torch.Generator().manual_seed(minority_seed(t.seed, epoch, step))
            images2, target2 = fetch(self.minority_sampler().draw(size, g), g)
            mixed, target2, lam = cutmix_batch(images, target, alpha=t.cutmix_alpha, generator=generator,
                                               partner=(images2.to(images.dtype), target2))
            logits = self.logits(model, forward, mixed, target)
            return StepResult(lam * loss(logits, target) + (1.0 - lam) * loss(logits, target2), logits, target)
        logits = self.logits(model, forward, images, target)
        return StepResult(loss(logits, target), logits, target)
