"""BBN: bilateral-branch network with cumulative learning (Zhou, Cui, Wei, Chen, "BBN:
Bilateral-Branch Network with Cumulative Learning for Long-Tailed Visual Recognition", CVPR 2020).

Official code read: megvii-research/BBN, commit 7992e908842f5934f0d1ee3f430d796621e81975
(`lib/backbone/resnet_cifar.py` `BBN_ResNet_Cifar`, `lib/core/combiner.py` `bbn_mix`,
`lib/dataset/imbalance_cifar.py` (the dual sampler), `lib/net/network.py`, `lib/core/function.py`
`valid_model`, `configs/cifar10.yaml`).

The network (models/cifar_resnet.py, `model.params.bbn: true`): the ResNet's layers are shared
except the last residual block, of which the conventional branch (`cb_block`) and the
re-balancing branch (`rb_block`) each have their own copy; the classifier is one Linear over the
concatenated 2 x 64 pooled features.

One training step (official `bbn_mix`), with x_c / y_c the loop's (uniform, instance-sampled)
batch and x_r / y_r a second batch of the same size from the re-balancing sampler:

    f_c = GAP(cb_block(trunk(x_c))),  f_r = GAP(rb_block(trunk(x_r)))     (two trunk passes)
    z   = W [2 alpha f_c ; 2 (1 - alpha) f_r] + b
    L   = alpha * L(z, y_c) + (1 - alpha) * L(z, y_r)                     (L: the configured loss, CE)
    alpha = 1 - (t / T)^2        (paper Eq. 3, "parabolic decay")

with t the 0-idx epoch (the official `(epoch - 1) / div_epoch` with its 1-based epoch), constant
within an epoch, and T = train.epochs, except the official's quirk that 90 and 180 epochs use
T = 100 and 200 (`div_epochs` sets T). At test time the network's plain forward is the official
`valid_model` pass: both branches on the same image, W [f_c ; f_r] + b, i.e. alpha = 0.5 with the
factor 2 (the paper's inference with equal weights); it lives in the model, so `longtail eval`,
`predict` and `export` predict with it.

The re-balancing batch (official DUAL_SAMPLER 'reverse', `sample_class_index_by_weight`): each of
its B images independently picks a class c with probability proportional to w_c = n_max / n_c
(paper Eq. 2: P_c = w_c / sum_k w_k), then a uniformly random image of that class (with
replacement). The positions and the batch's crops / flips come from a generator seeded by
(train.seed, epoch, step) only, so --resume is exact; the images are read and augmented by the
loop itself (`Method.batches`, the loop's `TrainBatches` service: its device-resident copy, its
BatchAugment, its DDP sharding), with the official's train transform (random crop with padding 4,
horizontal flip).

Quirks kept from the official code: the two batches go through the shared layers in separate
passes, so BatchNorm normalises each with its own batch statistics and updates its running
statistics twice per step (conventional first); the classifier keeps torch's default Linear
initialisation; the factor 2 of the mixed features. Differences: the loop keeps a last, smaller
batch (the official DataLoader drops it; its re-balancing batch then has the same smaller size);
training accuracy is scored against y_c only (the official logs alpha-weighted accuracies); the
LR warm-up is the project's linear ramp (lr * e / W) rather than WarmupMultiStepLR's ramp from
lr / 3, and the official SGD has Nesterov momentum (train.nesterov: true in the configs).

Options (method.params), from the official combiner's and dataset's alternatives (the paper's
ablations, Tables 3-4): `alpha_schedule` 'parabolic_decay' (default), 'linear_decay' (1 - t/T),
'cosine_decay' (cos(pi t / 2T)), 'parabolic_increment' ((t/T)^2), 'equal' (0.5); `second_sampler`
'reverse' (default), 'balance' (class-balanced: uniform class, then uniform image), 'uniform'
(uniform over images, with replacement).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.samplers import ClassThenImage, stream_seed
from ..losses._checks import choice, integer
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing

ALPHA_SCHEDULES = ("parabolic_decay", "linear_decay", "cosine_decay", "parabolic_increment", "equal")
SECOND_SAMPLERS = ("reverse", "balance", "uniform")
_STREAM = 2020  # tags the re-balancing stream's seeds apart from the loop's


def official_div_epochs(epochs: int) -> int:
    """T of the official combiner: the number of epochs, except 90 -> 100 and 180 -> 200."""
    return 100 * (epochs // 100 + 1) if epochs in (90, 180) else epochs


def bbn_alpha(epoch: int, div_epochs: int, schedule: str = "parabolic_decay") -> float:
    """The cumulative-learning weight alpha of 0-idx `epoch` (official `l`, with t = epoch - 1 of its
    1-based epoch): parabolic decay 1 - (t / T)^2 (paper Eq. 3) or one of the ablation schedules."""
    t = epoch / div_epochs
    if schedule == "parabolic_decay":
        return 1.0 - t ** 2
    if schedule == "linear_decay":
        return 1.0 - t
    if schedule == "cosine_decay":
        return math.cos(t * math.pi / 2)
    if schedule == "parabolic_increment":
        return t ** 2
    if schedule == "equal":
        return 0.5
    raise ValueError(f"alpha_schedule must be one of {', '.join(ALPHA_SCHEDULES)}, got {schedule!r}")


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the re-balancing batch of (0-idx) `epoch`, `step`."""
    return stream_seed(seed, epoch, step, _STREAM)


class BilateralSampler(ClassThenImage):
    """The re-balancing branch's sampler: `draw(size, generator)` -> training positions (size,).

    'reverse': class c with probability proportional to n_max / n_c, then a uniform image of c;
    'balance': a uniform class, then a uniform image of it; 'uniform': a uniform image. Every
    draw is independent (with replacement), as the official dataset's `__getitem__`. Classes
    without training images are never drawn.
    """

    def __init__(self, labels, class_counts, kind: str = "reverse"):
        self.kind = choice("second_sampler", kind, SECOND_SAMPLERS)
        super().__init__(labels, len(class_counts))
        counts = self.counts.numpy()
        present = counts > 0
        if kind == "reverse":
            weights = np.where(present, counts.max() / np.maximum(counts, 1), 0.0)
        else:
            weights = present.astype(np.float64)
        self.class_prob = torch.from_numpy(weights / weights.sum())

    def draw(self, size: int, generator: torch.Generator) -> np.ndarray:
        if self.kind == "uniform":
            return torch.randint(0, len(self.labels), (size,), generator=generator).numpy()
        return super().draw(size, generator)


@METHODS.register("bbn")
class BBN(Method):
    """BBN (Zhou et al., CVPR 2020): two branches, a uniform and a reversed batch per step, the
    cumulative-learning mix of their features and losses; equal weights at test time.

    Parameters (method.params):
        alpha_schedule: 'parabolic_decay' (official, paper Eq. 3), 'linear_decay', 'cosine_decay',
            'parabolic_increment', 'equal'.
        div_epochs: T of the schedule; None: train.epochs (official: 90 -> 100, 180 -> 200).
        second_sampler: the re-balancing branch's sampler, 'reverse' (official), 'balance', 'uniform'.
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "BBN: the reversed sampler's batch drawn on the host every step (data/samplers.py)",
    )

    rebalancing = True  # its equal-weight inference already aims at balanced classes (inference.py)

    def __init__(self, *, cfg, data, alpha_schedule: str = "parabolic_decay", div_epochs: int | None = None,
                 second_sampler: str = "reverse"):
        super().__init__(cfg=cfg, data=data)
        self.alpha_schedule = choice("alpha_schedule", alpha_schedule, ALPHA_SCHEDULES)
        self.div_epochs = integer("div_epochs", official_div_epochs(cfg.train.epochs) if div_epochs is None
                                  else div_epochs, low=1)
        self.second_sampler = choice("second_sampler", second_sampler, SECOND_SAMPLERS)
        refuse_batch_mixing(cfg, "bbn", "BBN mixes its two branches' features itself")
        if (cfg.model.params or {}).get("bbn") is not True:
            raise ValueError(f"needs BBN's two-branch network: set model.params.bbn: true (a CIFAR ResNet, "
                             f"e.g. resnet32; model is '{cfg.model.name}')")
        self.alpha = bbn_alpha(0, self.div_epochs, self.alpha_schedule)
        self._sampler: BilateralSampler | None = None

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not getattr(model, "bbn", False) or not callable(getattr(model, "bilateral", None)):
            raise ValueError(f"model '{self.cfg.model.name}' has no BBN two-branch mode (model.params.bbn)")
        return model

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)  # the configured loss's RW / DRW and epoch hooks
        self.alpha = bbn_alpha(epoch, self.div_epochs, self.alpha_schedule)

    def rebalancing_sampler(self) -> BilateralSampler:
        if self._sampler is None:  # built on first use: a rebuilt run's DataInfo has no training labels
            self._sampler = BilateralSampler(self.data.train.labels, self.data.class_counts, self.second_sampler)
        return self._sampler

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        epoch, step, size = self.step_position(images)
        fetch = self.extra_fetch(images.device)
        g = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, epoch, step))
        images_r, target_r = fetch(self.rebalancing_sampler().draw(size, g), g)
        with model.bilateral(self.alpha):
            _, logits = forward(torch.cat((images, images_r.to(images.dtype))))
        value = self.alpha * loss(logits, target) + (1.0 - self.alpha) * loss(logits, target_r)
        return StepResult(value, logits, target)
