"""DisAlign (Zhang, Li, Yan, He, Sun, "Distribution Alignment: A Unified Framework for Long-tail
Visual Recognition", CVPR 2021), its classification part.

Official code read: Megvii-BaseDetection/DisAlign at a2fc3500a108cb83e3942293a5675c97ab3a2c6e
(`classification/imagenetlt/resnext50/resx50.scratch.imagenet_lt.224size.90e.disalign.10e/
{config,net}.py`) and the layers it imports from Megvii-BaseDetection/cvpods at
2deea5dc659371318c8a570c644201d913a83027 (`DisAlignLinear` in `cvpods/layers/wrappers.py`,
`GRWCrossEntropyLoss` in `cvpods/modeling/losses/grw_loss.py`).

Stage 2 on a stage-1 checkpoint (`method.params.stage1`), like cRT / LWS in decoupled.py:

- the stage-1 network is loaded whole; every backbone parameter and the stage-1 classifier
  (weight and bias) are frozen, as `net.py` sets requires_grad False on all of them;
- the classifier becomes `DisAlignHead` (models/disalign_head.py): z_hat = (1 + sigma(x) alpha) z
  + sigma(x) beta with sigma(x) = sigmoid(v^T x + b); only alpha, beta, v and b train;
- the loss is the config's loss; DisAlign's is the generalized re-weighting loss `grw`
  (losses/grw.py, rho = 1.2 in the official ImageNet-LT config), which the shipped configs set.
  With `loss: ce` this is the paper's "calibration without G-RW" ablation;
- the sampler is the config's (the official stage 2 samples instances, as stage 1);
- `retrain_bn_stats` (default True): the official trainer leaves the network in train mode,
  so the frozen backbone's BatchNorm running statistics follow the stage-2 batches; False
  keeps the stage-1 statistics (backbone in eval mode);
- official schedule (ImageNet-LT, after 90 stage-1 epochs): 10 epochs, cosine lr from 0.1 at
  batch 256 without warm-up, weight decay 5e-4 on every trained parameter, SGD momentum 0.9.

Inference is the calibrated head's output (no prior correction): `rebalancing = True`.
A stage-2 method trains nothing like plain CE, so `plain_ce_epochs()` stays 0.
"""

from __future__ import annotations

from ..losses._checks import number
from ..models import Classifier
from ..models.disalign_head import DisAlignHead
from ..registry import METHODS
from .decoupled import _FrozenBackbone


@METHODS.register("disalign")
class DisAlign(_FrozenBackbone):
    """DisAlign stage 2: adaptive calibration head on the frozen stage-1 network (see module doc).

    Parameters: stage1 (path of the stage-1 checkpoint), retrain_bn_stats (bool, default True),
    scale_init (initial alpha, default 1.0 as the official code; 0 starts at the stage-1 logits),
    confidence_init (initial entries of v, default 0.1 as the official code).
    """

    rebalancing = True

    def __init__(self, *, cfg, data, stage1: str = "", retrain_bn_stats: bool = True, scale_init: float = 1.0,
                 confidence_init: float = 0.1):
        super().__init__(cfg=cfg, data=data, stage1=stage1, retrain_bn_stats=retrain_bn_stats)
        self.scale_init = number("scale_init", scale_init)
        self.confidence_init = number("confidence_init", confidence_init)

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        model.reset_head(DisAlignHead(model.head, in_features=model.num_features, num_classes=self.data.num_classes,
                                      scale_init=self.scale_init, confidence_init=self.confidence_init))
        model = self.freeze(model)  # everything frozen, then the head trainable ...
        model.head.base.requires_grad_(False)  # ... except the stage-1 classifier inside it
        return model
