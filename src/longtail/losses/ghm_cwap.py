"""GHM-CWAP, the gradient harmonized mechanism with category-wise adaptive precision
(Zhang, Lin, Zhang, Xu, "Solving the long-tailed problem via intra- and inter-category
balance", arXiv 2204.09234, 2022; seed paper 003)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import LOSSES
from ..dist import all_reduce_sum, context
from ._checks import choice, integer, number
from .base import Loss

APPROXIMATIONS = ("aura", "ura")
GRAD_NORMS = ("target", "l2")
NORMALIZATIONS = ("none", "class")
REDUCTIONS = ("weight_sum", "mean")


@LOSSES.register("ghm_cwap")
class GHMCWAPLoss(Loss):
    """GHM-CWAP: per-class gradient-norm histograms -> example weights (Eq. 1) and margins (Eq. 2-3).

    Paper (seed 003, Sec. 3.2-3.3), for class c with N unit regions ("bins"), alpha, gamma:

        v_ci   value of region i of the histogram H_c (example counts; Algorithm 1 below)
        S_c    = sum_i v_ci^alpha                                    effective sample size
        W_ci   = S_c / v_ci^alpha                                    (Eq. 1)
        M_mn   = gamma * log(min(1, S_n / S_m))                      (Eq. 2), m the target
        loss_i = W_{y_i, r_i} * CE(z_i + M_{y_i, :}, y_i)            (Eq. 3)

    where r_i is the region of example i's gradient norm in H_{y_i}. M_mm = 0, so the
    margins only shift the non-target logits of the softmax denominator, by a negative
    amount for classes n with S_n < S_m (the Seesaw mitigation with counts -> S).

    Readings chosen (the paper does not fix them; docs/ghm_cwap.md):

    * gradient norm g of the softmax CE with respect to the logits, whose gradient is
      p - onehot(y) (p = softmax(z.detach())): `grad_norm: target` (default) g = 1 - p_y,
      the target component of that gradient (GHM's |p - p*| on the true class; half its
      L1 norm); `grad_norm: l2` g = ||p - onehot(y)||_2 / sqrt(2). Both lie in [0, 1]
      (||p - e_y||_2 <= sqrt(2) (1 - p_y)).
    * regions of H_c partition [0, 1]: edges e_0 = 0, e_k = d_1 + ... + d_k; region k
      holds e_{k-1} <= g < e_k, the last one also g = 1.
    * `approximation: ura` (URA): equal widths d_i = 1/N. `approximation: aura` (AURA,
      Algorithm 1): each example adds 1/(N d_ci) to v_ci; after each epoch the widths are
      re-assigned from that epoch's values, d_ci <- 1/log(max(v_ci, e)), then normalised to
      sum 1. The clamp at e (Euler's number) is ours: Algorithm 1's 1/log(v) is infinite
      at v = 1 and negative below, so regions with v <= e get the largest width, 1 before
      normalisation, and dense regions get narrower ones (exactly 1/log v above e).
      URA is AURA with the widths never re-assigned, so v = counts there.
    * epochs: v is counted during an epoch (every forward call) and turned into weights,
      S and (AURA) new widths when the next epoch starts (`on_epoch_start`, called by the
      training loop through Method.on_epoch_start). Epoch e uses the histogram of epoch
      e - 1 (the paper: "count the gradient norm of every example during previous
      epoch"); an example is placed for its weight in the regions of that histogram (the
      widths v was counted with) and, for counting, in the current widths.
    * first epoch: there is no histogram yet; every weight is 1 and every margin 0, so
      epoch 0 is plain cross-entropy.
    * an example falling into a region that was empty in the previous epoch is weighted
      as the region's only member: v = 1 / (N d) (one count), so W = S_c / (1/(N d))^alpha.
    * a class absent from an epoch keeps its previous histogram, weights, S and widths
      (no new information); a class never seen has weights 1 and S unknown, and a margin
      involving an unknown S is 0. So no weight or margin is infinite or NaN.
    * `normalization` of W: `none` (default) W as Eq. 1, unnormalised as the paper
      writes it: W = S_c / v^alpha >= 1, smallest in a class's densest region (close to
      1 when that region holds most of the class), larger in its rarer regions. `class`
      divides each example's W by the mean W of its class over the examples of the
      current epoch so far, this batch included (running sums, reset when an epoch
      ends), so each class's total weight stays its number of examples, as in CE: W only
      re-balances easy against hard examples inside a class (intra-category balance) and
      the classes' totals are left to the margins (inter-category balance). With
      alpha = 0, `class` makes every weight 1.
      It is the current epoch's examples because the histogram is one epoch old and early
      in training a class's examples move between regions from one epoch to the next.
      Measured on CIFAR-10-LT ratio 100 (ResNet-32, docs/ghm_cwap.md "Measured"): with
      unbounded weights every normalisation collapses training from the first weighted
      epoch (validation at chance), `class` even with `max_weight` (it pushes the dense
      bulk of a class far below 1); `none` with `max_weight: 3` trains like CE and is what
      the configs use. The margins alone train like CE.
    * `reduction` over the batch (the paper's Eq. 3 is a per-example loss):
      `weight_sum` (default) loss = sum_i W_i l_i / sum_i W_i, as GHM divides by its
      total weight; `mean` loss = sum_i W_i l_i / B. Eq. 1 gives an example that is alone
      in its region a weight of order n_c^alpha (up to about 2,000 for a class of 5,000
      examples whose other examples share one region), so with `mean` one such example
      scales its batch's gradient by about W / B; `weight_sum` bounds each step by the
      largest gradient of one example, and equals `mean` when the batch's weights
      average 1. Under DDP the sum is per rank.
    * `max_weight` (not in the paper; default None, unbounded): W (after normalisation)
      is clipped at this value, >= 1: Eq. 1's direction (examples in the rarer regions of
      their class up to max_weight times the dense bulk) without its range.
    * `example_weights: false` sets every W to 1 (margins only; the ablation A of
      Table 3); `gamma: 0` gives no margins (R only). alpha = 0 and gamma = 0 with
      normalization `class` is plain cross-entropy at every epoch.

    Weights and margins carry no gradient (they are statistics of detached
    probabilities). Defaults bins N = 30, alpha = 0.9, gamma = 0.8 (Sec. 4.1),
    approximation AURA (the paper's full method R + A^AURA).

    Class weight (RW / DRW): w_{y_i} multiplies W_i (then the same reduction).

    State (persistent buffers, checkpointed with the loss): `counts` (C, N) int64, the
    current epoch's counts; `count_widths` (C, N) the widths they are counted in;
    `lookup_widths`, `region_weights` (C, N, Eq. 1 unnormalised) and `effective_size` S
    (C,) (0 = unknown) from the previous epoch; `class_weight_sums` (2, C) the current
    epoch's running sum of Eq. 1 weights and number of examples per class (`class`
    normalisation); `current_epoch` (the epoch being counted, -1 before the first).
    Counts and sums are updated in every forward call (under mixup, once per label of the
    mixed batch). DDP: `sync_statistics()` all-reduces the count increments since its
    last call (the training loop calls it after every step), so every rank, and rank 0's
    checkpoint, holds the global counts; it is also called when an epoch ends. The class
    sums of a batch are all-reduced in the forward call itself (every rank normalises
    with the same means).

    Shapes: logits (B, C), target (B,) int64 -> scalar. `class_counts` only sets C.
    """

    neutral_params = {"alpha": 0.0, "gamma": 0.0}  # every weight 1, every margin 0

    def __init__(self, *, class_counts, bins: int = 30, alpha: float = 0.9, gamma: float = 0.8,
                 approximation: str = "aura", grad_norm: str = "target", normalization: str = "none",
                 reduction: str = "weight_sum", max_weight: float | None = None, example_weights: bool = True):
        super().__init__(class_counts=class_counts)
        self.bins = integer("bins", bins, low=1)
        self.alpha = number("alpha", alpha, low=0, high=1)
        self.gamma = number("gamma", gamma, low=0)
        self.approximation = choice("approximation", approximation, APPROXIMATIONS)
        self.grad_norm = choice("grad_norm", grad_norm, GRAD_NORMS)
        self.normalization = choice("normalization", normalization, NORMALIZATIONS)
        self.reduction = choice("reduction", reduction, REDUCTIONS)
        self.max_weight = None if max_weight is None else number("max_weight", max_weight, low=1)
        if not isinstance(example_weights, bool):
            raise ValueError(f"example_weights must be true or false, got {example_weights!r}")
        self.example_weights = example_weights
        C, N = self.num_classes, self.bins
        f64 = torch.float64
        self.register_buffer("counts", torch.zeros(C, N, dtype=torch.int64))
        self.register_buffer("count_widths", torch.full((C, N), 1.0 / N, dtype=f64))
        self.register_buffer("lookup_widths", torch.full((C, N), 1.0 / N, dtype=f64))
        self.register_buffer("region_weights", torch.ones(C, N, dtype=f64))
        self.register_buffer("effective_size", torch.zeros(C, dtype=f64))
        self.register_buffer("class_weight_sums", torch.zeros(2, C, dtype=f64))
        self.register_buffer("current_epoch", torch.tensor(-1, dtype=torch.int64))
        # count increments since the last sync_statistics(); not checkpointed
        self.register_buffer("_pending", torch.zeros(C, N, dtype=torch.int64), persistent=False)

    # -- histogram bookkeeping
    def gradient_norm(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) gradient norm in [0, 1] of CE w.r.t. the detached logits (`grad_norm`)."""
        p = F.softmax(logits.detach().to(torch.float64), dim=1)
        if self.grad_norm == "target":
            return 1.0 - p.gather(1, target[:, None])[:, 0]
        diff = p - F.one_hot(target, p.shape[1]).to(p.dtype)
        return diff.norm(dim=1) / math.sqrt(2.0)

    def region_of(self, g: torch.Tensor, target: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """(B,) region index of g in the histogram of each example's class, with `widths` (C, N)."""
        if self.bins == 1:
            return torch.zeros_like(target)
        inner = widths.to(g.device, torch.float64).cumsum(1)[:, :-1]  # (C, N-1) edges e_1 .. e_{N-1}
        idx = torch.searchsorted(inner[target].contiguous(), g.to(torch.float64)[:, None].contiguous(), right=True)
        return idx[:, 0].clamp(max=self.bins - 1)

    @torch.no_grad()
    def accumulate(self, g: torch.Tensor, target: torch.Tensor) -> None:
        """Add the batch's examples to this epoch's counts (in the current widths)."""
        idx = self.region_of(g, target, self.count_widths)
        flat = target.to(self.counts.device) * self.bins + idx.to(self.counts.device)
        # index_add_ rather than bincount: no device-to-host synchronisation on a GPU
        ones = torch.ones_like(flat)
        self.counts.view(-1).index_add_(0, flat, ones)
        self._pending.view(-1).index_add_(0, flat, ones)

    @torch.no_grad()
    def sync_statistics(self) -> None:
        """DDP reduction point: all-reduce (sum) the count increments since the last call.

        A collective when torch.distributed runs more than one process: every rank calls it
        at the same point (the training loop: after every step). Otherwise it only clears
        the increment record.
        """
        if context().enabled:
            total = all_reduce_sum(self._pending.clone())
            self.counts += total - self._pending  # the other ranks' increments
        self._pending.zero_()

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch boundary hook: when `epoch` differs from the epoch being counted, the
        counts become the histogram behind the next weights / margins (`finish_epoch`)."""
        epoch = int(epoch)
        current = int(self.current_epoch)
        if current >= 0 and epoch != current:
            self.finish_epoch()
        self.current_epoch.fill_(epoch)

    @torch.no_grad()
    def finish_epoch(self) -> None:
        """Turn this epoch's counts into region weights (Eq. 1), S_c and (AURA) new widths."""
        self.sync_statistics()
        counts = self.counts.to(torch.float64)
        present = counts.sum(1) > 0  # classes seen this epoch; the others keep their state
        unit = 1.0 / (self.bins * self.count_widths)  # the value one example adds (Algorithm 1)
        values = counts * unit
        nonempty = counts > 0
        powered = torch.where(nonempty, values.clamp(min=1e-300).pow(self.alpha), torch.zeros_like(values))
        size = powered.sum(1)  # S_c
        # an empty region counts as holding one example (the one being weighted)
        floor = torch.where(nonempty, values, unit).pow(self.alpha)
        weights = size[:, None] / floor
        rows = present[:, None]
        self.region_weights.copy_(torch.where(rows, weights, self.region_weights))
        self.lookup_widths.copy_(torch.where(rows, self.count_widths, self.lookup_widths))
        self.effective_size.copy_(torch.where(present, size, self.effective_size))
        if self.approximation == "aura":
            widths = 1.0 / values.clamp(min=math.e).log()
            widths = widths / widths.sum(1, keepdim=True)
            self.count_widths.copy_(torch.where(rows, widths, self.count_widths))
        self.counts.zero_()
        self.class_weight_sums.zero_()

    # -- the loss
    def example_weights_of(self, g: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) W of each example from the previous epoch's histogram (1 before the first).

        With `normalization: class` the batch's Eq. 1 weights are added to this epoch's
        running class sums first (all ranks' batches under DDP), then each W is divided by
        its class's running mean.
        """
        if not self.example_weights:
            return torch.ones_like(g)
        idx = self.region_of(g, target, self.lookup_widths)
        weights = self.region_weights.to(g.device)[target, idx]
        if self.normalization == "none":
            return self.clip(weights)
        batch = torch.zeros(2, self.num_classes, dtype=torch.float64, device=g.device)
        batch[0].index_add_(0, target, weights.to(torch.float64))
        batch[1].index_add_(0, target, torch.ones_like(weights, dtype=torch.float64))
        sums = self.class_weight_sums
        sums += all_reduce_sum(batch).to(sums.device)
        mean = (sums[0] / sums[1].clamp(min=1.0)).to(g.device, weights.dtype)
        return self.clip(weights / mean[target].clamp(min=1e-300))

    def clip(self, weights: torch.Tensor) -> torch.Tensor:
        """W bounded above by `max_weight` (not in the paper; None: unbounded)."""
        return weights if self.max_weight is None else weights.clamp(max=self.max_weight)

    def margins(self, target: torch.Tensor) -> torch.Tensor:
        """(B, C) margins M_{y_i, n} = gamma log min(1, S_n / S_{y_i}); 0 where an S is unknown."""
        size = self.effective_size.to(target.device)
        known = size > 0
        log_size = torch.where(known, size.clamp(min=1e-300).log(), torch.zeros_like(size))
        diff = (log_size[None, :] - log_size[target][:, None]).clamp(max=0.0)
        both = known[None, :] & known[target][:, None]
        return self.gamma * torch.where(both, diff, torch.zeros_like(diff))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            g = self.gradient_norm(logits, target)
            weights = self.example_weights_of(g, target)
            margins = self.margins(target) if self.gamma > 0 else None
            self.accumulate(g, target)
        weights = weights.to(logits.dtype)
        if self.class_weight is not None:
            weights = weights * self.class_weight.to(logits.device, logits.dtype)[target]
        adjusted = logits if margins is None else logits + margins.to(logits.dtype)
        per_sample = F.cross_entropy(adjusted, target, reduction="none")
        if self.reduction == "weight_sum":
            return (weights * per_sample).sum() / weights.sum().clamp(min=1e-12)
        return (weights * per_sample).mean()
