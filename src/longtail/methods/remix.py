"""Remix: rebalanced mixup (Chou et al., "Remix: Rebalanced Mixup", ECCV Workshops 2020,
Sec. 3, Eq. 10).

The authors released no code (Papers with Code lists none); the rule follows the paper and
the widely used re-implementation in BagofTricks-LT (zhangyongshun/BagofTricks-LT, commit
ce7859a930649d10fb2a4fd4ed9242007eb25e2f, `lib/core/combiner.py` `Combiner.remix`, defaults
in `lib/config/default.py`).

Images are mixed exactly as mixup (`data/mixup.py` `mixup_batch`, shared with the default
`train.mixup_alpha` path): one lam ~ Beta(alpha, alpha) per batch, partners j = perm(i),
x~_i = lam x_i + (1 - lam) x_j. The *label* factor is set per sample from the training class
counts n (sample i has label y_a = y_i, its partner y_b = y_j):

    lambda_y,i = 0        if n_{y_i} / n_{y_j} >= kappa  and  lam < tau
                 1        if n_{y_i} / n_{y_j} <= 1/kappa and  1 - lam < tau
                 lam      otherwise

i.e. when a pair is imbalanced by at least kappa and the mixed image is mostly the minority
sample's (its image weight > 1 - tau), the whole label goes to the minority sample. The
conditions are tested as n_i >= kappa n_j and kappa n_i <= n_j (the same for positive
counts, exact in floating point for integer counts); the second rule is applied
after the first, as BagofTricks-LT (they never overlap for kappa > 1). kappa = inf never
triggers: Remix is then mixup, bitwise. Paper / BagofTricks-LT defaults: alpha 1, kappa 3,
tau 0.5; Remix-DRW adds LDAM-DRW's deferred re-weighting (effective number, beta 0.9999,
from epoch 160 of 200), which here is the config's `reweight` section (the loss's class
weight), so Remix composes with any loss and any re-weighting schedule.

Loss, `label_mixing: per_sample` (default, the paper's per-sample soft label):

    loss = (1/B) sum_i [ lambda_y,i L(z_i, y_a,i) + (1 - lambda_y,i) L(z_i, y_b,i) ]

The registered losses reduce a batch to a scalar, so lambda_y,i is applied by groups: it
takes at most three values (0, 1, lam), and each group G is handed to the configured loss as
its own sub-batch: loss = sum_G |G|/B * [v_G L(z_G, y_a,G) + (1 - v_G) L(z_G, y_b,G)] (the
term with weight 0 is not computed). For a loss that is a plain mean over samples (CE,
LDAM, focal, ... unweighted) this is exactly the per-sample formula above. With a class
weight (DRW), PyTorch's weighted mean is taken inside each group (sum w l / sum w over the
group), and the groups are combined by their sizes; where no rule fires (one group) it is
mixup's lam L_w(z, y_a) + (1 - lam) L_w(z, y_b). A loss with batch statistics sees the
groups as separate calls (as it sees mixup's two calls).

`label_mixing: batch_mean` is what BagofTricks-LT's code computes: its criterion returns the
batch mean, so `l_list * criterion(output, label_a)` broadcasts a scalar and the `.mean()`
leaves mean_i(lambda_y,i) as one factor for the whole batch:
loss = lbar L(z, y_a) + (1 - lbar) L(z, y_b), lbar = (1/B) sum_i lambda_y,i.

Training accuracy is scored against y_a (as the default mixup path). No method state: lam
and the partners come from the loop's epoch-seeded generator, so --resume is exact.
"""

from __future__ import annotations

import torch

from ..data.mixup import mixup_batch
from ..losses._checks import choice, number
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing

LABEL_MIXING = ("per_sample", "batch_mean")


def remix_label_lambda(counts_a: torch.Tensor, counts_b: torch.Tensor, lam: float, *, kappa: float,
                       tau: float) -> torch.Tensor:
    """lambda_y (B,) float64 of Remix's Eq. 10.

    Args:
        counts_a: (B,) training counts of each sample's own class (n_i; the image weight is lam).
        counts_b: (B,) training counts of its partner's class (n_j; image weight 1 - lam).
        lam: the image mixing factor. kappa: >= 1 (inf: never). tau: in [0, 1].
    """
    n_i = counts_a.to(torch.float64)
    n_j = counts_b.to(torch.float64)
    lam_y = torch.full(n_i.shape, float(lam), dtype=torch.float64, device=n_i.device)
    if lam < tau:
        lam_y[n_i >= kappa * n_j] = 0.0  # mostly the minority partner's image: its label only
    if 1.0 - lam < tau:
        lam_y[kappa * n_i <= n_j] = 1.0  # mostly this minority sample's image: its label only
    return lam_y


def remix_loss(loss, logits: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, lam: float,
               lam_y: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i [lam_y,i L(z_i, a_i) + (1 - lam_y,i) L(z_i, b_i)] for a loss that returns a batch
    mean: the configured loss on the groups lam_y = lam / 1 / 0, weighted by their sizes. One group
    covering the batch is mixup's expression, unscaled (bitwise mixup when no rule fires)."""
    batch = logits.shape[0]
    mixed = (lam_y != 0.0) & (lam_y != 1.0)
    only_a = (lam_y == 1.0) & ~mixed
    only_b = (lam_y == 0.0) & ~mixed
    if bool(mixed.all()):
        return lam * loss(logits, target_a) + (1.0 - lam) * loss(logits, target_b)
    total = None
    for mask, weight_a in ((mixed, lam), (only_a, 1.0), (only_b, 0.0)):
        count = int(mask.sum())
        if count == 0:
            continue
        z, a, b = logits[mask], target_a[mask], target_b[mask]
        if weight_a == 1.0:
            term = loss(z, a)
        elif weight_a == 0.0:
            term = loss(z, b)
        else:
            term = weight_a * loss(z, a) + (1.0 - weight_a) * loss(z, b)
        term = term * (count / batch)
        total = term if total is None else total + term
    return total


@METHODS.register("remix")
class Remix(Method):
    """Remix (Chou et al., ECCVW 2020): mixup images, minority-favouring labels.

    Parameters (method.params):
        alpha: Beta(alpha, alpha) of the image factor lam (paper / BagofTricks-LT: 1.0).
        kappa: count ratio at which a pair counts as majority / minority, >= 1 (3.0; .inf: mixup).
        tau: image-factor threshold in [0, 1] (0.5).
        label_mixing: 'per_sample' (the paper's per-sample lambda_y, default) or 'batch_mean'
            (BagofTricks-LT's effective loss: one batch-mean lambda_y).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'Remix: the label-assignment masks index the batch and are branched on, on the host',
    )

    def __init__(self, *, cfg, data, alpha: float = 1.0, kappa: float = 3.0, tau: float = 0.5,
                 label_mixing: str = "per_sample"):
        super().__init__(cfg=cfg, data=data)
        self.alpha = number("alpha", alpha, low=0, low_open=True)
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa >= 1:  # inf: never fires
            raise ValueError(f"kappa must be a number >= 1 (.inf: never rebalance), got {kappa!r}")
        self.kappa = float(kappa)
        self.tau = number("tau", tau, low=0, high=1)
        self.label_mixing = choice("label_mixing", label_mixing, LABEL_MIXING)
        refuse_batch_mixing(cfg, cfg.method.name, "Remix mixes its batches itself with method.params.alpha")
        self._counts: torch.Tensor | None = None

    def _class_counts(self, device) -> torch.Tensor:
        if self._counts is None or self._counts.device != device:
            self._counts = torch.as_tensor(self.data.class_counts, dtype=torch.float64).to(device)
        return self._counts

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        images, target_b, lam = mixup_batch(images, target, alpha=self.alpha, generator=generator)
        logits = self.logits(model, forward, images, target)
        counts = self._class_counts(target.device)
        lam_y = remix_label_lambda(counts[target], counts[target_b], lam, kappa=self.kappa, tau=self.tau)
        if self.label_mixing == "batch_mean":
            lbar = float(lam_y.mean())
            return StepResult(lbar * loss(logits, target) + (1.0 - lbar) * loss(logits, target_b), logits, target)
        return StepResult(remix_loss(loss, logits, target, target_b, lam, lam_y), logits, target)
