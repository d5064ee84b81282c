"""SWRM and DySWRM (seed 001): two-stage training, plain cross-entropy first, then the SWRM
loss (Eq. 4) for the last part of training, like DRW (paper Sec. 4.2: the last 60 of 200
CIFAR epochs, from the first LR decay).

Both need `loss.name: swrm` (its params hold window W, beta, edge, reduction); before the
switch the loss has w = 1, m = 0, i.e. it is cross-entropy.

- ``swrm``: at the first step of 0-idx epoch `start_epoch` the category similarity is
  modelled once (Sec. 3.2): class prototypes of the training images, their 1-D t-SNE
  projection (seed train.seed), windows, weights and margins (`longtail.similarity`). The
  similarity model is this run's own network at that moment (its CE stage 1), or the last
  checkpoint of another run, `similarity_run` (a run folder; its cached features are
  used). `similarity: projection` (default) takes sim(i, c) from the projection,
  `cosine` from the prototypes' cosine similarity. The projection (and similarity matrix)
  are method state, the weights and margins loss state: both are saved in every
  checkpoint, so a resumed run continues with the same ones; a run resumed before the
  switch computes them at the switch from the same weights, hence identically.
- ``dyswrm``: a learnable similarity vector of C parameters replaces the projection. It is
  an nn.Parameter of the SWRM loss (saved with the loss state in checkpoints; evaluation
  and exported models never see it), initialised N(0, init_std^2) from train.seed, and
  handed to the optimiser with the model's parameters (same SGD, LR schedule, momentum and
  weight decay). From `start_epoch` on, every step recomputes order, windows, weights and
  margins from it; the gradient of the SWRM loss reaches it through the margins only
  (docs/swrm.md). Before the switch it gets no gradient and does not move.

`start_epoch` defaults to the first milestone of the step LR schedule (the paper's and
DRW's switch point).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import ConfigError
from ..eval.predict import predict
from ..losses.swrm import SWRMLoss
from ..models import Classifier
from ..optim import ParamGroup
from ..registry import METHODS
from ..rundir import RunDir
from ..similarity.projection import prototypes_from_features, tsne_projection
from ..similarity.windows import SIMILARITIES, cosine_similarity_from_prototypes
from .base import Method

log = logging.getLogger(__name__)


class _TwoStage(Method):
    def __init__(self, *, cfg, data, start_epoch: int | None = None):
        super().__init__(cfg=cfg, data=data)
        name, t = cfg.method.name, cfg.train
        if start_epoch is None:
            if t.lr_schedule != "step" or not t.milestones:
                raise ConfigError(f"method '{name}' needs method.params.start_epoch (no step LR milestone to "
                                  "default to)")
            start_epoch = int(t.milestones[0])
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or not 0 <= start_epoch < t.epochs:
            raise ConfigError(f"method.params.start_epoch must be an integer in [0, train.epochs = {t.epochs}), "
                              f"got {start_epoch!r}")
        self.start_epoch = start_epoch
        self._loss: SWRMLoss | None = None

    def plain_ce_epochs(self) -> float:
        """Plain CE before `start_epoch` (the SWRM loss is off, no similarity yet)."""
        return 0 if self.cfg.train.mixup_alpha > 0 else min(self.start_epoch, self._unweighted_epochs())

    def build_loss(self) -> SWRMLoss:
        if self.cfg.loss.name != "swrm":
            raise ConfigError(f"method '{self.cfg.method.name}' needs loss.name: swrm, got '{self.cfg.loss.name}'")
        loss = super().build_loss()
        if loss.swr_weight.ne(1).any() or loss.swm_margin.ne(0).any():
            raise ConfigError(f"method '{self.cfg.method.name}' computes the similarity itself; "
                              "remove loss.params.projection / similarity")
        self._loss = loss
        return loss


@METHODS.register("swrm")
class SWRM(_TwoStage):
    """SWRM: CE, then the SWRM loss with similarity from t-SNE of class prototypes (two-stage)."""

    def __init__(self, *, cfg, data, start_epoch: int | None = None, similarity_run: str | None = None,
                 similarity: str = "projection", perplexity: float | None = None):
        super().__init__(cfg=cfg, data=data, start_epoch=start_epoch)
        if similarity not in SIMILARITIES:
            raise ConfigError(f"method.params.similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
        if similarity_run is not None and not isinstance(similarity_run, str):
            raise ConfigError(f"method.params.similarity_run must be the path of a run folder, got {similarity_run!r}")
        if perplexity is not None and (isinstance(perplexity, bool) or not isinstance(perplexity, (int, float))
                                       or not 0 < perplexity < data.num_classes):
            raise ConfigError(f"method.params.perplexity must be a number in (0, {data.num_classes}), "
                              f"got {perplexity!r}")
        self.similarity_run, self.similarity = similarity_run, similarity
        self.perplexity = None if perplexity is None else float(perplexity)
        self.projection: np.ndarray | None = None
        self.similarity_matrix: np.ndarray | None = None
        self.switched_at = -1
        self._pending = False

    def build_loss(self) -> SWRMLoss:
        # checked here (before training starts), not in __init__: evaluating a finished run
        # builds only its model and must not need the similarity run any more
        if self.similarity_run is not None and not RunDir(self.similarity_run).is_trained():
            raise ConfigError(f"method.params.similarity_run must be a trained run folder (with "
                              f"{RunDir.LAST}), got {self.similarity_run!r}")
        return super().build_loss()

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)  # sets self._epoch
        self._pending = epoch >= self.start_epoch and self.projection is None

    def training_step(self, model: Classifier, forward, images, target, loss, generator):
        if self._pending:
            self.model_similarity(model, loss)
            self._pending = False
        return super().training_step(model, forward, images, target, loss, generator)

    def _train_features(self, model: Classifier) -> tuple[np.ndarray, np.ndarray]:
        if self.similarity_run is not None:
            if self.services.run_features is None:
                raise ConfigError("method.params.similarity_run needs the run-feature service (longtail.runs.train_run "
                                  "provides it)")
            feats, labels, num_classes = self.services.run_features(self.similarity_run)
            if num_classes != self.data.num_classes:
                raise ConfigError(f"similarity_run {self.similarity_run} has {num_classes} classes, this run "
                                  f"{self.data.num_classes}")
            return feats, labels
        t = self.cfg.train
        out = predict(model, self.data.train, mean=self.data.mean, std=self.data.std, batch_size=t.eval_batch_size,
                      device=next(model.parameters()).device, features=True, channels_last=t.channels_last)
        self.set_train_mode(model)  # predict left the model in eval mode
        return out["features"], out["labels"]

    def model_similarity(self, model: Classifier, loss: SWRMLoss) -> None:
        """Prototypes -> t-SNE projection -> weights and margins set on the loss (Sec. 3.2)."""
        feats, labels = self._train_features(model)
        protos = prototypes_from_features(feats, labels, self.data.num_classes)
        projection = tsne_projection(protos, seed=self.cfg.train.seed, perplexity=self.perplexity)
        sim = cosine_similarity_from_prototypes(protos).numpy() if self.similarity == "cosine" else None
        loss.set_similarity(projection, sim)
        self.projection, self.similarity_matrix = projection, sim
        self.switched_at = self._epoch
        source = self.similarity_run or "this run's model"
        log.info("swrm: similarity from %s at epoch %d; weights %s; margins %s", source, self._epoch + 1,
                 np.round(loss.swr_weight.cpu().numpy(), 3).tolist(),
                 np.round(loss.swm_margin.cpu().numpy(), 3).tolist())

    def state_dict(self) -> dict:
        state = {"switched_at": self.switched_at}
        if self.projection is not None:
            state["projection"] = torch.from_numpy(np.asarray(self.projection, dtype=np.float64))
        if self.similarity_matrix is not None:
            state["similarity"] = torch.from_numpy(np.asarray(self.similarity_matrix, dtype=np.float64))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.switched_at = int(state.get("switched_at", -1))
        p, s = state.get("projection"), state.get("similarity")
        self.projection = None if p is None else p.double().numpy()
        self.similarity_matrix = None if s is None else s.double().numpy()


@METHODS.register("dyswrm")
class DySWRM(_TwoStage):
    """DySWRM: CE, then the SWRM loss on a learnable similarity vector (two-stage)."""

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'DySWRM: the windows are rebuilt on the host every step from the learnt projection (class order by argsort, similarity/windows.py)',
    )

    def __init__(self, *, cfg, data, start_epoch: int | None = None, init_std: float = 0.1):
        super().__init__(cfg=cfg, data=data, start_epoch=start_epoch)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
            raise ConfigError(f"method.params.init_std must be a number > 0, got {init_std!r}")
        self.init_std = float(init_std)

    def build_loss(self) -> SWRMLoss:
        loss = super().build_loss()
        gen = torch.Generator().manual_seed(self.cfg.train.seed)
        loss.add_learnable_vector(torch.randn(self.data.num_classes, generator=gen) * self.init_std)
        return loss

    def param_groups(self, model: Classifier) -> list[ParamGroup]:
        """The model's parameters and the loss's similarity vector, in one group (same SGD)."""
        if self._loss is None:
            raise RuntimeError("build_loss() must run before param_groups(): the optimiser needs the similarity vector")
        return [ParamGroup("model", [*[p for p in model.parameters() if p.requires_grad], self._loss.vector])]

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        loss.learning = epoch >= self.start_epoch
