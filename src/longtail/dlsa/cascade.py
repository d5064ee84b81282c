"""The DLSA cascade on frozen features (Xu et al., ECCV 2022, Sec. 3.2-3.4, Fig. 4).

    remaining = all training samples
    for d in 1..depth:
        train a Flow Filter (flow.GaussianMixtureFlow, losses of losses.py) on `remaining`
        threshold t_d = the likelihood of the sample at rank int(n (1 - share)) of `remaining`
        (sorted ascending): the top `share` (30 %) go to cluster-aided classifier d
        (classifier.ClusterAidedClassifier, Balanced Softmax over that subset's counts,
        P(y|h) = class histogram of *all* training samples in cluster h of filter d)
        remaining = the rest
    the last remainder -> a regular linear classifier (Balanced Softmax over all training counts)

Validation and test samples are routed with the training thresholds: a sample goes to the
first filter whose threshold its likelihood reaches, else to the regular classifier, so
every sample is classified exactly once (`route`).

The baseline "classifier alone" is that regular classifier trained on all training samples
with the same optimiser, epochs and features, so the comparison isolates DLSA. Every prefix
of the cascade (depth 1..depth) gets its own regular classifier, so one run reports each
depth; `dlsa_val_selected` picks depth and epoch on validation.

Readings and deviations (docs/dlsa.md):
- features are standardised with the training mean / std (dimensions with std <= 1e-6 x the
  largest std dropped; the divisor floored at `std_floor` x the median std) for the flows
  and all classifiers; the MADE log-scale is soft-clamped (flow.py).
- numerical safeguards of flow training (ours, `train_flow`): dequantisation noise of std
  `flow_noise` on every training batch, and restarts with a halved learning rate after a
  non-finite epoch (`flow_retries`). Without the noise, post-ReLU features (exact zeros)
  made the weighted MLE unbounded and the flows overflowed after 4-50 epochs; a lower rate
  only delayed it.
- flow epoch: the official rule (most clusters with purity > 0.7 and size > 10 on the
  flow's training subset, among epochs whose largest cluster is under a cap); the official
  cap is 5000 samples on ImageNet-LT (115,846 samples, 500 clusters: 21.6 x the uniform
  cluster size), here `max_cluster_ratio` x n / K (default 20). `flow_select: last` keeps the
  last epoch.
- classifier epoch: the official code picks it on test accuracy; here every classifier of a
  model keeps snapshots every `eval_every` epochs and one epoch is chosen by the top-1 of the
  whole model (cascade or baseline) on the validation split. Both last and best-val are
  reported.
- K default: round(500 sqrt(C / 1000)) (`default_clusters`).
- head / tail for the separation accuracy: tail = classes with n_c <= `tail_threshold`;
  default the median training count, so half the classes are tail and a random filter
  scores the tail share of the test set (50 % on a balanced test set), as in the paper's
  Fig. 2 reading of 50 % as random separation.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..errors import ConfigError, DataError, did_you_mean
from ..eval.metrics import compute_metrics
from .classifier import ClusterAidedClassifier, LinearClassifier, Snapshots, train_classifier
from .flow import GaussianMixtureFlow
from .losses import BalancednessLoss, PairSampler, likelihood_weights, purity_loss, weighted_nll

log = logging.getLogger(__name__)

FLOW_SELECT = ("clusters", "last")


def default_clusters(num_classes: int) -> int:
    """K = round(500 sqrt(C / 1000)), at least 2.

    Equals the paper's 500 at C = 1000 (ImageNet-LT), grows sub-linearly (the paper's
    ablation: 1000 clusters are worse and slower than 500), and stays above C for C < 250,
    so on small label sets every class can own a cluster (purity is reachable). CIFAR-10:
    50 clusters, about 248 training samples per cluster, close to ImageNet-LT's 232 at 500.
    """
    return max(2, int(round(500 * math.sqrt(num_classes / 1000))))


@dataclass
class DLSAConfig:
    """Hyper-parameters of `run_dlsa`; defaults follow the official ImageNet-LT configs
    unless noted (docs/dlsa.md). `clusters` / `tail_threshold` None: derived from the data."""

    clusters: int | None = None          # K; None: default_clusters(C)
    depth: int = 3                       # number of Flow Filters
    filter_share: float = 0.3            # share of the remaining training samples filtered per filter
    q: float = 2.0                       # likelihood weights n_c^-q
    eta: float = 0.7                     # balancedness momentum
    lambda_lh: float = 2.0
    lambda_bal: float = 1.0
    lambda_pure: float = 0.02
    center_std: float = 0.05
    scale_clamp: float | None = 5.0      # soft clamp of the MADE log-scale (ours; None: off)
    flow_blocks: int = 2
    flow_epochs: int = 50                # official ImageNet-LT value
    flow_batch: int = 512                # ours: official 1024 on 116k ImageNet-LT samples
    flow_lr: float = 0.2
    flow_noise: float = 0.05             # ours: std of the dequantisation noise on flow training batches (0: off)
    flow_retries: int = 5                # ours: restarts with a halved flow lr after a non-finite epoch
    std_floor: float = 0.1               # ours: standardisation divisor >= this x the median feature std
    flow_select: str = "clusters"
    min_purity: float = 0.7
    min_size: int = 10
    max_cluster_ratio: float = 20.0
    cls_epochs: int = 150
    cls_batch: int = 128
    cls_lr: float = 1e-2
    eval_every: int = 5
    tail_threshold: float | None = None  # tail: n_c <= this; None: median training count
    init_from_head: bool = False         # every classifier's Linear_x starts from the run's linear head
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        def need(key, ok, what):
            if not ok:
                raise ConfigError(f"dlsa {key} must be {what}, got {getattr(self, key)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need("clusters", self.clusters is None or (is_int(self.clusters) and self.clusters >= 2),
             "an integer >= 2 (or unset for the default)")
        for key in ("depth", "flow_blocks", "flow_epochs", "flow_batch", "cls_epochs", "cls_batch", "eval_every"):
            need(key, is_int(getattr(self, key)) and getattr(self, key) >= 1, "an integer >= 1")
        need("flow_batch", self.flow_batch >= 2, "an integer >= 2 (batch-norm statistics)")
        need("min_size", is_int(self.min_size) and self.min_size >= 0, "an integer >= 0")
        need("flow_retries", is_int(self.flow_retries) and self.flow_retries >= 0, "an integer >= 0")
        for key in ("flow_noise", "std_floor"):
            need(key, is_num(getattr(self, key)) and getattr(self, key) >= 0, "a number >= 0")
        need("seed", is_int(self.seed) and self.seed >= 0, "an integer >= 0")
        need("filter_share", is_num(self.filter_share) and 0 < self.filter_share < 1, "a number in (0, 1)")
        need("eta", is_num(self.eta) and 0 <= self.eta < 1, "a number in [0, 1)")
        need("min_purity", is_num(self.min_purity) and 0 <= self.min_purity <= 1, "a number in [0, 1]")
        for key in ("q", "lambda_lh", "lambda_bal", "lambda_pure"):
            need(key, is_num(getattr(self, key)) and getattr(self, key) >= 0, "a number >= 0")
        for key in ("center_std", "flow_lr", "cls_lr", "max_cluster_ratio"):
            need(key, is_num(getattr(self, key)) and getattr(self, key) > 0, "a number > 0")
        need("scale_clamp", self.scale_clamp is None or (is_num(self.scale_clamp) and self.scale_clamp > 0),
             "a number > 0 (or unset for no clamp)")
        need("tail_threshold",
             self.tail_threshold is None or (is_num(self.tail_threshold) and self.tail_threshold >= 0),
             "a number >= 0 (or unset for the median count)")
        need("flow_select", self.flow_select in FLOW_SELECT, f"one of {', '.join(FLOW_SELECT)}")
        need("init_from_head", isinstance(self.init_from_head, bool), "true or false")

    @classmethod
    def from_dict(cls, values: dict) -> DLSAConfig:
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown dlsa option '{key}'{did_you_mean(key, known)}")
        return cls(**values)


class Standardiser:
    """x -> (x[:, keep] - mean) / max(std, floor) with training statistics (N, D) -> (N, D_kept).

    Drops constant dimensions (std <= 1e-6 x the largest std). Numerical safeguard (ours):
    the divisor is floored at `std_floor` x the median std of the kept dimensions. Post-ReLU
    pooled features have nearly dead channels (non-zero in a handful of samples, std ~1e-3 of
    a typical channel); dividing by their own std turns those few samples into z-scores of
    ~sqrt(N / k) (100+ on CIFAR-size sets), and such outliers make the flow's MLE gradient
    explode. With the floor a nearly dead channel keeps its small spread; ordinary channels
    (std >= the floor) are standardised exactly as before. `std_floor=0` turns it off.
    """

    def __init__(self, features: np.ndarray, *, std_floor: float = 0.1):
        std = features.std(0)
        self.keep = np.where(std > 1e-6 * max(float(std.max()), 1e-12))[0]
        self.mean = features[:, self.keep].mean(0)
        kept = std[self.keep]
        floor = std_floor * float(np.median(kept)) if len(kept) else 0.0
        self.std = np.maximum(kept, floor)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features[:, self.keep] - self.mean) / self.std).astype(np.float32)


def standardised_head(head: dict, std: Standardiser, train: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's linear head, logits = W f + b (W (C, D), b (C,)), rewritten for the standardised
    features x = (f[keep] - mean) / s that every DLSA classifier sees: W' = W[:, keep] * s (C, D_kept),
    b' = b + W[:, keep] @ mean + W[:, dropped] @ mean(f[:, dropped]) (C,), so W' x + b' = W f + b (a
    dropped dimension is constant on the training set). The official PaCo configs start the
    classifiers from the backbone's head this way (`backbone_weight_path`, loaded into Linear_x).

    `head`: FeatureSet.head ({"weight", optional "bias"}); `train`: the training split, whose stored
    logits must be that linear function of its features, else the head is not a plain linear layer
    (a cosine or normalised head, TDE's, an expert mean...) and a ConfigError says so.
    """
    if "weight" not in head:
        raise ConfigError("--init-from-head needs a run whose head is a linear layer; this run's head has no "
                          "(classes x features) weight")
    f = np.asarray(train["features"], dtype=np.float64)
    w = np.asarray(head["weight"], dtype=np.float64)
    b = np.asarray(head.get("bias", np.zeros(w.shape[0])), dtype=np.float64)
    logits = np.asarray(train["logits"], dtype=np.float64)
    if w.shape != (logits.shape[1], f.shape[1]):
        raise ConfigError(f"--init-from-head: the run's head weight {tuple(w.shape)} does not map its "
                          f"{f.shape[1]} features to {logits.shape[1]} classes")
    error = float(np.abs(f @ w.T + b - logits).max())
    if error > 1e-3 * (1.0 + float(np.abs(logits).max())):
        raise ConfigError(f"--init-from-head needs a run whose logits are W f + b of its features (a plain linear "
                          f"head); this run's differ from that by up to {error:.3g}")
    dropped = np.setdiff1d(np.arange(f.shape[1]), std.keep)
    weight = w[:, std.keep] * std.std
    bias = b + w[:, std.keep] @ std.mean + w[:, dropped] @ f[:, dropped].mean(0)
    return torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)


def cluster_statistics(clusters: np.ndarray, labels: np.ndarray, num_clusters: int,
                       num_classes: int) -> dict[str, np.ndarray]:
    """Per cluster: size (K,), purity (K,) = largest class share (0 when empty), histogram (K, C)."""
    hist = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(hist, (clusters, labels), 1)
    size = hist.sum(1)
    purity = np.where(size > 0, hist.max(1) / np.maximum(size, 1), 0.0)
    return {"size": size, "purity": purity, "histogram": hist}


def cluster_prior_table(clusters: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """P(y | h) (K, C): class histogram of the samples in each cluster, rows sum to 1 (0 if empty)."""
    hist = cluster_statistics(clusters, labels, num_clusters, num_classes)["histogram"].astype(np.float64)
    size = hist.sum(1, keepdims=True)
    return (hist / np.maximum(size, 1)).astype(np.float32)


def _snapshot(flow: GaussianMixtureFlow, balance: BalancednessLoss) -> dict:
    """Everything one flow epoch changes: the weights, the batch-norm running statistics and the
    balancedness estimator's state (its running tensor is replaced, never modified in place)."""
    return {"flow": copy.deepcopy(flow.state_dict()), "running": balance.running, "step": balance.step}


def _restore(flow: GaussianMixtureFlow, balance: BalancednessLoss, saved: dict) -> None:
    """Put back a `_snapshot`."""
    flow.load_state_dict(saved["flow"])
    balance.running, balance.step = saved["running"], saved["step"]


def _flow_epoch(flow, optimiser, features, pos, neg, *, target, weights, balance, cfg, batch, steps,
                noise) -> tuple[np.ndarray, float, str | None]:
    """One epoch of SGD steps on (positive, negative) pairs, each batch with fresh dequantisation
    noise. Returns (mean [loss, mle, balance, purity], largest gradient norm, None), or stops at
    the first non-finite loss or gradient norm, before its step, and returns what was not finite."""
    totals, largest = np.zeros(4), 0.0
    params = list(flow.parameters())
    for s in range(steps):
        p = torch.as_tensor(pos[s * batch:(s + 1) * batch], device=features.device)
        q = torch.as_tensor(neg[s * batch:(s + 1) * batch], device=features.device)
        x_pos, x_neg = features[p], features[q]
        if cfg.flow_noise > 0:
            x_pos = x_pos + cfg.flow_noise * torch.randn(x_pos.shape, generator=noise, device=x_pos.device)
            x_neg = x_neg + cfg.flow_noise * torch.randn(x_neg.shape, generator=noise, device=x_neg.device)
        _, joint_pos, ll_pos = flow(x_pos)
        _, joint_neg, _ = flow(x_neg)
        parts = [cfg.lambda_lh * weighted_nll(ll_pos, target[p], weights)]
        parts.append(cfg.lambda_bal * balance(joint_pos) if cfg.lambda_bal > 0 else ll_pos.new_zeros(()))
        parts.append(cfg.lambda_pure * purity_loss(joint_pos, joint_neg) if cfg.lambda_pure > 0
                     else ll_pos.new_zeros(()))
        loss = parts[0] + parts[1] + parts[2]
        if not torch.isfinite(loss):
            return totals / steps, largest, f"the flow loss is not finite at step {s + 1}"
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))  # the norm only, no clipping
        if not math.isfinite(norm):
            return totals / steps, largest, f"the flow gradient norm is not finite at step {s + 1}"
        largest = max(largest, norm)
        optimiser.step()
        totals += [float(v.detach()) for v in (loss, *parts)]
    return totals / steps, largest, None


def _divergence_message(name: str, epoch: int, failure: str, cfg: DLSAConfig, lr: float) -> str:
    """The one-line error after the last allowed restart, naming the options that help."""
    return (f"{name}: flow training diverged at epoch {epoch} ({failure}) after {cfg.flow_retries} restart(s), "
            f"each with half the learning rate (last {lr:g}); lower --flow-lr (now {cfg.flow_lr:g}), raise "
            f"--flow-noise (now {cfg.flow_noise:g}; the noise keeps repeated feature values such as post-ReLU "
            f"zeros from making the likelihood unbounded) or raise --flow-retries (now {cfg.flow_retries})")


def train_flow(features: torch.Tensor, labels: np.ndarray, *, cfg: DLSAConfig, clusters: int,
               num_classes: int, seed: int, name: str = "filter") -> tuple[GaussianMixtureFlow, dict]:
    """Train one Flow Filter on (features (n, D), labels (n,)); returns (flow in eval mode, info).

    Numerical safeguards (ours, not in the paper; docs/dlsa.md "Numerical safeguards"):
    - dequantisation: every training batch gets fresh N(0, `cfg.flow_noise`^2) noise (seeded).
      Post-ReLU features repeat values exactly (zeros), and a subset can be constant in a
      dimension; a continuous density's likelihood on such point masses has no maximum, so
      without the noise the weighted MLE keeps sharpening the flow until SGD overflows. The
      likelihoods used for filtering, routing and the epoch choice are those of the clean
      features (eval mode, no noise).
    - recovery: an epoch whose loss, gradient (norm) or end-of-epoch training-subset
      likelihoods are not finite is undone: the weights, batch-norm statistics and
      balancedness state of the end of the previous epoch are restored, the learning rate is
      halved for the rest of this flow, and training goes on from there (logged, and listed
      in info["restarts"]). If the very next epoch fails again, that restored state is finite
      but already wrecked, so the flow starts over from its initial weights (history and
      epoch choice reset) at the halved rate. After `cfg.flow_retries` restarts a one-line
      ConfigError names the options that help.
    """
    n = features.shape[0]
    try:
        sampler = PairSampler(labels)
    except ValueError as err:
        raise DataError(f"{name}: {err}; use a smaller --depth") from None
    flow = GaussianMixtureFlow(features.shape[1], clusters=clusters, center_std=cfg.center_std,
                               blocks=cfg.flow_blocks, scale_clamp=cfg.scale_clamp, seed=seed).to(features.device)
    weights = torch.tensor(likelihood_weights(np.bincount(labels, minlength=num_classes), cfg.q),
                           dtype=torch.float32, device=features.device)
    target = torch.as_tensor(labels, dtype=torch.long, device=features.device)
    balance = BalancednessLoss(clusters=clusters, momentum=cfg.eta)
    lr = cfg.flow_lr
    optimiser = torch.optim.SGD(flow.parameters(), lr=lr, momentum=0.0)
    rng = np.random.default_rng(seed)
    noise = torch.Generator(device=features.device)
    noise.manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
    batch = min(cfg.flow_batch, n)
    steps = max(n // batch, 1)  # full batches only: batch-norm needs >= 2 samples
    cap = cfg.max_cluster_ratio * n / clusters
    best = {"good": -1, "epoch": None, "state": None}
    history, restarts = [], []
    initial = saved = _snapshot(flow, balance)
    epoch, progressed = 1, True
    while epoch <= cfg.flow_epochs:
        flow.train()
        pos, neg = sampler.epoch(rng)
        totals, grad_norm, failure = _flow_epoch(flow, optimiser, features, pos, neg, target=target,
                                                 weights=weights, balance=balance, cfg=cfg, batch=batch,
                                                 steps=steps, noise=noise)
        if failure is None:
            ll, assigned = flow.score(features)
            if not bool(torch.isfinite(ll).all()):
                failure = "the likelihoods of the training subset are not finite"
        if failure is not None:
            if len(restarts) >= cfg.flow_retries:
                raise ConfigError(_divergence_message(name, epoch, failure, cfg, lr))
            lr /= 2
            for group in optimiser.param_groups:
                group["lr"] = lr
            # a state that fails again at once, at a lower rate, is finite but already wrecked: start over
            resume = 0 if restarts and not progressed else epoch - 1
            _restore(flow, balance, initial if resume == 0 else saved)
            if resume == 0:
                saved, history, best = initial, [], {"good": -1, "epoch": None, "state": None}
            restarts.append({"epoch": epoch, "failure": failure, "resumed_after_epoch": resume, "new_lr": lr})
            log.warning(f"  {name}: epoch {epoch}: {failure}; went back to "
                        f"{'the initial weights' if resume == 0 else f'the state after epoch {resume}'} "
                        f"and halved the flow learning rate to {lr:g}")
            epoch, progressed = resume + 1, False
            continue
        progressed = True
        saved = _snapshot(flow, balance)
        stats = cluster_statistics(assigned.cpu().numpy(), labels, clusters, num_classes)
        good = int(((stats["purity"] > cfg.min_purity) & (stats["size"] > cfg.min_size)).sum())
        largest = int(stats["size"].max())
        history.append({"epoch": epoch, "loss": totals[0], "mle": totals[1], "balance": totals[2],
                        "purity": totals[3], "good_clusters": good, "largest_cluster": largest,
                        "used_clusters": int((stats["size"] > 0).sum()), "mean_loglik": float(ll.mean()),
                        "lr": lr, "max_grad_norm": grad_norm})
        if cfg.flow_select == "clusters" and good > best["good"] and largest < cap:
            best = {"good": good, "epoch": epoch, "state": saved["flow"]}
        epoch += 1
    if best["state"] is not None:
        flow.load_state_dict(best["state"])
        selected = best["epoch"]
    else:
        selected = cfg.flow_epochs
    flow.eval()
    h = history[selected - 1]
    log.info(f"  {name}: {n} samples, {steps} steps/epoch x {cfg.flow_epochs} epochs; epoch {selected} kept "
             f"({h['good_clusters']} clusters with purity > {cfg.min_purity:g} and size > {cfg.min_size}, "
             f"largest {h['largest_cluster']}, {h['used_clusters']}/{clusters} used)"
             + (f"; {len(restarts)} restart(s), final lr {lr:g}" if restarts else ""))
    info = {"samples": int(n), "steps_per_epoch": steps, "selected_epoch": selected,
            "selection": cfg.flow_select if best["state"] is not None else "last",
            "largest_cluster_cap": cap, "restarts": restarts, "final_lr": lr, "history": history}
    return flow, info


def _check_finite(loglik: np.ndarray, name: str, which: str) -> np.ndarray:
    bad = int((~np.isfinite(loglik)).sum())
    if bad:
        raise DataError(f"{name}: {bad} of {len(loglik)} log-likelihoods of {which} features are not finite")
    return loglik


def route(loglik_per_filter: list[np.ndarray], thresholds: list[float]) -> np.ndarray:
    """Classifier index per sample: the first filter d with loglik_d >= threshold_d, else
    len(thresholds) (the regular classifier). Every sample gets exactly one index. (N,) int64."""
    n = len(loglik_per_filter[0]) if loglik_per_filter else 0
    out = np.full(n, len(thresholds), dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    for d, (ll, thr) in enumerate(zip(loglik_per_filter, thresholds, strict=True)):
        hit = alive & (ll >= thr)
        out[hit] = d
        alive &= ~hit
    return out


def likelihood_threshold(loglik: np.ndarray, share: float) -> float:
    """The official quantile: sorted(loglik)[int(n (1 - share))] (ascending); loglik >= it is filtered."""
    ordered = np.sort(loglik)
    return float(ordered[min(int(len(ordered) * (1 - share)), len(ordered) - 1)])


@dataclass
class _Stage:
    flow: GaussianMixtureFlow
    threshold: float
    prior_table: np.ndarray          # (K, C) P(y | h) over all training samples
    model: torch.nn.Module           # cluster-aided classifier
    snapshots: Snapshots


class DLSACascade:
    """A fitted cascade: `fit(train features, labels)`, then `predict(features, depth)`.

    `stages[d]` is filter d + 1 with its cluster-aided classifier; `regular[d]` is the
    regular classifier of the remainder after the first d + 1 filters, so every prefix
    depth 1..depth is a complete cascade (the flows of a prefix do not depend on the later
    filters); the configured model is depth = cfg.depth. Extra prefixes cost one linear
    classifier each and let the depth be compared (and chosen on validation).
    """

    def __init__(self, cfg: DLSAConfig, num_classes: int, *, head_init: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg, self.num_classes, self.head_init = cfg, num_classes, head_init
        self.stages: list[_Stage] = []
        self.regular: list[tuple[torch.nn.Module, Snapshots]] = []
        self.info: list[dict] = []
        self.epochs: list[int] = []

    def _seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([self.cfg.seed, *parts]).generate_state(1)[0])

    def _classifier(self, model, features, target, mask, counts, seed, prior=None):
        sel = torch.as_tensor(np.where(mask)[0], device=features.device)
        cfg = self.cfg
        return train_classifier(model.to(features.device), features[sel], target[sel], prior_counts=counts,
                                cluster_prior=None if prior is None else (prior[0], prior[1][sel]),
                                epochs=cfg.cls_epochs, batch_size=cfg.cls_batch, lr=cfg.cls_lr,
                                eval_every=cfg.eval_every, seed=seed, init=self.head_init)

    def fit(self, features: torch.Tensor, labels: np.ndarray) -> DLSACascade:
        cfg, C, D = self.cfg, self.num_classes, features.shape[1]
        K = cfg.clusters or default_clusters(C)
        all_counts = np.bincount(labels, minlength=C)
        target = torch.as_tensor(labels, dtype=torch.long, device=features.device)
        remaining = np.ones(len(labels), dtype=bool)
        for d in range(cfg.depth):
            t0, c0 = time.perf_counter(), time.process_time()
            idx = np.where(remaining)[0]
            flow, info = train_flow(features[torch.as_tensor(idx, device=features.device)], labels[idx], cfg=cfg,
                                    clusters=K, num_classes=C, seed=self._seed(1, d),
                                    name=f"filter {d + 1}")
            flow_seconds, flow_cpu = time.perf_counter() - t0, time.process_time() - c0
            ll, assigned = (t.cpu().numpy() for t in flow.score(features))
            _check_finite(ll, f"filter {d + 1}", "training")
            threshold = likelihood_threshold(ll[idx], cfg.filter_share)
            chosen = remaining & (ll >= threshold)
            table = cluster_prior_table(assigned, labels, K, C)
            prior = (torch.as_tensor(table, device=features.device),  # rows looked up per batch
                     torch.as_tensor(assigned, dtype=torch.long, device=features.device))
            t1 = time.perf_counter()
            model = ClusterAidedClassifier(D, C)
            snaps = self._classifier(model, features, target, chosen, np.bincount(labels[chosen], minlength=C),
                                     self._seed(2, d), prior)
            self.stages.append(_Stage(flow, threshold, table, model, snaps))
            remaining &= ~chosen
            # the regular classifier of this prefix: the remainder, Balanced Softmax over all counts
            regular = LinearClassifier(D, C)
            self.regular.append((regular, self._classifier(regular, features, target, remaining, all_counts,
                                                           self._seed(3, d))))
            self.info.append({"filter": d + 1, "clusters": K, "threshold": threshold, "flow": info,
                              "train_remaining": int(len(idx)), "train_filtered": int(chosen.sum()),
                              "train_loglik_range": [float(ll.min()), float(ll.max())],
                              "flow_seconds": flow_seconds, "flow_cpu_seconds": flow_cpu,
                              "classifier_seconds": time.perf_counter() - t1})
            if not remaining.any():
                raise DataError(f"no training samples remain after filter {d + 1}; use a smaller --depth")
        self.epochs = snaps.epochs
        return self

    @torch.no_grad()
    def route(self, features: torch.Tensor, depth: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(classifier index per sample (N,): d < depth filter d + 1, depth = regular;
        cluster per filter [(N,) ...])."""
        depth = depth or len(self.stages)
        lls, clusters = [], []
        for d, stage in enumerate(self.stages[:depth]):
            ll, assigned = stage.flow.score(features)
            lls.append(_check_finite(ll.cpu().numpy(), f"filter {d + 1}", "these"))
            clusters.append(assigned.cpu().numpy())
        return route(lls, [s.threshold for s in self.stages[:depth]]), clusters

    @torch.no_grad()
    def predict(self, features: torch.Tensor, depth: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(route (N,), [logits (N, C) per snapshot epoch, in `self.epochs` order]) of the
        prefix cascade with `depth` filters (default: all)."""
        depth = depth or len(self.stages)
        routes, clusters = self.route(features, depth)
        models = [(s.model, s.snapshots, s.prior_table) for s in self.stages[:depth]]
        models.append((*self.regular[depth - 1], None))
        out = []
        for j in range(len(self.epochs)):
            logits = torch.zeros(features.shape[0], self.num_classes, device=features.device)
            for d, (model, snapshots, table) in enumerate(models):
                mask = torch.as_tensor(routes == d, device=features.device)
                if not bool(mask.any()):
                    continue
                model.load_state_dict(snapshots[j][1])
                prior = None
                if table is not None:
                    prior = torch.as_tensor(table[clusters[d][mask.cpu().numpy()]], device=features.device)
                logits[mask] = model(features[mask], prior)
            out.append(logits.cpu().numpy())
        return routes, out


def _predict_alone(model, snapshots, features: torch.Tensor) -> list[np.ndarray]:
    out = []
    with torch.no_grad():
        for _, state in snapshots:
            model.load_state_dict(state)
            out.append(model(features).cpu().numpy())
    return out


def _summary(logits: np.ndarray, labels: np.ndarray, counts: np.ndarray, tail: np.ndarray, **thresholds) -> dict:
    m = compute_metrics(logits, labels, counts, **thresholds)
    per_class = np.array([np.nan if v is None else v for v in m["per_class"]])
    head = np.setdiff1d(np.arange(len(counts)), tail)
    return {"top1": m["top1"], "many": m["many"], "medium": m["medium"], "few": m["few"],
            "head": float(np.nanmean(per_class[head])) if len(head) else None,
            "tail": float(np.nanmean(per_class[tail])) if len(tail) else None,
            "mcc": m["mcc"], "nmi": m["nmi"], "mean_per_class": m["mean_per_class"], "per_class": m["per_class"]}


def _stage_accuracy(mask: np.ndarray, labels: np.ndarray, dlsa_logits: np.ndarray, alone_logits: np.ndarray) -> dict:
    """Top-1 (%, last epoch) on the test samples one classifier of the cascade receives, for
    that classifier and for the classifier alone on the same samples."""
    if not mask.any():
        return {"classifier_top1": None, "alone_top1_same_samples": None}
    y = labels[mask]
    return {"classifier_top1": float((dlsa_logits[mask].argmax(1) == y).mean() * 100),
            "alone_top1_same_samples": float((alone_logits[mask].argmax(1) == y).mean() * 100)}


def _select(val_logits: list[np.ndarray] | None, val_labels: np.ndarray | None) -> int | None:
    if val_logits is None or val_labels is None or len(val_labels) == 0:
        return None
    scores = [float((v.argmax(1) == val_labels).mean()) for v in val_logits]
    return int(np.argmax(scores))  # first maximum: the earliest epoch among ties


def run_dlsa(feature_set, cfg: DLSAConfig | None = None, *, many_threshold: int = 100,
             few_threshold: int = 20) -> dict:
    """DLSA vs the classifier alone on a `longtail.features.FeatureSet`; JSON-ready results."""
    from ..dist import resolve_device

    cfg = cfg or DLSAConfig()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    train = feature_set["train"]
    counts = np.asarray(feature_set.class_counts, dtype=np.int64)
    C = feature_set.num_classes
    labels = np.asarray(train["labels"], dtype=np.int64)
    if len(labels) == 0:
        raise DataError("the feature set has no training samples")
    if not np.array_equal(np.bincount(labels, minlength=C)[:C], counts):
        raise DataError("the training labels of the feature set do not match its class counts")
    device = resolve_device(cfg.device)
    tail_threshold = float(np.median(counts)) if cfg.tail_threshold is None else float(cfg.tail_threshold)
    tail = np.where(counts <= tail_threshold)[0]
    K = cfg.clusters or default_clusters(C)
    thresholds = {"many_threshold": many_threshold, "few_threshold": few_threshold}
    std = Standardiser(np.asarray(train["features"], dtype=np.float64), std_floor=cfg.std_floor)

    def tensor(split):
        return torch.as_tensor(std(np.asarray(split["features"], dtype=np.float64)), device=device)

    x_train = tensor(train)
    head_init = None
    if cfg.init_from_head:
        head_init = tuple(v.to(device) for v in standardised_head(feature_set.head, std, train))
    has_val = "val" in feature_set.splits and len(feature_set["val"]["labels"]) > 0
    test = feature_set["test"]
    x_test, y_test = tensor(test), np.asarray(test["labels"], dtype=np.int64)
    x_val = tensor(feature_set["val"]) if has_val else None
    y_val = np.asarray(feature_set["val"]["labels"], dtype=np.int64) if has_val else None
    log.info(f"dlsa: {len(labels)} training samples, {C} classes, {x_train.shape[1]} feature dimensions "
             f"({len(std.keep)} kept), K = {K}, depth {cfg.depth}, seed {cfg.seed}")

    # the classifier alone: the regular classifier on every training sample, same training
    t0, c0 = time.perf_counter(), time.process_time()
    alone = LinearClassifier(x_train.shape[1], C).to(device)
    snaps = train_classifier(alone, x_train, torch.as_tensor(labels, device=device), prior_counts=counts,
                             epochs=cfg.cls_epochs, batch_size=cfg.cls_batch, lr=cfg.cls_lr, eval_every=cfg.eval_every,
                             seed=int(np.random.SeedSequence([cfg.seed, 3]).generate_state(1)[0]), init=head_init)
    alone_seconds, alone_cpu = time.perf_counter() - t0, time.process_time() - c0
    epochs = snaps.epochs
    alone_test = _predict_alone(alone, snaps, x_test)
    alone_val = _predict_alone(alone, snaps, x_val) if has_val else None

    t0, c0 = time.perf_counter(), time.process_time()
    cascade = DLSACascade(cfg, C, head_init=head_init).fit(x_train, labels)
    fit_seconds, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    depths = list(range(1, cfg.depth + 1))
    test_pred = {d: cascade.predict(x_test, d) for d in depths}
    val_pred = {d: cascade.predict(x_val, d) for d in depths} if has_val else {}
    routes_train, _ = cascade.route(x_train)
    routes_test = test_pred[cfg.depth][0]
    routes_val = val_pred[cfg.depth][0] if has_val else None

    def summary(logits, epoch):
        return {"epoch": epoch, **_summary(logits, y_test, counts, tail, **thresholds)}

    def both(per_epoch, val_per_epoch):
        out = {"last": summary(per_epoch[-1], epochs[-1])}
        pick = _select(val_per_epoch, y_val)
        if pick is not None:
            out["best_val"] = summary(per_epoch[pick], epochs[pick])
        return out

    by_depth = {str(d): both(test_pred[d][1], val_pred[d][1] if has_val else None) for d in depths}
    val_selected = None
    if has_val:  # depth and epoch together, by validation top-1 (first maximum: shallowest, earliest)
        scores = [(float((v.argmax(1) == y_val).mean()), -d, -j) for d in depths
                  for j, v in enumerate(val_pred[d][1])]
        top, neg_d, neg_j = max(scores)
        d, j = -neg_d, -neg_j
        val_selected = {"depth": d, "val_top1": top * 100, **summary(test_pred[d][1][j], epochs[j])}

    is_tail = np.isin(np.arange(C), tail)
    filters = []
    for d, info in enumerate(cascade.info):
        row = {k: v for k, v in info.items() if k != "flow"}
        row["flow"] = {k: v for k, v in info["flow"].items() if k != "history"}
        row["flow"]["last_epoch"] = info["flow"]["history"][-1]
        row["flow"]["kept_epoch"] = info["flow"]["history"][info["flow"]["selected_epoch"] - 1]
        splits = (("train", routes_train, labels), ("val", routes_val, y_val), ("test", routes_test, y_test))
        for split, routes, y in splits:
            if routes is None:
                continue
            reached = routes >= d
            hit = routes == d
            row[split] = {"reached": int(reached.sum()), "filtered": int(hit.sum()),
                          "separation_accuracy": float(is_tail[y[hit]].mean() * 100) if hit.any() else None,
                          "tail_share_reached": float(is_tail[y[reached]].mean() * 100) if reached.any() else None}
        row["test"].update(_stage_accuracy(routes_test == d, y_test, test_pred[cfg.depth][1][-1], alone_test[-1]))
        filters.append(row)
    last = routes_train == cfg.depth
    last_test = routes_test == cfg.depth
    regular = {"train": int(last.sum()), "train_tail": int(is_tail[labels[last]].sum()),
               "test": int(last_test.sum()), "test_tail": int(is_tail[y_test[last_test]].sum()),
               **_stage_accuracy(last_test, y_test, test_pred[cfg.depth][1][-1], alone_test[-1])}
    run_head = _summary(np.asarray(test["logits"]), y_test, counts, tail, **thresholds)
    config = asdict(cfg)
    config.update(clusters=K, tail_threshold=tail_threshold)
    result = {
        "config": config,
        "features": {"path": str(feature_set.path) if feature_set.path else None, "epoch": feature_set.epoch,
                     "train": int(len(labels)), "val": int(len(y_val)) if has_val else 0, "test": int(len(y_test)),
                     "dim": int(feature_set.dim), "kept_dims": int(len(std.keep))},
        "class_counts": counts.tolist(),
        "head_tail": {"tail_threshold": tail_threshold, "tail_classes": tail.tolist(),
                      "rule": "tail: training count <= tail_threshold"},
        "shot_thresholds": {"many": many_threshold, "few": few_threshold},
        "run_head": run_head,
        "classifier_alone": both(alone_test, alone_val),
        "dlsa": by_depth[str(cfg.depth)],
        "dlsa_by_depth": by_depth,
        "dlsa_val_selected": val_selected,
        "filters": filters,
        "regular_classifier": regular,
        "wall_seconds": {"classifier_alone": alone_seconds, "dlsa_fit": fit_seconds,
                         "flows": sum(f["flow_seconds"] for f in cascade.info),
                         "total": time.perf_counter() - t_start},
        "cpu_seconds": {"classifier_alone": alone_cpu, "dlsa_fit": fit_cpu,
                        "flows": sum(f["flow_cpu_seconds"] for f in cascade.info),
                        "total": time.process_time() - cpu_start},
        "flow_history": [info["flow"]["history"] for info in cascade.info],
    }
    return result
