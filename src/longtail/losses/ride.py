"""RIDE loss (Wang, Lian, Miao, Liu, Yu, "Long-tailed Recognition by Routing Diverse Distribution-Aware
Experts", ICLR 2021; official frank-xwang/RIDE-LongTailRecognition, commit
ab8be5c21124612493aff87c7cf235d950bda178, `model/loss.py` `RIDELoss`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ._checks import number
from .base import Loss
from .ldam import ldam_margins


def ride_diversity_weights(class_counts, reweight_factor: float) -> torch.Tensor:
    """Per-class diversity temperature factors of the official `RIDELoss`:
    w_c = C p_c f + 1 - f with p_c = n_c / sum n, then divided by max_c w_c (so max w = 1). float32 (C,)."""
    n = np.asarray(class_counts, dtype=np.float64)
    p = n / n.sum()
    w = len(n) * p * reweight_factor + 1.0 - reweight_factor
    w = w / w.max()
    if not np.all(w > 0):
        raise ValueError(f"reweight_factor {reweight_factor} makes a diversity temperature <= 0")
    return torch.tensor(w, dtype=torch.float32)


def diversity_kl(expert_logits: torch.Tensor, mean_logits: torch.Tensor, temperature) -> torch.Tensor:
    """KL(softmax(mean / T) || softmax(z_e / T)), batch mean, the target held fixed (no gradient), as
    `F.kl_div(log_softmax(z_e / T), softmax(mean / T).detach(), reduction='batchmean')`.
    temperature: a float or a (C,) tensor (per-class temperatures, broadcast over the batch)."""
    log_q = F.log_softmax(expert_logits / temperature, dim=1)
    with torch.no_grad():
        p = F.softmax(mean_logits / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


@LOSSES.register("ride")
class RIDELoss(Loss):
    """Per-expert LDAM with RIDE's distribution-aware diversity term (official `RIDELoss`).

    For expert logits z_e (E, B, C) (already scaled by the model: s * cosine), mean z = mean_e z_e:

        loss = sum_e [ lambda_b * CE(z_e - s m_y [j = y], y, weight = w_DRW)
                       + lambda_d * mean(T)^2 * KL(softmax(z / T) || softmax(z_e / T)) ]

    - m_c: LDAM margins (n_c^-1/4 scaled to max_m); the margin is subtracted *after* the model's
      scale, so it is s * m_c in logit units (`s` must equal the model's `experts.scale`).
    - w_DRW: the run's re-weighting (`reweight` section; official: effective number, beta 0.9999,
      from 1-based epoch > reweight_epoch, i.e. our 0-idx start_epoch = reweight_epoch).
    - T: `base_diversity_temperature` before DRW; once a class weight is set (DRW active) the
      per-class T_c = T * w_c with w_c of `ride_diversity_weights(reweight_factor)`, as the official
      switches both at reweight_epoch. mean(T) is the scalar mean over classes.
    - lambda_d = `additional_diversity_factor` (official default -0.2; CIFAR-100 config -0.45):
      negative, so the loss *rewards* divergence from the ensemble mean. The KL target is the
      mean of all E experts (the expert included), held fixed (official `torch.no_grad`).
    - quirk kept: with lambda_d = 0 every expert's LDAM term is computed on the *mean* logits
      (official `ride_loss_logits = output_logits if additional_diversity_factor == 0`).
    - the E terms are summed, not averaged (official).

    (B, C) logits are one expert (E = 1): the KL is 0 and the loss is LDAM on s-scaled logits.
    max_m = 0 and lambda_d = 0 is plain CE (times E on expert logits).

    Shapes: logits (E, B, C) or (B, C), target (B,) int64 -> scalar.
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'RIDE loss: the mean diversity temperature read as a float while DRW re-weights (losses/ride.py)',
    )

    rebalancing = True
    neutral_params = {"max_m": 0.0, "additional_diversity_factor": 0.0}  # (B, C): CE on the logits

    def __init__(self, *, class_counts, max_m: float = 0.5, s: float = 30.0, base_loss_factor: float = 1.0,
                 additional_diversity_factor: float = -0.2, base_diversity_temperature: float = 1.0,
                 reweight_factor: float = 0.05):
        super().__init__(class_counts=class_counts)
        self.max_m = number("max_m", max_m, low=0)
        self.s = number("s", s, low=0, low_open=True)
        self.base_loss_factor = number("base_loss_factor", base_loss_factor)
        self.additional_diversity_factor = number("additional_diversity_factor", additional_diversity_factor)
        self.base_diversity_temperature = number("base_diversity_temperature", base_diversity_temperature,
                                                 low=0, low_open=True)
        self.reweight_factor = number("reweight_factor", reweight_factor, low=0, high=1)
        self.register_buffer("margins", ldam_margins(class_counts, self.max_m))
        self.register_buffer("diversity_weights", ride_diversity_weights(class_counts, self.reweight_factor))

    def temperature(self):
        """(T, mean T): the scalar base temperature, or the per-class (C,) one while DRW is active."""
        if self.class_weight is None:
            return self.base_diversity_temperature, self.base_diversity_temperature
        t = self.base_diversity_temperature * self.diversity_weights
        return t, float(t.mean())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        experts = logits.unsqueeze(0) if logits.dim() == 2 else logits
        if experts.dim() != 3:
            raise ValueError(f"ride loss takes logits (B, C) or expert logits (E, B, C), got {tuple(logits.shape)}")
        mean = experts.mean(dim=0)
        onehot = F.one_hot(target, experts.shape[-1]).to(experts.dtype)
        shift = onehot * (self.s * self.margins.to(experts.dtype)[target])[:, None]
        weight = None if self.class_weight is None else self.class_weight.to(experts.dtype)
        t, t_mean = self.temperature()
        if torch.is_tensor(t):
            t = t.to(experts.dtype)
        total = experts.new_zeros(())
        for z in experts:
            base_logits = mean if self.additional_diversity_factor == 0 else z
            total = total + self.base_loss_factor * F.cross_entropy(base_logits - shift, target, weight=weight)
            if self.additional_diversity_factor != 0:
                total = total + self.additional_diversity_factor * t_mean ** 2 * diversity_kl(z, mean, t)
        return total
