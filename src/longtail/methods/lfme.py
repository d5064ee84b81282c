"""LFME: learning from multiple experts (Xiang, Ding and Han, "Learning From Multiple Experts:
Self-paced Knowledge Distillation for Long-tailed Classification", ECCV 2020; official code
xiangly55/LFME, commit 0a18a06ba452c7b0b9781b0e2174decadd4859d1: `run_network_LFME.py`
(`batch_loss`, `get_distill_loss_weight`, `instance_weight_scheduler`, `eval_instance_hardness`,
`concat_distill_outputs`), `loss/DistillationLoss.py`, `data/dataloader_LFME.py`
(`Curric_Dataset.set_scale_classwise_instance_weight_with_shot`), `config/ImageNet_LT/LFME.py`).

Experts are ordinary runs of this toolkit trained on class subsets (`data.class_subset`, e.g. the
many-, medium- and few-shot classes). A student (this method) trains on all classes with

    z'_i = v_i(e) * z_i                                        (the curriculum scales the logits)
    L = loss(z', y) + distill_weight * sum_k w_k * KL_k
    KL_k = (1/B) sum_i sum_{c in S_k} p_t[i, c] (log p_t[i, c] - log p_s[i, c])
    p_t = softmax(t_k(x) / T) over the expert's classes, p_s = softmax(z'[:, S_k] / T)

over every image of the batch (not only those of S_k), T = 2 (official `distill_loss_param`), no
T^2 factor (official `F.kl_div(...)` with its element mean times |S_k|: batch-mean KL).

Self-paced expert selection (official `get_distill_loss_weight`, decay_thresh 0.3): with a_k the
expert's top-1 accuracy on its own classes' validation images (its |S_k|-way prediction) and c_k the
student's mean per-class accuracy over S_k on the validation split (C-way prediction), measured
after each epoch (0 before the first),

    w_k = 1                                          if c_k < decay_thresh * a_k
    w_k = max((a_k - c_k) / a_k / (1 - decay_thresh), 0)   otherwise

Curriculum instance selection (official `eval_instance_hardness` + `..._with_shot` +
`instance_weight_scheduler('Linear')`): h_i = the covering expert's softmax probability of the
label of training image i (eval mode, no augmentation), computed once before the first step. Within
each class, h is min-max scaled into [r_g, 1], r_g = m_min / m_g with m_g the mean training count of
expert g's classes and m_min the smallest such mean (official hand-rounded 12 / 53 / 230 on
ImageNet-LT: few 1, medium 12/53, many 12/230), so easy images start at 1 and hard head images
near r_g. Then v_i(e) = (1 - v0_i) / E * e + v0_i with e the 1-based epoch and E = train.epochs / 2.

Quirks kept from the official code (docs/methods.md, "LFME"):
- the curriculum weight multiplies the *logits* of both CE and distillation (not the loss);
- v grows past 1 after epoch E (no clamp: 2 - v0 at the last epoch); `curriculum_clip: true`
  clamps it at 1 (the docstring's "e=E, weight=1" reading);
- the student is trained on the official class-aware sampler (configs: `sampler: class_aware`).
Readings where the code divides by zero: a class whose images all have the same h (or one image)
gets v0 = 1; an expert with a_k = 0 gets w_k = 0. Classes no expert covers get v0 = 1 and no KL.

Tensor shapes: logits (B, C); expert logits (B, |S_k|); instance weights (B,); experts frozen in eval
mode, on the student's images renormalised to the expert's mean / std when they differ.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..config import config_from_dict
from ..data.build import DataInfo, Split, class_subset_index
from ..data.samplers import Sampler, split_batch
from ..dist import autocast_dtype
from ..errors import CheckpointError, ConfigError, LongtailError
from ..eval.predict import predict
from ..losses._checks import number
from ..models import Classifier
from ..registry import METHODS
from ..rundir import RunDir
from .base import Method, StepResult, rebuild_model, refuse_batch_mixing
from .frozen import read_checkpoint

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the math


def expert_weight(student_acc: float, expert_acc: float, decay_thresh: float) -> float:
    """Self-paced weight w_k of one expert (official `get_distill_loss_weight`)."""
    if expert_acc <= 0:
        return 0.0
    if student_acc < expert_acc * decay_thresh:
        return 1.0
    return max((expert_acc - student_acc) / expert_acc / (1.0 - decay_thresh), 0.0)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch-mean KL(softmax(t / T) || softmax(s / T)) over the expert's classes: (B, K), (B, K) -> ()."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="sum") / student_logits.shape[0]


def initial_instance_weights(hardness: np.ndarray, labels: np.ndarray, floor_of_class: np.ndarray) -> np.ndarray:
    """v0 (N,): per class, h min-max scaled into [floor_c, 1] (official
    `set_scale_classwise_instance_weight_with_shot`); a class with max h == min h gets 1."""
    out = np.ones(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        h = hardness[rows].astype(np.float64)
        span = h.max() - h.min()
        if span > 0:
            r = float(floor_of_class[c])
            out[rows] = (h - h.min()) / span * (1.0 - r) + r
    return out


def class_floors(class_counts: np.ndarray, subsets: list[np.ndarray]) -> np.ndarray:
    """r_c (C,): m_min / m_g for the classes of expert g (m_g the mean training count of its classes),
    1 for a class no expert covers."""
    counts = np.asarray(class_counts, dtype=np.float64)
    means = [counts[s].mean() for s in subsets]
    floors = np.ones(len(counts), dtype=np.float64)
    for s, m in zip(subsets, means):
        floors[s] = min(means) / m
    return floors


def scheduled_weights(v0: torch.Tensor, epoch: int, half_epochs: float, clip: bool) -> torch.Tensor:
    """v(e) = (1 - v0) / E * e + v0 at 1-based epoch e (official 'Linear'); clamped at 1 with `clip`."""
    v = (1.0 - v0) / half_epochs * epoch + v0
    return v.clamp(max=1.0) if clip else v


# ----------------------------------------------------------------------------- experts


class _Expert:
    """A frozen expert: its network, the student's class indices it covers (S_k), its mean / std."""

    def __init__(self, path: str, model: Classifier, classes: np.ndarray, mean, std):
        self.path, self.model, self.classes, self.mean, self.std = path, model, classes, tuple(mean), tuple(std)


class _RecordingSampler(Sampler):
    """The configured sampler; remembers the order of the epoch the loop asked for last, so a step
    knows the training positions of its images (the curriculum's per-image weights)."""

    def __init__(self, base: Sampler):
        super().__init__(labels=base.labels, class_counts=base.class_counts, seed=base.seed, epochs=base.epochs)
        self.base, self.epoch, self.order = base, None, None

    def __len__(self) -> int:
        return len(self.base)

    def indices(self, epoch: int) -> np.ndarray:
        self.epoch, self.order = epoch, self.base.indices(epoch)
        return self.order


# ----------------------------------------------------------------------------- the method


@METHODS.register("lfme")
class LFME(Method):
    """LFME student (Xiang et al., ECCV 2020): CE + self-paced multi-expert distillation + curriculum
    instance weights (module docstring).

    Parameters (method.params; defaults are the official ImageNet-LT LFME config):
        experts: the expert runs: a run folder (its last.pt) or a checkpoint file, or a list of them;
            each covers the classes of its own run's data.class_subset (all classes without one),
            matched to this run's classes by name. Subsets must be disjoint. [] : no distillation.
        temperature: T of the distillation softmax (2.0).
        distill_weight: weight of the summed KL terms (official DistillLoss weight 1.0).
        decay_thresh: self-paced threshold (0.3), in [0, 1).
        curriculum: curriculum instance weights on the logits (official CurricSampler run: true).
        curriculum_epochs: E of the linear schedule; None: train.epochs / 2 (official).
        curriculum_clip: clamp v at 1 after epoch E (official: false).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        "LFME: the experts' distillation weights read on the host every step",
    )

    def __init__(self, *, cfg, data, experts=(), temperature: float = 2.0, distill_weight: float = 1.0,
                 decay_thresh: float = 0.3, curriculum: bool = True, curriculum_epochs: float | None = None,
                 curriculum_clip: bool = False):
        super().__init__(cfg=cfg, data=data)
        if isinstance(experts, str):
            experts = [experts]
        if not isinstance(experts, (list, tuple)) or not all(isinstance(p, str) and p for p in experts):
            raise ValueError(f"experts must be a run folder / checkpoint path or a list of them, got {experts!r}")
        if len(set(experts)) != len(experts):
            raise ValueError("experts names the same run twice")
        self.expert_paths = list(experts)
        self.temperature = number("temperature", temperature, low=0, low_open=True)
        self.distill_weight = number("distill_weight", distill_weight, low=0)
        self.decay_thresh = number("decay_thresh", decay_thresh, low=0, high=1, high_open=True)
        for name, value in (("curriculum", curriculum), ("curriculum_clip", curriculum_clip)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.curriculum, self.curriculum_clip = curriculum, curriculum_clip
        half = cfg.train.epochs / 2 if curriculum_epochs is None else curriculum_epochs
        self.curriculum_epochs = number("curriculum_epochs", half, low=0, low_open=True)
        refuse_batch_mixing(cfg, "lfme")
        # a DataInfo (rebuilding a trained run's network) carries no splits: nothing to check then
        if self.expert_paths and hasattr(data, "val") and (data.val is None or not len(data.val)):
            raise ConfigError("method 'lfme' measures the experts' and the student's accuracies on a validation "
                              "split: set data.val_per_class (e.g. data.val_per_class=20)")
        self.experts: list[_Expert] = []
        self.sampler: _RecordingSampler | None = None
        self.epoch = 0
        self.expert_acc: torch.Tensor | None = None  # (K,) float64, a_k
        self.student_acc: torch.Tensor | None = None  # (K,) float64, c_k of the last epoch
        self.init_weight: torch.Tensor | None = None  # (N,) float64, v0 of the training images
        self.bf16 = autocast_dtype(cfg.train) is not None

    # -- building
    def build(self, services=None):
        recipe = super().build(services)
        self.experts = [self.load_expert(p) for p in self.expert_paths]
        seen = np.zeros(self.data.num_classes, dtype=bool)
        for e in self.experts:
            if seen[e.classes].any():
                raise ConfigError(f"method.params.experts: expert {e.path} covers classes another expert covers; "
                                  "the experts' class subsets must be disjoint")
            seen[e.classes] = True
        if self.expert_paths:
            self.sampler = recipe.sampler = _RecordingSampler(recipe.sampler)
        return recipe

    def load_expert(self, where: str) -> _Expert:
        """A frozen expert from a run folder (its last.pt and data.json) or a checkpoint file, rebuilt
        from its own config; one-line errors name the key and the path."""
        key = f"method.params.experts ({where})"
        state, run = read_checkpoint(where, key="method.params.experts", action="using as an LFME expert")
        info = None
        try:
            if run is not None:
                info = DataInfo.from_json(run.read_data_info())
        except LongtailError as err:
            raise CheckpointError(f"{key}: {str(err).splitlines()[0]}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{key}: unreadable {RunDir.DATA}: {str(err).splitlines()[0]}") from None
        if not isinstance(state.get("config"), dict):
            raise CheckpointError(f"{key}: not a longtail checkpoint (no model weights or config)")
        names = list(self.data.class_names)
        try:
            e_cfg = config_from_dict(state["config"])
            if info is not None:
                expert_names = list(info.class_names)
                unknown = [n for n in expert_names if n not in names]
                if unknown:
                    raise CheckpointError(f"its class {unknown[0]!r} is not a class of this run's data")
                classes = np.asarray([names.index(n) for n in expert_names], dtype=np.int64)
            else:
                subset = e_cfg.data.class_subset
                classes = np.arange(len(names)) if subset is None else class_subset_index(subset, names)
                info = DataInfo(class_names=[names[c] for c in classes],
                                class_counts=np.asarray(self.data.class_counts)[classes],
                                source_counts=np.asarray(self.data.class_counts)[classes], mean=self.data.mean,
                                std=self.data.std, image_shape=tuple(getattr(self.data, "image_shape", (32, 32))),
                                channels=self.data.channels)
            model = rebuild_model(e_cfg, info, state)
        except LongtailError as err:
            raise CheckpointError(f"{key}: cannot rebuild the expert: {str(err).splitlines()[0]}") from None
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(f"{key}: does not fit this data: {str(err).splitlines()[0]}") from None
        counts = state.get("class_counts")
        if counts is not None and not np.array_equal(np.asarray(counts),
                                                     np.asarray(self.data.class_counts)[classes]):
            log.warning("LFME expert %s was trained on other class counts than this run's for its classes", where)
        model.requires_grad_(False)
        return _Expert(where, model.eval(), classes, info.mean, info.std)

    # -- the experts' outputs
    def expert_logits(self, expert: _Expert, images: torch.Tensor) -> torch.Tensor:
        """(B, |S_k|) logits of a frozen expert on the student's normalised images."""
        device = images.device
        if next(expert.model.parameters()).device != device:
            expert.model.to(device)
        x = images
        if expert.mean != tuple(self.data.mean) or expert.std != tuple(self.data.std):
            def col(v):
                return torch.as_tensor(v, dtype=images.dtype, device=device).view(1, -1, 1, 1)
            x = (images * col(self.data.std) + col(self.data.mean) - col(expert.mean)) / col(expert.std)
        expert.model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = expert.model.forward_head(expert.model.forward_features(x))
        return z.float()

    def _prepare(self, device) -> None:
        """a_k on the validation split and v0 of every training image, once (saved in the state)."""
        if self.expert_acc is not None:
            return
        data, t = self.data, self.cfg.train
        accs, hard = [], np.ones(len(data.train), dtype=np.float64)
        for e in self.experts:
            local = np.full(data.num_classes, -1, dtype=np.int64)
            local[e.classes] = np.arange(len(e.classes))
            kw = dict(mean=e.mean, std=e.std, batch_size=t.eval_batch_size, device=device,
                      channels_last=t.channels_last)
            rows = np.flatnonzero(local[data.val.labels] >= 0)
            val = Split(data.val.images, data.val.index[rows], local[data.val.labels[rows]])
            with torch.no_grad():
                out = predict(e.model, val, **kw)
            accs.append(float((out["logits"].argmax(1) == out["labels"]).mean()) if len(rows) else 0.0)
            if self.curriculum:
                rows = np.flatnonzero(local[data.train.labels] >= 0)
                tr = Split(data.train.images, data.train.index[rows], local[data.train.labels[rows]])
                with torch.no_grad():
                    out = predict(e.model, tr, **kw)
                probs = torch.softmax(torch.from_numpy(out["logits"]).double(), dim=1)
                hard[rows] = probs.gather(1, torch.from_numpy(out["labels"])[:, None]).squeeze(1).numpy()
        self.expert_acc = torch.tensor(accs, dtype=torch.float64)
        self.student_acc = torch.zeros(len(self.experts), dtype=torch.float64)
        if self.curriculum:
            floors = class_floors(data.class_counts, [e.classes for e in self.experts])
            covered = np.zeros(data.num_classes, dtype=bool)
            for e in self.experts:
                covered[e.classes] = True
            v0 = initial_instance_weights(hard, data.train.labels, floors)
            v0[~covered[data.train.labels]] = 1.0
            self.init_weight = torch.from_numpy(v0)
        log.info("LFME experts' validation accuracy %s", np.round(self.expert_acc.numpy(), 4).tolist())

    def expert_weights(self) -> list[float]:
        """w_k of the current epoch from the last measured student accuracies."""
        if self.expert_acc is None:
            return [1.0] * len(self.experts)
        return [expert_weight(float(c), float(a), self.decay_thresh)
                for c, a in zip(self.student_acc, self.expert_acc)]

    def batch_instance_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        """v(e) (B,) of this rank's images of the current step, or None (no curriculum, or a step
        outside the loop whose positions are unknown)."""
        if not self.curriculum or self.init_weight is None or self.sampler is None or self.batches is None \
                or self.sampler.order is None or self.sampler.epoch != self.batches.epoch:
            return None
        order, b = self.sampler.order, self.batches
        start = b.step * self.cfg.train.batch_size
        global_pos = order[start:start + b.global_size]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            pos = split_batch(global_pos, dist.get_rank(), dist.get_world_size(), order)
        else:
            pos = global_pos
        if len(pos) != len(target):
            return None
        v = scheduled_weights(self.init_weight[torch.from_numpy(np.asarray(pos))], self.epoch + 1,
                              self.curriculum_epochs, self.curriculum_clip)
        return v.to(device=target.device, dtype=torch.float32)

    # -- per epoch / per step
    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        self.epoch = epoch

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        if not self.experts:
            return super().training_step(model, forward, images, target, loss, generator)
        self._prepare(images.device)
        logits = forward(images)[1]
        v = self.batch_instance_weights(target)
        if v is not None:
            logits = logits * v[:, None].to(logits.dtype)
        total = loss(logits, target)
        if self.distill_weight > 0:
            for e, w in zip(self.experts, self.expert_weights()):
                if w > 0:
                    cls = torch.as_tensor(e.classes, device=logits.device)
                    kl = distill_kl(logits.index_select(1, cls), self.expert_logits(e, images), self.temperature)
                    total = total + self.distill_weight * w * kl
        return StepResult(total, logits, target)

    def on_epoch_end(self, epoch: int, model: Classifier, device) -> None:
        super().on_epoch_end(epoch, model, device)
        if not self.experts:
            return
        self._prepare(device)
        t, data = self.cfg.train, self.data
        out = predict(model, data.val, mean=data.mean, std=data.std, batch_size=t.eval_batch_size, device=device,
                      channels_last=t.channels_last)
        correct = out["logits"].argmax(1) == out["labels"]
        accs = []
        for e in self.experts:
            per_class = [correct[out["labels"] == c].mean() for c in e.classes if (out["labels"] == c).any()]
            accs.append(float(np.mean(per_class)) if per_class else 0.0)
        self.student_acc = torch.tensor(accs, dtype=torch.float64)
        log.debug("lfme after epoch %d: student %s, weights %s", epoch + 1, accs, self.expert_weights())

    # -- state saved in checkpoints
    def state_dict(self) -> dict:
        if self.expert_acc is None:
            return {}
        state = {"expert_acc": self.expert_acc.clone(), "student_acc": self.student_acc.clone()}
        if self.init_weight is not None:
            state["init_weight"] = self.init_weight.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.expert_acc = state["expert_acc"].to(torch.float64).cpu()
            self.student_acc = state["student_acc"].to(torch.float64).cpu()
            w = state.get("init_weight")
            self.init_weight = None if w is None else w.to(torch.float64).cpu()
