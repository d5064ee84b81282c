"""ISDA: implicit semantic data augmentation (Wang et al., NeurIPS 2019 / TPAMI 2021).

As the official `ISDA.py` (CIFAR): an online estimate of every class's feature covariance
Sigma_c (full D x D, or diagonal with `diagonal: true` as the official ImageNet version),
updated from the detached batch features *before* the loss; the loss is the configured
loss on augmented logits

    z_hat_j = z_j + lam/2 * (w_j - w_y)^T Sigma_y (w_j - w_y)        (the j = y term is 0)

with w the linear head's weight (bias unused), Sigma_y detached and gradients flowing
through W; lam = lambda0 * epoch / T (0-idx epoch, T = train.epochs), so it rises from 0
to lambda0 (T-1)/T. Predictions use the plain logits.

Covariance update for a class with n_b batch samples, batch mean mu_b and biased batch
covariance S_b, and N samples seen so far: w = n_b / (n_b + N);
Sigma <- (1-w) Sigma + w S_b + w(1-w)(mu - mu_b)(mu - mu_b)^T; mu <- (1-w) mu + w mu_b;
N <- N + n_b. The estimator is method state, saved in checkpoints (resume-exact).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models import Classifier
from ..registry import METHODS
from ..dist import all_gather_cat
from .base import Method


class CovarianceEstimator:
    """Online per-class mean and covariance of (B, D) features."""

    def __init__(self, num_classes: int, num_features: int, *, diagonal: bool = False):
        self.diagonal = diagonal
        shape = (num_classes, num_features) if diagonal else (num_classes, num_features, num_features)
        self.cov = torch.zeros(shape)
        self.mean = torch.zeros(num_classes, num_features)
        self.count = torch.zeros(num_classes)

    def to(self, device) -> "CovarianceEstimator":
        self.cov, self.mean, self.count = self.cov.to(device), self.mean.to(device), self.count.to(device)
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, target: torch.Tensor) -> None:
        features = features.detach().to(self.mean.dtype)
        for c in torch.unique(target).tolist():
            x = features[target == c]
            n_b = x.shape[0]
            mu_b = x.mean(0)
            centred = x - mu_b
            s_b = (centred * centred).mean(0) if self.diagonal else centred.t() @ centred / n_b
            w = n_b / (n_b + float(self.count[c]))
            delta = self.mean[c] - mu_b
            extra = delta * delta if self.diagonal else torch.outer(delta, delta)
            self.cov[c] = (1 - w) * self.cov[c] + w * s_b + w * (1 - w) * extra
            self.mean[c] = (1 - w) * self.mean[c] + w * mu_b
            self.count[c] += n_b

    def state_dict(self) -> dict:
        return {"cov": self.cov.cpu(), "mean": self.mean.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict) -> None:
        device = self.mean.device
        self.cov, self.mean, self.count = (state[k].to(device) for k in ("cov", "mean", "count"))


def isda_logits(logits: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, cov: torch.Tensor,
                lam: float, *, detach_cov: bool = True) -> torch.Tensor:
    """z + lam/2 * (w_j - w_y)^T Sigma_y (w_j - w_y).

    Args:
        logits: (B, C). weight: (C, D). target: (B,). cov: (C, D, D) or diagonal (C, D).
        detach_cov: ISDA's reading (no gradient into Sigma); MetaSAug's meta step passes False
            to differentiate the loss with respect to the covariance.
    """
    diff = weight.unsqueeze(0) - weight[target].unsqueeze(1)  # (B, C, D)
    sigma = cov[target].detach() if detach_cov else cov[target]
    if sigma.dim() == 2:  # diagonal
        quad = (diff * diff * sigma.unsqueeze(1)).sum(-1)
    else:
        quad = torch.einsum("bcd,bde,bce->bc", diff, sigma, diff)
    return logits + 0.5 * lam * quad


class LazyCovariance:
    """A CovarianceEstimator made at the first batch (when the class and feature counts are
    known), with checkpoint state that may arrive before it exists (resume). Updated from the
    whole global batch under torchrun, so every rank holds the same estimate."""

    def __init__(self, *, diagonal: bool = False):
        self.diagonal = diagonal
        self.estimator: CovarianceEstimator | None = None
        self._pending_state: dict | None = None

    def update(self, samples: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Add samples (N, D) with labels (N,); return the covariances (num_classes, D, D) or
        (num_classes, D) in the samples' dtype."""
        self._ensure(num_classes, samples.shape[1], samples.device)
        self.estimator.update(all_gather_cat(samples.detach()), all_gather_cat(labels))
        return self.estimator.cov.to(samples.dtype)

    def current(self, num_classes: int, num_features: int, device) -> torch.Tensor:
        """The covariances as they are, before this batch's update (zeros before the first
        update): (num_classes, D, D) or (num_classes, D), float32."""
        self._ensure(num_classes, num_features, device)
        return self.estimator.cov

    def _ensure(self, num_classes: int, num_features: int, device) -> None:
        if self.estimator is None:
            self.estimator = CovarianceEstimator(num_classes, num_features, diagonal=self.diagonal)
            if self._pending_state is not None:
                self.estimator.load_state_dict(self._pending_state)
            self.estimator.to(device)

    def state_dict(self) -> dict:
        return {} if self.estimator is None else self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending_state = state
            if self.estimator is not None:
                self.estimator.load_state_dict(state)


@METHODS.register("isda")
class ISDA(Method):
    """ISDA on a linear head: the configured loss on covariance-augmented logits."""

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "ISDA covariance update: a Python loop over the batch's classes (torch.unique, boolean selection, the seen count read as a float); a vectorised update would round differently",
    )

    def __init__(self, *, cfg, data, lambda0: float = 0.5, diagonal: bool = False):
        super().__init__(cfg=cfg, data=data)
        if not isinstance(lambda0, (int, float)) or isinstance(lambda0, bool) or lambda0 < 0:
            raise ValueError(f"lambda0 must be a number >= 0, got {lambda0!r}")
        self.lambda0, self.diagonal, self.lam = float(lambda0), bool(diagonal), 0.0
        self.covariance = LazyCovariance(diagonal=self.diagonal)

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not isinstance(model.head, torch.nn.Linear):
            raise ConfigError(f"method '{self.cfg.method.name}' needs a linear head (model.head: linear)")
        return model

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        self.lam = self.lambda0 * epoch / self.cfg.train.epochs

    def logits(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features, logits = forward(images)
        cov = self.covariance.update(features, target, logits.shape[1])
        return isda_logits(logits, model.head.weight, target, cov.to(logits.dtype), self.lam)

    def state_dict(self) -> dict:
        return self.covariance.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.covariance.load_state_dict(state)
