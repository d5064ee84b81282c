"""GLMC: global and local mixture consistency cumulative learning (Du, Yang, Jia, Nan, Chen, Yang,
"Global and Local Mixture Consistency Cumulative Learning for Long-tailed Visual Recognitions",
CVPR 2023).

Official code read: ynu-yangpeng/GLMC, commit 2c0261cc50c12483cba1c6be9659218f9d42676d
(`GLMC-2023/Trainer.py` `train` / `SimSiamLoss`, `utils/util.py` `GLMC_mixed` / `rand_bbox`,
`main.py` (weighted loader, arguments), `model/ResNet_cifar.py` `ResNet_modify`, README commands).

One step of 0-idx epoch e of E, with (x, y) the loop's batch (uniform: instance sampling), x' its
extra 'regular' view (the official TwoCropTransform), and (v, y_v), v' a second batch from the
re-balanced sampler (image i weighted n_{y_i}^-r, r = `resample_weighting`, with replacement; the
official WeightedRandomSampler) with its two views:

    lam ~ Beta(a, a)                                       (official GLMC_mixed: a = 1)
    x_mix = lam x + (1 - lam) v                            global MixUp with the re-balanced batch
    x_cut = CutMix(x', v', lam)                            local CutMix, box side ceil(S sqrt(1 - lam))
    Y = lam onehot(y) + (1 - lam) onehot(y_v);  Y_w = lam w_y onehot(y) + (1 - lam) w_{y_v} onehot(y_v)
    w_c = n_c^-t / sum_j n_j^-t * C                        (t = `label_weighting`)
    for each mixture m: f = backbone(x_m) (its own pass), u = fc(f), b = fc_cb(f), z = g(f), p = h(z)
    L_bal = sum_m -mean_i sum_c Y log softmax(u)          (fc: the uniform branch)
    L_rebal = sum_m -mean_i sum_c Y_w log softmax(b)      (fc_cb: the re-balanced branch, used at test)
    L_con = -cos(p_mix, sg(z_cut)) - cos(p_cut, sg(z_mix))  (SimSiam's negative cosine, batch means)
    alpha = 1 - (e / E)^2                                  (cumulative: from 1 to ~0 over training)
    L = alpha L_bal + (1 - alpha) L_rebal + contrast_weight L_con

Model: the classifier `head` is the official fc_cb (the one evaluated); `glmc_fc` (Linear(D, C),
the uniform branch's fc), `glmc_projection` (Linear(D, hidden), official projection_head) and
`glmc_predictor` (Linear(hidden, hidden), official contrast_head; hidden 128) are added modules
(in the checkpoint; a plain forward never calls them).

Quirks kept: the Trainer draws lam ~ Beta(beta) with `--beta 0.5` but never uses it; GLMC_mixed
draws its own lam with its default alpha 1 (here `mix_alpha`, default 1). The CutMix labels use the
drawn lam, not the pasted area (`adjust_lam` false; true: the kept pixel fraction). Y_w's rows are
not renormalised. Both mixtures take separate backbone passes (BatchNorm statistics per mixture).
Differences: the official ResNet-32 of GLMC is 4x wider (nf = 64: widths 64/128/256, about 7.4 M
parameters, vs 16/32/64 and 0.46 M here); its long-tailed subset draw is its own (a random choice of
images per class, first with replacement, corrected 2023/5/23): ours is the library's profile. The
official re-balanced loader is an iterator restarted when exhausted, truncated to the uniform batch's
size; here each step's re-balanced batch is drawn from a generator seeded by (train.seed, epoch,
step), of the step's global batch size, so --resume is exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import VIEWS
from ..data.mixup import cutmix_batch
from ..data.samplers import stream_seed
from ..errors import ConfigError
from ..losses._checks import choice, integer, number
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing
from .cmo import MinoritySampler, minority_class_prob

_STREAM = 2023  # tags GLMC's re-balanced stream apart from the loop's, BBN's and CMO's


def rebalanced_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the re-balanced batch of (0-idx) `epoch`, `step`."""
    return stream_seed(seed, epoch, step, _STREAM)


def label_weights(class_counts, label_weighting: float) -> torch.Tensor:
    """(C,) official `update_weight`: n_c^-t normalised to sum C (a class without images gets 0):
    C x CMO's minority class probabilities with weighting 'class'."""
    return torch.from_numpy(minority_class_prob(class_counts, label_weighting, "class") * len(class_counts)).float()


def cumulative_alpha(epoch: int, epochs: int) -> float:
    """Official `alpha = 1 - (epoch / epochs) ** 2` (0-idx epoch): the uniform branch's weight."""
    return 1.0 - (epoch / epochs) ** 2


def soft_cross_entropy(logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """-mean_i sum_c soft_target_ic log softmax(logits_i)_c (official loss_mix / loss_mix_w)."""
    return -(F.log_softmax(logits, dim=1) * soft_target).sum(1).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -mean_i cos(p_i, sg(z_i)) (official SimSiamLoss 'simplified')."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


@METHODS.register("glmc")
class GLMC(Method):
    """GLMC (Du et al., CVPR 2023): MixUp + CutMix of a uniform and a re-balanced batch, two
    classifiers blended by the cumulative alpha, a SimSiam consistency between the mixtures.

    Parameters (method.params):
        contrast_weight: weight of the consistency loss (official --contrast_weight; CIFAR-10-LT
            ratio 100: 4 in the README's reported setup, 1 in its usage list).
        label_weighting: t of the re-balanced labels' class weights n_c^-t (official 1.2 on CIFAR).
        resample_weighting: r of the re-balanced sampler's image weights n_c^-r (official 0.0 on
            CIFAR ratio 100: instance sampling with replacement; 0.2 elsewhere).
        mix_alpha: Beta parameter of the shared lam (official GLMC_mixed default 1.0).
        hidden_dim: projection / predictor width (official 128).
        adjust_lam: CutMix labels by the pasted area (false: the official drawn lam).
        view: the second view's pipeline (data.augment.VIEWS; official: the same crop-and-flip).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "GLMC: the re-balanced batch and MixUp / CutMix's lam and box drawn on the host every step",
    )

    def __init__(self, *, cfg, data, contrast_weight: float = 4.0, label_weighting: float = 1.2,
                 resample_weighting: float = 0.0, mix_alpha: float = 1.0, hidden_dim: int = 128,
                 adjust_lam: bool = False, view: str = "regular"):
        super().__init__(cfg=cfg, data=data)
        self.contrast_weight = number("contrast_weight", contrast_weight, low=0)
        self.label_weighting = number("label_weighting", label_weighting, low=0)
        self.resample_weighting = number("resample_weighting", resample_weighting, low=0)
        self.mix_alpha = number("mix_alpha", mix_alpha, low=0, low_open=True)
        self.hidden_dim = integer("hidden_dim", hidden_dim, low=1)
        if not isinstance(adjust_lam, bool):
            raise ValueError(f"adjust_lam must be true or false, got {adjust_lam!r}")
        self.adjust_lam = adjust_lam
        self.view = choice("view", view, tuple(VIEWS))
        self.views = (self.view,)
        if cfg.model.head != "linear":
            raise ConfigError(f"method 'glmc' trains two linear classifiers (official fc, fc_cb); "
                              f"model.head is '{cfg.model.head}'")
        if cfg.loss.name != "ce":
            raise ConfigError(f"method 'glmc' computes its own soft-label cross-entropies; set loss.name: ce "
                              f"(got '{cfg.loss.name}')")
        refuse_batch_mixing(cfg, "glmc", "GLMC mixes its own batches")
        self.weights = label_weights(data.class_counts, self.label_weighting)
        self._sampler: MinoritySampler | None = None

    def build_model(self) -> Classifier:
        model = super().build_model()
        if not hasattr(model, "glmc_fc"):
            d, c = model.num_features, self.data.num_classes
            layers = {"glmc_fc": nn.Linear(d, c), "glmc_projection": nn.Linear(d, self.hidden_dim),
                      "glmc_predictor": nn.Linear(self.hidden_dim, self.hidden_dim)}
            for name, layer in layers.items():
                nn.init.kaiming_normal_(layer.weight)  # official _weights_init on every Linear
                model.add_module(name, layer)
        return model

    def sampler(self) -> MinoritySampler:
        if self._sampler is None:  # built on first use: a rebuilt run's DataInfo has no training labels
            self._sampler = MinoritySampler(self.data.train.labels, self.data.num_classes,
                                            weighted_alpha=self.resample_weighting, weighting="image")
        return self._sampler

    def _rebalanced(self, images, target, views, epoch: int, step: int, size: int):
        """(v, y_v, v'): the step's re-balanced batch and its second view; without a loop (a direct
        call, the contract test) the loop's batch reversed stands in for it."""
        b = self.batches
        if b is None or b.fetch_views is None:
            return images.flip(0), target.flip(0), views[0].flip(0)
        g = torch.Generator().manual_seed(rebalanced_seed(self.cfg.train.seed, epoch, step))
        v, y_v, v_views = b.fetch_views(self.sampler().draw(size, g), g)
        return v.to(images.dtype), y_v, v_views[0].to(images.dtype)

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        epoch, step, size = self.step_position(images)
        b = self.batches
        views = b.views if b is not None and b.views else (images,)
        v, y_v, v2 = self._rebalanced(images, target, views, epoch, step, size)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(self.mix_alpha, self.mix_alpha))
        x_mix = lam * images + (1.0 - lam) * v
        x_cut, _, kept = cutmix_batch(views[0], target, alpha=self.mix_alpha, generator=generator,
                                      partner=(v2, y_v), lam=lam, ceil=True)
        lam_cut = kept if self.adjust_lam else lam
        c = self.data.num_classes
        one, one_v = F.one_hot(target, c).float(), F.one_hot(y_v, c).float()
        w = self.weights.to(images.device)
        outs = []
        for x, lm in ((x_mix, lam), (x_cut, lam_cut)):
            pooled, logits_cb = forward(x)
            z = model.glmc_projection(pooled)
            outs.append((model.glmc_fc(pooled), logits_cb, z, model.glmc_predictor(z), lm))
        balance = rebalance = 0.0
        for u, cb, _, _, lm in outs:
            balance = balance + soft_cross_entropy(u, lm * one + (1 - lm) * one_v)
            rebalance = rebalance + soft_cross_entropy(cb, (lm * one + (1 - lm) * one_v) * w)
        (_, _, z1, p1, _), (_, _, z2, p2, _) = outs
        consistency = negative_cosine(p1, z2) + negative_cosine(p2, z1)
        alpha = cumulative_alpha(epoch, self.cfg.train.epochs)
        total = alpha * balance + (1.0 - alpha) * rebalance + self.contrast_weight * consistency
        return StepResult(total, outs[0][1], target)
