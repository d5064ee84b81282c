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

The classifier's rate is a parameter group at `lr_factor` x lr (optim/groups.py); the LWS
scales are a group at lr. (Before the optimizer had groups, a gradient hook on the classifier
emulated this: the same update in exact arithmetic; float rounding differs in the last bits.)

The stage-1 config is method state: saved in every stage-2 checkpoint, so a stage-2 run's
network rebuilds from its own folder once the stage-1 file is gone.
"""

from __future__ import annotations

import math

from torch import nn

from ..config import config_from_dict
from ..errors import CheckpointError, ConfigError, LongtailError
from ..models import Classifier
from ..models.heads import LWSHead
from ..registry import METHODS
from ..io import safe_torch_load
from ..optim import ParamGroup
from .base import Method, build_method


@METHODS.register("mislas")
class MiSLAS(Method):
    """MiSLAS stage 2: stage-1 classifier + LWS scales on a frozen backbone, optional shift-BN."""

    stage = 2

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
        self.stage1_config: dict | None = None  # the stage-1 run's config, once read (method state)

    def stage1_network(self) -> Classifier:
        """The stage-1 network, built by the stage-1 run's method: with the stage-1 weights when
        training; from the saved stage-1 config alone when a trained run is rebuilt."""
        if self.weights_from_checkpoint and self.stage1_config is not None:
            return self._stage1_architecture(self.stage1_config, source="the checkpoint's stage-1 config")
        state = safe_torch_load(self.stage1)
        if not isinstance(state, dict):
            raise CheckpointError(f"stage-1 checkpoint {self.stage1} does not hold a state_dict")
        saved = state.get("config")
        if isinstance(saved, dict):
            model = self._stage1_architecture(saved, source=f"stage-1 checkpoint {self.stage1}")
            self.stage1_config = saved
        else:  # a bare state_dict: the stage-2 config's model section describes it
            model = super().build_model()
        if self.weights_from_checkpoint:
            return model
        weights = state.get("model", state)
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"stage-1 checkpoint {self.stage1} does not fit model '{type(model).__name__}': "
                                  f"{str(err).splitlines()[0]}") from None
        return model

    def _stage1_architecture(self, saved: dict, *, source: str) -> Classifier:
        try:
            stage1_cfg = config_from_dict(saved)
        except ConfigError as err:
            raise CheckpointError(f"{source}: its saved config is not valid ({str(err).splitlines()[0]})") from None
        own, theirs = self.cfg.model, stage1_cfg.model
        if (own.name, own.head, own.params) != (theirs.name, theirs.head, theirs.params):
            raise ConfigError(f"config section 'model' ({own.name}, head {own.head}, params {own.params}) differs "
                              f"from the stage-1 run's ({theirs.name}, head {theirs.head}, params {theirs.params})")
        stage1_cfg.model.weights = None  # the stage-1 checkpoint holds every weight
        try:
            method = build_method(stage1_cfg, self.data)
            method.weights_from_checkpoint = True  # architecture only: weights are loaded by the caller
            return method.build_model()
        except LongtailError as err:
            raise CheckpointError(f"cannot rebuild the stage-1 network of {source}: {str(err).splitlines()[0]}") from None

    def build_model(self) -> Classifier:
        model = self.stage1_network()
        if not isinstance(model.head, nn.Linear):
            raise ConfigError("method 'mislas' needs a linear stage-1 head (model.head: linear)")
        model.reset_head(LWSHead(model.head))
        model.requires_grad_(False)
        model.head.requires_grad_(True)  # the classifier (from stage 1) and the scales
        return model

    def param_groups(self, model: Classifier) -> list[ParamGroup]:
        """The stage-1 classifier at lr_factor x lr, the LWS scales at lr."""
        linear = list(model.head.linear.parameters())
        scales = [p for p in model.head.parameters() if p.requires_grad and all(p is not q for q in linear)]
        if self.lr_factor == 1.0:
            return [ParamGroup("classifier", [*linear, *scales])]
        return [ParamGroup("classifier", linear, lr_scale=self.lr_factor), ParamGroup("scales", scales)]

    def set_train_mode(self, model: Classifier) -> None:
        if self.shift_bn:
            model.train()
        else:
            model.eval()
            model.head.train()

    def state_dict(self) -> dict:
        return {} if self.stage1_config is None else {"stage1_config": self.stage1_config}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("stage1_config")
        if isinstance(saved, dict):
            self.stage1_config = saved
