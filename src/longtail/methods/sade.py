"""SADE: self-supervised aggregation of diverse experts (Zhang, Hooi, Hong, Feng, "Self-Supervised
Aggregation of Diverse Experts for Test-Agnostic Long-Tailed Recognition", NeurIPS 2022).

Official code read: Vanint/SADE-AgnosticLT, commit cba11b8b0fb91711eeffd5e45311f321f8a88680
(`model/loss.py` `DiverseExpertLoss`, `model/ldam_drw_resnets/expert_resnet_cifar.py` `ResNet_s`,
`model/model.py` `ResNet32Model`, `trainer/trainer.py`, `train.py` `CustomLR`,
`configs/config_cifar100_ir100_sade.json`, `configs/test_time_cifar100_ir100_sade.json`,
`test_training_cifar.py`).

Training (skill-diverse experts). The network is the experts option of the ResNets
(models/experts.py; on CIFAR `model.params.experts: {num: 3, shared_stages: 1, widths: ride,
scale: 30}` with `model.head: cosine`, the official `reduce_dimension: true, use_norm: true, s = 30`).
With z_e = s * head_e(f_e) the three experts' logits (E = 3, B, C), pi the training prior
(class_counts / N) and pi_inv the prior mirrored by rank (official `inverse_prior`: the class
with the k-th smallest prior gets the k-th largest prior value), one step's loss is the SUM

    L = CE(z_1, y)                                                  expert 1: forward (long-tailed) skill
      + CE(z_2 + log(pi + 1e-9), y)                                 expert 2: balanced softmax, uniform skill
      + CE(z_3 + log(pi + 1e-9) - tau * log(pi_inv + 1e-9), y)      expert 3: inverse softmax, backward skill

(paper Eqs. 1-3, official `DiverseExpertLoss.forward`; tau = 2 on CIFAR-100-LT and ImageNet-LT, 1 on
Places-LT and iNaturalist). Shapes: expert logits (3, B, C), target (B,), loss a scalar. The network's
plain forward (eval, predict, export, the test-agnostic table's plain rows) is the expert mean (the
official `final_out`, 1/3 each); training accuracy is scored on it too.

Test-time self-supervised aggregation (official `test_training_cifar.py`): for one unlabelled test
set, learnable weights a (E,) start equal (official 1/3 each), w = softmax(a), and

    p_v = softmax(sum_e w_e z_e(view_v)),  v = 1, 2      (two augmented views of each image)
    loss = - mean_b cos(p_1, p_2)                        (prediction stability, cos eps 1e-6)

trained with SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4 on a: the official test-time
config), batches of 128 shuffled each epoch (last batch kept), the network frozen in eval mode, for
at most 5 epochs; after each epoch the weights rounded to 2 decimals are checked and training stops
when one of them is below 0.05 (the official stop rule, on the rounded values). The subset is then
scored with the un-augmented logits sum_e w_e z_e. Here it is `SADE.test_time_aggregation`, the
method-level hook the test-agnostic evaluation calls (runs.evaluate_test_agnostic).

Readings and differences (docs/methods.md, "SADE"):
- the two test-time views (`test_views`): by default the official view less its blur ('crop_jitter':
  padded crop, flip, colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2; the official Gaussian
  blur p 0.2 has no batched op here), seeded per distribution; `test_views: train` uses the run's own
  train.augment instead;
- the official CIFAR training transform adds RandomRotation(15); the configs keep the project's crop
  and flip (base.yaml);
- `inverse_prior` sorts with a stable sort (ties keep the class order); the official sort is not stable;
- the aggregation needs 3 experts (the three skills); num_experts is not a free parameter.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import BatchAugment
from ..errors import ConfigError
from ..losses._checks import integer, number
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing, require_experts

NUM_SKILLS = 3  # forward, uniform, backward
SADE_EXPERTS = "{num: 3, shared_stages: 1, widths: ride, scale: 30} on a ResNet such as resnet32"
_EPS = 1e-9  # the official `+ 1e-9` inside every log


def inverse_prior(prior: torch.Tensor) -> torch.Tensor:
    """(C,) the prior mirrored by rank (official `DiverseExpertLoss.inverse_prior`): the class with the
    k-th smallest prior gets the k-th largest value. Ties keep the class order (stable sort)."""
    value, order = torch.sort(prior, stable=True)
    rank = torch.argsort(order)
    return value[prior.numel() - 1 - rank]


class DiverseExpertLoss(nn.Module):
    """SADE's skill-diverse loss over three experts (module docstring): the sum of the three cross-
    entropies of expert 1 (plain), expert 2 (+ log pi) and expert 3 (+ log pi - tau log pi_inv).

    `forward(expert_logits (3, B, C), target (B,)) -> scalar`; `terms(...) -> (3,)` the three terms.
    """

    def __init__(self, *, class_counts, tau: float = 2.0):
        super().__init__()
        counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
        if counts.dim() != 1 or len(counts) < 1 or counts.sum() <= 0 or (counts < 0).any():
            raise ValueError("class_counts must be a non-empty list of counts >= 0 with a positive sum")
        self.tau = number("tau", tau, low=0.0)
        prior = counts / counts.sum()
        log_prior = torch.log(prior + _EPS)
        shifts = torch.stack([torch.zeros_like(prior), log_prior, log_prior - self.tau * torch.log(inverse_prior(prior) + _EPS)])
        self.register_buffer("shifts", shifts)  # (3, C) float64: added to each expert's logits

    def terms(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if expert_logits.dim() != 3 or expert_logits.shape[0] != NUM_SKILLS:
            raise ValueError(f"expert_logits must be (3, B, C), got {tuple(expert_logits.shape)}")
        shifts = self.shifts.to(device=expert_logits.device, dtype=expert_logits.dtype)
        return torch.stack([F.cross_entropy(expert_logits[e] + shifts[e], target) for e in range(NUM_SKILLS)])

    def forward(self, expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.terms(expert_logits, target).sum()


# -- test-time self-supervised aggregation

def aggregate(expert_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(E, B, C) expert logits, (E,) aggregation weights -> (B, C) sum_e w_e z_e."""
    return torch.einsum("e,ebc->bc", weights.to(expert_logits.dtype), expert_logits)


def stability_loss(raw_weights: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """- mean cosine similarity of the aggregated softmax of two views (E, B, C) each; the weights are
    softmax(raw_weights) (official `test_training`)."""
    w = torch.softmax(raw_weights, dim=0)
    p_a = torch.softmax(aggregate(logits_a, w), dim=1)
    p_b = torch.softmax(aggregate(logits_b, w), dim=1)
    return -F.cosine_similarity(p_a, p_b, dim=1, eps=1e-6).mean()


def learn_aggregation(view_logits, num_images: int, num_experts: int, *, epochs: int = 5, lr: float = 0.1,
                      momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                      stop_below: float = 0.05, generator: torch.Generator, device="cpu") -> dict:
    """Learn the aggregation weights on one unlabelled test set (module docstring).

    `view_logits(positions (B,) int64 array, generator) -> (logits of view 1, logits of view 2)`, each
    (E, B, C) without gradient. Returns {"weights": [E floats, softmax], "raw": (E,) tensor, "epochs":
    epochs run, "stopped": whether the stop rule ended it, "stability": mean cosine per epoch}.
    """
    raw = torch.full((num_experts,), 1.0 / num_experts, device=device, requires_grad=True)
    opt = torch.optim.SGD([raw], lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    history, stopped, done = [], False, 0
    for _ in range(epochs):
        order = torch.randperm(num_images, generator=generator).numpy()
        total, seen = 0.0, 0
        for start in range(0, num_images, batch_size):
            pos = order[start:start + batch_size]
            logits_a, logits_b = view_logits(pos, generator)
            loss = stability_loss(raw, logits_a.detach(), logits_b.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total - loss.item() * len(pos), seen + len(pos)
        done += 1
        history.append(total / max(seen, 1))
        rounded = np.round(torch.softmax(raw.detach(), 0).cpu().double().numpy(), 2)
        if (rounded < stop_below).any():  # the official rule, on the weights rounded to 2 decimals
            stopped = True
            break
    weights = torch.softmax(raw.detach(), 0).cpu()
    return {"weights": [float(w) for w in weights], "raw": raw.detach().cpu(), "epochs": done, "stopped": stopped,
            "stability": history}


def distribution_seed(seed: int, name: str) -> int:
    """The views' seed of test distribution `name` (independent of which others are evaluated)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@METHODS.register("sade")
class SADE(Method):
    """SADE (Zhang et al., NeurIPS 2022): three experts trained with the forward / uniform / backward
    losses (DiverseExpertLoss); at test time, per unlabelled test set, aggregation weights learnt by
    prediction stability (`test_time_aggregation`, called by `longtail eval RUN --test-agnostic`).

    Parameters (method.params):
        tau: the inverse-softmax strength of expert 3 (>= 0; official 2 on CIFAR-100-LT).
        aggregation_epochs (5), aggregation_lr (0.1), aggregation_momentum (0.9, Nesterov),
        aggregation_weight_decay (5e-4), aggregation_batch_size (128), aggregation_stop (0.05):
            the test-time aggregation's SGD and stop rule (official test-time config).
        test_views: the test-time views' pipeline: 'crop_jitter' (default; the official one without its
            Gaussian blur) or 'train' (the run's train.augment).
    """

    rebalancing = True  # its plain (expert-mean) prediction is not calibrated to the training prior
    aggregates_at_test_time = True

    @staticmethod
    def calibrated_prior(class_counts, params: dict) -> np.ndarray:
        """(C,) the prior the expert mean's logits are calibrated to, for post-hoc adjustment (the test-
        agnostic oracle): expert e fits z_e + shift_e ~ log p(x|y) + log pi, so z_1 ~ .. + log pi,
        z_2 ~ .., z_3 ~ .. + tau log pi_inv, and their mean carries (pi * pi_inv^tau)^(1/3), normalised."""
        counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
        pi = counts / counts.sum()
        tau = float((params or {}).get("tau", 2.0))
        log_q = (torch.log(pi + _EPS) + tau * torch.log(inverse_prior(pi) + _EPS)) / NUM_SKILLS
        return torch.softmax(log_q, 0).numpy()

    def __init__(self, *, cfg, data, tau: float = 2.0, aggregation_epochs: int = 5, aggregation_lr: float = 0.1,
                 aggregation_momentum: float = 0.9, aggregation_weight_decay: float = 5e-4,
                 aggregation_batch_size: int = 128, aggregation_stop: float = 0.05, test_views: str = "crop_jitter"):
        super().__init__(cfg=cfg, data=data)
        if test_views not in ("crop_jitter", "train"):
            raise ValueError(f"test_views must be 'crop_jitter' or 'train', got {test_views!r}")
        self.test_views = test_views
        self.tau = number("tau", tau, low=0.0)
        self.aggregation = dict(
            epochs=integer("aggregation_epochs", aggregation_epochs, low=1),
            lr=number("aggregation_lr", aggregation_lr, low=0.0, low_open=True),
            momentum=number("aggregation_momentum", aggregation_momentum, low=0.0, high=1.0, high_open=True),
            weight_decay=number("aggregation_weight_decay", aggregation_weight_decay, low=0.0),
            batch_size=integer("aggregation_batch_size", aggregation_batch_size, low=1),
            stop_below=number("aggregation_stop", aggregation_stop, low=0.0, high=1.0, high_open=True))
        require_experts(cfg, "sade", minimum=NUM_SKILLS, exactly=True, example=SADE_EXPERTS)
        if cfg.loss.name != "ce":
            raise ValueError(f"SADE's diverse-expert loss replaces the configured loss; set loss.name: ce "
                             f"(got '{cfg.loss.name}')")
        if cfg.reweight.scheme != "none":
            raise ValueError("SADE's experts carry their own re-balancing; set reweight.scheme: none")
        refuse_batch_mixing(cfg, "sade", "SADE trains without mixup / CutMix, as the official code")
        self.diverse = DiverseExpertLoss(class_counts=data.class_counts, tau=self.tau)

    def build_model(self) -> Classifier:
        model = super().build_model()
        require_experts(self.cfg, "sade", minimum=NUM_SKILLS, exactly=True, example=SADE_EXPERTS, model=model)
        return model

    def expert_logits(self, model: Classifier, forward, images: torch.Tensor) -> torch.Tensor:
        """(3, B, C) training logits through the loop's (possibly DDP-wrapped) forward: its pooled
        features are the experts' concatenated (B, 3 D), each expert's head applied here (as ISDA
        applies its head to the forward's features)."""
        pooled, _ = forward(images)
        return model.head.per_expert(pooled)

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        z = self.expert_logits(model, forward, images)
        return StepResult(self.diverse(z, target), z.detach().mean(dim=0), target)

    # -- test time
    @torch.no_grad()
    def _split_expert_logits(self, model, split, transform, batch_size: int, device) -> torch.Tensor:
        out = []
        for start in range(0, len(split), batch_size):
            pos = np.arange(start, min(start + batch_size, len(split)))
            images = transform(torch.from_numpy(split.batch(pos)).to(device))
            out.append(model.expert_outputs(images)[0].float().cpu())
        return torch.cat(out, dim=1)

    def test_time_aggregation(self, model: Classifier, split, subsets: dict, *, mean, std, batch_size: int, device,
                              channels_last: bool = False, seed: int = 0) -> dict:
        """For each named subset (indices into `split`, an unlabelled test set: labels are not read)
        the learned aggregation weights and the aggregated logits (n, C) of its un-augmented images.

        Views: `test_views` ('crop_jitter': crop, flip, colour jitter, grayscale; 'train': the run's
        train.augment) through BatchAugment, drawn from a generator seeded by (seed, name). Returns {name: {"weights", "epochs", "stopped", "stability", "logits"}}.
        """
        model.eval()
        a = self.cfg.train.augment
        plain = BatchAugment(mean=mean, std=std, device=device, channels_last=channels_last)
        views = BatchAugment(mean=mean, std=std, crop_padding=a.crop_padding, flip=a.flip, device=device,
                             channels_last=channels_last, policy=a.policy, randaugment_n=a.randaugment_n,
                             randaugment_m=a.randaugment_m, randaugment_mstd=a.randaugment_mstd, cutout=a.cutout)
        if self.test_views == "crop_jitter":
            views = views.view("crop_jitter")
        if getattr(model, "num_experts", 0) != NUM_SKILLS:
            raise ConfigError("the test-time aggregation needs the run's three-expert network")
        all_logits = self._split_expert_logits(model, split, plain, batch_size, device)  # (3, N, C)
        out = {}
        for name, idx in subsets.items():
            idx = np.asarray(idx, dtype=np.int64)

            @torch.no_grad()
            def view_logits(pos, generator, idx=idx):
                raw = torch.from_numpy(split.batch(idx[pos])).to(device)
                first, second = views.two_views(raw, generator)
                return model.expert_outputs(first)[0].float(), model.expert_outputs(second)[0].float()

            gen = torch.Generator().manual_seed(distribution_seed(seed, name))
            learned = learn_aggregation(view_logits, len(idx), NUM_SKILLS, generator=gen, device=device,
                                        **self.aggregation)
            weights = torch.tensor(learned["weights"])
            out[name] = {k: learned[k] for k in ("weights", "epochs", "stopped", "stability")}
            out[name]["logits"] = aggregate(all_logits[:, idx], weights).numpy()
        return out
