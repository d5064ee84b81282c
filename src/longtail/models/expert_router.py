"""RIDE's expert-assignment router ("EA"): decides per image whether to consult the next expert.

Wang, Lian, Miao, Liu, Yu, "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts",
ICLR 2021. Official code read: frank-xwang/RIDE-LongTailRecognition at
ab8be5c21124612493aff87c7cf235d950bda178, `model/ldam_drw_resnets/ea_resnet_cifar.py` (`ResNet_s`:
`pred_expert_help`, `forward` with and without target) and `configs/config_imbalance_cifar100_ride_ea.json`.
Our code is our own.

After expert i (0-idx) an image has the running mean m_i = (1 / (i+1)) sum_{j<=i} z_j of the scaled
expert logits z_j (B, C) and expert i's pooled features f_i (B, D). The router's score for going on is

    r_i = w^T [ topk(m_i, k) ; relu(H_i f_i / ||f_i||) ] + b          (B,)

H_i: Linear(D, 16), one per step i = 0..E-2 (official `expert_help_pred_hidden_fcs`); w, b: one
Linear(k + 16, 1) shared by all steps (official `expert_help_pred_fc`, `share_expert_help_pred_fc`
True); topk: the k largest mean logits in descending order (official `top_choices_num`: 30 in the
CIFAR-100 config, 50 for ImageNet-LT / iNaturalist). Weights Kaiming-normal (official
`_weights_init`), biases PyTorch's default.

Test time: expert i+1 is consulted where sigmoid(r_i) > threshold (official 0.5), for the images that
consulted expert i; the prediction is the mean of the consulted experts' logits.

Training target (official): t_i = [expert-sum after i experts is wrong] and [some later expert-sum
j > i is right], from the argmax of the running *sum* of the logits (= of the running mean).

`RoutedExperts` replaces a multi-expert network's `ExpertHeads`: its forward routes with masks over
all experts' features (the same outputs as the dynamic routing, no compute saved; so `predict`,
`export` and the plain forward route), while `routed_forward` computes each expert only for the
images that reach it (evaluation, with the FLOPs of what ran).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertHeads

HIDDEN = 16  # official expert_hidden_fc_output_dim


class ExpertRouter(nn.Module):
    """Scores r_i (B,) for going on after expert i = 0..E-2 (module doc)."""

    def __init__(self, *, num_experts: int, feature_dim: int, top_k: int, hidden: int = HIDDEN):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"a router needs at least 2 experts, got {num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.expert_help_pred_hidden_fcs = nn.ModuleList(nn.Linear(feature_dim, hidden)
                                                         for _ in range(num_experts - 1))
        self.expert_help_pred_fc = nn.Linear(hidden + top_k, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, step: int, features: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
        """features (B, D) of expert `step`, mean_logits (B, C) of experts 0..step -> r (B,)."""
        f = features / features.norm(dim=1, keepdim=True)  # official: no epsilon
        h = F.relu(self.expert_help_pred_hidden_fcs[step](f))
        top = torch.topk(mean_logits, k=self.top_k, dim=1).values
        return self.expert_help_pred_fc(torch.cat((top, h), dim=1)).view(-1)


def router_targets(expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """expert_logits (E, B, C), target (B,) -> bool (E-1, B): row i is 'wrong after experts 0..i, right
    after some 0..j, j > i' (official `expert_help_target`)."""
    correct = expert_logits.cumsum(dim=0).argmax(dim=2) == target  # (E, B)
    later = correct.flip(0).cummax(dim=0).values.flip(0)  # later[j]: right at some j' >= j
    return ~correct[:-1] & later[1:]


def router_scores(router: ExpertRouter, expert_logits: torch.Tensor, expert_features: torch.Tensor) -> torch.Tensor:
    """Training scores (E-1, B) with every expert computed: step i reads expert i's features and the
    mean of experts 0..i (official training forward)."""
    running = expert_logits.cumsum(dim=0)
    return torch.stack([router(i, expert_features[i], running[i] / (i + 1))
                        for i in range(expert_logits.shape[0] - 1)])


def router_loss(scores: torch.Tensor, targets: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """(1 / (E-1)) sum_i BCE-with-logits(r_i, t_i; pos_weight), each a batch mean (official)."""
    pw = scores.new_tensor([pos_weight])
    terms = [F.binary_cross_entropy_with_logits(s, t.to(s.dtype), pos_weight=pw) for s, t in zip(scores, targets)]
    return torch.stack(terms).sum() / len(terms)


def route_masked(router: ExpertRouter, expert_logits: torch.Tensor, expert_features: torch.Tensor,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The test-time rule on precomputed experts: (E, B, C), (E, B, D) -> (mean of the consulted
    experts (B, C), number consulted (B,) int64)."""
    total = expert_logits[0]
    active = torch.ones(total.shape[0], dtype=torch.bool, device=total.device)
    count = torch.ones(total.shape[0], dtype=torch.long, device=total.device)
    for i in range(1, expert_logits.shape[0]):
        go = torch.sigmoid(router(i - 1, expert_features[i - 1], total / count[:, None].to(total.dtype))) > threshold
        active = active & go
        total = total + torch.where(active[:, None], expert_logits[i], torch.zeros_like(expert_logits[i]))
        count = count + active.long()
    return total / count[:, None].to(total.dtype), count


class RoutedExperts(nn.Module):
    """The head of a routed multi-expert network: the stage-1 `ExpertHeads` (`experts`) and the
    `router`. It answers what the expert network asks of its head (`per_expert`, indexing, `scale`,
    `stacked`); its forward (not stacked) is the routed prediction (B, C)."""

    def __init__(self, experts: ExpertHeads, router: ExpertRouter, *, threshold: float = 0.5):
        super().__init__()
        self.experts, self.router, self.threshold = experts, router, float(threshold)

    # what models/experts.py's ExpertNetwork reads from its head
    def per_expert(self, features: torch.Tensor) -> torch.Tensor:
        return self.experts.per_expert(features)

    def __getitem__(self, index: int) -> nn.Module:
        return self.experts[index]

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def scale(self) -> float:
        return self.experts.scale

    @property
    def stacked(self) -> bool:
        return self.experts.stacked

    @stacked.setter
    def stacked(self, value: bool) -> None:
        self.experts.stacked = value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.experts.per_expert(features)  # (E, B, C)
        if self.stacked:
            return logits.transpose(0, 1)
        feats = torch.stack(features.chunk(len(self.experts), dim=1))
        return route_masked(self.router, logits, feats, self.threshold)[0]


@torch.no_grad()
def routed_forward(model, images: torch.Tensor, threshold: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic routing (official test-time forward): the shared part once, then expert i only for
    the images the router sent on. model: an expert network whose head is `RoutedExperts`.
    -> (logits (B, C), experts consulted (B,) int64, router evaluations (B,) int64)."""
    head: RoutedExperts = model.head
    router = head.router
    threshold = head.threshold if threshold is None else threshold
    shared = model.shared_features(images)
    feat = model.expert_branch(shared, 0).mean(dim=(2, 3))
    total = model.expert_head(0, feat)
    n = total.shape[0]
    count = torch.ones(n, dtype=torch.long, device=total.device)
    calls = torch.zeros(n, dtype=torch.long, device=total.device)
    idx = torch.arange(n, device=total.device)
    for i in range(1, model.num_experts):
        score = router(i - 1, feat, total[idx] / i)
        calls[idx] += 1
        keep = torch.sigmoid(score) > threshold
        idx, feat = idx[keep], None
        if idx.numel() == 0:
            break
        feat = model.expert_branch(shared[idx], i).mean(dim=(2, 3))
        total[idx] += model.expert_head(i, feat)
        count[idx] += 1
    return total / count[:, None].to(total.dtype), count, calls


@torch.no_grad()
def routing_flops(model, image_shape: tuple[int, int, int]) -> dict:
    """FLOPs per image (torch.utils.flop_counter: convolutions and matrix products; pooling,
    normalisation, top-k and sigmoids are not counted) of the shared part, of each expert (its own
    stages and head) and of one router evaluation. model: a routed expert network (eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros((1, *image_shape), dtype=p.dtype, device=p.device)

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            out = fn()
        return int(counter.get_total_flops()), out

    shared_flops, shared = count(lambda: model.shared_features(x))
    experts, feat, logits = [], None, None
    for e in range(model.num_experts):
        flops, (feat, logits) = count(lambda e=e: _one_expert(model, shared, e))
        experts.append(flops)
    router_flops, _ = count(lambda: model.head.router(0, feat, logits))
    return {"shared": shared_flops, "experts": experts, "router": router_flops}


def _one_expert(model, shared, e):
    feat = model.expert_branch(shared, e).mean(dim=(2, 3))
    return feat, model.expert_head(e, feat)
