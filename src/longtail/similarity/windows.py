"""Similarity windows, SWR weights (Eq. 2) and SWM margins (Eq. 3) of SWRM (seed 001).

Classes are ordered by a 1-D projection (the t-SNE projection of the class prototypes for
SWRM, the learnable similarity vector for DySWRM), ascending, ties in class-index order.
The similarity window of the class at position k of that order holds W consecutive classes
around it (`window_mask`); Eq. 2 and Eq. 3 average over the window's members:

    w_c = log(1 + n_max / n_c * mean_{i in win(c)} n_i / n_c)                    (Eq. 2)
    m_c = log(mean_{i in win(c)} sim(i, c)^(-beta))                               (Eq. 3)

Readings chosen where the paper is not exact (docs/swrm.md):

- Window: W classes including c itself, from position k - floor(W/2) to k - floor(W/2) + W - 1
  (odd W: centred; even W: one more class before c than after). The paper's sum from
  c - W/2 to c + W/2 has W + 1 terms for even W but is divided by W; here the sum and the
  divisor agree (a mean over the members).
- Ends: `edge='shift'` (default) slides a window that would leave the order back inside, so
  every window has exactly W members and the divisor is exactly 1/W; `edge='truncate'` drops
  the missing positions and averages over the members that remain.
- W > C: with 'shift', W is clamped to C and every window is all classes; with 'truncate'
  the centred range is clipped as for any W (all classes only where it covers the whole
  order, for every position once W >= 2C - 1). W = 1 is allowed: w_c = log(1 + n_max / n_c)
  and m_c = 0.
- sim(i, c) in (0, 1], sim(c, c) = 1, so every m_c >= 0. Two definitions:
  `projection_similarity` (default): exp(-|p~_i - p~_c|) with p~ the projection min-max
  scaled to [0, 1], so sim is in [e^-1, 1] and m_c <= beta; it depends on the projection only,
  which DySWRM needs (its gradient reaches the vector through it).
  `cosine_similarity_from_prototypes`: exp(cos(p_i, p_c) - 1), in [e^-2, 1], from the
  prototypes themselves (then m_c <= 2 beta).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError

EDGES = ("shift", "truncate")
SIMILARITIES = ("projection", "cosine")


def class_order(projection) -> np.ndarray:
    """Class indices sorted by projection value, ascending; ties keep class-index order."""
    p = torch.as_tensor(projection).detach().cpu().double().numpy()
    return np.argsort(p, kind="stable")


def window_bounds(num_classes: int, window: int, edge: str = "shift") -> tuple[np.ndarray, np.ndarray]:
    """(lo (C,), hi (C,)): the window around position k of the order is positions [lo[k], hi[k])."""
    if edge not in EDGES:
        raise ConfigError(f"edge must be one of {', '.join(EDGES)}, got {edge!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}")
    C = int(num_classes)
    k = np.arange(C)
    if edge == "shift":
        W = min(window, C)
        lo = np.clip(k - W // 2, 0, C - W)
        return lo, lo + W
    lo = k - window // 2
    return np.maximum(lo, 0), np.minimum(lo + window, C)


def window_members(order, window: int, edge: str = "shift") -> list[list[int]]:
    """For every class c (by class index), the classes of its similarity window, in order."""
    order = np.asarray(order)
    lo, hi = window_bounds(len(order), window, edge)
    members: list[list[int]] = [[] for _ in range(len(order))]
    for k in range(len(order)):
        members[int(order[k])] = order[lo[k]:hi[k]].tolist()
    return members


def window_mask(order, window: int, edge: str = "shift") -> torch.Tensor:
    """(C, C) bool: mask[c, i] is True when class i is in class c's window (c's own row
    always holds c). Built without a per-class loop (DySWRM rebuilds it every step)."""
    order = np.asarray(order)
    lo, hi = window_bounds(len(order), window, edge)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))  # position of each class in the order
    row_lo, row_hi = lo[rank][:, None], hi[rank][:, None]
    return torch.from_numpy((rank[None, :] >= row_lo) & (rank[None, :] < row_hi))


def projection_similarity(projection: torch.Tensor) -> torch.Tensor:
    """sim(i, c) = exp(-|p~_i - p~_c|), p~ = (p - min p) / (max p - min p); (C,) -> (C, C).

    Differentiable in the projection (DySWRM). A constant projection gives all ones.
    """
    p = torch.as_tensor(projection)
    if not p.is_floating_point():
        p = p.double()
    span = p.max() - p.min()
    scaled = (p - p.min()) / span if float(span.detach()) > 0 else torch.zeros_like(p)
    return torch.exp(-(scaled[:, None] - scaled[None, :]).abs())


def cosine_similarity_from_prototypes(prototypes) -> torch.Tensor:
    """sim(i, c) = exp(cos(p_i, p_c) - 1) of class prototypes (C, D) -> (C, C) float64."""
    from sklearn.metrics.pairwise import cosine_similarity

    protos = np.asarray(prototypes, dtype=np.float64)
    if not np.isfinite(protos).all():
        raise ConfigError("every class needs a finite prototype (a class without training images has none)")
    cos = np.clip(cosine_similarity(protos), -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return torch.from_numpy(np.exp(cos - 1.0))


def _counts(class_counts) -> torch.Tensor:
    n = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    if n.dim() != 1 or not bool((n > 0).all()):
        bad = [i for i, v in enumerate(n.reshape(-1).tolist()) if not v > 0]
        raise ConfigError(f"SWR weights need at least one training image per class (classes without: {bad[:10]})")
    return n


def swr_weights(class_counts, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: w_c = log(1 + n_max / n_c * mean_{i in win(c)} n_i / n_c); float64 (C,)."""
    n = _counts(class_counts)
    m = mask.to(torch.float64)
    local = (m * n[None, :]).sum(1) / n / m.sum(1)
    return torch.log1p(n.max() / n * local)


def swm_margins(similarity: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 3: m_c = log(mean_{i in win(c)} sim(i, c)^(-beta)), as a masked logsumexp; (C,).

    Differentiable in `similarity` (float dtype of `similarity`)."""
    sim = torch.as_tensor(similarity)
    neg_log = -float(beta) * torch.log(sim)
    terms = torch.where(mask.to(sim.device), neg_log, torch.full_like(neg_log, -math.inf))
    size = mask.sum(1).to(sim.dtype).to(sim.device)
    return torch.logsumexp(terms, dim=1) - torch.log(size)


def window_table(order, window: int, edge: str = "shift") -> tuple[np.ndarray, np.ndarray]:
    """(members (C, W') int64, valid (C, W') bool): row c lists class c's window in order (as
    `window_members`), padded with c itself where `valid` is False; W' the largest window.
    The banded form of `window_mask` for many classes: C x W' instead of C x C."""
    order = np.asarray(order, dtype=np.int64)
    C = len(order)
    lo, hi = window_bounds(C, window, edge)
    width = int((hi - lo).max()) if C else 0
    pos = lo[:, None] + np.arange(width)[None, :]  # (C, W') positions, by position of the owner
    valid_by_pos = pos < hi[:, None]
    by_pos = np.where(valid_by_pos, order[np.minimum(pos, C - 1)], order[:, None])
    members = np.empty_like(by_pos)
    valid = np.empty_like(valid_by_pos)
    members[order], valid[order] = by_pos, valid_by_pos
    return members, valid


def swr_weights_banded(class_counts, members: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Eq. 2 from `window_table` (C x W' memory); float64 (C,), equal to `swr_weights` up to
    the order of summation."""
    n = _counts(class_counts).numpy()
    local = np.where(valid, n[members], 0.0).sum(1) / n / valid.sum(1)
    return np.log1p(n.max() / n * local)


def swm_margins_banded(similarity_of, members: np.ndarray, valid: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 3 from `window_table`: `similarity_of(c (C, 1), i (C, W'))` gives sim(i, c) of the
    window pairs only; float64 (C,), equal to `swm_margins` up to rounding."""
    owner = np.arange(len(members))[:, None]
    neg_log = -float(beta) * np.log(np.asarray(similarity_of(owner, members), dtype=np.float64))
    terms = torch.from_numpy(np.where(valid, neg_log, -np.inf))
    return (torch.logsumexp(terms, dim=1) - torch.log(torch.from_numpy(valid.sum(1).astype(np.float64)))).numpy()


def projection_similarity_of(projection):
    """sim(i, c) of `projection_similarity` for index arrays (c, i), without the C x C matrix."""
    p = np.asarray(projection, dtype=np.float64)
    span = p.max() - p.min() if len(p) else 0.0
    scaled = (p - p.min()) / span if span > 0 else np.zeros_like(p)
    return lambda c, i: np.exp(-np.abs(scaled[i] - scaled[c]))


def cosine_similarity_of(prototypes):
    """sim(i, c) of `cosine_similarity_from_prototypes` for index arrays (c, i), without the
    C x C matrix."""
    protos = np.asarray(prototypes, dtype=np.float64)
    if not np.isfinite(protos).all():
        raise ConfigError("every class needs a finite prototype (a class without training images has none)")
    norm = np.linalg.norm(protos, axis=1, keepdims=True)
    unit = protos / np.where(norm > 0, norm, 1.0)

    def of(c, i):
        cos = np.clip(np.einsum("cwd,cwd->cw", unit[np.broadcast_to(c, i.shape)], unit[i]), -1.0, 1.0)
        return np.exp(np.where(i == c, 1.0, cos) - 1.0)
    return of


def weights_and_margins(projection, class_counts, *, window: int, beta: float, edge: str = "shift",
                        similarity=None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(w (C,) Eq. 2, m (C,) Eq. 3, order (C,)) from a projection (C,).

    `similarity` (C, C) in (0, 1] replaces the projection kernel in Eq. 3 (the windows
    still come from the projection's order). Margins keep the projection's autograd graph.
    """
    p = torch.as_tensor(projection)
    if not p.is_floating_point():
        p = p.double()
    order = class_order(p)
    mask = window_mask(order, window, edge).to(p.device)
    sim = projection_similarity(p) if similarity is None else torch.as_tensor(similarity).to(p)
    return swr_weights(class_counts, mask).to(p.device), swm_margins(sim, mask, beta), order
