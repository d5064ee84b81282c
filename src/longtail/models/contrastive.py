"""Contrastive building blocks: a projection head, a feature queue and a momentum encoder.

Shared pieces for the contrastive long-tail methods (PaCo / GPaCo: methods/paco.py; BCL uses
ProjectionHead). Read against the official code:

* PaCo (Cui et al., ICCV 2021), dvlab-research/Parametric-Contrastive-Learning, commit
  fe56535ecd716e56a72e75c4e818f2059e557584, `PaCo/LT/moco/builder.py` (MoCo v2 layout) and
  `PaCo/LT/sh/CIFAR100_train_imb0.01.sh` (ResNet-32: --moco-dim 32 --moco-k 1024
  --moco-m 0.999 --feat_dim 64, `--mlp` True);
* BCL (Zhu et al., CVPR 2022), FlamieZhu/Balanced-Contrastive-Learning, commit
  f72d0703794bcec8b00da86774c9d780dc721701, `models/resnext.py` `BCLModel.head`.

`ProjectionHead`: Linear(D, H) - BatchNorm1d(H) - ReLU - Linear(H, d), H = D by default
(`hidden_layers` such blocks; GPaCo: 2, without BatchNorm), as
both (PaCo's CIFAR ResNet-32: 64 -> 64 -> 32; BCL: D -> D -> feat_dim), then L2
normalisation of the output (both normalise the projected feature before the loss).
SupCon's head has no BatchNorm: `batch_norm=False`.

`FeatureQueue`: a FIFO ring of K (feature (d,), label) pairs, as PaCo's `queue`, `queue_l`,
`queue_ptr`: each push writes the batch's (detached) rows at the pointer and moves it on,
modulo K. Under torchrun the rows of all ranks are gathered first (PaCo's
`concat_all_gather`), so every rank holds the same queue. Unlike PaCo (which asserts K % B ==
0) any batch size wraps around; a push larger than K keeps its last K rows. The queue starts
empty (`filled` counts valid rows); `randomize` gives PaCo's start instead: features
N(0, 1) normalised along dim 0 (over the K slots, a quirk of the official code, kept) and
uniform random labels, all counted as filled. Its buffers are its checkpoint state.

`MomentumEncoder`: a copy of a network whose parameters follow the trained one as an
exponential moving average, theta_k <- m theta_k + (1 - m) theta_q (PaCo's
`_momentum_update_key_encoder`, m = 0.999 on CIFAR), with requires_grad off. The official
code updates at the start of each forward, before the key pass; calling `update` in a method's
`after_step` hook (after every optimiser step) gives the same sequence of key-encoder weights
(the first official update, with identical copies, changes nothing). Buffers (BatchNorm
statistics): 'own' (MoCo / PaCo: the copy's statistics come from its own forward passes) or
'copy' (taken from the trained network at each update). DDP: `after_step` is called on
every process with the unwrapped model, whose parameters are the same on every rank after
each step, and the copy is made at build time from the seeded initial weights, which are the
same on every rank: the copies stay identical without communication.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import all_gather_cat

BUFFER_MODES = ("own", "copy")


class ProjectionHead(nn.Module):
    """MLP projection (PaCo / BCL): (B, in_features) -> (B, out_features), L2-normalised rows.

    Args:
        in_features: D, the backbone's pooled feature size (`model.num_features`).
        out_features: d (PaCo CIFAR: 32; BCL: feat_dim).
        hidden_features: H (default D, as both).
        batch_norm: BatchNorm1d after the first linear layer (PaCo, BCL); False: SupCon's head.
        normalize: L2-normalise the output rows (PaCo, BCL, SupCon all do before the loss).
        hidden_layers: number of Linear(., H) [- BN] - ReLU blocks before the last linear layer (1:
            PaCo / BCL; GPaCo's CIFAR head: 2, without BatchNorm).
    """

    def __init__(self, in_features: int, out_features: int, *, hidden_features: int | None = None,
                 batch_norm: bool = True, normalize: bool = True, hidden_layers: int = 1):
        super().__init__()
        hidden = in_features if hidden_features is None else hidden_features
        for name, value in (("in_features", in_features), ("out_features", out_features), ("hidden_features", hidden),
                            ("hidden_layers", hidden_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value in (("batch_norm", batch_norm), ("normalize", normalize)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        layers: list[nn.Module] = []
        for i in range(hidden_layers):
            layers.append(nn.Linear(in_features if i == 0 else hidden, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(hidden, out_features))
        self.mlp = nn.Sequential(*layers)
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(features)
        return F.normalize(out, dim=1) if self.normalize else out


class FeatureQueue(nn.Module):
    """FIFO ring of `size` (feature, label) pairs; buffers `features` (K, d), `labels` (K,) int64,
    `ptr` (next slot) and `filled` (valid rows), all in `state_dict()`."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.size, self.dim = size, dim
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def randomize(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """PaCo's initial queue: randn (K, d) normalised along dim 0, labels uniform in [0, C)."""
        feats = torch.randn(self.size, self.dim, generator=generator)
        self.features.copy_(F.normalize(feats, dim=0))
        self.labels.copy_(torch.randint(0, num_classes, (self.size,), generator=generator))
        self.ptr.zero_()
        self.filled.fill_(self.size)

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor, *, gather: bool = True) -> None:
        """Enqueue (B, d) features with (B,) labels, overwriting the oldest rows. gather: first
        concatenate every rank's rows in rank order (a no-op in one process)."""
        if features.dim() != 2 or features.shape[1] != self.dim or labels.shape != features.shape[:1]:
            raise ValueError(f"push needs features (B, {self.dim}) and labels (B,), got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        features = features.detach()
        if gather:
            features, labels = all_gather_cat(features), all_gather_cat(labels)
        n = features.shape[0]
        if n > self.size:  # only the newest K rows survive; the pointer moves as if all were written
            features, labels = features[n - self.size:], labels[n - self.size:]
        start = int(self.ptr)
        slots = (start + torch.arange(features.shape[0], device=self.features.device)
                 + (n - features.shape[0])) % self.size
        self.features[slots] = features.to(self.features.dtype)
        self.labels[slots] = labels.to(torch.int64)
        self.ptr.fill_((start + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid (features (N, d), labels (N,)), oldest first (N = `filled`)."""
        n, ptr = int(self.filled), int(self.ptr)
        order = (torch.arange(n, device=self.features.device) + (ptr - n)) % self.size
        return self.features[order], self.labels[order]


class MomentumEncoder(nn.Module):
    """An EMA copy of `model` (requires_grad off); `update(model)` after every optimiser step.

    Args:
        model: the trained network (unwrapped, not the DDP wrapper), copied now.
        momentum: m in [0, 1] (PaCo / MoCo: 0.999); 0 copies the weights at every update.
        buffers: 'own' (MoCo / PaCo) or 'copy' (see the module docstring).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.999, buffers: str = "own"):
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {', '.join(map(repr, BUFFER_MODES))}, got {buffers!r}")
        self.momentum, self.buffers = float(momentum), buffers
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, *, exclude: tuple[str, ...] = ()) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q, parameter by parameter (PaCo's expression).
        exclude: names of `model`'s direct submodules left out of the pairing (a model that holds
        this encoder, or parts added after the copy, such as PaCo's queue)."""
        m = self.momentum
        mine = list(self.module.parameters())
        theirs = [p for n, p in model.named_parameters() if n.split(".", 1)[0] not in exclude]
        if len(mine) != len(theirs):
            raise ValueError("the momentum encoder and the model have different parameters")
        for p_k, p_q in zip(mine, theirs):
            p_k.copy_(p_k * m + p_q.detach() * (1.0 - m))
        if self.buffers == "copy":
            theirs_b = [b for n, b in model.named_buffers() if n.split(".", 1)[0] not in exclude]
            for b_k, b_q in zip(self.module.buffers(), theirs_b):
                b_k.copy_(b_q)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
