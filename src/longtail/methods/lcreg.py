"""LCReg: long-tailed recognition by learning from latent categories (seed paper 004, Eq. 1-7).

The paper builds on MiSLAS (two stages; stage 1 with mixup). This module is LCReg's
stage 1; its stage 2 is MiSLAS's (method ``mislas``, which rebuilds this network from the
stage-1 checkpoint's own config). docs/lcreg.md has the full account; in short:

- **Latent categories (Sec. 3.1).** A pool of M learnable latent features f'_m (stored
  (M, D), initialised N(0, 1)), encoded by a 1x1 convolution FC (D -> D, with bias):
  e_m = FC(f'_m). On the backbone's last pre-pooling map f (B, D, h, w), N = h*w:

      S^m(a, b) = sigmoid(f(a, b)^T e_m)                                   (Eq. 1)
      S_hat^m(a, b) = softmax_m S^m(a, b)                                   (Eq. 2)
      f_hat(a, b) = sum_m e_m S_hat^m(a, b)                                 (Eq. 3)

- **Reconstruction loss (Eq. 4).** Per image C_f = f_hat^T f (N x N); row j is a softmax
  over the N original locations and its target is j (t_j = j: the reconstruction at
  location j should match the original feature at j better than any other location's).
  The number of classes of this softmax is N = h*w by construction, for any map size.
  Averaged over images and locations (the paper's sum over j would scale with N; the mean
  keeps beta = 0.1 meaningful for 8x8 and 7x7 maps alike). `recon_similarity: cosine`
  (alternative) uses cos(f_hat_j, f_k) / recon_temperature instead of the dot product.

- **Latent augmentation (Eq. 5-6).** Read with one classifier for Sec. 3.1 and Eq. 6: the
  encoded latents e_j are the weights of an M-way "latent category" classifier, logits
  z_j(v) = v^T e_j (the pre-sigmoid similarity of Eq. 1; bias 0), and ISDA's surrogate

      L_aug = CE(z(v) + lam/2 [(e_j - e_y)^T Sigma'_y (e_j - e_y)]_j, y)

  with a covariance Sigma'_y per latent category, estimated online by ISDA's
  `CovarianceEstimator` (updated before the loss, detached). What v and y are (the
  paper's y'_m "ground truth of the latent categories") is `aug_target`:
  ``part`` (default): v = g_{i,m} = sum_n S_hat^m_n f_n / sum_n S_hat^m_n, image i's
  feature of latent category m, with ground truth y = m ("the first latent category as
  the first class", Sec. 3.1). Every image gives one sample per latent category, so the
  augmented set is balanced over the M latent categories (the paper's Fig. 2) and
  Sigma'_m pools images of every class, head and tail.
  ``location`` (alternative): v = f(a, b), every location's feature, with pseudo ground
  truth y = argmax_m S^m(a, b) (detached).
  lam = lambda0 * t / T with t the 0-idx iteration and T the total iterations (Sec. 3.3).

- **Total (Eq. 7).** L = alpha L_aug + beta L_recon + gamma L_cls, alpha = beta = 0.1,
  gamma = 1; L_cls is the configured loss on the classifier's logits (with
  train.mixup_alpha the mixed-label loss, as MiSLAS stage 1).

- **How f_hat reaches the classifier (the paper leaves it open).** Table 4 credits the
  latent categories *alone* (no L_aug, no L_recon) with a gain, so they must be on the
  classification path. ``fusion: residual`` (default): the classifier sees pool(f + f_hat);
  ``replace``: pool(f_hat) only. With ``latent_category: false`` the classifier sees f and
  the latent pool is an auxiliary branch for L_aug / L_recon only.

Ablation switches (Table 4): `latent_category`, `latent_aug`, `latent_recon`; all three
off is exactly the backbone (same weights, same state_dict keys), i.e. MiSLAS stage 1.
M is `num_latents` (Table 3: 40 best on CIFAR-10-LT, 50 on CIFAR-100-LT).

Shapes: images (B, C_in, H, W) -> backbone map (B, D, h, w); logits (B, M, N);
weights S_hat (B, M, N); f_hat (B, D, N); part features (B, M, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import Classifier
from ..registry import METHODS
from .base import Method, StepResult
from .isda import ISDA, LazyCovariance, isda_logits

FUSIONS = ("residual", "replace")
AUG_TARGETS = ("part", "location")
SIMILARITIES = ("dot", "cosine")


@dataclass
class LatentOutput:
    """What one forward pass of `LatentCategories` computes (N = h*w locations)."""

    features: torch.Tensor  # f, (B, D, N)
    encoded: torch.Tensor  # e_m = FC(f'_m), (M, D)
    logits: torch.Tensor  # f^T e_m before the sigmoid of Eq. 1, (B, M, N)
    weights: torch.Tensor  # S_hat (Eq. 2), (B, M, N), sums to 1 over M
    reconstruction: torch.Tensor  # f_hat (Eq. 3), (B, D, N)

    def float(self) -> "LatentOutput":
        """In float32 (a bf16-autocast pass): the losses and covariances are computed in fp32."""
        return LatentOutput(*(t.float() for t in (self.features, self.encoded, self.logits, self.weights,
                                                  self.reconstruction)))


class LatentCategories(nn.Module):
    """The latent feature pool f'_1..f'_M (M, D) and its 1x1-conv encoder FC (Eq. 1-3)."""

    def __init__(self, *, num_features: int, num_latents: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, num_features))
        self.encoder = nn.Conv2d(num_features, num_features, kernel_size=1)

    def encode(self) -> torch.Tensor:
        """e = FC(f') as (M, D): the 1x1 convolution applied to each latent as a 1x1 map."""
        return self.encoder(self.latents[:, :, None, None]).flatten(1)

    def forward(self, feature_map: torch.Tensor) -> LatentOutput:
        features = feature_map.flatten(2)  # (B, D, N)
        encoded = self.encode()
        logits = torch.einsum("md,bdn->bmn", encoded, features)
        weights = torch.softmax(torch.sigmoid(logits), dim=1)
        reconstruction = torch.einsum("md,bmn->bdn", encoded, weights)
        return LatentOutput(features, encoded, logits, weights, reconstruction)


class LatentCategoryClassifier(Classifier):
    """A backbone whose last map goes through `LatentCategories` before pooling.

    forward_features returns f + f_hat (``residual``), f_hat (``replace``) or f
    (``none``: the latent branch is auxiliary). The head is the backbone's (state_dict
    keys ``backbone.*`` and ``latent.*``). In training mode with `keep_latent_output` set
    (by the ``lcreg`` method), the last pass's `LatentOutput` is kept for the losses, so
    they use the very pass the (possibly DDP-wrapped) training forward made.
    """

    def __init__(self, backbone: Classifier, latent: LatentCategories, *, fusion: str = "residual"):
        super().__init__()
        if fusion not in (*FUSIONS, "none"):
            raise ValueError(f"fusion must be one of residual, replace, none, got {fusion!r}")
        self.backbone, self.latent, self.fusion = backbone, latent, fusion
        self.num_features = backbone.num_features
        self.keep_latent_output = False
        self._latent_output: LatentOutput | None = None

    @property
    def head(self) -> nn.Module:
        return self.backbone.head

    def reset_head(self, module: nn.Module) -> None:
        self.backbone.reset_head(module)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(images)
        keep = self.training and self.keep_latent_output
        if self.fusion == "none" and not keep:
            return f
        out = self.latent(f)
        if keep:
            self._latent_output = out
        if self.fusion == "none":
            return f
        f_hat = out.reconstruction.reshape(f.shape)
        return f + f_hat if self.fusion == "residual" else f_hat

    @property
    def graph_capturable(self) -> bool:
        """False while training passes keep the latent output for the loss: a side output that a
        CUDA-graph replay would not set (engine/graphs.py)."""
        return not (self.training and self.keep_latent_output)

    def pop_latent_output(self) -> LatentOutput:
        out, self._latent_output = self._latent_output, None
        if out is None:
            raise RuntimeError("no latent output kept: call forward in training mode with keep_latent_output set")
        return out


def reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor, *, similarity: str = "dot",
                        temperature: float = 0.1) -> torch.Tensor:
    """L_Recon (Eq. 4): per image C_f = f_hat^T f (N x N), cross-entropy of row j with target j.

    Args:
        reconstruction: f_hat (B, D, N). features: f (B, D, N).
        similarity: ``dot`` (the paper's C_f) or ``cosine`` (unit-normalised columns, divided
            by `temperature`).
    Returns:
        the mean over the B*N rows.
    """
    if similarity == "cosine":
        reconstruction, features = F.normalize(reconstruction, dim=1), F.normalize(features, dim=1)
    corr = torch.einsum("bdj,bdk->bjk", reconstruction, features)
    if similarity == "cosine":
        corr = corr / temperature
    n = corr.shape[-1]
    target = torch.arange(n, device=corr.device).repeat(corr.shape[0])
    return F.cross_entropy(corr.reshape(-1, n), target)


def part_features(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """g_{i,m} = sum_n S_hat^m_n f_n / sum_n S_hat^m_n: (B, D, N), (B, M, N) -> (B, M, D)."""
    return torch.einsum("bmn,bdn->bmd", weights, features) / weights.sum(2).unsqueeze(2)


def latent_augmentation_loss(samples: torch.Tensor, target: torch.Tensor, encoded: torch.Tensor,
                             cov: torch.Tensor, lam: float) -> torch.Tensor:
    """L_latent_aug (Eq. 6): ISDA's surrogate over the M latent categories.

    z = samples @ e^T, then z_j + lam/2 (e_j - e_y)^T Sigma_y (e_j - e_y) (ISDA's
    `isda_logits`, evaluated once per (y, j) pair as an M x M table, since the term does
    not depend on the sample), then the mean cross-entropy with `target`.

    Args:
        samples: (n, D). target: (n,) in [0, M). encoded: e, (M, D), the classifier weights.
        cov: Sigma' (M, D, D) or its diagonal (M, D); detached inside `isda_logits`.
    """
    m = encoded.shape[0]
    logits = samples @ encoded.t()
    table = isda_logits(logits.new_zeros(m, m), encoded, torch.arange(m, device=encoded.device), cov, lam)
    return F.cross_entropy(logits + table[target], target)


def _need(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise ConfigError(f"method.params.{key} must be {expected}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@METHODS.register("lcreg")
class LCReg(Method):
    """LCReg stage 1 (latent categories, Eq. 1-7); stage 2 is ``mislas`` on its checkpoint."""

    def __init__(self, *, cfg, data, num_latents: int = 40, latent_category: bool = True, latent_aug: bool = True,
                 latent_recon: bool = True, alpha: float = 0.1, beta: float = 0.1, gamma: float = 1.0,
                 lambda0: float = 0.5, fusion: str = "residual", aug_target: str = "part", diagonal: bool = False,
                 recon_similarity: str = "dot", recon_temperature: float = 0.1):
        super().__init__(cfg=cfg, data=data)
        _need(isinstance(num_latents, int) and not isinstance(num_latents, bool) and num_latents >= 2,
              "num_latents", "an integer >= 2", num_latents)
        for key, value in (("latent_category", latent_category), ("latent_aug", latent_aug),
                           ("latent_recon", latent_recon), ("diagonal", diagonal)):
            _need(isinstance(value, bool), key, "true or false", value)
        for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lambda0", lambda0)):
            _need(_is_number(value) and value >= 0, key, "a number >= 0", value)
        _need(fusion in FUSIONS, "fusion", f"one of {', '.join(FUSIONS)}", fusion)
        _need(aug_target in AUG_TARGETS, "aug_target", f"one of {', '.join(AUG_TARGETS)}", aug_target)
        _need(recon_similarity in SIMILARITIES, "recon_similarity", f"one of {', '.join(SIMILARITIES)}",
              recon_similarity)
        _need(_is_number(recon_temperature) and recon_temperature > 0, "recon_temperature", "a number > 0",
              recon_temperature)
        self.num_latents = num_latents
        self.latent_category, self.latent_aug, self.latent_recon = latent_category, latent_aug, latent_recon
        self.alpha, self.beta, self.gamma, self.lambda0 = float(alpha), float(beta), float(gamma), float(lambda0)
        self.fusion, self.aug_target, self.diagonal = fusion, aug_target, diagonal
        self.recon_similarity, self.recon_temperature = recon_similarity, float(recon_temperature)
        self.covariance = LazyCovariance(diagonal=diagonal)
        self._steps_per_epoch: int | None = None
        self._iteration = 0

    @property
    def uses_latents(self) -> bool:
        return self.latent_category or self.latent_aug or self.latent_recon

    def build_model(self) -> Classifier:
        backbone = super().build_model()
        if not self.uses_latents:
            return backbone
        latent = LatentCategories(num_features=backbone.num_features, num_latents=self.num_latents)
        return LatentCategoryClassifier(backbone, latent, fusion=self.fusion if self.latent_category else "none")

    def build_sampler(self):
        sampler = super().build_sampler()
        self._steps_per_epoch = math.ceil(len(sampler) / self.cfg.train.batch_size)
        return sampler

    def set_train_mode(self, model: Classifier) -> None:
        super().set_train_mode(model)
        if isinstance(model, LatentCategoryClassifier):
            model.keep_latent_output = True

    def on_epoch_start(self, epoch: int, loss) -> None:
        super().on_epoch_start(epoch, loss)
        if self._steps_per_epoch is None:
            self._steps_per_epoch = math.ceil(len(self.data.train) / self.cfg.train.batch_size)
        self._iteration = epoch * self._steps_per_epoch

    @property
    def lam(self) -> float:
        """lambda = lambda0 * t / T (t: 0-idx iteration, T: total iterations)."""
        total = self.cfg.train.epochs * (self._steps_per_epoch or 1)
        return self.lambda0 * self._iteration / total

    def training_step(self, model: Classifier, forward, images: torch.Tensor, target: torch.Tensor, loss,
                      generator: torch.Generator) -> StepResult:
        step = super().training_step(model, forward, images, target, loss, generator)
        lam = self.lam
        self._iteration += 1
        total = self.gamma * step.loss
        if not isinstance(model, LatentCategoryClassifier):
            return StepResult(total, step.logits, step.target)
        out = model.pop_latent_output().float()
        if self.latent_recon:
            total = total + self.beta * reconstruction_loss(out.reconstruction, out.features,
                                                            similarity=self.recon_similarity,
                                                            temperature=self.recon_temperature)
        if self.latent_aug:
            total = total + self.alpha * self._augmentation(out, lam)
        return StepResult(total, step.logits, step.target)

    def _augmentation(self, out: LatentOutput, lam: float) -> torch.Tensor:
        b, d, _ = out.features.shape
        m = out.encoded.shape[0]
        if self.aug_target == "part":
            samples = part_features(out.features, out.weights).reshape(b * m, d)
            labels = torch.arange(m, device=samples.device).repeat(b)
        else:
            samples = out.features.transpose(1, 2).reshape(-1, d)
            labels = out.logits.detach().argmax(1).reshape(-1)
        # as ISDA: updated before the loss, from the whole global batch under torchrun
        cov = self.covariance.update(samples, labels, m)
        return latent_augmentation_loss(samples, labels, out.encoded, cov, lam)

    def capture_blockers(self, loss=None) -> tuple[str, ...]:
        """ISDA's covariance update blocks capture only with the latent augmentation on."""
        own = (ISDA.host_syncs[0],) if self.latent_aug else ()
        return own + super().capture_blockers(loss)

    def state_dict(self) -> dict:
        return self.covariance.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.covariance.load_state_dict(state)
