"""Weight balancing, stage 2 (Alshammari, Wang, Ramanan, Kong, CVPR 2022).

The recipe is two stages (Sec. 4, "a simple approach"): (1) learn features with plain
cross-entropy and a tuned weight decay (configs/cifar10_lt/wb_stage1.yaml: the `standard`
method with train.weight_decay 5e-3); (2) re-train the classifier on the frozen features with
the class-balanced loss, weight decay and the MaxNorm constraint (this method with
configs/cifar10_lt/wb.yaml: `loss: cb_softmax_bce`, train.weight_decay 0.1,
`constraint: {name: max_norm, params: {thresh: 0.1}}`).

Official code: ShadeAlsha/LTR-weight-balancing @ e89f29273d35bb02d58204e7e450a390920c264d,
`demo2_second-stage-training.py` ("Finetune with MaxNorm and Weight Decay"). Readings:

- the stage-1 classifier is **fine-tuned**, not re-initialised (`copy.deepcopy(base_model)`):
  unlike cRT, the head keeps its stage-1 weight and bias;
- only the classifier's weight and bias train (`requires_grad` False elsewhere, the optimiser
  holds only them), but the whole network stays in `.train()` (`train_model` calls
  `model.train()`), so the frozen backbone's BatchNorm running statistics keep updating on
  the stage-2 batches: `retrain_bn_stats: true` (default; false keeps them, backbone in eval);
- the MaxNorm radius is relative to the stage-1 classifier's row norms and fixed before
  stage 2 starts (`setPerLayerThresh` on the stage-1 model): our constraint is built from the
  model `build_model` returns, i.e. the stage-1 weights (optim/constraints.py);
- the official selects the best stage-1 and stage-2 epochs **on the test set**
  (`train_model` keeps the best test accuracy); this package never does: it starts stage 2
  from the stage-1 run's last.pt and reports the last epoch and the best-on-validation epoch.

Shapes: the network's logits (B, C) as in stage 1; inference is the fine-tuned linear head.
"""

from __future__ import annotations

from ..models import Classifier
from ..registry import METHODS
from .decoupled import _FrozenBackbone


@METHODS.register("weight_balancing")
class WeightBalancing(_FrozenBackbone):
    """Weight balancing stage 2: fine-tune the stage-1 head on a frozen backbone (Alshammari et al. 2022).

    Parameters: `stage1` (path of the stage-1 checkpoint), `retrain_bn_stats` (True, as the
    official code). Loss, weight decay and the MaxNorm constraint come from the config's `loss`,
    `train.weight_decay` and `constraint` sections.
    """

    def build_model(self) -> Classifier:
        return self.freeze(self.stage1_model())
