"""FSLwF stage 2 (Gidaris & Komodakis, "Dynamic Few-Shot Visual Learning without Forgetting", CVPR
2018) as a long-tail baseline: the few-shot (tail) classes' classifier weights are generated from
their training features by the attention-based weight generator, on a frozen stage-1 network.

Official code read: gidariss/FewShotWithoutForgetting at 0efdc78ceddf2395b5b0bef4f789f9d63c761b9b
(architectures/ClassifierWithFewShotGenerationModule.py, algorithms/FewShot.py, dataloader.py
`FewShotDataloader`, config/imagenet_ResNet10CosineClassifierWeightAttN*.py,
config/miniImageNet_*CosineClassifierGenWeightAttN*.py, algorithms/Algorithm.py LUT_lr). The head
is models/fslwf.py.

Long-tail reading (the official code is for the few-shot benchmarks; OLTR's paper and seed 004's
Places-LT table use FSLwF as a long-tail baseline):
- "novel" classes: those with fewer than `novel_below` training images (default 20: the few-shot
  split of the standard many / medium / few protocol); every other class is a base class. On
  CIFAR-10-LT (no class under 20) the shipped configs set novel_below 200: the three tail classes;
- stage 1 is a plain CE run; its linear classifier's rows (bias dropped) start the base weights of
  the cosine classifier (the official stage 1 trains the cosine classifier itself); scale 10, bias 0;
- the feature extractor is frozen in eval mode (the official stage 2: `feat_model` without
  optimiser, `.eval()`); everything in the head trains: base weights, scale, bias, query layer,
  keys, attention scale, phi_avg, phi_att (the official classifier optimiser holds them all);
- episodic training as `FewShotDataloader` in its train phase: each step draws `episode_novel`
  fake novel classes from the base classes (default: as many as there are real novel classes, at
  most all base classes but one; the official ImageNet config draws 250, the number of test novel
  classes), `exemplars` training images of each (default 5, the official N = 5 config) read and
  augmented by the loop's batch reader; their weights are generated attending over the remaining
  base classes, and the episode's logits are scored against [w_base of the other base classes,
  generated weights]; loss: cross-entropy over the episode's classes;
- the episode's test examples are the loop's batch restricted to base classes (a reading: the
  official samples 3 x n_novel test images uniformly over the base classes and 6 per fake novel
  class, separately from the exemplars; here a batch image may also be an exemplar);
- the loop's training accuracy is the full classifier's (base weights and the novel weights generated
  after the previous epoch, zero before the first) on the whole batch, not the episode's;
- after every epoch (so for validation, test and the checkpoint) the real novel classes' weights
  are generated from all their un-augmented training images, attending over all base classes.
Left out: the official ImageNet evaluation's novel prior (`softmax_with_novel_prior`, prior_m 0.8)
and the best-on-validation model selection. Single process only (a ConfigError under torchrun).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import BatchAugment
from ..dist import context
from ..errors import ConfigError
from ..losses._checks import integer, number
from ..models import Classifier
from ..models.fslwf import FewShotCosineHead
from ..registry import METHODS
from .base import Recipe, Services, StepResult, refuse_batch_mixing
from .decoupled import _FromStage1


@METHODS.register("fslwf")
class FSLwF(_FromStage1):
    """FSLwF's attention-based weight generator for the tail classes (module doc).

    Parameters: stage1, novel_below (20), episode_novel (null: min(#novel, #base - 1)),
    exemplars (5), scale_cls (10), scale_att (10).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'FSLwF: the batch split into base / novel rows on the host (numpy) and by boolean masks',
    )

    def __init__(self, *, cfg, data, stage1: str = "", novel_below: int = 20, episode_novel: int | None = None,
                 exemplars: int = 5, scale_cls: float = 10.0, scale_att: float = 10.0):
        super().__init__(cfg=cfg, data=data, stage1=stage1)
        self.novel_below = integer("novel_below", novel_below, low=1)
        counts = np.asarray(data.class_counts)
        self.novel_ids = np.flatnonzero(counts < self.novel_below)
        self.base_ids = np.flatnonzero(counts >= self.novel_below)
        if len(self.novel_ids) == 0 or len(self.base_ids) < 2:
            raise ValueError(f"novel_below {novel_below} must leave at least one novel class (fewer training "
                             f"images) and two base classes; class counts {counts.min()}..{counts.max()}")
        if episode_novel is None:
            episode_novel = min(len(self.novel_ids), len(self.base_ids) - 1)
        self.episode_novel = integer("episode_novel", episode_novel, low=1)
        if self.episode_novel >= len(self.base_ids):
            raise ValueError(f"episode_novel must be below the {len(self.base_ids)} base classes, got {episode_novel}")
        self.exemplars = integer("exemplars", exemplars, low=1)
        self.scale_cls = number("scale_cls", scale_cls, low=0, low_open=True)
        self.scale_att = number("scale_att", scale_att, low=0, low_open=True)
        if cfg.loss.name != "ce":
            raise ValueError(f"fslwf trains its episodes with cross-entropy: set loss.name: ce, got {cfg.loss.name!r}")
        refuse_batch_mixing(cfg, "fslwf", "its episodes score unmixed images")
        self._positions: list[np.ndarray] | None = None
        self._plain: BatchAugment | None = None

    def build(self, services: Services | None = None) -> Recipe:
        if context().world_size > 1:
            raise ConfigError("method 'fslwf' runs in one process only (its episodes are not sharded)")
        return super().build(services)

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        stage1_head = model.head
        if not isinstance(stage1_head, nn.Linear):
            raise ValueError("fslwf starts its base weights from a linear stage-1 head (model.head: linear)")
        head = FewShotCosineHead(model.num_features, self.data.num_classes,
                                 torch.from_numpy(np.isin(np.arange(self.data.num_classes), self.novel_ids)),
                                 scale_cls=self.scale_cls, scale_att=self.scale_att)
        if not self.weights_from_checkpoint:
            with torch.no_grad():
                head.weight_base.copy_(stage1_head.weight)
        model.requires_grad_(False)
        model.reset_head(head)
        return model

    def set_train_mode(self, model: Classifier) -> None:
        model.eval()  # frozen feature extractor in eval mode, as the official stage 2

    # -- reading training images
    def _class_positions(self) -> list[np.ndarray]:
        if self._positions is None:
            labels = np.asarray(self.data.train.labels)
            self._positions = [np.flatnonzero(labels == c) for c in range(self.data.num_classes)]
        return self._positions

    def _read_plain(self, positions: np.ndarray, device) -> torch.Tensor:
        """Un-augmented, normalised training images (the evaluation transform)."""
        if self._plain is None:
            self._plain = BatchAugment(mean=self.data.mean, std=self.data.std, device=device,
                                       channels_last=self.cfg.train.channels_last)
        return self._plain(torch.from_numpy(self.data.train.batch(positions)).to(device))

    def sample_episode(self, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(episode base classes, fake novel classes, exemplar positions, exemplar episode-novel index),
        drawn from `generator` (base classes only, as the official train-phase episodes)."""
        perm = torch.randperm(len(self.base_ids), generator=generator).numpy()
        fake = np.sort(self.base_ids[perm[:self.episode_novel]])
        kept = np.sort(self.base_ids[perm[self.episode_novel:]])
        positions, which = [], []
        for j, c in enumerate(fake):
            pos = self._class_positions()[c]
            pick = torch.randperm(len(pos), generator=generator)[:self.exemplars].numpy()
            positions.append(pos[np.sort(pick)])
            which.append(np.full(len(pick), j))
        return kept, fake, np.concatenate(positions), np.concatenate(which)

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        head: FewShotCosineHead = model.head
        kept, fake, positions, which = self.sample_episode(generator)
        if self.batches is not None:
            ex_images, _ = self.batches.fetch(positions, generator)
        else:
            ex_images = self._read_plain(positions, images.device)
        with torch.no_grad():
            pooled, full_logits = forward(torch.cat((images, ex_images.to(images.dtype))))
        test_feats, ex_feats = pooled[:len(images)].float(), pooled[len(images):].float()
        device = test_feats.device
        index = torch.full((self.data.num_classes,), -1, dtype=torch.long, device=device)
        index[torch.from_numpy(kept).to(device)] = torch.arange(len(kept), device=device)
        index[torch.from_numpy(fake).to(device)] = torch.arange(len(kept), len(kept) + len(fake), device=device)
        episode_target = index[target]
        keep = episode_target >= 0  # the batch's images of real novel classes are not in the episode
        onehot = F.one_hot(torch.from_numpy(which).to(device), len(fake)).float()
        novel_w = head.generate(ex_feats, onehot, torch.from_numpy(kept).to(device))
        weights = torch.cat((head.weight_base[torch.from_numpy(kept).to(device)], novel_w))
        logits = head.scores(test_feats[keep], weights)
        episode_target = episode_target[keep]
        value = F.cross_entropy(logits, episode_target) if len(episode_target) else head.scale_cls.sum() * 0.0
        # training accuracy: the full classifier (base weights, the last generated novel weights) on the batch
        return StepResult(value, full_logits[:len(images)].float(), target)

    @torch.no_grad()
    def generate_novel(self, model: Classifier, device) -> None:
        """The real novel classes' weights from all their un-augmented training images (eval mode)."""
        head: FewShotCosineHead = model.head
        model.eval()
        positions = np.concatenate([self._class_positions()[c] for c in self.novel_ids])
        which = np.concatenate([np.full(len(self._class_positions()[c]), j) for j, c in enumerate(self.novel_ids)])
        bs = self.cfg.train.eval_batch_size
        feats = torch.cat([model.forward_head(model.forward_features(self._read_plain(positions[s:s + bs], device)),
                                              pre_logits=True).float() for s in range(0, len(positions), bs)])
        onehot = F.one_hot(torch.from_numpy(which).to(feats.device), len(self.novel_ids)).float()
        weights = head.generate(feats, onehot, torch.from_numpy(self.base_ids).to(feats.device))
        head.novel_weight[torch.from_numpy(self.novel_ids).to(feats.device)] = weights.to(head.novel_weight)
        self.set_train_mode(model)

    def on_epoch_end(self, epoch: int, model: Classifier, device) -> None:
        super().on_epoch_end(epoch, model, device)
        self.generate_novel(model, device)
