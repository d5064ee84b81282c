"""M2m: major-to-minor translation (Kim, Jeong and Shin, "M2m: Imbalanced Classification via
Major-to-minor Translation", CVPR 2020; official code alinlab/M2m, commit
42d08a5399c1b62925044287e7ee8d134260a08a, `train.py` (`train_gen_epoch`, `train_net`,
`generation`), `utils.py` (`make_step`, `random_perturb`), `run.sh`).

A classifier g trained with plain ERM on the same imbalanced data (`method.params.classifier`:
a run folder or a checkpoint, e.g. runs/bench/cifar10_lt_ce/checkpoints/last.pt) is frozen. The
network f being trained first trains like the configured loss and sampler (plain CE, instance
sampling); from the 0-idx epoch `start_epoch` on (official `--warm 160` of 200) every step

1. draws which batch positions get a generated sample: position i (label y_i) is kept with
   probability n_{y_i} / n_max, else it is a *generation slot* with target class k_i = y_i
   (official `gen_probs = N[y] / N[0]`);
2. picks for every slot a seed position j of the same batch with probability proportional to
   p_ij = 1 - beta^{max(n_{y_j} - n_{k_i}, 0)} (only seeds of a larger class have weight;
   slots whose row is all 0 are dropped), and keeps p_accept_i = p_ij of the seed drawn;
3. translates the seed images x0 (pixel space [0, 1]) towards k: a random start
   x = clamp(x0 + r, 0, 1), then `attack_iters` (10) normalised-gradient steps on

       L(x) = CE(g(x), k) + lam * mean_i f_{k0_i}(x_i)          (CE and the logit term batch means)
       x <- clamp(x - step_size * grad / (||grad||_2 per sample + 1e-10), 0, 1)

   with f and g in eval mode (f's BatchNorm running statistics, as the official `model_r.eval()`);
4. accepts slot i when softmax(g(x*_i))_{k_i} >= gamma AND a Bernoulli(p_accept_i) coin says yes
   (the rejection rule of `generation`); accepted images replace the slot's image, the label
   stays k_i (= y_i); a rejected slot keeps its original image;
5. the training forward and loss run on that batch with f in train mode.

From `start_epoch` on the loader also over-samples (`oversample: true`, the official default
without `--no_over`: `get_oversampled` at epoch `--warm`): N draws with replacement with per-sample
weight 1 / n_y, so a slot whose translation fails holds an over-sampled minority original.

Tensor shapes: images (B, C, H, W) normalised as the loop delivers them (converted to pixel space
with the data's mean / std and back), target (B,); M generation slots -> (M, B) seed weights,
(M, C, H, W) translated images.

Quirks of the official code kept (docs/methods.md, "M2m"):
- the random start is `(rand - 0.5).renorm(p=2, dim=1, maxnorm=0.5)`: dim=1 renormalises each
  *channel slice over the whole set of seeds* to L2 norm <= 0.5, not each image, so the
  per-image noise shrinks with the number of seeds;
- the lam term is f's logit of the seed class averaged over the seeds (train.py's own
  `classwise_loss`, which shadows the imported utils.py one), not a loss of g;
- the acceptance coin reuses the seed-selection weight p_ij as a probability;
- the keep probability divides by class 0's count in the official code (`N[0]`); here by the
  largest count (the same on every long-tailed profile, whose class 0 is the largest).

Not ported: the balanced-data branch (`imb_type none`: random targets) and SMOTE / cost options of
train.py. Randomness: one int64 drawn from the loop's generator per generation step seeds a
generator on the device for that step's draws (slots, seeds, noise, coins), so --resume is exact
and plain steps before `start_epoch` draw nothing (a run may branch off a plain-CE checkpoint at
or before `start_epoch`). Under DDP each rank translates within its own shard (seed + rank).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..config import config_from_dict
from ..data.samplers import Sampler, epoch_rng
from ..dist import autocast_dtype
from ..errors import CheckpointError, ConfigError, LongtailError
from ..losses._checks import number
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult, refuse_batch_mixing
from .frozen import read_checkpoint, rebuild_frozen

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the math, batched


def seed_weights(class_counts: torch.Tensor, batch_labels: torch.Tensor, gen_targets: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """(M, B) seed-selection weights p_ij = 1 - beta^{max(n_{y_j} - n_{k_i}, 0)} of batch position j
    for generation target k_i (official `train_net`); rows are sampled proportionally."""
    counts = class_counts.to(torch.float64)
    delta = F.relu(counts[batch_labels][None, :] - counts[gen_targets][:, None])
    return (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=delta.device), delta)).float()


def translation_objective(logits_g: torch.Tensor, logits_f: torch.Tensor, gen_targets: torch.Tensor,
                          seed_targets: torch.Tensor, lam: float) -> torch.Tensor:
    """CE(g(x), k) (batch mean) + lam * mean_i f_{k0_i}(x_i): the function `generation` descends."""
    seed_logit = logits_f.gather(1, seed_targets[:, None]).squeeze(1)
    return F.cross_entropy(logits_g, gen_targets) + lam * seed_logit.mean()


def l2_step(x: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    """One descent step of length `step_size` along each sample's L2-normalised gradient, clamped
    to [0, 1] (official `make_step(grad, 'l2', step_size)` then `clamp(0, 1)`)."""
    norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return (x - step_size * grad / (norm + 1e-10)).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, uniform: torch.Tensor, radius: float = 0.5) -> torch.Tensor:
    """clamp(x + r, 0, 1) with r = (uniform - 0.5) renormalised over dim 1 (each channel slice of
    the whole set, the official `random_perturb(inputs, 'l2', 0.5)`)."""
    return (x + (uniform - 0.5).renorm(p=2, dim=1, maxnorm=radius)).clamp(0.0, 1.0)


def accepted(probs_target: torch.Tensor, gamma: float, coin: torch.Tensor) -> torch.Tensor:
    """The rejection rule: g's probability of the target class >= gamma and the coin is 1."""
    return (probs_target >= gamma) & (coin > 0)


def translate(x0: torch.Tensor, *, g, f, gen_targets: torch.Tensor, seed_targets: torch.Tensor, lam: float,
              step_size: float, iters: int, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x* (M, C, H, W) in [0, 1], g's probability of the target class (M,)): `iters` steps on
    `translation_objective` from x0 (a random start when `uniform` is given). `g` and `f` map
    pixel images to logits; gradients flow only into the images."""
    x = x0 if uniform is None else random_start(x0, uniform)
    for _ in range(iters):
        x = x.detach().requires_grad_(True)
        value = translation_objective(g(x), f(x), gen_targets, seed_targets, lam)
        grad, = torch.autograd.grad(value, [x])
        x = l2_step(x, grad, step_size)
    x = x.detach()
    with torch.no_grad():
        probs = torch.softmax(g(x).float(), dim=1).gather(1, gen_targets[:, None]).squeeze(1)
    return x, probs


# ----------------------------------------------------------------------------- the sampler


class _DeferredOversampler(Sampler):
    """The configured sampler before `start_epoch`; from then on N draws with replacement with
    per-sample weight 1 / n_y (official `get_oversampled`: `WeightedRandomSampler(1/n_y, N)`)."""

    def __init__(self, base: Sampler, start_epoch: int):
        super().__init__(labels=base.labels, class_counts=base.class_counts, seed=base.seed, epochs=base.epochs)
        self.base, self.start_epoch = base, start_epoch

    def __len__(self) -> int:
        return len(self.base)

    def indices(self, epoch: int) -> np.ndarray:
        if epoch < self.start_epoch:
            return self.base.indices(epoch)
        w = 1.0 / np.maximum(self.class_counts.astype(np.float64), 1.0)[self.labels]
        return epoch_rng(self.seed, epoch).choice(len(self.labels), size=len(self.labels), replace=True,
                                                  p=w / w.sum())


# ----------------------------------------------------------------------------- the method


@METHODS.register("m2m")
class M2m(Method):
    """M2m (Kim et al., CVPR 2020): translate majority seeds into minority samples with a frozen
    ERM classifier g, from `start_epoch` on (module docstring).

    Parameters (method.params; defaults are the official run.sh M2m line):
        classifier: the ERM classifier g: a run folder (its last.pt) or a checkpoint file; the
            network rebuilds from the checkpoint's own config (`rebuild_model`). Required.
        start_epoch: 0-idx epoch generation (and over-sampling) starts (official `--warm 160` of
            200); None: the first step-LR milestone.
        beta: seed-selection / acceptance parameter (0.999).
        lam: weight of f's seed-class logit in the objective (0.5).
        gamma: acceptance threshold on g's target probability (0.9; config.py's default 0.99).
        step_size: L2 step length in pixel space (0.1).
        attack_iters: gradient steps per translation (10).
        random_start: start from x0 + the renormalised uniform noise (official True).
        oversample: class-balanced over-sampling from `start_epoch` (official default True).
    """

    # why a step reads device values on the host (issue 21; Method.capture_blockers, tests/test_host_sync.py)
    host_syncs = (
        'M2m: the seeds to translate chosen on the host (nonzero, boolean masks, counts read as ints)',
    )

    rebalancing = True  # class-balanced over-sampling + minority translations (inference.py)

    def __init__(self, *, cfg, data, classifier: str = "", start_epoch: int | None = None, beta: float = 0.999,
                 lam: float = 0.5, gamma: float = 0.9, step_size: float = 0.1, attack_iters: int = 10,
                 random_start: bool = True, oversample: bool = True):
        super().__init__(cfg=cfg, data=data)
        t = cfg.train
        if not isinstance(classifier, str) or not classifier:
            raise ConfigError("method 'm2m' needs method.params.classifier, the run folder or checkpoint of an "
                              "ERM classifier trained on the same data")
        if start_epoch is None:
            if t.lr_schedule != "step" or not t.milestones:
                raise ValueError("start_epoch is needed (no step LR milestone to default to)")
            start_epoch = int(t.milestones[0])
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or not 0 <= start_epoch < t.epochs:
            raise ValueError(f"start_epoch must be an integer in [0, train.epochs = {t.epochs}), got {start_epoch!r}")
        if not isinstance(attack_iters, int) or isinstance(attack_iters, bool) or attack_iters < 1:
            raise ValueError(f"attack_iters must be an integer >= 1, got {attack_iters!r}")
        for name, value in (("random_start", random_start), ("oversample", oversample)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        refuse_batch_mixing(cfg, "m2m")
        self.classifier, self.start_epoch = classifier, start_epoch
        self.beta = number("beta", beta, low=0, high=1, high_open=True)
        self.lam = number("lam", lam, low=0)
        self.gamma = number("gamma", gamma, low=0, high=1)
        self.step_size = number("step_size", step_size, low=0, low_open=True)
        self.attack_iters, self.random_start, self.oversample = attack_iters, random_start, oversample
        self.bf16 = autocast_dtype(t) is not None
        self.active = False
        self.g: Classifier | None = None  # the frozen ERM classifier, loaded by build()
        self.last_stats: dict = {}  # slots / accepted of the last generation step (tests, logging)

    # -- building
    def build(self, services=None):
        recipe = super().build(services)
        self.g = self.load_classifier()
        return recipe

    def build_sampler(self) -> Sampler:
        base = super().build_sampler()
        return _DeferredOversampler(base, self.start_epoch) if self.oversample else base

    def load_classifier(self) -> Classifier:
        """g from `classifier`: a run folder's last.pt or a checkpoint file, rebuilt by the run's own
        method from the config saved in it; frozen, in eval mode. One-line errors name the key."""
        key = "method.params.classifier"
        state, _ = read_checkpoint(self.classifier, key=key, action="using as M2m's classifier")
        saved = state.get("config")
        try:
            g_cfg = config_from_dict(saved) if isinstance(saved, dict) else self.cfg
            if g_cfg.method.name == "m2m":
                raise CheckpointError("g must be an ERM run, not an M2m run")
        except LongtailError as err:
            raise CheckpointError(f"{key} ({self.classifier}): cannot rebuild its network: "
                                  f"{str(err).splitlines()[0]}") from None
        model = rebuild_frozen(g_cfg, self.data, state, key=key, source=self.classifier,
                               num_classes=self.data.num_classes)
        counts = state.get("class_counts")
        if counts is not None and not np.array_equal(np.asarray(counts), np.asarray(self.data.class_counts)):
            log.warning("M2m classifier %s was trained on other class counts than this run's", self.classifier)
        return model

    # -- per epoch / per step
    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        self.active = epoch >= self.start_epoch

    def training_step(self, model: Classifier, forward, images, target, loss, generator) -> StepResult:
        if not self.active:
            return super().training_step(model, forward, images, target, loss, generator)
        images = self.generate(model, images, target, generator)
        logits = forward(images)[1]
        return StepResult(loss(logits, target), logits, target)

    def _device_generator(self, generator: torch.Generator, device: torch.device) -> torch.Generator:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return torch.Generator(device=device).manual_seed(seed + rank)

    def generate(self, model: Classifier, images: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """The batch with the accepted translations in their slots (steps 1-4 of the module docstring)."""
        if self.g is None:
            raise ConfigError("method 'm2m' generates with its classifier g; build the recipe first")
        device = images.device
        gen = self._device_generator(generator, device)
        if next(self.g.parameters()).device != device:
            self.g = self.g.to(device)
        counts = torch.as_tensor(np.asarray(self.data.class_counts), dtype=torch.float32, device=device)
        keep = torch.bernoulli(counts[target] / counts.max(), generator=gen)
        slots = (keep == 0).nonzero().view(-1)
        gen_targets = target[slots]
        weights = seed_weights(counts, target, gen_targets, self.beta)
        valid = weights.sum(1) > 0
        slots, gen_targets, weights = slots[valid], gen_targets[valid], weights[valid]
        self.last_stats = {"slots": int(len(slots)), "accepted": 0}
        if len(slots) == 0:
            return images
        seeds = torch.multinomial(weights, 1, replacement=True, generator=gen).view(-1)
        p_accept = weights.gather(1, seeds[:, None]).squeeze(1)
        mean = torch.as_tensor(self.data.mean, dtype=images.dtype, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.data.std, dtype=images.dtype, device=device).view(1, -1, 1, 1)
        x0 = (images[seeds] * std + mean).clamp(0.0, 1.0)
        uniform = torch.rand(x0.shape, generator=gen, device=device, dtype=x0.dtype) if self.random_start else None

        def logits_of(net):
            def run(x):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    z = net.forward_head(net.forward_features((x.clamp(0.0, 1.0) - mean) / std))
                return z.float()
            return run

        was_training = model.training
        model.eval()
        try:
            x, probs = translate(x0, g=logits_of(self.g), f=logits_of(model), gen_targets=gen_targets,
                                 seed_targets=target[seeds], lam=self.lam, step_size=self.step_size,
                                 iters=self.attack_iters, uniform=uniform)
        finally:
            model.train(was_training)
        coin = torch.bernoulli(p_accept, generator=gen)
        ok = accepted(probs, self.gamma, coin)
        self.last_stats["accepted"] = int(ok.sum())
        out = images.clone()
        out[slots[ok]] = ((x[ok] - mean) / std).to(out.dtype)
        return out

    def plain_ce_epochs(self) -> float:
        """Plain CE before `start_epoch` when the configured loss is unweighted `ce` (nothing is
        drawn and the configured sampler runs until then)."""
        c = self.cfg
        if c.loss.name != "ce" or c.loss.params:
            return 0
        return min(self.start_epoch, self._unweighted_epochs())
