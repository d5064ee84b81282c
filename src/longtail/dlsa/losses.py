"""The three Flow Filter objectives of DLSA (Xu et al., ECCV 2022, Sec. 3.3, Eqs. 6-11) and
the class-balanced pair sampler that feeds them.

    L = lambda_lh L_MLE + lambda_bal L_bal + lambda_pure L_pure          (Eq. 11, with the
                                                                        official lambda_lh)

Readings (official code, `train_dlsa.py`, `utils/datasets.py`, `models/losses.py`):

- L_MLE (Eqs. 6-7): -mean_i w_{y_i} log p(x_i), w_c = n_c^-q / sum_c' n_c'^-q over the
  classes present in the current (remaining) training subset; a batch *mean* (the paper
  writes a sum). Positives are drawn class-uniformly, so with q = 2 the likelihood is fitted
  almost only to the rarest classes: tail samples get high likelihood and are filtered first.
- L_bal (Eq. 9 with the momentum estimator of Sec. 3.3): p_t = mean_batch P(h|x) + 1e-7;
  m_t = eta m_{t-1} + (1 - eta) p_t with m_0 = 0 and m_{t-1} detached; p_hat = m_t / (1 - eta^t)
  with t counting steps from 1; L_bal = sum_k p_hat_k log p_hat_k + log K = KL(p_hat || uniform)
  >= 0, zero exactly at uniform cluster use (the + log K only shifts the value).
- L_pure (Eq. 10): mean over pairs of sum_k P(h=k|x_i).detach() log P(h=k|x_j), x_i and x_j
  from two different classes (official `contrast_freeze: True`: no gradient through the
  positive's posterior). Minimising it raises the cross-entropy between the pair's cluster
  posteriors, pushing the negative out of the positive's clusters.

Shapes: log_joint (B, K) (log p(x, h=k) up to a constant), loglik (B,), target (B,) int64.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def likelihood_weights(class_counts, q: float = 2.0) -> np.ndarray:
    """w_c = n_c^-q / sum over classes with n > 0 (Eq. 6); 0 for an absent class. (C,) float64."""
    n = np.asarray(class_counts, dtype=np.float64)
    w = np.zeros_like(n)
    present = n > 0
    w[present] = n[present] ** -q
    total = w.sum()
    return w / total if total > 0 else w


def weighted_nll(loglik: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_MLE = -mean_i w[y_i] loglik_i (Eq. 7, batch mean as the official code)."""
    return -(weights.to(loglik.dtype)[target] * loglik).mean()


class BalancednessLoss:
    """Negative entropy of the momentum-averaged, bias-corrected cluster posterior (Eq. 9).

    Stateful (the running estimate and the step counter); `reset()` starts a new flow.
    __call__(log_joint (B, K)) -> scalar; the gradient flows through this batch's mean
    posterior only (earlier batches enter detached).
    """

    def __init__(self, *, clusters: int, momentum: float = 0.7, floor: float = 1e-7):
        if not 0 <= momentum < 1:
            raise ValueError(f"balancedness momentum (eta) must be in [0, 1), got {momentum}")
        self.clusters, self.momentum, self.floor = clusters, momentum, floor
        self.reset()

    def reset(self) -> None:
        self.running: torch.Tensor | float = 0.0
        self.step = 0

    def estimate(self, log_joint: torch.Tensor) -> torch.Tensor:
        """Bias-corrected posterior estimate p_hat (K,); advances the running state."""
        self.step += 1
        batch = torch.softmax(log_joint, dim=1).mean(0) + self.floor
        running = self.momentum * self.running + (1 - self.momentum) * batch
        self.running = running.detach()
        return running / (1 - self.momentum ** self.step)

    def __call__(self, log_joint: torch.Tensor) -> torch.Tensor:
        p = self.estimate(log_joint)
        return (p * p.log()).sum() + math.log(self.clusters)


def purity_loss(log_joint_pos: torch.Tensor, log_joint_neg: torch.Tensor) -> torch.Tensor:
    """L_pure = mean_i sum_k P(k|x_i+).detach() log P(k|x_i-) (Eq. 10), pairs of different classes."""
    p_pos = torch.softmax(log_joint_pos.detach(), dim=1)
    return (p_pos * torch.log_softmax(log_joint_neg, dim=1)).sum(1).mean()


class PairSampler:
    """Per epoch, N (positive, negative) index pairs: the positive's class uniform over the
    present classes, the negative's class uniform over the others, each sample uniform
    within its class (official `ContrastiveDataset`; N = the subset size).

    labels: (N,) int64 of the subset. Needs at least two classes.
    """

    def __init__(self, labels: np.ndarray):
        labels = np.asarray(labels, dtype=np.int64)
        self.classes, counts = np.unique(labels, return_counts=True)
        if len(self.classes) < 2:
            raise ValueError(f"the purity pairs need samples of at least 2 classes, got {len(self.classes)}")
        self.by_class = np.argsort(labels, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts
        self.size = len(labels)

    def _pick(self, cls: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        offset = (rng.random(len(cls)) * self.counts[cls]).astype(np.int64)
        return self.by_class[self.starts[cls] + np.minimum(offset, self.counts[cls] - 1)]

    def epoch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(positive indices (N,), negative indices (N,)) into the subset."""
        m = len(self.classes)
        pos = rng.integers(0, m, self.size)
        neg = (pos + rng.integers(1, m, self.size)) % m  # uniform over the other m - 1 classes
        return self._pick(pos, rng), self._pick(neg, rng)
