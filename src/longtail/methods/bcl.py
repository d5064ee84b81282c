"""BCL: Balanced Contrastive Learning (Zhu et al., "Balanced Contrastive Learning for Long-Tailed
Visual Recognition", CVPR 2022), read against the official code FlamieZhu/Balanced-Contrastive-Learning
at commit f72d0703794bcec8b00da86774c9d780dc721701 (main.py, loss/contrastive.py `BalSCL`,
loss/logitadjust.py `LogitAdjust`, models/resnext.py `BCLModel`).

Two branches on one backbone, trained together (docs/methods.md, "BCL"):

* classification: the configured loss (configs: `logit_adjustment` with tau 1, the official
  `LogitAdjust`: CE(z + log pi)) on the logits of the first, regular view, times `alpha`; with a
  cosine head the logits are `scale` (official NormedLinear's s = 30) times the cosines;
* contrastive: the balanced supervised contrastive loss (`balanced_supcon`) over two
  contrastive views (`views`, default two SimCLR views) of the same batch, projected by an MLP
  head (`model.contrastive_head`: Linear(D, D)-BN-ReLU-Linear(D, feat_dim), L2-normalised), plus
  one prototype per class made from the classifier's weights by a second MLP of the same shape
  (`model.prototype_head`, the official `head_fc`; input: the (C, D) class weight rows), times
  `beta`.

The heads are submodules of the model (in its checkpoint; `rebuild_model` rebuilds them);
inference uses only the classifier.
"""

from __future__ import annotations

import torch

from ..data.augment import VIEWS
from ..errors import ConfigError
from ..losses._checks import integer, number
from ..models import Classifier
from ..models.contrastive import ProjectionHead
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing


def check_two_views(views) -> tuple[str, str]:
    """The two contrastive view pipelines of `method.params.views` (names of data.augment.VIEWS),
    as a tuple; ValueError naming the key otherwise. Shared by BCL and ProCo."""
    if isinstance(views, str) or not isinstance(views, (list, tuple)) or len(views) != 2:
        raise ValueError(f"views must be a list of two view pipelines ({', '.join(VIEWS)}), got {views!r}")
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"views: unknown view pipeline {v!r}; one of {', '.join(VIEWS)}")
    return tuple(views)


def forward_three_views(forward, images: torch.Tensor, batches, *, joint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (3B, D) of [regular view, contrastive view 1, view 2] and the regular view's
    logits (B, C). The loop hands the two views in `batches.views`; called outside the loop (no
    views: a direct call, the contract test) the images stand in for both. `joint`: one backbone
    pass over the concatenated 3B images, so BatchNorm statistics span all three (BCL's and
    ProCo's official code); false: three passes. Shared by BCL and ProCo."""
    views = batches.views if batches is not None and batches.views else (images, images)
    B = images.shape[0]
    if joint:
        pooled, logits = forward(torch.cat([images, *views], dim=0))
        return pooled, logits[:B]
    outs = [forward(x) for x in (images, *views)]
    return torch.cat([o[0] for o in outs], 0), outs[0][1]


def balanced_supcon(features: torch.Tensor, target: torch.Tensor, prototypes: torch.Tensor | None, *,
                    num_classes: int, temperature: float, class_averaging: bool = True) -> torch.Tensor:
    """BCL's balanced supervised contrastive loss (paper Eq. 7; official `BalSCL.forward`).

    Args:
        features: (B, V, d) L2-normalised projections of V views (official: V = 2).
        target: (B,) class indices.
        prototypes: (C, d) L2-normalised class prototypes (class-complement), or None (off: SupCon's
            contrast set of the batch alone).
        class_averaging: divide each negative (and positive) exponent by the number of rows of its
            class in the contrast set (positives: that number less the anchor itself); off: 1.

    The anchors are the B V view rows; the contrast set is the anchors, then the prototypes. For
    anchor i and contrast row j != i with class c_j, n_c the rows of class c in the contrast set:
        L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{j != i} exp(s_ij) / (n_{c_j} - [c_j = c_i]) ),
    s = z_i . z_j / temperature, P(i) the rows of i's class other than i (its other views and its
    prototype included). The loss is the mean over the B V anchors. With class_averaging off and
    prototypes None it is SupCon (Khosla et al. 2020) with V views.
    """
    B, V, _ = features.shape
    anchors = torch.cat(torch.unbind(features, dim=1), dim=0)  # (V B, d), view-major as the official
    labels = target.repeat(V)
    contrast, contrast_labels = anchors, labels
    if prototypes is not None:
        contrast = torch.cat([anchors, prototypes], dim=0)
        contrast_labels = torch.cat([labels, torch.arange(num_classes, device=labels.device)])
    n = V * B
    logits = anchors @ contrast.T / temperature  # (V B, V B [+ C])
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = torch.ones_like(logits)
    not_self[torch.arange(n), torch.arange(n)] = 0
    positive = (labels[:, None] == contrast_labels[None, :]).to(logits.dtype) * not_self
    exp = torch.exp(logits) * not_self
    if class_averaging:
        counts = torch.bincount(contrast_labels, minlength=num_classes).to(logits.dtype)
        exp = exp / (counts[contrast_labels][None, :] - positive)
    log_prob = logits - torch.log(exp.sum(dim=1, keepdim=True))
    per_anchor = (positive * log_prob).sum(1) / positive.sum(1)
    return -per_anchor.mean()


@METHODS.register("bcl")
class BCL(Method):
    """BCL (Zhu et al., CVPR 2022): alpha * loss(first view) + beta * balanced_supcon(two views + prototypes).

    Parameters (method.params):
        alpha: weight of the classification loss (official --alpha, 1.0).
        beta: weight of the contrastive loss (official --beta, 0.35).
        temperature: contrastive temperature (official --temp, 0.07).
        feat_dim: projection size d (official --feat_dim, 1024).
        scale: multiplier of a cosine head's logits in training (official NormedLinear s = 30); a
            linear head's logits are used as they are.
        views: the contrastive views' pipelines (data.augment.VIEWS; official sim-sim: two
            'simclr'; sim-rand: 'simclr_randaugment', 'simclr').
        class_averaging, class_complement: the two parts of BCL (off, off: SupCon; paper Table 5).
        joint_forward: one backbone pass over the concatenated [regular, view 1, view 2] batch, so
            BatchNorm statistics span all three (official); false: three passes.
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "BCL: the batch's class counts taken with bincount for the balanced contrastive loss (methods/bcl.py)",
    )

    def __init__(self, *, cfg, data, alpha: float = 1.0, beta: float = 0.35, temperature: float = 0.07,
                 feat_dim: int = 1024, scale: float = 30.0, views=("simclr", "simclr"), class_averaging: bool = True,
                 class_complement: bool = True, joint_forward: bool = True):
        super().__init__(cfg=cfg, data=data)
        self.alpha = number("alpha", alpha, low=0)
        self.beta = number("beta", beta, low=0)
        self.temperature = number("temperature", temperature, low=0, low_open=True)
        self.feat_dim = integer("feat_dim", feat_dim, low=1)
        self.scale = number("scale", scale, low=0, low_open=True)
        self.views = check_two_views(views)
        for name, value in (("class_averaging", class_averaging), ("class_complement", class_complement),
                            ("joint_forward", joint_forward)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.class_averaging, self.class_complement, self.joint_forward = class_averaging, class_complement, joint_forward
        if cfg.model.head not in ("cosine", "linear"):
            raise ConfigError(f"method 'bcl' makes its class prototypes from a cosine or linear head's weights; "
                              f"model.head is '{cfg.model.head}'")
        refuse_batch_mixing(cfg, "bcl")

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not hasattr(model, "contrastive_head"):
            d = model.num_features
            model.add_module("contrastive_head", ProjectionHead(d, self.feat_dim))
            model.add_module("prototype_head", ProjectionHead(d, self.feat_dim))
        return model

    def class_weights(self, model: Classifier) -> torch.Tensor:
        """(C, D) class weight rows: a cosine head's (D, C) weight transposed (official
        `fc.weight.T`), a linear head's weight."""
        w = model.head.weight
        return w.T if self.cfg.model.head == "cosine" else w

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        """The two contrastive views come from `self.batches.views` (`forward_three_views`)."""
        B = images.shape[0]
        pooled, logits = forward_three_views(forward, images, self.batches, joint=self.joint_forward)
        if self.cfg.model.head == "cosine":
            logits = logits * self.scale
        projected = model.contrastive_head(pooled)
        features = torch.stack([projected[B:2 * B], projected[2 * B:]], dim=1)  # (B, 2, d)
        prototypes = model.prototype_head(self.class_weights(model)) if self.class_complement else None
        contrastive = balanced_supcon(features, target, prototypes, num_classes=self.data.num_classes,
                                      temperature=self.temperature, class_averaging=self.class_averaging)
        return StepResult(self.alpha * loss(logits, target) + self.beta * contrastive, logits, target)
