"""RSG: the rare-class sample generator (Wang, Lukasiewicz, Hu, Cai, Xu, "RSG: A Simple but
Effective Module for Learning Imbalanced Datasets", CVPR 2021), a training-only module between two
stages of a backbone (CIFAR ResNet: after layer2, maps (B, 32, 16, 16)).

Official code read: Jianf-Wang/RSG, commit 3c5074511455428d81af89e1621493dcdb5db6ce
(`Imbalanced_Classification/models/RSG.py`, `models/resnet_cifar.py`, `cifar_train.py`).

With F (B, C, H, W) the maps, D = F detached, y (B,) the labels, K centres per class:

- Centre estimation: gamma = softmax_k(GAP(D) . A_y[:, k] + b_y[k]) (B, K), A (classes, C, K)
  ~ N(0, 1), b = 1; centres c (classes, K, C), zero at the start.
  L_cesc = sum_{b,k} gamma_bk ||D_b - c_{y_b,k}||^2 / B  (the squared distance summed over C, H, W;
  c broadcast over H, W), plus, in the contrastive phase, CE(fc(GAP(g(cat(D[:B/2], D[B/2:])))),
  [y[:B/2] == y[B/2:]]), g = Conv1x1(2C, d) - ReLU - Conv3x3(d, d), fc = Linear(d, 2).
- Generation (the generation phase, with head and tail samples in the batch): for head maps h with
  centre c_h = c_{y_h, argmax gamma_h} and tail maps t with c_t likewise (gamma and centres detached),
  v = T(h - c_h) (T: Conv3x3(C, C) with bias, "vector transformation"), new maps t + v with the
  tail labels, appended to F (they go through the rest of the network with the batch).
  L_mv = CE(fc(GAP(g(cat(h, v)))), 0) (g, fc frozen: no gradient to them, only through them)
       + [sum_rows | ||v_row|| - ||(h - c_h)_row|| | + sum | nrm(t - c_t) * nrm(v) - 1 |] / n
  with rows of C values (below) and n the tail samples of the pass. Head and tail are paired in
  segments: with n_h >= n_t, segment j pairs heads [j n_t, (j+1) n_t) with all tails, for
  max(1, int(n_h s / n_t)) segments (s = transfer strength); else all heads with tails
  [j n_h, (j+1) n_h), max(1, int(n_t s / n_h)) segments; L_mv is the mean over segments.

Quirks kept from the official code: every loss term reads the detached maps (the backbone gets
no gradient from L_cesc or L_mv; T learns through L_mv and the classification loss of the new
samples); `.view(-1, C)` on (n, C, H, W) maps takes rows of C consecutive memory values (runs
along W inside a channel), not channel vectors (`vectors: 'official'`; `'channel'` takes the C
channel values at each position instead); the "cosine" term is elementwise |a_i b_i - 1| summed,
not a dot product; the contrastive pairs are the first half against the second half of the batch
(an odd last sample is left out here; the official drops incomplete batches). GAP is the mean
over H, W (official AvgPool2d(16) on the 16 x 16 map). Initialisation as the official: A
standard normal, b ones, centres zeros, convolutions kaiming-normal weights with zero bias, fc
weight standard normal, zero bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VECTORS = ("official", "channel")


class RSGModule(nn.Module):
    """Centre estimation, contrastive and vector-transformation modules over (B, channels, H, W) maps.

    Parameters: `linear` (classes, channels, n_center), `bias` (classes, n_center), `centers`
    (classes, n_center, channels), `vec_transformation`, `contrastive` (+ `contrastive_fc`).
    """

    def __init__(self, *, channels: int, num_classes: int, n_center: int = 15, contrastive_dim: int = 256):
        super().__init__()
        for name, value in (("channels", channels), ("num_classes", num_classes), ("rsg_centers", n_center),
                            ("rsg_dim", contrastive_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.channels, self.n_center = channels, n_center
        self.linear = nn.Parameter(torch.randn(num_classes, channels, n_center))
        self.bias = nn.Parameter(torch.ones(num_classes, n_center))
        self.centers = nn.Parameter(torch.zeros(num_classes, n_center, channels))
        self.vec_transformation = nn.Conv2d(channels, channels, 3, 1, 1)
        self.contrastive = nn.Sequential(nn.Conv2d(2 * channels, contrastive_dim, 1), nn.ReLU(),
                                         nn.Conv2d(contrastive_dim, contrastive_dim, 3, 1, 1))
        self.contrastive_fc = nn.Linear(contrastive_dim, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight)
                nn.init.zeros_(m.bias)

    # -- pieces
    def assignment(self, maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """gamma (N, K): softmax over the class's centres of GAP(maps) A_y + b_y."""
        pooled = maps.mean((2, 3))
        return torch.softmax(torch.bmm(pooled.unsqueeze(1), self.linear[target]).squeeze(1) + self.bias[target], 1)

    def cesc_distance(self, maps: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """sum_{b,k} gamma_bk ||maps_b - c_{y_b,k}||^2 / N (the centre-estimation term of L_cesc)."""
        diff = maps.unsqueeze(1) - self.centers[target][..., None, None]  # (N, K, C, H, W)
        return (gamma * diff.pow(2).flatten(2).sum(2)).sum() / maps.shape[0]

    def pair_logits(self, maps_a: torch.Tensor, maps_b: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        """(N, 2) same-class logits of map pairs; `frozen`: the module's weights detached."""
        pair = torch.cat((maps_a, maps_b), 1)
        if not frozen:
            return self.contrastive_fc(self.contrastive(pair).mean((2, 3)))
        conv1, conv2 = self.contrastive[0], self.contrastive[2]
        out = F.conv2d(pair, conv1.weight.detach(), conv1.bias.detach())
        out = F.conv2d(F.relu(out), conv2.weight.detach(), conv2.bias.detach(), padding=1)
        return F.linear(out.mean((2, 3)), self.contrastive_fc.weight.detach(), self.contrastive_fc.bias.detach())

    def contrastive_loss(self, maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE of the first half of the batch paired with the second (label: same class)."""
        half = maps.shape[0] // 2
        if half == 0:
            return maps.new_zeros(())
        logits = self.pair_logits(maps[:half], maps[half:2 * half])
        return F.cross_entropy(logits, (target[:half] == target[half:2 * half]).long())

    def transfer(self, heads: torch.Tensor, head_target: torch.Tensor, tails: torch.Tensor,
                 tail_target: torch.Tensor, *, vectors: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
        """(L_mv of one segment, new tail maps (n, C, H, W)) from n head and n tail (detached) maps."""
        c = self.channels
        with torch.no_grad():
            centers = self.centers.detach()
            c_h = centers[head_target, self.assignment(heads, head_target).argmax(1)]
            c_t = centers[tail_target, self.assignment(tails, tail_target).argmax(1)]
        var_map = heads - c_h[..., None, None]
        moved = self.vec_transformation(var_map)
        tail_vec = tails - c_t[..., None, None]
        if vectors == "official":
            rows = lambda x: x.reshape(-1, c)  # noqa: E731  (official .view(-1, C): C consecutive values)
        else:
            rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, c)  # noqa: E731
        n = tails.shape[0]
        norm_term = (rows(moved).norm(dim=1) - rows(var_map).norm(dim=1)).abs().sum()
        cos_term = (F.normalize(rows(tail_vec), dim=1) * F.normalize(rows(moved), dim=1) - 1).abs().sum()
        pair = self.pair_logits(heads, moved, frozen=True)
        loss = F.cross_entropy(pair, torch.zeros(n, dtype=torch.long, device=pair.device)) + (norm_term + cos_term) / n
        return loss, tails + moved

    # -- one training pass
    def forward(self, maps: torch.Tensor, target: torch.Tensor, *, head_mask: torch.Tensor, contrastive: bool,
                generate: bool, transfer_strength: float = 1.0, vectors: str = "official"):
        """Returns (maps with the new tail maps appended (B + G, C, H, W), L_cesc, L_mv, labels (B + G,)).

        head_mask: (classes,) bool, the head classes. contrastive: add the pair CE to L_cesc (the
        official epoch <= epoch_thresh). generate: make new tail samples and L_mv (epoch > thresh).
        """
        detached = maps.detach()
        cesc = self.cesc_distance(detached, target, self.assignment(detached, target))
        if contrastive:
            cesc = cesc + self.contrastive_loss(detached, target)
        mv = detached.new_zeros(())
        if not generate:
            return maps, cesc, mv, target
        is_head = head_mask[target]
        heads, head_target = detached[is_head], target[is_head]
        tails, tail_target = detached[~is_head], target[~is_head]
        n_h, n_t = heads.shape[0], tails.shape[0]
        if n_h == 0 or n_t == 0:
            return maps, cesc, mv, target
        out_maps, out_target = [maps], [target]
        if n_h >= n_t:
            segments = max(1, int(n_h * transfer_strength / n_t))
            pairs = [(slice(j * n_t, (j + 1) * n_t), slice(None)) for j in range(segments)]
        else:
            segments = max(1, int(n_t * transfer_strength / n_h))
            pairs = [(slice(None), slice(j * n_h, (j + 1) * n_h)) for j in range(segments)]
        for h, t in pairs:
            loss, new = self.transfer(heads[h], head_target[h], tails[t], tail_target[t], vectors=vectors)
            mv = mv + loss
            out_maps.append(new.to(maps.dtype))
            out_target.append(tail_target[t])
        return torch.cat(out_maps), cesc, mv / segments, torch.cat(out_target)
