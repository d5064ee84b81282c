"""SSP: rotation self-supervised pre-training (Gidaris et al., ICLR 2018), as used for
long-tailed recognition by Yang & Xu (NeurIPS 2020, `imbalanced-semi-self`) and by the
unified-perspective paper (seed 000, Sec. 5.2, Table 1: "CE + SSP", "+ SSP + RS / RW / DRW").

Pre-training (this method, `method.name: ssp`) runs on the long-tailed training images with
their class labels unused: every image gets **one** rotation k * 90 degrees, k in {0, 1, 2, 3},
and a 4-way linear head is trained with plain cross-entropy to predict k. The rotation is
applied after the usual crop / flip / normalisation, as `pretrain_rot.py`.

Fine-tuning is a separate, ordinary run of any method / loss / sampler / schedule that names
the pre-training checkpoint in `model.weights`; `longtail.models.load_weights` loads every
backbone tensor and never the rotation head (the checkpoint declares it, see `state_dict`), so
the fine-tuning head keeps its fresh initialisation, as the official `train.py` (which skips
keys containing 'linear' / 'fc'). The whole network is then trained; nothing is frozen.

Readings chosen:
- Balanced labels. The official `rotation()` permutes [0, 1, 2, 3] * (B // 4 + 1) and keeps the
  first B, so a batch is only roughly balanced (B = 128: between 29 and 33 per rotation).
  Here a batch of B holds exactly B // 4 of each rotation, plus one more for B % 4 rotations
  drawn at random (the fact sheet's "exactly balanced" reading); positions are shuffled.
  Labels come from the loop's (seed, epoch) generator, so resumed runs stay exact. Under
  torchrun each process balances its own shard.
- Evaluation is deterministic: every validation / test image in all four rotations (4 N
  predictions), scored with the library's metrics over the 4 rotation "classes" (eval.json
  top1 = rotation accuracy, per_class = per rotation, confusion 4 x 4); `rotation_per_class`
  adds the rotation accuracy of each real class's images (class labels used for reporting
  only). The official script scores one random rotation per test image.
- What the pretext task does not use is refused rather than ignored: `loss` must be plain
  `ce`, `reweight.scheme` none, `train.mixup_alpha` and `train.cutmix_alpha` 0, `model.head`
  linear. Any sampler is allowed (the official script accepts its re-sampler during
  pre-training).
- Images must be square (a 90 degree rotation of an H x W image is W x H).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.augment import BatchAugment
from ..errors import ConfigError
from ..eval.metrics import compute_metrics
from ..losses import Loss, build_loss
from ..models import Classifier, build_model, load_weights
from ..registry import METHODS
from .base import Method, StepResult

NUM_ROTATIONS = 4
ROTATION_NAMES = ("0 deg", "90 deg", "180 deg", "270 deg")


def balanced_rotation_labels(batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64 rotation labels in {0, 1, 2, 3}: B // 4 of each, plus one more for B % 4
    rotations drawn at random, in a random order (exactly B / 4 each when 4 divides B)."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    extra = torch.randperm(NUM_ROTATIONS, generator=generator)[: batch_size % NUM_ROTATIONS]
    labels = torch.cat([torch.arange(NUM_ROTATIONS).repeat(batch_size // NUM_ROTATIONS), extra])
    return labels[torch.randperm(batch_size, generator=generator)]


def rotate_batch(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Image i rotated by rotations[i] * 90 degrees: `torch.rot90(img, k, dims=(H, W))`, as the
    official `torch.rot90(img, k, [1, 2])` on (C, H, W) (counter-clockwise for k = 1).

    Args:
        images: (B, C, H, W) with H == W (any memory format; kept).
        rotations: (B,) integers in {0, 1, 2, 3}.
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"rotations need square (B, C, H, H) images, got shape {tuple(images.shape)}")
    rotations = rotations.to(images.device)
    out = images.clone()
    for k in range(1, NUM_ROTATIONS):
        idx = (rotations == k).nonzero().squeeze(1)
        if len(idx):
            out[idx] = torch.rot90(images[idx], k, dims=(2, 3))
    return out


@torch.no_grad()
def rotation_predictions(model: torch.nn.Module, split, *, mean, std, batch_size: int = 100,
                         device: str | torch.device = "cpu", channels_last: bool = False) -> dict[str, np.ndarray]:
    """Every image of `split` in all four rotations, in eval mode.

    Returns logits (4N, 4) float32, rotation labels (4N,), and the images' class labels (4N,);
    rows are image-major (image 0 at 0, 90, 180, 270 degrees, then image 1, ...).
    """
    model.eval()
    transform = BatchAugment(mean=mean, std=std, device=device, channels_last=channels_last)
    logits = []
    for start in range(0, len(split), batch_size):
        pos = np.arange(start, min(start + batch_size, len(split)))
        images = transform(torch.from_numpy(split.batch(pos)).to(device))
        per_k = []
        for k in range(NUM_ROTATIONS):
            rotated = torch.rot90(images, k, dims=(2, 3))
            if channels_last:
                rotated = rotated.contiguous(memory_format=torch.channels_last)
            per_k.append(model(rotated).float().cpu())
        logits.append(torch.stack(per_k, dim=1).reshape(-1, NUM_ROTATIONS))
    n = len(split)
    return {"logits": torch.cat(logits).numpy() if logits else np.zeros((0, NUM_ROTATIONS), np.float32),
            "labels": np.tile(np.arange(NUM_ROTATIONS), n),
            "class_labels": np.repeat(np.asarray(split.labels, dtype=np.int64), NUM_ROTATIONS)}


@METHODS.register("ssp")
class RotationPretraining(Method):
    """SSP: rotation self-supervised pre-training (4-way head); fine-tune via model.weights."""

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "SSP: the rotated images' rows found with nonzero (methods/ssp.py)",
    )

    pretext = "rotation"

    def __init__(self, *, cfg, data):
        super().__init__(cfg=cfg, data=data)

        def refuse(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"method 'ssp' pre-trains a 4-way rotation head with plain cross-entropy: {what} "
                                  "(losses, re-weighting and heads of the zoo belong to the fine-tuning run, "
                                  "docs/ssp.md)")

        params = f" with params {cfg.loss.params}" if cfg.loss.params else ""
        refuse(cfg.loss.name == "ce" and not cfg.loss.params,
               f"set loss.name ce without params, got '{cfg.loss.name}'{params}")
        refuse(cfg.reweight.scheme == "none", f"set reweight.scheme none, got '{cfg.reweight.scheme}'")
        refuse(cfg.train.mixup_alpha == 0, f"set train.mixup_alpha 0, got {cfg.train.mixup_alpha}")
        refuse(cfg.train.cutmix_alpha == 0, f"set train.cutmix_alpha 0, got {cfg.train.cutmix_alpha}")
        refuse(cfg.model.head == "linear", f"set model.head linear, got '{cfg.model.head}'")
        h, w = data.image_shape
        if h != w:
            raise ConfigError(f"method 'ssp' rotates images by 90 degrees and needs square images, got {h}x{w}: "
                              "set data.image_size")
        self._head_keys: list[str] | None = None  # the rotation head's state_dict keys, set by build_model

    def build_model(self) -> Classifier:
        m = self.cfg.model
        model = build_model(m.name, num_classes=NUM_ROTATIONS, in_channels=self.data.channels, head="linear",
                            params=m.params)
        if m.weights and not self.weights_from_checkpoint:
            load_weights(model, m.weights)
        self._head_keys = sorted(k for k in model.state_dict() if k.startswith(f"{model.head_name}."))
        return model

    def build_loss(self) -> Loss:
        return build_loss("ce", {}, class_counts=self.rotation_counts())

    def rotation_counts(self) -> np.ndarray:
        """Training images per rotation in one epoch: N / 4 each (balanced batches)."""
        n = len(self.data.train)
        return np.array([n // NUM_ROTATIONS + (k < n % NUM_ROTATIONS) for k in range(NUM_ROTATIONS)])

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss: Loss,
                      generator: torch.Generator) -> StepResult:
        """CE of the rotation logits (B, 4); training accuracy is scored against the rotations,
        not the class labels."""
        rotations = balanced_rotation_labels(images.shape[0], generator=generator).to(images.device)
        logits = forward(rotate_batch(images, rotations))[1]
        return StepResult(loss(logits, rotations), logits, rotations)

    def evaluate(self, model: Classifier, split, *, mean, std, batch_size: int, device, channels_last: bool,
                 **metric_kw) -> tuple[dict, dict]:
        """Rotation metrics of `split` (module docstring) and the arrays for predictions.npz."""
        out = rotation_predictions(model, split, mean=mean, std=std, batch_size=batch_size, device=device,
                                   channels_last=channels_last)
        metric_kw = {k: v for k, v in metric_kw.items() if k != "class_names"}
        metrics = compute_metrics(out["logits"], out["labels"], self.rotation_counts(),
                                  class_names=list(ROTATION_NAMES), **metric_kw)
        correct = out["logits"].argmax(1) == out["labels"]
        per_class = []
        for c in range(self.data.num_classes):
            mask = out["class_labels"] == c
            per_class.append(float(correct[mask].mean() * 100) if mask.any() else None)
        metrics.update({
            "task": "rotation",
            "rotation_per_class": {"class_names": list(self.data.class_names),
                                   "train_counts": [int(v) for v in self.data.class_counts],
                                   "top1": per_class},
        })
        return metrics, {"logits": out["logits"], "labels": out["labels"], "class_labels": out["class_labels"]}

    def state_dict(self) -> dict:
        """Saved in every checkpoint: declares the rotation head, which fine-tuning never loads."""
        if self._head_keys is None:
            self.build_model()
        return {"pretext": "rotation", "pretext_head": list(self._head_keys)}
