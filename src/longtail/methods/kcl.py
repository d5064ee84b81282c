"""KCL: k-positive contrastive learning (Kang, Li, Xie, Yuan, Feng, "Exploring Balanced Feature Spaces
for Representation Learning", ICLR 2021), stage 1: the representation.

Official code read: bingykang/BalFeat, commit ba60412df9154077f57ff6d320ff8e7717e330b8
(`main_kcl.py`, `moco/kcl_builder.py` `KCL.forward`, `util.py` `SoftCrossEntropyLoss`,
`main_lincls.py`). The official KCL is MoCo-based: a query encoder, a momentum key encoder and a
queue of K keys with their labels.

One step, with the loop's batch (B images, the query view) and its extra 'regular' view (the key
view; official TwoCropsTransform of the supervised augmentation, `--slaug`):

    q = normalize(P(f(x_q)))            (B, d)   P: Linear(D, d) (official, no --mlp), or an MLP
    k = normalize(P_k(f_k(x_k)))        (B, d)   the momentum copy, no gradient
    Q, y_Q = the queue's valid keys and labels   (N, d), (N,)
    logits = [q . k, q Q^T] / T         (B, 1 + N)
    M_ij = [y_Q j = y_i], then only the first `k` ones per row kept (official topk of the 0/1 mask)
    soft = [1, M] / (1 + |M_i|)                       own key + at most k same-class queue keys
    L = -1/B sum_i sum_j soft_ij log softmax(logits_i)_j     (official SoftCrossEntropyLoss)

then the batch's keys (with their labels) are enqueued, and after the optimiser step the key
encoder follows theta_k <- m theta_k + (1 - m) theta_q (models/contrastive.py MomentumEncoder;
the official updates at the start of the next forward: the same sequence).

`loss_type` 'v1' (official default): the unused same-class queue keys stay in the denominator as
negatives; 'v2': their logits are multiplied by 0 (set to 0, not removed: official quirk, kept).

Stage 2 (official `main_lincls.py`): a linear classifier on the frozen representation; here the
`crt` method on this run's checkpoint (methods/decoupled.py strips the stage-1-only modules named
`kcl_*`), with the paper's class-balanced sampling (docs/methods.md "KCL").

Quirks and readings: the official queue starts filled with real keys (`init_key_queue`, K / B
batches before training); here it starts empty and only its filled rows are used. Official topk on
a 0/1 mask returns an unspecified choice among ties; here the first k in queue-slot order. The
official shuffles the key batch across GPUs for BatchNorm; one process needs no shuffle (BatchNorm
statistics do not depend on the order), under DDP each rank's keys use its own statistics. The
classifier head of this stage is never trained (the official encoder has none); this run's own
evaluation is therefore of an untrained head: read stage 2's.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import VIEWS
from ..losses._checks import choice, integer, number
from ..models import Classifier
from ..models.contrastive import FeatureQueue, MomentumEncoder, ProjectionHead
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing

LOSS_TYPES = ("v1", "v2")


def kcl_loss(query: torch.Tensor, key: torch.Tensor, target: torch.Tensor, queue: torch.Tensor,
             queue_labels: torch.Tensor, *, k: int, temperature: float, loss_type: str = "v1") -> torch.Tensor:
    """The k-positive contrastive loss of `moco/kcl_builder.py` + `SoftCrossEntropyLoss`.

    Args:
        query: (B, d) L2-normalised queries (with gradient). key: (B, d) keys (detached here).
        target: (B,) labels. queue: (N, d) keys, queue_labels: (N,) their labels (N may be 0).
        k: at most k same-class queue keys per anchor are positives (first k in queue order);
            k = 0 keeps only the own key (MoCo's InfoNCE with the queue).
    """
    key = key.detach()
    queue = queue.detach().to(query.dtype)
    pos = (query * key.to(query.dtype)).sum(1, keepdim=True)  # (B, 1)
    neg = query @ queue.T  # (B, N)
    same = (queue_labels[None, :] == target[:, None]).to(query.dtype)  # (B, N)
    used = same * (torch.cumsum(same, dim=1) <= k).to(query.dtype)  # the first k ones of each row
    if loss_type == "v2":
        neg = neg * (1 - (same - used))
    logits = torch.cat([pos, neg], dim=1) / temperature
    soft = torch.cat([torch.ones_like(pos), used], dim=1)
    soft = soft / soft.sum(1, keepdim=True)
    return -(F.log_softmax(logits, dim=1) * soft).sum() / query.shape[0]


@METHODS.register("kcl")
class KCL(Method):
    """KCL stage 1 (Kang et al., ICLR 2021): the k-positive contrastive loss with a momentum key
    encoder and a label queue; the classifier head is left untrained (stage 2: `crt`).

    Parameters (method.params):
        k: positives per anchor from the queue (official --posk 6), >= 0.
        temperature: T (official --moco-t 0.07).
        dim: projection size d (official --moco-dim 128).
        queue_size: K (official --moco-k 65536 for ImageNet; configs: 4096 on CIFAR, a reading).
        momentum: key encoder m (official --moco-m 0.999).
        mlp: False (official README command): P = Linear(D, d); True: Linear-ReLU-Linear (--mlp).
        loss_type: 'v1' (official default) or 'v2' (see the module docstring).
        view: the key view's pipeline (data.augment.VIEWS; official --slaug: 'regular').
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "KCL: the positives' count and the feature queue's pointer read on the host (methods/kcl.py, models/contrastive.py)",
    )

    def __init__(self, *, cfg, data, k: int = 6, temperature: float = 0.07, dim: int = 128,
                 queue_size: int = 4096, momentum: float = 0.999, mlp: bool = False, loss_type: str = "v1",
                 view: str = "regular"):
        super().__init__(cfg=cfg, data=data)
        self.k = integer("k", k, low=0)
        self.temperature = number("temperature", temperature, low=0, low_open=True)
        self.dim = integer("dim", dim, low=1)
        self.queue_size = integer("queue_size", queue_size, low=1)
        self.momentum = number("momentum", momentum, low=0, high=1)
        if not isinstance(mlp, bool):
            raise ValueError(f"mlp must be true or false, got {mlp!r}")
        self.mlp = mlp
        self.loss_type = choice("loss_type", loss_type, LOSS_TYPES)
        self.view = choice("view", view, tuple(VIEWS))
        self.views = (self.view,)
        refuse_batch_mixing(cfg, "kcl")

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not hasattr(model, "kcl_projection"):
            d = model.num_features
            proj = (ProjectionHead(d, self.dim, batch_norm=False, normalize=False) if self.mlp
                    else nn.Linear(d, self.dim))
            model.add_module("kcl_projection", proj)
            # the key encoder: a copy of the query network (backbone + projection), made before the
            # key and the queue become submodules; the classifier head is part of it but unused
            model.add_module("kcl_key", MomentumEncoder(model, momentum=self.momentum))
            model.add_module("kcl_queue", FeatureQueue(self.queue_size, self.dim))
        for p in model.head.parameters():  # stage 1 trains no classifier (crt re-initialises it)
            p.requires_grad_(False)
        return model

    @staticmethod
    def _embed(net: Classifier, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(net.kcl_projection(pooled), dim=1)

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        """Called without a loop (no views: a direct call, the contract test) the images stand in
        for the key view."""
        views = self.batches.views if self.batches is not None and self.batches.views else (images,)
        pooled, logits = forward(images)
        query = self._embed(model, pooled)
        with torch.no_grad():
            key_net = model.kcl_key.module
            key = self._embed(key_net, key_net.forward_head(key_net.forward_features(views[0]), pre_logits=True))
        queue = model.kcl_queue
        n = int(queue.filled)  # the valid slots are 0 .. n-1 until the ring is full (it starts empty)
        # copies: the push below overwrites the queue in place, and the loss keeps it for backward
        value = kcl_loss(query, key, target, queue.features[:n].clone(), queue.labels[:n].clone(), k=self.k,
                         temperature=self.temperature, loss_type=self.loss_type)
        queue.push(key, target)
        return StepResult(value, logits.detach(), target)

    def after_step(self, model: Classifier) -> None:
        super().after_step(model)
        model.kcl_key.update(model, exclude=("kcl_key", "kcl_queue"))  # the query net, as the copy
