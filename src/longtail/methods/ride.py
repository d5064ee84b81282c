"""RIDE: routing diverse distribution-aware experts (Wang, Lian, Miao, Liu, Yu, ICLR 2021), stage 1.

Official code read: frank-xwang/RIDE-LongTailRecognition at ab8be5c21124612493aff87c7cf235d950bda178
(`model/loss.py` `RIDELoss`, `model/ldam_drw_resnets/ride_resnet_cifar.py` `ResNet_s`,
`trainer/trainer.py`, `configs/config_imbalance_cifar100_ride.json`).

- network: the configured ResNet with `model.params.experts` (models/experts.py); the official
  CIFAR recipe is ResNet-32, 3 experts, layer1 shared, `reduce_dimension` widths 24/48 (`widths: ride`),
  cosine heads (`use_norm`, `model.head: cosine`) with s = 30 (`experts.scale: 30`);
- each step: one forward of the batch through the loop's (DDP-wrapped) forward inside
  `model.per_expert()`, so the head returns the E experts' logits (B, E, C); the loss is the
  configured `ride` loss (losses/ride.py) of the (E, B, C) logits; training accuracy is scored on
  their mean (the official `output`);
- DRW: the run's `reweight` section (effective number, beta 0.9999, from 0-idx epoch 160 of 200,
  official `reweight_epoch: 160` with its 1-based `epoch > 160`); the ride loss switches its
  per-class diversity temperatures on with the class weights, as the official does;
- prediction: the plain forward, the mean of the expert logits (official `final_out`); all experts
  (the router, EA, is the second stage `ride_router`).

- distillation (`teacher`, official `RIDELossWithDistill`, `trainer/trainer.py` with `distill: true`,
  `configs/config_imbalance_cifar100_distill_ride.json`): a frozen bigger RIDE network (a run folder
  or checkpoint, e.g. 6 experts) gives teacher logits t (its expert mean); with the student's expert
  mean z the loss is

      E * [ ride(z_1..z_E) + w T^2 KL(softmax(t / T) || softmax(z / T)) ]   (batch mean KL)

  with T = `distill_temperature` (official CIFAR-100: 1.5) and w = `distill_weight` (official
  `additional_distill_loss_factor`, default 1.0). The factor E is the official quirk: its loss loops
  over the E experts (`for logits_item in extra_info['logits']`) and adds the whole RIDE loss and
  the whole distillation term once per expert, never reading `logits_item`
  (`repeat_over_experts: false` drops it). The official teacher is never put in eval mode: it runs
  in train mode, its BatchNorm normalising with the batch's statistics (`teacher_bn: batch`, the
  default; `running` uses its running statistics). The teacher gets no gradient.
  Official CIFAR distillation recipe: the RIDE recipe with 20 warm-up epochs instead of 5.

Stage 2, the expert-assignment router, is method `ride_router` below (models/expert_router.py).
Not implemented: the official `use_experts: rand` option (a random E-1 subset of experts per
forward). The methods have no state of their own: --resume is exact (the teacher is reloaded).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..config import config_from_dict
from ..errors import CheckpointError, ConfigError, LongtailError
from ..eval.metrics import compute_metrics
from ..losses._checks import integer, number
from ..models import Classifier
from ..models.expert_router import ExpertRouter, RoutedExperts, router_loss, router_scores, router_targets
from ..models.expert_router import routed_forward, routing_flops
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing, require_experts
from .decoupled import _FromStage1
from .frozen import read_checkpoint, rebuild_frozen

log = logging.getLogger(__name__)
RIDE_EXPERTS = "{num: 3, shared_stages: 1, widths: ride, scale: 30}"  # the official CIFAR network


@METHODS.register("ride")
class RIDE(Method):
    """RIDE stage 1: the `ride` loss over the experts of `model.params.experts` (see module doc).

    Parameters (all for the distillation variant; without `teacher` there is none):
    teacher (a run folder or checkpoint of a bigger RIDE network on the same classes; "" = off),
    distill_temperature (T, default 1.5 as the official CIFAR-100 config), distill_weight (w, default
    1.0), repeat_over_experts (the official factor E, default True), teacher_bn ('batch': the
    teacher in train mode as the official, or 'running')."""

    rebalancing = True

    def __init__(self, *, cfg, data, teacher: str = "", distill_temperature: float = 1.5,
                 distill_weight: float = 1.0, repeat_over_experts: bool = True, teacher_bn: str = "batch"):
        super().__init__(cfg=cfg, data=data)
        if not isinstance(teacher, str):
            raise ValueError(f"teacher must be a run folder or checkpoint path (or empty), got {teacher!r}")
        self.teacher_source = teacher
        self.distill_temperature = number("distill_temperature", distill_temperature, low=0, low_open=True)
        self.distill_weight = number("distill_weight", distill_weight, low=0)
        if not isinstance(repeat_over_experts, bool):
            raise ValueError(f"repeat_over_experts must be true or false, got {repeat_over_experts!r}")
        self.repeat_over_experts = repeat_over_experts
        if teacher_bn not in ("batch", "running"):
            raise ValueError(f"teacher_bn must be 'batch' (official: teacher in train mode) or 'running', "
                             f"got {teacher_bn!r}")
        self.teacher_bn = teacher_bn
        self.teacher: Classifier | None = None  # loaded by build()
        refuse_batch_mixing(cfg, "ride")
        require_experts(cfg, "ride", example=RIDE_EXPERTS)
        if cfg.loss.name != "ride":
            raise ValueError(f"trains with the 'ride' loss (loss.name: ride), got '{cfg.loss.name}'")
        self._scale: float | None = None

    def build_model(self) -> Classifier:
        model = super().build_model()
        require_experts(self.cfg, "ride", example=RIDE_EXPERTS, model=model)
        self._scale = model.head.scale
        return model

    def build_loss(self):
        loss = super().build_loss()
        if self._scale is not None and abs(loss.s - self._scale) > 1e-12:
            raise ValueError(f"loss.params.s ({loss.s:g}) must equal model.params.experts.scale ({self._scale:g}): "
                             f"the margin is s * m_c on logits the model already scaled by s")
        return loss

    def build(self, services=None):
        recipe = super().build(services)
        if self.teacher_source:
            self.teacher = load_teacher(self.teacher_source, cfg=self.cfg, data=self.data)
            if self.teacher_bn == "running":
                self.teacher.eval()
        return recipe

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        with model.per_expert():
            _, stacked = forward(images)  # (B, E, C)
        experts = stacked.transpose(0, 1)
        mean = experts.mean(dim=0)
        value = loss(experts, target)
        if self.teacher is not None:
            self.teacher.to(images.device)
            if self.teacher_bn == "batch":
                self.teacher.train()  # official: the teacher is never put in eval mode
            with torch.no_grad():
                teacher_logits = self.teacher(images).float()
            value = value + self.distill_weight * distill_kl(mean, teacher_logits, self.distill_temperature)
            if self.repeat_over_experts:
                value = value * experts.shape[0]
        return StepResult(value, mean, target)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), batch mean (official `RIDELossWithDistill`:
    `F.kl_div(log_softmax(student / T), softmax(teacher / T), reduction='batchmean') * T * T`).
    student, teacher: (B, C) logits; no gradient reaches the teacher."""
    log_q = F.log_softmax(student / temperature, dim=1)
    p = F.softmax(teacher.detach() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature * temperature


def load_teacher(source: str, *, cfg, data) -> Classifier:
    """The frozen RIDE teacher from `source`: a run folder's last.pt or a checkpoint file, rebuilt by
    its own config (else this run's). One-line CheckpointError naming method.params.teacher."""
    key = "method.params.teacher"
    state, _ = read_checkpoint(source, key=key, action="using as RIDE's teacher")
    saved = state.get("config")
    try:
        t_cfg = config_from_dict(saved) if isinstance(saved, dict) else cfg
    except LongtailError as err:
        raise CheckpointError(f"{key} ({source}): cannot rebuild its network: {str(err).splitlines()[0]}") from None
    model = rebuild_frozen(t_cfg, data, state, key=key, source=source, num_classes=data.num_classes)
    if not getattr(model, "num_experts", 0):
        log.warning("RIDE teacher %s is not a multi-expert network; distilling from its logits", source)
    return model


@METHODS.register("ride_router")
class RIDERouter(_FromStage1):
    """RIDE stage 2: the expert-assignment router on a frozen `ride` stage-1 network
    (models/expert_router.py; official `ea_resnet_cifar.py`, `config_imbalance_cifar100_ride_ea.json`).

    - the stage-1 network (`method.params.stage1`: its checkpoint; the model section must describe
      it) is frozen whole, BatchNorm included (official: every parameter but the router's has
      requires_grad False and `_hook_before_iter` puts frozen BatchNorm layers in eval mode, i.e.
      all of them): the network runs in eval mode, only the router trains;
    - each step: one forward through every expert (`per_expert`), router scores of steps 0..E-2,
      loss (1/(E-1)) sum_i BCE(r_i, t_i; pos_weight), t_i of `router_targets`; the config's `loss`
      section is not used and must be `ce`; training accuracy is the all-expert mean's;
    - evaluation (validation, `longtail eval`): dynamic routing (`routed_forward`), metrics of the
      routed prediction, and under "routing" the mean number of experts, the share of images per
      count, FLOPs per image routed and with all experts, and the all-expert metrics;
      predict / export: the network's forward routes with masks (same outputs).

    Parameters: stage1, top_k (official `top_choices_num`; default 30, the CIFAR-100 config; at most
    the number of classes), pos_weight (official 100), hidden (official 16), threshold (sigmoid
    threshold at test time, official 0.5).
    """

    rebalancing = True

    def __init__(self, *, cfg, data, stage1: str = "", top_k: int = 30, pos_weight: float = 100.0,
                 hidden: int = 16, threshold: float = 0.5):
        super().__init__(cfg=cfg, data=data, stage1=stage1)
        self.top_k = integer("top_k", top_k, low=1)
        if self.top_k > data.num_classes:
            raise ValueError(f"top_k ({self.top_k}) must be at most the number of classes ({data.num_classes})")
        self.pos_weight = number("pos_weight", pos_weight, low=0, low_open=True)
        self.hidden = integer("hidden", hidden, low=1)
        self.threshold = number("threshold", threshold, low=0, high=1)
        require_experts(cfg, "ride_router", minimum=2, example=RIDE_EXPERTS)  # the stage-1 RIDE network
        if cfg.loss.name != "ce":
            raise ValueError(f"the router trains with its own BCE (method.params.pos_weight); set loss.name: ce "
                             f"(unused), got '{cfg.loss.name}'")
        refuse_batch_mixing(cfg, "ride_router")

    def build_model(self) -> Classifier:
        model = self.stage1_model()
        require_experts(self.cfg, "ride_router", minimum=2, example=RIDE_EXPERTS, model=model)
        num = model.num_experts
        if isinstance(model.head, RoutedExperts):
            raise ConfigError("method 'ride_router': the stage-1 network already has a router")
        dim = model.num_features // num  # each expert's pooled width D (num_features = E * D)
        router = ExpertRouter(num_experts=num, feature_dim=dim, top_k=self.top_k, hidden=self.hidden)
        model.requires_grad_(False)
        model.reset_head(RoutedExperts(model.head, router, threshold=self.threshold))
        return model

    def set_train_mode(self, model: Classifier) -> None:
        model.eval()  # frozen network, BatchNorm with its stage-1 statistics (official)
        model.head.router.train()

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        with model.per_expert():
            pooled, stacked = forward(images)  # (B, E*D), (B, E, C)
        experts = stacked.transpose(0, 1).detach()
        feats = torch.stack(pooled.detach().chunk(experts.shape[0], dim=1))
        scores = router_scores(model.head.router, experts, feats)
        value = router_loss(scores, router_targets(experts, target), self.pos_weight)
        return StepResult(value, experts.mean(dim=0), target)

    def evaluate(self, model: Classifier, split, *, mean, std, batch_size: int, device, channels_last: bool,
                 **metric_kw) -> tuple[dict, dict]:
        from ..data.augment import BatchAugment

        model.eval()
        transform = BatchAugment(mean=mean, std=std, device=device, channels_last=channels_last)
        routed, plain, used, calls = [], [], [], []
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                pos = np.arange(start, min(start + batch_size, len(split)))
                images = transform(torch.from_numpy(split.batch(pos)).to(device))
                z, n, c = routed_forward(model, images)
                routed.append(z.float().cpu())
                used.append(n.cpu())
                calls.append(c.cpu())
                with model.per_expert():
                    plain.append(model(images).float().mean(dim=1).cpu())
        labels = np.asarray(split.labels, dtype=np.int64)
        z = torch.cat(routed).numpy() if routed else np.zeros((0, self.data.num_classes), np.float32)
        zp = torch.cat(plain).numpy() if plain else z
        n = torch.cat(used).numpy() if used else np.zeros(0, np.int64)
        c = torch.cat(calls).numpy() if calls else np.zeros(0, np.int64)
        metrics = compute_metrics(z, labels, self.data.class_counts, **metric_kw)
        metrics["routing"] = routing_summary(model, n, c, image_shape=tuple(images.shape[1:]) if len(split) else None,
                                             all_experts=compute_metrics(zp, labels, self.data.class_counts,
                                                                         **metric_kw),
                                             threshold=model.head.threshold)
        return metrics, {"logits": z, "labels": labels, "experts_used": n.astype(np.int32)}


def routing_summary(model, used: np.ndarray, calls: np.ndarray, *, image_shape, all_experts: dict,
                    threshold: float) -> dict:
    """eval.json's "routing" section: experts used, FLOPs per image (routed and all experts), and the
    all-expert prediction's metrics."""
    num = model.num_experts
    out = {"threshold": threshold, "num_experts": num,
           "mean_experts": float(used.mean()) if len(used) else None,
           "share_by_experts": [float((used == k).mean()) if len(used) else None for k in range(1, num + 1)],
           "mean_router_calls": float(calls.mean()) if len(calls) else None}
    if image_shape is not None:
        f = routing_flops(model, image_shape)
        cum = np.cumsum([0] + f["experts"])  # cum[k]: FLOPs of experts 0..k-1
        routed = f["shared"] + cum[used].mean() + f["router"] * calls.mean()
        out["flops"] = {"per_image_routed": float(routed), "per_image_all_experts": int(f["shared"] + cum[-1]),
                        "shared": f["shared"], "per_expert": f["experts"], "router_call": f["router"],
                        "counted": "torch.utils.flop_counter: convolutions and matrix products"}
    keep = ("top1", "top5", "many", "medium", "few", "mean_per_class")
    out["all_experts"] = {k: all_experts[k] for k in keep if k in all_experts}
    return out
