"""PaCo and GPaCo: (generalized) parametric contrastive learning.

PaCo: Cui, Zhong, Liu, Yu, Jia, "Parametric Contrastive Learning", ICCV 2021. GPaCo: Cui, Zhong,
Tian, Liu, Yu, Jia, "Generalized Parametric Contrastive Learning", TPAMI 2023. Read against the
official code dvlab-research/Parametric-Contrastive-Learning at commit
fe56535ecd716e56a72e75c4e818f2059e557584: `PaCo/LT/paco_cifar.py`, `PaCo/LT/losses.py`
`PaCoLoss`, `PaCo/LT/moco/builder.py` `MoCo`, `PaCo/LT/sh/CIFAR100_train_imb0.01.sh`, and the
GPaCo versions of the same files under `GPaCo/LT/` (docs/methods.md, "PaCo and GPaCo").

The learnable class centres are the model's linear classifier (the official `self.linear` on
the pooled backbone feature): its logits z (A, C) enter the contrast as C extra columns, and
inference is that classifier alone, without any prior correction (official `_inference`).

Loss (`paco_loss`, official `PaCoLoss.forward`; one row per anchor i, columns: the C centres,
then the N contrast features, the anchors first):

    s_ij = f_i . f_j / T                       (features L2-normalised)
    c_ic = z_ic + log(pi_c + 1e-9)             (pi: the training prior; the rebalancing term)
    w_ic = beta [c = y_i]  (GPaCo: label smoothing of the one-hot),  w_ij = alpha [y_j = y_i, j != i]
    den_i = sum_c exp(c_ic) + gamma sum_{j != i} exp(s_ij)
    L_i = - sum_k w_ik (l_ik - log(den_i + 1e-12)) / sum_k w_ik        (l: c or s)
    L = mean_i L_i

(T / base_temperature = 1 in the official runs.) With gamma = alpha = 0 it is the balanced-softmax
cross-entropy of the centres; with beta = 0 and the centre logits at -inf it is SupCon's L_out.

PaCo (`paco`) on CIFAR: MoCo with a momentum key encoder (m 0.999, `MomentumEncoder`, a copy of
backbone + classifier + projection updated after every optimiser step) and a queue of K = 1024
keys with labels (`FeatureQueue`, random start); anchors are the B queries of the regular view
(AutoAugment + Cutout: train.augment), contrast = [queries, keys of the second view ('mocov2'),
queue]; the centre logits are those of the queries. GPaCo (`gpaco`): no key encoder; both views go
through the trained network (two passes), all 2B features are anchors, centre logits for both,
projection Linear-ReLU-Linear-ReLU-Linear without BatchNorm; the second view's features are
queued.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.augment import VIEWS
from ..dist import autocast_dtype
from ..errors import ConfigError
from ..losses._checks import integer, number
from ..models import Classifier
from ..models.contrastive import FeatureQueue, MomentumEncoder, ProjectionHead
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing


def paco_loss(features: torch.Tensor, labels: torch.Tensor, centre_logits: torch.Tensor, *, num_anchors: int,
              alpha: float, beta: float = 1.0, gamma: float = 1.0, temperature: float,
              log_prior: torch.Tensor | None = None, smooth: float = 0.0) -> torch.Tensor:
    """The (G)PaCo loss (module docstring; official `PaCoLoss.forward`).

    Args:
        features: (N, d) L2-normalised contrast features, the A anchors first (official
            `features`: PaCo [q, k, queue], GPaCo [q, k, queue] with q and k anchors).
        labels: (N,) int64 labels of the rows of `features`.
        centre_logits: (A, C) the classifier's logits of the anchors (official `sup_logits`).
        num_anchors: A.
        alpha: weight of each same-class sample positive; beta: of the centre positive; gamma:
            weight of the sample terms in the denominator.
        log_prior: (C,) log(pi + 1e-9) added to the centre logits (official, long-tailed runs), or
            None (GPaCo's balanced branch).
        smooth: GPaCo's label smoothing of the centre positives (0: one-hot, PaCo).
    Returns the scalar mean over anchors.
    """
    A = int(num_anchors)
    N, C = features.shape[0], centre_logits.shape[1]
    if not 0 < A <= N or centre_logits.shape[0] != A or labels.shape != (N,):
        raise ValueError(f"paco_loss needs features (N, d), labels (N,), centre_logits (A, C) with 0 < A <= N; got "
                         f"{tuple(features.shape)}, {tuple(labels.shape)}, {tuple(centre_logits.shape)}, A={A}")
    centre = centre_logits if log_prior is None else centre_logits + log_prior.to(centre_logits.dtype)
    sample = features[:A] @ features.T / temperature  # (A, N)
    logits = torch.cat([centre, sample], dim=1)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = torch.ones(A, N, dtype=logits.dtype, device=logits.device)
    not_self[torch.arange(A), torch.arange(A)] = 0
    same = (labels[:A, None] == labels[None, :]).to(logits.dtype) * not_self
    one_hot = F.one_hot(labels[:A], C).to(logits.dtype)
    if smooth:
        one_hot = smooth / (C - 1) * (1 - one_hot) + (1 - smooth) * one_hot
    positive = torch.cat([beta * one_hot, alpha * same], dim=1)
    weight = torch.cat([torch.ones(A, C, dtype=logits.dtype, device=logits.device), gamma * not_self], dim=1)
    log_prob = logits - torch.log((torch.exp(logits) * weight).sum(1, keepdim=True) + 1e-12)
    return -((positive * log_prob).sum(1) / positive.sum(1)).mean()


@METHODS.register("paco")
class PaCo(Method):
    """PaCo (Cui et al., ICCV 2021): the PaCo loss over the regular view's queries, the momentum
    encoder's keys of a second view and a label queue, with the classifier as class centres.

    Parameters (method.params; defaults: the official CIFAR-100-LT ResNet-32 script):
        alpha: weight of the sample positives (--alpha 0.01).
        beta: weight of the centre positive (--beta 1.0).
        gamma: weight of the sample terms in the denominator (--gamma 1.0).
        temperature: T (--moco-t 0.05).
        queue_size: K (--moco-k 1024).
        feat_dim: projection size d (--moco-dim 32).
        momentum: key encoder EMA m (--moco-m 0.999).
        view: the second view's pipeline (data.augment.VIEWS; official `augmentation_sim_cifar`:
            'mocov2', its Gaussian blur left out).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "PaCo / GPaCo: the momentum queue's pointer read on the host (models/contrastive.py)",
    )

    rebalancing = True  # the classifier is trained with + log(prior): its raw logits aim at balanced classes
    variant = "paco"
    default_temperature, default_feat_dim = 0.05, 32

    def __init__(self, *, cfg, data, alpha: float = 0.01, beta: float = 1.0, gamma: float = 1.0,
                 temperature: float | None = None, queue_size: int = 1024, feat_dim: int | None = None,
                 momentum: float = 0.999, smooth: float = 0.0, view: str = "mocov2"):
        super().__init__(cfg=cfg, data=data)
        self.bf16 = autocast_dtype(cfg.train) is not None  # resolved once, not every step
        self.alpha = number("alpha", alpha, low=0)
        self.beta = number("beta", beta, low=0)
        self.gamma = number("gamma", gamma, low=0)
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: no positive term is left")
        self.temperature = number("temperature", self.default_temperature if temperature is None else temperature,
                                  low=0, low_open=True)
        self.queue_size = integer("queue_size", queue_size, low=1)
        self.feat_dim = integer("feat_dim", self.default_feat_dim if feat_dim is None else feat_dim, low=1)
        self.momentum = number("momentum", momentum, low=0, high=1)
        self.smooth = number("smooth", smooth, low=0, high=1, high_open=True)
        if self.variant == "paco" and self.smooth:
            raise ValueError("smooth is GPaCo's label smoothing; method 'paco' has none (use 'gpaco')")
        if view not in VIEWS:
            raise ValueError(f"view: unknown view pipeline {view!r}; one of {', '.join(VIEWS)}")
        self.views = (view,)
        name = cfg.method.name
        if cfg.model.head != "linear":
            raise ConfigError(f"method '{name}' uses a linear classifier as its class centres (official "
                              f"nn.Linear); model.head is '{cfg.model.head}'")
        if cfg.loss.name != "ce" or cfg.loss.params:
            raise ConfigError(f"method '{name}' trains with its own PaCo loss; loss.name must be 'ce' without "
                              f"params (unused), got '{cfg.loss.name}'")
        if cfg.reweight.scheme != "none":
            raise ConfigError(f"method '{name}' re-balances inside its loss; set reweight.scheme: none")
        refuse_batch_mixing(cfg, name)
        counts = torch.as_tensor(list(data.class_counts), dtype=torch.float64)
        self.log_prior = torch.log(counts / counts.sum() + 1e-9).to(torch.float32)  # official log(weight + 1e-9)

    # -- model: backbone + centres (the classifier) + projection [+ key encoder] + queue
    def projection(self, in_features: int) -> ProjectionHead:
        """MoCo-v2 `mlp` head: Linear(D, D)-BN-ReLU-Linear(D, d) (ResNet-32: 64-64-32), L2-normalised."""
        return ProjectionHead(in_features, self.feat_dim)

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not hasattr(model, "paco_projection"):
            model.add_module("paco_projection", self.projection(model.num_features))
            if self.variant == "paco":  # a copy of backbone + classifier + projection (official encoder_k, linear_k)
                model.add_module("paco_key", MomentumEncoder(model, momentum=self.momentum))
            queue = FeatureQueue(self.queue_size, self.feat_dim)
            # the official random start (randn, global RNG); here from a generator seeded by train.seed
            queue.randomize(self.data.num_classes, generator=torch.Generator().manual_seed(self.cfg.train.seed))
            model.add_module("paco_queue", queue)
        return model

    def _loss(self, features, labels, centre_logits, num_anchors):
        return paco_loss(features, labels, centre_logits, num_anchors=num_anchors, alpha=self.alpha, beta=self.beta,
                         gamma=self.gamma, temperature=self.temperature,
                         log_prior=self.log_prior.to(centre_logits.device), smooth=self.smooth)

    def _second_view(self, images):
        """The loop's extra view; called outside the loop (no views: a direct call, the contract
        test) the images stand in for it."""
        if self.batches is not None and self.batches.views:
            return self.batches.views[0]
        return images

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        B = images.shape[0]
        pooled, logits = forward(images)
        q = model.paco_projection(pooled)
        second = self._second_view(images)
        with torch.no_grad():  # keys: the momentum encoder on the second view (train mode: its own BN statistics)
            key = model.paco_key.module
            with torch.autocast(second.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                pooled_k = key.forward_head(key.forward_features(second), pre_logits=True)
            k = key.paco_projection(pooled_k.float())
        queued, queued_labels = model.paco_queue.contents()
        features = torch.cat([q, k.to(q.dtype), queued.to(q.dtype)])
        labels = torch.cat([target, target, queued_labels])
        value = self._loss(features, labels, logits.float(), B)
        model.paco_queue.push(k, target)  # after the loss, as the official _dequeue_and_enqueue
        return StepResult(value, logits, target)

    def after_step(self, model: Classifier) -> None:
        """The key encoder's EMA step (official `_momentum_update_key_encoder`, there at the start of
        the next forward: the same sequence of key weights)."""
        if self.variant == "paco":
            model.paco_key.update(model, exclude=("paco_key", "paco_queue"))
        super().after_step(model)


@METHODS.register("gpaco")
class GPaCo(PaCo):
    """GPaCo (Cui et al., TPAMI 2023): the PaCo loss without a momentum encoder; both views pass
    through the trained network and are anchors, with centre logits of both.

    Parameters as `paco`, defaults from GPaCo/LT/paco_cifar.py and sh/CIFAR/CIFAR100_train.sh:
    alpha 0.01, temperature 0.07, queue_size 1024, feat_dim 128 (--moco-dim default); beta and
    gamma are not passed to the official loss (1.0, kept as parameters); smooth: the official
    loss's label smoothing (0 in every official run); momentum is unused.
    """

    variant = "gpaco"
    default_temperature, default_feat_dim = 0.07, 128

    def projection(self, in_features: int) -> ProjectionHead:
        """GPaCo's `mlp` head: Linear(D, D)-ReLU-Linear(D, D)-ReLU-Linear(D, d), no BatchNorm."""
        return ProjectionHead(in_features, self.feat_dim, batch_norm=False, hidden_layers=2)

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        B = images.shape[0]
        pooled_q, logits_q = forward(images)  # two passes, as the official encoder_q(im_q), encoder_q(im_k)
        pooled_k, logits_k = forward(self._second_view(images))
        q, k = model.paco_projection(pooled_q), model.paco_projection(pooled_k)
        queued, queued_labels = model.paco_queue.contents()
        features = torch.cat([q, k, queued.to(q.dtype)])
        labels = torch.cat([target, target, queued_labels])
        value = self._loss(features, labels, torch.cat([logits_q, logits_k]).float(), 2 * B)
        model.paco_queue.push(k, target)
        return StepResult(value, logits_q, target)
