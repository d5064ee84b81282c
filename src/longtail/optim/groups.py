"""Parameter groups: which parameters train, at what share of the learning rate, with what decay.

A method's recipe hands the engine a list of `ParamGroup`s; the optimizer gets one torch
parameter group per entry, carrying `lr_scale` (the group's learning rate is the schedule's
rate times `lr_scale`, every epoch) and its own `weight_decay` (None: the run's
`train.weight_decay`). MiSLAS's classifier at 0.5 x lr is such a group; weight balancing
needs per-group decay; `no_decay_split` keeps decay off BatchNorm / norm layers and biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ParamGroup:
    """params: the tensors of the group (requires_grad); name: for logs and errors."""

    name: str
    params: list = field(default_factory=list)
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def __post_init__(self):
        self.params = list(self.params)
        if not (isinstance(self.lr_scale, (int, float)) and self.lr_scale > 0):
            raise ValueError(f"parameter group '{self.name}': lr_scale must be > 0, got {self.lr_scale!r}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"parameter group '{self.name}': weight_decay must be >= 0, got {self.weight_decay!r}")


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def no_decay_split(group: ParamGroup, module: nn.Module) -> list[ParamGroup]:
    """`group` as two groups: its norm-layer parameters and biases without weight decay, the rest as is.

    A parameter is "no decay" when it belongs to a normalisation layer or is named `bias`
    (the convention of timm and most recent recipes). Empty groups are dropped.
    """
    skip: set[int] = set()
    for mod in module.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if isinstance(mod, _NORMS) or pname == "bias":
                skip.add(id(p))
    decay = [p for p in group.params if id(p) not in skip]
    rest = [p for p in group.params if id(p) in skip]
    out = [ParamGroup(group.name, decay, group.lr_scale, group.weight_decay),
           ParamGroup(f"{group.name} (no decay)", rest, group.lr_scale, 0.0)]
    return [g for g in out if g.params]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate := lr x its lr_scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
