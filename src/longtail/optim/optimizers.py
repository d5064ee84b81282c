"""The optimizer registry: `sgd` (momentum, optional Nesterov) and `adamw`.

A builder takes the parameter groups and the run's base rate and decay, keyword-only, plus
its own parameters from the config's `optimizer.params`; unknown parameters are refused by
the registry with the allowed names.
"""

from __future__ import annotations

import math

import torch

from ..registry import Registry
from .groups import ParamGroup

OPTIMIZERS = Registry("optimizer")


def _torch_groups(groups: list[ParamGroup], *, lr: float, weight_decay: float) -> list[dict]:
    out = []
    for g in groups:
        if not g.params:
            continue
        wd = weight_decay if g.weight_decay is None else g.weight_decay
        out.append({"params": g.params, "lr": lr * g.lr_scale, "lr_scale": g.lr_scale, "weight_decay": wd,
                    "name": g.name})
    if not out:
        raise ValueError("no parameter to train: every parameter group is empty")
    return out


@OPTIMIZERS.register("sgd")
def sgd(groups: list[ParamGroup], *, lr: float, weight_decay: float, momentum: float = 0.9,
        nesterov: bool = False, dampening: float = 0.0, fused: bool | None = None) -> torch.optim.SGD:
    """SGD with momentum (torch.optim.SGD: buf = mu buf + (g + wd p); p -= lr buf), optional Nesterov.
    `fused` (optimizer.params.fused): torch's fused kernel, one launch per step for all parameters
    (the same update, rounded in another order); None: torch's default (foreach on CUDA)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be true or false, got {nesterov!r}")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be true or false, got {fused!r}")
    return torch.optim.SGD(_torch_groups(groups, lr=lr, weight_decay=weight_decay), lr=lr, momentum=momentum,
                           weight_decay=weight_decay, nesterov=nesterov, dampening=dampening, fused=fused)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[ParamGroup], *, lr: float, weight_decay: float, betas: list | tuple = (0.9, 0.999),
          eps: float = 1e-8, amsgrad: bool = False) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, ICLR 2019): decoupled weight decay p -= lr wd p."""
    if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    return torch.optim.AdamW(_torch_groups(groups, lr=lr, weight_decay=weight_decay), lr=lr,
                             betas=tuple(float(b) for b in betas), eps=float(eps), weight_decay=weight_decay,
                             amsgrad=amsgrad)


def build_optimizer(name: str, groups: list[ParamGroup], *, lr: float, weight_decay: float,
                    params: dict | None = None) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(name, groups=groups, lr=lr, weight_decay=weight_decay, **(params or {}))
