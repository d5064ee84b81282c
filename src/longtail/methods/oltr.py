"""OLTR stage 2 (Liu, Miao, Zhan, Wang, Gong, Yu, "Large-Scale Long-Tailed Recognition in an Open
World", CVPR 2019), its closed-set part, on a stage-1 checkpoint (`method.params.stage1`).

Official code read: zhmiao/OpenLongTailRecognition-OLTR at f50e375f123fd12dd0ae39e07aa226fadec32f33
(run_networks.py, config/ImageNet_LT/stage_2_meta_embedding.py, config/Places_LT/
stage_2_meta_embedding.py, models/MetaEmbeddingClassifier.py, models/CosNormClassifier.py,
models/ResNetFeature.py, layers/ModulatedAttLayer.py, loss/DiscCentroidsLoss.py). The network
pieces are in models/oltr.py, the centroid loss in losses/disc_centroids.py.

What stage 2 does, as the official ImageNet-LT config:
- the stage-1 backbone is loaded; the modulated attention is added on its last feature map (the
  identity at initialisation), then the new `fc_add` (Linear D -> D + ReLU, random init; `fc_dim`)
  after pooling; the whole feature model trains (`freeze_backbone: true` is the Places-LT recipe:
  only the attention and fc_add train there);
- the classifier becomes the meta-embedding head; its hallucinator starts from the stage-1 linear
  classifier (weight and bias, `hallucinator_init: stage1`), the selector and the cosine classifier
  are new;
- the memory (centroids) is computed before the first step as the per-class mean of the direct
  features of the un-augmented training images in eval mode through the stage-2 network (the
  official `centroids_cal(train_plain)`), then trained as a parameter by the centroid loss only (its
  own lr, `centroid_lr_scale`); the head reads it detached;
- loss = config loss (CE) on the logits + feature_weight (0.01) * discriminative centroid loss on
  the direct features (attract + 0.01 * repel, margin 10; the official hand-written centroid
  gradient by default);
- learning rates as parameter groups: feature model lr x feature_lr_scale (official 0.01 of the
  classifier's 0.1), classifier lr x 1, centroids lr x centroid_lr_scale (official 0.01); weight
  decay 5e-4 everywhere (train.weight_decay), SGD momentum 0.9, class-aware sampling 4 per class;
  the whole network in train mode (BatchNorm statistics follow the stage-2 batches).

Left out: the open-set part (reachability-based rejection, the official `open_threshold` 0.1 on the
top softmax probability) and the best-on-validation checkpoint the official keeps (the last epoch
is reported here; validation selects nothing).
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses._checks import choice, number
from ..losses.disc_centroids import CENTROID_GRADS, disc_centroids_loss
from ..models import Classifier
from ..models.oltr import OLTRNetwork
from ..optim import ParamGroup
from ..registry import METHODS
from .base import ClassMeanCentroids, StepResult, refuse_batch_mixing
from .decoupled import _FromStage1

HALLUCINATOR_INITS = ("stage1", "random")


@METHODS.register("oltr")
class OLTR(ClassMeanCentroids, _FromStage1):
    """OLTR's dynamic meta-embedding stage on a stage-1 CE checkpoint (module doc).

    Parameters: stage1, feature_weight (0.01), repel_weight (0.01), margin (10), centroid_grad
    ('official' | 'autograd'), reachability_scale (10), cosine_scale (16), attention (True),
    fc_add (True; fc_dim: its width, default the backbone's D), freeze_backbone (False),
    hallucinator_init ('stage1' | 'random'), feature_lr_scale (0.1), centroid_lr_scale (0.1).
    """

    rebalancing = True

    def __init__(self, *, cfg, data, stage1: str = "", feature_weight: float = 0.01, repel_weight: float = 0.01,
                 margin: float = 10.0, centroid_grad: str = "official", reachability_scale: float = 10.0,
                 cosine_scale: float = 16.0, attention: bool = True, fc_add: bool = True, fc_dim: int | None = None,
                 freeze_backbone: bool = False, hallucinator_init: str = "stage1", feature_lr_scale: float = 0.1,
                 centroid_lr_scale: float = 0.1):
        super().__init__(cfg=cfg, data=data, stage1=stage1)
        self.feature_weight = number("feature_weight", feature_weight, low=0)
        self.repel_weight = number("repel_weight", repel_weight, low=0)
        self.margin = number("margin", margin, low=0)
        self.centroid_grad = choice("centroid_grad", centroid_grad, CENTROID_GRADS)
        self.reachability_scale = number("reachability_scale", reachability_scale, low=0, low_open=True)
        self.cosine_scale = number("cosine_scale", cosine_scale, low=0, low_open=True)
        for name, value in (("attention", attention), ("fc_add", fc_add), ("freeze_backbone", freeze_backbone)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if fc_dim is not None and (not isinstance(fc_dim, int) or isinstance(fc_dim, bool) or fc_dim < 1):
            raise ValueError(f"fc_dim must be a positive integer or null, got {fc_dim!r}")
        refuse_batch_mixing(cfg, "oltr", "its centroid loss needs one label per image")
        self.attention, self.fc_add, self.fc_dim, self.freeze_backbone = attention, fc_add, fc_dim, freeze_backbone
        self.hallucinator_init = choice("hallucinator_init", hallucinator_init, HALLUCINATOR_INITS)
        self.feature_lr_scale = number("feature_lr_scale", feature_lr_scale, low=0, low_open=True)
        self.centroid_lr_scale = number("centroid_lr_scale", centroid_lr_scale, low=0, low_open=True)

    def build_model(self) -> Classifier:
        backbone = self.stage1_model()
        stage1_head = backbone.head
        d = backbone.num_features
        fc_dim = (self.fc_dim or d) if self.fc_add else None
        if self.hallucinator_init == "stage1" and not self.weights_from_checkpoint:
            if not isinstance(stage1_head, nn.Linear):
                raise ValueError("hallucinator_init 'stage1' needs a linear stage-1 head (model.head: linear); "
                                 "set hallucinator_init: random")
            if (fc_dim or d) != d:
                raise ValueError(f"hallucinator_init 'stage1' needs fc_dim = the backbone's {d} features, got {fc_dim}")
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():  # the last map's size, for the attention's spatial layer
            probe = torch.zeros(1, self.data.channels, *self.data.image_shape)
            map_size = tuple(backbone.forward_features(probe).shape[2:])
        backbone.train(was_training)
        model = OLTRNetwork(backbone, num_classes=self.data.num_classes, map_size=map_size, attention=self.attention,
                            fc_dim=fc_dim, reachability_scale=self.reachability_scale, cosine_scale=self.cosine_scale)
        if self.hallucinator_init == "stage1" and not self.weights_from_checkpoint:
            with torch.no_grad():
                model.fc.hallucinator.weight.copy_(stage1_head.weight)
                model.fc.hallucinator.bias.copy_(stage1_head.bias)
        if self.freeze_backbone:
            model.backbone.requires_grad_(False)
        return model

    def param_groups(self, model: Classifier) -> list[ParamGroup]:
        head = model.head
        feature = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.requires_grad]
        classifier = [p for n, p in head.named_parameters() if n != "centroids"]
        return [ParamGroup("features", feature, lr_scale=self.feature_lr_scale),
                ParamGroup("classifier", classifier),
                ParamGroup("centroids", [head.centroids], lr_scale=self.centroid_lr_scale)]

    def centroid_buffers(self, model: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory (C, D): the head's centroids parameter (trained by the centroid loss after
        its class-mean initialisation), and its ready flag."""
        return model.head.centroids, model.head.centroids_ready

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        self.ensure_centroids(model, images.device)
        features, logits = forward(images)
        total = loss(logits, target)
        if self.feature_weight:
            total = total + self.feature_weight * disc_centroids_loss(
                features.float(), target, model.head.centroids, margin=self.margin, repel_weight=self.repel_weight,
                centroid_grad=self.centroid_grad)
        return StepResult(total, logits, target)
