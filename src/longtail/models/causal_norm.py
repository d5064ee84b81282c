"""Causal-norm classifier with TDE inference (Tang, Huang, Zhang, "Long-Tailed Classification by
Keeping the Good and Removing the Bad Momentum Causal Effect", NeurIPS 2020).

Read from the official `classification/models/CausalNormClassifier.py` and
`classification/run_networks.py` of KaihuaTang/Long-Tailed-Recognition.pytorch at commit
5c916d0d0fd5e1fa984621b86f15cda2bc69df17. Shapes: features x (B, D), weight W (C, D), the D
feature dimensions split into K = `num_head` consecutive heads of D/K each (x_k, w_{c,k}, d_k).

Training mode (paper Eq. 6, "de-confounded training"; the official forward with `training`):

    logit_c = (tau / K) * sum_k  <x_k / ||x_k||,  w_{c,k} / (||w_{c,k}|| + gamma)>

(the official `causal_norm` on the weight, `l2_norm` on the features, `scale = tau / num_head`),
and the moving feature direction d (paper Sec. 3.2, the "momentum" M of SGD) is updated from the
detached batch features *exactly as the official code*: d <- mu * d + mean_batch(x). This is not
the usual (1 - mu)-weighted average: d grows to about mean / (1 - mu), but only its per-head
direction is used, and with a constant mu the two differ by the factor (1 - mu) only. Under
torchrun the batch mean is the global batch's (an all-reduce of the sum and the count), as the
official single-process DataParallel run sees the whole batch, so every rank holds the same d.

Eval mode (paper Eq. 7-8, "total direct effect"; the official `use_effect` branch), head-wise with
x_hat_k = x_k / ||x_k||, d_hat_k = d_k / ||d_k|| and cos_k = <x_hat_k, d_hat_k>:

    TDE logit_c = (tau / K) * sum_k < x_hat_k - alpha * cos_k * d_hat_k,  w_{c,k} / (||w_{c,k}|| + gamma) >

i.e. the plain logit minus alpha * cos(x_k, d_k) * (the logit of the unit vector along d_k), per
head. alpha = 0 gives the plain causal-norm logits exactly. `alpha` is a buffer, so a checkpoint
carries the alpha its predictions use (e.g. one chosen on the validation split), and every
consumer of the model in eval mode (`longtail eval`, `predict`, export) gets TDE's prediction.

Quirks and readings:
- the weight's per-head norm gets + gamma (gamma = 1/32) in the denominator, the features' none;
- the official l2 normalisation has no epsilon (0/0 -> NaN); here a zero feature head or a zero d
  (no training step yet) normalises to 0, so TDE then equals the plain logits;
- d is updated only in training mode (official: `phase == 'train'`), from every training batch,
  never reset between epochs; validation and test never change it;
- weight init uniform(-1/sqrt(D), 1/sqrt(D)) as the official `reset_parameters`; no bias;
- `mu` is a plain attribute (not saved): the `tde` method sets it every epoch (official CIFAR:
  constant 0.9; other datasets: 1 - 0.1 * min(50 * lr, 1), `mu_schedule: lr`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import all_reduce_sum
from ..registry import HEADS

DEFAULTS = {"num_head": 2, "tau": 16.0, "gamma": 1.0 / 32.0, "mu": 0.9, "alpha": 3.0}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_causal_norm_params(*, num_head, tau, gamma, mu, alpha, in_features: int | None = None) -> None:
    """ValueError naming the parameter and its allowed values for a bad hyper-parameter."""
    if not isinstance(num_head, int) or isinstance(num_head, bool) or num_head < 1:
        raise ValueError(f"num_head must be a positive integer, got {num_head!r}")
    if in_features is not None and in_features % num_head:
        raise ValueError(f"num_head must divide the feature width {in_features}, got {num_head!r}")
    if not _number(tau) or tau <= 0:
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    if not _number(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    if not _number(mu) or not 0 <= mu <= 1:
        raise ValueError(f"mu must be a number in [0, 1], got {mu!r}")
    if not _number(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")


class CausalNormHead(nn.Module):
    """Multi-head causal-norm classifier; TDE (counterfactual) logits in eval mode.

    Args (keyword-only): in_features D, num_classes C, num_head K (divides D), tau (scale, the
    logits are multiplied by tau / K), gamma (added to each weight head's norm), mu (momentum
    of the feature direction d), alpha (TDE strength in eval mode; 0: plain logits).
    Buffers: `direction` d (D,), `alpha` (). Forward: (B, D) -> (B, C).
    """

    def __init__(self, *, in_features: int, num_classes: int, num_head: int = DEFAULTS["num_head"],
                 tau: float = DEFAULTS["tau"], gamma: float = DEFAULTS["gamma"], mu: float = DEFAULTS["mu"],
                 alpha: float = DEFAULTS["alpha"]):
        super().__init__()
        check_causal_norm_params(num_head=num_head, tau=tau, gamma=gamma, mu=mu, alpha=alpha,
                                 in_features=in_features)
        self.in_features, self.num_classes, self.num_head = in_features, num_classes, num_head
        self.tau, self.gamma, self.mu = float(tau), float(gamma), float(mu)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
        self.register_buffer("direction", torch.zeros(in_features))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.update_direction = True  # False: training-mode forwards leave d alone

    @property
    def scale(self) -> float:
        return self.tau / self.num_head

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, num_head={self.num_head}, "
                f"tau={self.tau}, gamma={self.gamma}, mu={self.mu}, alpha={float(self.alpha)}")

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.num_head, self.in_features // self.num_head)

    def normalised_weight(self) -> torch.Tensor:
        """(C, D): each head of each class's weight divided by (its norm + gamma)."""
        w = self._split(self.weight)
        return (w / (w.norm(dim=-1, keepdim=True) + self.gamma)).reshape(self.num_classes, self.in_features)

    def normalised_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, D/K): each head of each feature at unit norm."""
        return F.normalize(self._split(features), dim=-1)

    def direction_cos(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K): cos(x_k, d_k) per sample and head (0 where d is 0)."""
        nd = F.normalize(self._split(self.direction.to(features.dtype)), dim=-1)
        return (self.normalised_features(features) * nd).sum(-1)

    @torch.no_grad()
    def _update_direction(self, features: torch.Tensor) -> None:
        f = features.detach().float()
        stats = torch.cat([f.sum(0), f.new_full((1,), f.shape[0])])
        all_reduce_sum(stats)  # the global batch under torchrun
        mean = stats[:-1] / stats[-1].clamp_min(1.0)
        self.direction.mul_(self.mu).add_(mean.to(self.direction.dtype))

    def logits(self, features: torch.Tensor, alpha: torch.Tensor | float | None = None) -> torch.Tensor:
        """(B, C) logits of (B, D) features; `alpha` None: plain (training) logits, else TDE's."""
        x = features.to(self.weight.dtype)  # bf16 autocast features -> fp32 norms; float64 stays float64
        nx = self.normalised_features(x)
        if alpha is not None:
            nd = F.normalize(self._split(self.direction.to(x.dtype)), dim=-1)  # (K, D/K)
            cos = (nx * nd).sum(-1, keepdim=True)  # (B, K, 1)
            nx = nx - alpha * cos * nd
        return (nx.reshape(x.shape[0], self.in_features) * self.scale) @ self.normalised_weight().t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.update_direction:
                self._update_direction(features)
            return self.logits(features)
        return self.logits(features, self.alpha)


@HEADS.register("causal_norm")
def causal_norm_head(*, in_features: int, num_classes: int) -> nn.Module:
    """The causal-norm head at the official constructor's defaults (num_head 2, tau 16, gamma
    1/32, mu 0.9, alpha 3); the `tde` method builds it with its own parameters."""
    return CausalNormHead(in_features=in_features, num_classes=num_classes)
