"""RSG: the rare-class sample generator (Wang, Lukasiewicz, Hu, Cai, Xu, "RSG: A Simple but
Effective Module for Learning Imbalanced Datasets", CVPR 2021), with any loss.

Official code read: Jianf-Wang/RSG, commit 3c5074511455428d81af89e1621493dcdb5db6ce
(`Imbalanced_Classification/models/RSG.py`, `models/resnet_cifar.py`, `cifar_train.py`). The module
and its loss terms are models/rsg.py; the network option is `model.params.rsg: true` on a CIFAR
ResNet (the module reads the layer2 maps, as the official `ResNet_s`).

One training step (official `train`), with epoch the 0-idx epoch:

    maps = layer2(...(x));  maps', L_cesc, L_mv, y' = RSG(maps, y, epoch)
    z = head(GAP(layer3(maps')))                   (B + G rows: G generated tail samples)
    L = L_cls(z, y') + 0.1 L_cesc + 0.01 L_mv       (L_cls: the configured loss, LDAM-DRW official)

- epoch <= epoch_thresh: L_cesc has the contrastive pair term; nothing is generated (L_mv = 0).
- epoch > epoch_thresh: generation (head -> tail variation transfer) and L_mv; no pair term.
  Official epoch_thresh 159 of 200 epochs (generation with DRW from epoch 160); default here
  round(0.8 * train.epochs) - 1 (159 of 200, 23 of 30).
- Head classes: the int(C * head_ratio) classes with the most training images (official
  `head_tail_ratio` 0.2 in cifar_train.py, the first int(C * 0.2) class indices, which are the
  largest classes of CIFAR-LT: the same classes there; ties here by class index).
- Training accuracy is scored on the B real samples only (the official scores all B + G).

Inference is the plain network: the model's forward never calls the module (`longtail eval`,
`predict`, `export`); the official drops the module from its checkpoints, here it stays in them
(resume needs it) and costs nothing at test time.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dist import context
from ..errors import ConfigError
from ..losses._checks import choice, integer, number
from ..models import Classifier
from ..models.rsg import VECTORS
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing


def head_classes(class_counts, head_ratio: float) -> np.ndarray:
    """Indices of the int(C * head_ratio) classes with the most training images (ties: lower index)."""
    counts = np.asarray(class_counts)
    k = int(len(counts) * head_ratio)
    return np.sort(np.argsort(-counts, kind="stable")[:k])


@METHODS.register("rsg")
class RSG(Method):
    """RSG (Wang et al., CVPR 2021): centre estimation + contrastive module, then rare-class samples
    generated from head-class variations, on the model's RSG module (`model.params.rsg: true`).

    Parameters (method.params):
        head_ratio: share of classes that are head classes (official 0.2), in (0, 1).
        transfer_strength: segments of head -> tail transfer per step (official 1.0), in (0, 1].
        epoch_thresh: last 0-idx epoch of the contrastive phase; generation after it. None:
            round(0.8 * train.epochs) - 1 (official 159 of 200).
        cesc_weight, mv_weight: weights of L_cesc and L_mv (official 0.1, 0.01), >= 0.
        vectors: rows of L_mv's norm / cosine terms, 'official' (C consecutive memory values) or
            'channel' (the C channels at a position).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'RSG: head / tail features split with boolean masks (models/rsg.py)',
    )

    def __init__(self, *, cfg, data, head_ratio: float = 0.2, transfer_strength: float = 1.0,
                 epoch_thresh: int | None = None, cesc_weight: float = 0.1, mv_weight: float = 0.01,
                 vectors: str = "official"):
        super().__init__(cfg=cfg, data=data)
        self.head_ratio = number("head_ratio", head_ratio, low=0, high=1, low_open=True, high_open=True)
        self.transfer_strength = number("transfer_strength", transfer_strength, low=0, high=1, low_open=True)
        thresh = round(0.8 * cfg.train.epochs) - 1 if epoch_thresh is None else epoch_thresh
        self.epoch_thresh = integer("epoch_thresh", thresh, low=-1)
        self.cesc_weight = number("cesc_weight", cesc_weight, low=0)
        self.mv_weight = number("mv_weight", mv_weight, low=0)
        self.vectors = choice("vectors", vectors, VECTORS)
        refuse_batch_mixing(cfg, "rsg", "RSG generates samples in feature space")
        if (cfg.model.params or {}).get("rsg") is not True:
            raise ValueError(f"needs the RSG module: set model.params.rsg: true (a CIFAR ResNet, e.g. resnet32; "
                             f"model is '{cfg.model.name}')")
        heads = head_classes(data.class_counts, self.head_ratio)
        if len(heads) == 0 or len(heads) == data.num_classes:
            raise ValueError(f"head_ratio {self.head_ratio:g} gives {len(heads)} head classes of "
                             f"{data.num_classes}; RSG needs both head and tail classes")
        self.heads = heads
        self._head_mask: torch.Tensor | None = None


    def build(self, services=None):
        if context().world_size > 1:  # checked where the run starts, with a one-line error
            raise ConfigError("method 'rsg' runs in one process only: its module's parameters enter a step's "
                              "graph twice (centre and contrastive terms), which DistributedDataParallel cannot "
                              "reduce; train it without torchrun")
        return super().build(services)

    def build_model(self) -> Classifier:
        model = super().build_model()
        if getattr(model, "rsg", None) is None or not callable(getattr(model, "rsg_pass", None)):
            raise ValueError(f"model '{self.cfg.model.name}' has no RSG module (model.params.rsg)")
        return model

    def head_mask(self, device) -> torch.Tensor:
        if self._head_mask is None or self._head_mask.device != torch.device(device):
            mask = torch.zeros(self.data.num_classes, dtype=torch.bool)
            mask[torch.from_numpy(self.heads)] = True
            self._head_mask = mask.to(device)
        return self._head_mask

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        generate = self._epoch > self.epoch_thresh
        out = {}

        def hook(maps):
            maps, out["cesc"], out["mv"], out["target"] = model.rsg(
                maps, target, head_mask=self.head_mask(target.device), contrastive=not generate, generate=generate,
                transfer_strength=self.transfer_strength, vectors=self.vectors)
            return maps

        with model.rsg_pass(hook):
            _, logits = forward(images)
        value = loss(logits, out["target"]) + self.cesc_weight * out["cesc"].float() \
            + self.mv_weight * out["mv"].float()
        n = images.shape[0]
        return StepResult(value, logits[:n], target)
