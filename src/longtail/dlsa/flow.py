"""DLSA's Gaussian-mixture flow: a masked autoregressive flow onto a fixed-mean Gaussian mixture.

Xu, Li, Li, Lu, "Constructing Balance from Imbalance for Long-tailed Image Recognition",
ECCV 2022, Sec. 3.3, Eqs. 1-5; the official code (silicx/DLSA, `models/Flows.py`,
`models/FlowGMM.py`) fixes the architecture:

- MAF (Papamakarios et al. 2017) with 2 blocks, each a MADE followed by a RealNVP batch-norm
  flow layer: MADE -> BN -> MADE -> BN. The second MADE uses the reversed variable order.
- MADE: masked linears D -> H, H -> H (one hidden layer), H -> 2D with ReLU between; H = D;
  sequential degrees (hidden unit j has degree j mod (D - 1)). Output (m, s):
  u = (x - m) exp(-s), log|det| = -s per dimension.
- Flow batch norm: y = exp(log_gamma) (x - mean) / sqrt(var + eps) + beta,
  log|det| = log_gamma - 1/2 log(var + eps); train mode uses the batch mean and the unbiased
  batch variance and updates running = 0.9 running + 0.1 batch; eval mode uses the running
  statistics (so a trained flow is a fixed per-sample bijection).
- Latent: K components N(mu_k, I) with mu_k ~ N(0, 0.05^2 I) drawn once and fixed (buffer),
  uniform prior 1/K. log p_k(x) = log N(z | mu_k, I) + log|det dz/dx| (the joint log p(x, h=k)
  up to the constant -log K); log p(x) = logsumexp_k log p_k(x) - log K (Eq. 5);
  P(h = k | x) = softmax_k log p_k(x) (Eq. 4).

Our own code, not a flow library: nflows' MaskedAffineAutoregressiveTransform parameterises
the scale as sigmoid(s + 2) + 1e-3 (not exp), its MADE differs in the hidden degrees, and it
is not a dependency of this project; the model above is ~150 lines.

Deviation, to keep likelihoods finite on real features: the MADE log-scale is soft-clamped,
s = c tanh(s_raw / c) with c = `scale_clamp` (default 5: a per-layer scale within
[e^-5, e^5]; the official code has no clamp; None turns it off). The cascade also
standardises the features (train mean / std with a std floor, constant dimensions dropped)
before the flow, see `cascade.Standardiser`, and trains it with dequantisation noise and
restarts on a non-finite epoch, see `cascade.train_flow`. The clamp alone does not bound
the likelihood: the shifts and the batch-norm scales are free, so on features with exact
repeated values (post-ReLU zeros) the weighted MLE sharpens the flow without limit; the
noise is what keeps that optimum finite.

Shapes: features (B, D) -> z (B, D), log_det (B,), log_joint (B, K), log_likelihood (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def made_masks(order: torch.Tensor, hidden: int, n_hidden: int) -> list[torch.Tensor]:
    """Connectivity masks of a MADE (Germain et al. 2015) for the variable degrees `order`.

    order: (D,) a permutation of 0..D-1 (variable i is the order[i]-th to be generated).
    Returns masks of shapes (H, D), n_hidden x (H, H), (D, H) (out, in), 1 = connected:
    hidden unit j has degree j mod (D - 1); a hidden unit sees inputs of degree <= its own;
    output i sees hidden units of degree < order[i], so output i depends only on variables
    generated before it (output degree 0 sees nothing: its m and s are biases).
    """
    dim = order.numel()
    hidden_deg = torch.arange(hidden) % (dim - 1)
    masks = [(hidden_deg[:, None] >= order[None, :]).float()]
    for _ in range(n_hidden):
        masks.append((hidden_deg[:, None] >= hidden_deg[None, :]).float())
    masks.append((order[:, None] > hidden_deg[None, :]).float())
    return masks


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask (out, in)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """One masked autoregressive affine layer: u = (x - m(x)) exp(-s(x)), log|det| = -s.

    forward(x (B, D)) -> (u (B, D), log_det (B, D)); inverse(u) -> x, one variable at a time
    in generation order (D passes).
    """

    def __init__(self, dim: int, *, hidden: int, n_hidden: int = 1, reverse: bool = False,
                 scale_clamp: float | None = 5.0):
        super().__init__()
        order = torch.arange(dim)
        if reverse:
            order = order.flip(0)
        self.register_buffer("order", order)
        masks = made_masks(order, hidden, n_hidden)
        layers: list[nn.Module] = [MaskedLinear(dim, hidden, masks[0])]
        for m in masks[1:-1]:
            layers += [nn.ReLU(), MaskedLinear(hidden, hidden, m)]
        layers += [nn.ReLU(), MaskedLinear(hidden, 2 * dim, masks[-1].repeat(2, 1))]
        self.net = nn.Sequential(*layers)
        self.scale_clamp = scale_clamp

    def shift_and_log_scale(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self.net(inputs).chunk(2, dim=1)
        if self.scale_clamp is not None:
            log_scale = self.scale_clamp * torch.tanh(log_scale / self.scale_clamp)
        return shift, log_scale

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self.shift_and_log_scale(inputs)
        return (inputs - shift) * torch.exp(-log_scale), -log_scale

    def inverse(self, latent: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(latent)
        for var in torch.argsort(self.order).tolist():  # generation order
            shift, log_scale = self.shift_and_log_scale(out)
            out[:, var] = latent[:, var] * torch.exp(log_scale[:, var]) + shift[:, var]
        return out


class FlowBatchNorm(nn.Module):
    """RealNVP batch normalisation as a flow layer (Dinh et al. 2017, Sec. 3.7).

    y = exp(log_gamma) (x - mean) / sqrt(var + eps) + beta; log|det| = log_gamma - 1/2 log(var + eps).
    Train mode: batch mean and unbiased batch variance (the official code's `x.var(0)`),
    running = momentum running + (1 - momentum) batch. Eval mode: running statistics.
    """

    def __init__(self, dim: int, *, momentum: float = 0.9, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def _stats(self, inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and inputs is not None:
            mean, var = inputs.mean(0), inputs.var(0)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean.detach())
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var.detach())
            return mean, var
        return self.running_mean, self.running_var

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._stats(inputs)
        out = torch.exp(self.log_gamma) * (inputs - mean) / torch.sqrt(var + self.eps) + self.beta
        log_det = (self.log_gamma - 0.5 * torch.log(var + self.eps)).expand_as(inputs)
        return out, log_det

    def inverse(self, outputs: torch.Tensor) -> torch.Tensor:
        """Inverse with the running statistics (eval-mode bijection)."""
        mean, var = self.running_mean, self.running_var
        return (outputs - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps) + mean


class MAF(nn.Module):
    """Masked autoregressive flow: `blocks` x (MADE, FlowBatchNorm), variable order reversed
    in every other MADE. forward(x) -> (z, log_det (B,)); inverse(z) -> x (eval mode)."""

    def __init__(self, dim: int, *, blocks: int = 2, hidden: int | None = None, n_hidden: int = 1,
                 batch_norm: bool = True, scale_clamp: float | None = 5.0):
        super().__init__()
        layers: list[nn.Module] = []
        for b in range(blocks):
            layers.append(MADE(dim, hidden=hidden or dim, n_hidden=n_hidden, reverse=bool(b % 2),
                               scale_clamp=scale_clamp))
            if batch_norm:
                layers.append(FlowBatchNorm(dim))
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = inputs.new_zeros(inputs.shape[0])
        for layer in self.layers:
            inputs, ld = layer(inputs)
            log_det = log_det + ld.sum(1)
        return inputs, log_det

    def inverse(self, latent: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            latent = layer.inverse(latent)
        return latent


class GaussianMixtureFlow(nn.Module):
    """Flow filter model: MAF onto a K-component, identity-covariance, uniform-prior mixture.

    Args:
        dim: feature dimension D (>= 2).
        clusters: K.
        center_std: std of the fixed means, mu_k ~ N(0, center_std^2 I) (paper: 0.05).
        blocks, hidden, n_hidden, batch_norm, scale_clamp: the MAF (module docstring).
        seed: the means and the initial weights come from torch.Generator(seed); no global RNG.

    forward(features (B, D)) -> (z (B, D), log_joint (B, K), log_likelihood (B,)).
    """

    def __init__(self, dim: int, *, clusters: int, center_std: float = 0.05, blocks: int = 2,
                 hidden: int | None = None, n_hidden: int = 1, batch_norm: bool = True,
                 scale_clamp: float | None = 5.0, seed: int = 0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"the flow needs features of dimension >= 2, got {dim}")
        self.dim, self.clusters = dim, clusters
        self.flow = MAF(dim, blocks=blocks, hidden=hidden, n_hidden=n_hidden, batch_norm=batch_norm,
                        scale_clamp=scale_clamp)
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("means", torch.randn(clusters, dim, generator=gen) * center_std)
        with torch.no_grad():  # nn.Linear's default init (uniform +-1/sqrt(fan_in)), seeded
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.weight.uniform_(-bound, bound, generator=gen)
                    module.bias.uniform_(-bound, bound, generator=gen)

    def log_joint(self, latent: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """log N(z | mu_k, I) + log|det| per component, (B, K).

        ||z - mu||^2 is expanded as ||z||^2 - 2 z.mu + ||mu||^2: the term that differs
        between components (z.mu - ||mu||^2 / 2) is exact, memory is O(B K) not O(B K D).
        """
        const = -0.5 * self.dim * math.log(2 * math.pi)
        common = const - 0.5 * latent.pow(2).sum(1) + log_det
        means = self.means.to(latent.dtype)
        return common[:, None] + latent @ means.T - 0.5 * means.pow(2).sum(1)[None, :]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, log_det = self.flow(features)
        joint = self.log_joint(latent, log_det)
        loglik = torch.logsumexp(joint, dim=1) - math.log(self.clusters)
        return latent, joint, loglik

    @torch.no_grad()
    def score(self, features: torch.Tensor, *, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (log_likelihood (N,), cluster = argmax_k P(h=k|x) (N,)) in batches."""
        was_training = self.training
        self.eval()
        lls, clusters = [], []
        for start in range(0, features.shape[0], batch_size):
            _, joint, ll = self(features[start:start + batch_size])
            lls.append(ll)
            clusters.append(joint.argmax(1))
        self.train(was_training)
        if not lls:
            return features.new_zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(lls), torch.cat(clusters)


def cluster_posterior(log_joint: torch.Tensor) -> torch.Tensor:
    """P(h = k | x) = softmax_k log p_k(x) (Eq. 4; the uniform prior cancels). (B, K)."""
    return torch.softmax(log_joint, dim=1)
