"""Decoupled two-stage methods (Kang et al., ICLR 2020; classifier-balancing official code).

Every method here starts from a stage-1 checkpoint named by an explicit path
(`method.params.stage1`, e.g. `runs/cifar10_lt_ce/checkpoints/last.pt`); the model section
of the config must describe the same architecture.

- ``crt``: classifier re-training. The head is re-initialised, the backbone frozen
  (requires_grad False); train the head with the configured loss and sampler (the shipped
  config uses class-aware sampling with 4 per class, as the paper). `retrain_bn_stats`
  (default True, as the official code, which leaves every network in .train()) lets the
  frozen backbone's BatchNorm running statistics be re-estimated on the stage-2 batches;
  False keeps them (backbone in .eval()).
- ``lws``: learnable weight scaling; the stage-1 head frozen, per-class scales trained.
- ``tau_norm``: post-hoc; w_i / ||w_i||^tau with tau chosen on the **validation** split
  over linspace(tau_min, tau_max, tau_steps) (default 0..2, 21 values); never on test.
  Ties go to the smallest tau.
- ``ncm``: post-hoc nearest class mean on normalised features ('cl2n').
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..eval.predict import predict
from ..models import Classifier
from ..models.heads import LWSHead, NCMHead, TauNormLinear, build_head
from ..registry import METHODS
from ..io import safe_torch_load
from .base import Method


# top-level modules a stage-1 method adds for its own training only (KCL's projection, momentum key
# encoder and queue): dropped from a stage-1 checkpoint when the stage-2 model has no such module
STAGE1_ONLY = ("kcl_projection", "kcl_key", "kcl_queue")


def load_stage1(model: Classifier, path: str) -> None:
    state = safe_torch_load(path)
    weights = state.get("model", state) if isinstance(state, dict) else state
    if isinstance(weights, dict):
        weights = {k: v for k, v in weights.items()
                   if not (k.split(".", 1)[0] in STAGE1_ONLY and not hasattr(model, k.split(".", 1)[0]))}
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"stage-1 checkpoint {path} does not fit model '{type(model).__name__}': "
                              f"{str(err).splitlines()[0]}") from None


class _FromStage1(Method):
    stage = 2

    def __init__(self, *, cfg, data, stage1: str = ""):
        super().__init__(cfg=cfg, data=data)
        if not isinstance(stage1, str) or not stage1:
            raise ConfigError(f"method '{cfg.method.name}' needs method.params.stage1, the path of a stage-1 checkpoint")
        self.stage1 = stage1

    def stage1_model(self) -> Classifier:
        """The stage-1 network (the config's model section) with the stage-1 weights; without
        them when a trained run is rebuilt (its checkpoint holds every weight)."""
        model = super().build_model()
        if not self.weights_from_checkpoint:
            load_stage1(model, self.stage1)
        return model


class _FrozenBackbone(_FromStage1):
    def __init__(self, *, cfg, data, stage1: str = "", retrain_bn_stats: bool = True):
        super().__init__(cfg=cfg, data=data, stage1=stage1)
        if not isinstance(retrain_bn_stats, bool):
            raise ValueError(f"retrain_bn_stats must be true or false, got {retrain_bn_stats!r}")
        self.retrain_bn_stats = retrain_bn_stats

    def freeze(self, model: Classifier) -> Classifier:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        return model

    def set_train_mode(self, model: Classifier) -> None:
        if self.retrain_bn_stats:
            model.train()
        else:
            model.eval()
            model.head.train()


@METHODS.register("crt")
class ClassifierRetraining(_FrozenBackbone):
    """cRT: re-initialised head trained on a frozen stage-1 backbone (Kang et al. 2020)."""

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        model.reset_head(build_head(self.cfg.model.head, in_features=model.num_features,
                                    num_classes=self.data.num_classes))
        return self.freeze(model)


@METHODS.register("lws")
class LearnableWeightScaling(_FrozenBackbone):
    """LWS: per-class scales on the frozen stage-1 linear head (Kang et al. 2020)."""

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        if not isinstance(model.head, torch.nn.Linear):
            raise ConfigError("method 'lws' needs a linear stage-1 head (model.head: linear)")
        model.reset_head(LWSHead(model.head))
        model = self.freeze(model)
        model.head.linear.requires_grad_(False)
        return model


class _PostHoc(_FromStage1):
    trains = False

    def features(self, model: Classifier, split, device) -> dict:
        t = self.cfg.train
        return predict(model, split, mean=self.data.mean, std=self.data.std, batch_size=t.eval_batch_size,
                       device=device, features=True, channels_last=t.channels_last)


@METHODS.register("tau_norm")
class TauNormalisation(_PostHoc):
    """tau-normalisation of the stage-1 classifier, tau selected on the validation split."""

    rebalancing = True

    def __init__(self, *, cfg, data, stage1: str = "", tau_min: float = 0.0, tau_max: float = 2.0, tau_steps: int = 21):
        super().__init__(cfg=cfg, data=data, stage1=stage1)
        if not (isinstance(tau_steps, int) and tau_steps >= 1 and tau_max >= tau_min):
            raise ValueError(f"need tau_steps >= 1 and tau_max >= tau_min, got {tau_min}, {tau_max}, {tau_steps}")
        self.grid = np.linspace(tau_min, tau_max, tau_steps)

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        head = model.head
        if not isinstance(head, torch.nn.Linear):
            raise ConfigError("method 'tau_norm' needs a linear stage-1 head (model.head: linear)")
        model.reset_head(TauNormLinear(head.weight))
        return model

    def fit_posthoc(self, model: Classifier, device) -> dict:
        if self.data.val is None or not len(self.data.val):
            raise ConfigError("tau_norm selects tau on the validation split: set data.val_per_class (e.g. 20)")
        out = self.features(model, self.data.val, device)
        feats = torch.from_numpy(out["features"]).to(device)
        labels = torch.from_numpy(out["labels"]).to(device)
        scores = []
        with torch.no_grad():
            for tau in self.grid:
                model.head.tau.fill_(float(tau))
                scores.append(float((model.head(feats).argmax(1) == labels).float().mean() * 100))
        best = int(np.argmax(scores))  # first maximum: the smallest tau among ties
        model.head.tau.fill_(float(self.grid[best]))
        return {"tau": float(self.grid[best]), "selected_on": "validation top1",
                "grid": [float(v) for v in self.grid], "val_top1": scores}


@METHODS.register("ncm")
class NearestClassMean(_PostHoc):
    """NCM on stage-1 features ('cl2n': centred, L2-normalised; squared L2 distance)."""

    rebalancing = True

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        model.reset_head(NCMHead(model.num_features, self.data.num_classes))
        return model

    def fit_posthoc(self, model: Classifier, device) -> dict:
        out = self.features(model, self.data.train, device)  # eval mode, no augmentation
        feats = torch.from_numpy(out["features"]).to(device)
        labels = torch.from_numpy(out["labels"]).to(device)
        head = model.head
        with torch.no_grad():
            head.feature_mean.copy_(feats.mean(0))
            normed = head.normalise(feats)
            sums = torch.zeros_like(head.centroids).index_add_(0, labels, normed)
            counts = torch.bincount(labels, minlength=self.data.num_classes).clamp_min(1).unsqueeze(1)
            head.centroids.copy_(sums / counts)
        return {"num_train_features": int(len(labels))}
