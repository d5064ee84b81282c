"""DLSA's classifiers on frozen features (Xu et al., ECCV 2022, Sec. 3.4) and their trainer.

- `ClusterAidedClassifier`: logits = Linear_x(x) + Linear_p(P(y | h(x))), where P(y | h) is
  the class histogram of the training samples in the sample's cluster h(x). The paper writes
  FC[x, z] + FC[P]; the official code feeds the backbone feature for both x and z
  (Linear_x(x) + Linear_zp([x; P])), which is the same function class as the two linears
  here (the two weights on x add up), so we keep the brief's form.
- `LinearClassifier`: the regular classifier (official 'XZ' = two linears on x = one linear).

Both are trained by `train_classifier` as the official solvers: Balanced Softmax
(log(n_c + 1e-6) added to the logits in training, `longtail.losses.BalancedSoftmax`),
SGD without momentum or weight decay, constant lr 1e-2, batch 128, 150 epochs. The official
code keeps the epoch with the best *test* accuracy; here snapshots are taken every
`eval_every` epochs and the caller selects on the validation split (never on test).

Shapes: features (N, D), cluster_prior (N, C), labels (N,) int64 -> logits (N, C).
`train_classifier` takes the prior as (table (K, C), cluster (N,)) and looks up each batch's
rows only, so the (N, C) prior of all samples is never built (ImageNet-LT: 115,846 x 1,000;
iNaturalist 2018: 437,513 x 8,142, 14 GB).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..losses.balanced_softmax import BalancedSoftmax


class LinearClassifier(nn.Module):
    """logits = W x + b. forward(features (B, D), cluster_prior ignored) -> (B, C)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, cluster_prior: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(features)


class ClusterAidedClassifier(nn.Module):
    """logits = Linear_x(x) + Linear_p(P(y|h)). forward(features (B, D), cluster_prior (B, C))."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.prior_linear = nn.Linear(num_classes, num_classes)

    def forward(self, features: torch.Tensor, cluster_prior: torch.Tensor | None = None) -> torch.Tensor:
        if cluster_prior is None:
            raise ValueError("the cluster-aided classifier needs the cluster prior P(y|h) of every sample")
        return self.linear(features) + self.prior_linear(cluster_prior)


def reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)) drawn from `generator`."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features ** 0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)


class Snapshots:
    """Copies of a classifier's weights at chosen epochs, as a list of (epoch, state_dict).

    A state up to `spill_bytes` stays in memory; a larger one (the C x C prior layer of the
    cluster-aided classifier: 265 MB at iNaturalist's 8,142 classes, 30 snapshots per filter
    with the defaults) is written to a temporary folder and read back when it is used, so
    memory holds one such state at a time. The folder goes with the object.
    """

    def __init__(self, *, spill_bytes: int = 64 << 20):
        self.spill_bytes = spill_bytes
        self._items: list[tuple[int, dict | Path]] = []
        self._folder: tempfile.TemporaryDirectory | None = None

    def append(self, epoch: int, state: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in state.values())
        if size <= self.spill_bytes:
            self._items.append((epoch, {k: v.detach().clone() for k, v in state.items()}))
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="longtail-dlsa-")
        path = Path(self._folder.name) / f"snapshot{len(self._items)}.pt"
        torch.save(state, path)
        self._items.append((epoch, path))

    @property
    def epochs(self) -> list[int]:
        return [e for e, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, j: int) -> tuple[int, dict]:
        epoch, state = self._items[j]
        if isinstance(state, Path):
            state = torch.load(state, weights_only=True)
        return epoch, state

    def __iter__(self):
        return (self[j] for j in range(len(self)))


def train_classifier(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, *,
                     prior_counts, cluster_prior: tuple[torch.Tensor, torch.Tensor] | None = None, epochs: int = 150,
                     batch_size: int = 128, lr: float = 1e-2, momentum: float = 0.0,
                     eval_every: int = 5, seed: int = 0,
                     init: tuple[torch.Tensor, torch.Tensor] | None = None) -> Snapshots:
    """Train with Balanced Softmax (prior `prior_counts` (C,)); snapshots every `eval_every`
    epochs and at the last epoch: `Snapshots`, [(epoch, state_dict copy), ...]. Deterministic in `seed`.
    `cluster_prior`: (P(y|h) table (K, C), cluster of each sample (N,) int64) or None. `init`:
    (weight (C, D), bias (C,)) for `model.linear` after the seeded init (the official PaCo configs'
    start from the backbone's head); the cluster-aided prior layer keeps its seeded init."""
    gen = torch.Generator().manual_seed(int(seed))
    reset_parameters(model, gen)
    if init is not None:
        with torch.no_grad():
            model.linear.weight.copy_(init[0])
            model.linear.bias.copy_(init[1])
    criterion = BalancedSoftmax(class_counts=np.asarray(prior_counts, dtype=np.float64)).to(features.device)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    snapshots = Snapshots()
    n = features.shape[0]
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen).to(features.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            prior = None if cluster_prior is None else cluster_prior[0][cluster_prior[1][idx]]
            loss = criterion(model(features[idx], prior), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if epoch % eval_every == 0 or epoch == epochs:
            snapshots.append(epoch, model.state_dict())
    model.eval()
    return snapshots
