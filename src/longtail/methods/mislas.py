"""MiSLAS stage 2 (Zhong et al., "Improving Calibration for Long-Tailed Recognition", CVPR 2021).

MiSLAS trains in two stages. Stage 1 is the standard recipe with mixup
(`train.mixup_alpha: 1.0` on CIFAR; configs/cifar10_lt/mislas_stage1.yaml). Stage 2 is
this method, as the official `train_stage2.py`:

- the stage-1 network with its classifier **initialised from stage 1** and trained, times
  learnable per-class LWS scales s (init 1): logits = s * (W f + b), s kept at test time
  (the `LWSHead`, here with a trainable linear layer);
- every other parameter frozen (not in the optimiser);
- `shift_bn` (BatchNorm shift learning): True puts the frozen backbone in train mode, so
  BN running statistics are re-estimated on the class-balanced stage-2 batches (affine
  parameters stay fixed); False keeps it in eval mode;
- classifier learning rate `lr_factor` x lr, LWS scales at lr (both with train.weight_decay);
- the loss and sampler are the config's: MiSLAS uses `label_aware_smoothing` and
  class-aware sampling with 4 per class, 10 epochs of cosine lr from 0.1.

Defaults `shift_bn: false`, `lr_factor: 0.5` are MiSLAS's CIFAR-10-LT ratio-100 setting
(CIFAR-100-LT ratio 100: true, 0.2; ImageNet-LT / iNat: true, 0.05).

The stage-1 network is rebuilt by the stage-1 run's own method from the config saved in
its checkpoint, so stage 2 works on any stage 1: plain or mixup runs, and LCReg runs,
whose latent-category module then belongs to the frozen feature extractor. The stage-2
config's `model` section must name the same backbone.

The loop has one learning rate for all parameters; `lr_factor` is applied exactly by a
gradient hook on the classifier's parameters: for SGD (momentum mu, weight decay wd,
optionally Nesterov) a group at lr' = k*lr is the same update as lr with the gradient
g + wd*p scaled by k, so the hook returns k*g + (k - 1)*wd*p and the optimiser adds wd*p.
"""

from __future__ import annotations

import math

from torch import nn

from ..config import config_from_dict
from ..errors import CheckpointError, ConfigError, LongtailError
from ..models import Classifier
from ..models.heads import LWSHead
from ..registry import METHODS
from ..train.checkpoint import safe_torch_load
from .base import Method


def scale_learning_rate(parameters, *, factor: float, weight_decay: float) -> list:
    """Make plain SGD update `parameters` as if their learning rate were `factor` x lr.

    Registers g -> factor*g + (factor - 1)*weight_decay*p on each parameter (see the module
    docstring). Returns the hook handles.
    """
    handles = []
    for p in parameters:
        def hook(grad, p=p):
            return factor * grad + (factor - 1.0) * weight_decay * p.detach()

        handles.append(p.register_hook(hook))
    return handles


@METHODS.register("mislas")
class MiSLAS(Method):
    """MiSLAS stage 2: stage-1 classifier + LWS scales on a frozen backbone, optional shift-BN."""

    def __init__(self, *, cfg, data, stage1: str = "", shift_bn: bool = False, lr_factor: float = 0.5):
        super().__init__(cfg=cfg, data=data)
        if not isinstance(stage1, str) or not stage1:
            raise ConfigError("method 'mislas' needs method.params.stage1, the path of a stage-1 checkpoint")
        if not isinstance(shift_bn, bool):
            raise ConfigError(f"method.params.shift_bn must be true or false, got {shift_bn!r}")
        if not (isinstance(lr_factor, (int, float)) and not isinstance(lr_factor, bool) and math.isfinite(lr_factor)
                and lr_factor > 0):
            raise ConfigError(f"method.params.lr_factor must be a number > 0, got {lr_factor!r}")
        self.stage1, self.shift_bn, self.lr_factor = stage1, shift_bn, float(lr_factor)
        self._hooked: set[int] = set()

    def stage1_network(self) -> Classifier:
        """The stage-1 network with its weights, built by the stage-1 run's method."""
        state = safe_torch_load(self.stage1)
        if not isinstance(state, dict):
            raise CheckpointError(f"stage-1 checkpoint {self.stage1} does not hold a state_dict")
        saved = state.get("config")
        if isinstance(saved, dict):
            try:
                stage1_cfg = config_from_dict(saved)
            except ConfigError as err:
                raise CheckpointError(f"stage-1 checkpoint {self.stage1}: its saved config is not valid "
                                      f"({str(err).splitlines()[0]})") from None
            own, theirs = self.cfg.model, stage1_cfg.model
            if (own.name, own.head, own.params) != (theirs.name, theirs.head, theirs.params):
                raise ConfigError(f"config section 'model' ({own.name}, head {own.head}, params {own.params}) differs "
                                  f"from the stage-1 run's ({theirs.name}, head {theirs.head}, params {theirs.params})")
            stage1_cfg.model.weights = None  # the checkpoint holds every weight
            from . import build_method

            try:
                model = build_method(stage1_cfg, self.data).build_model()
            except LongtailError as err:
                raise CheckpointError(f"cannot rebuild the stage-1 network of {self.stage1}: "
                                      f"{str(err).splitlines()[0]}") from None
        else:  # a bare state_dict: the stage-2 config's model section describes it
            model = super().build_model()
        weights = state.get("model", state)
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"stage-1 checkpoint {self.stage1} does not fit model '{type(model).__name__}': "
                                  f"{str(err).splitlines()[0]}") from None
        return model

    def build_model(self) -> Classifier:
        model = self.stage1_network()
        if not isinstance(model.head, nn.Linear):
            raise ConfigError("method 'mislas' needs a linear stage-1 head (model.head: linear)")
        model.reset_head(LWSHead(model.head))
        model.requires_grad_(False)
        model.head.requires_grad_(True)  # the classifier (from stage 1) and the scales
        return model

    def parameters(self, model: Classifier):
        if self.lr_factor != 1.0 and id(model) not in self._hooked:
            scale_learning_rate(model.head.linear.parameters(), factor=self.lr_factor,
                                weight_decay=self.cfg.train.weight_decay)
            self._hooked.add(id(model))
        return [p for p in model.parameters() if p.requires_grad]

    def set_train_mode(self, model: Classifier) -> None:
        if self.shift_bn:
            model.train()
        else:
            model.eval()
            model.head.train()
