"""The embedding-margin term of ELM (Jitkrittum, Menon, Rawat and Kumar, "ELM: Embedding and
Logit Margins for Long-Tail Learning", arXiv 2204.13208, 2022).

No official code is public (searched: google-research, the paper's page); this follows the
paper's description, with the readings below chosen where it leaves room. It is a function of
pooled embeddings, not of logits, so it is no registered `Loss`; the `elm` method
(methods/elm.py) adds it to the configured logit-margin loss.

For a batch of embeddings h_i (B, D) with labels y_i, unit-normalised u_i = h_i / |h_i| and
cosine similarities c_ij = u_i . u_j, anchor i's positives P(i) = {p != i : y_p = y_i} and
negatives N(i) = {n : y_n != y_i}. A class-dependent margin rho_y (larger for rarer classes)
is subtracted from the positive similarity, in cosine units, before the temperature T:

    a_ip = (c_ip - rho_{y_i}) / T,    s_in = c_in / T

    'positive_and_negatives' (default; the logit-margin analogue: the positive plays the
    target logit, the negatives the other logits):
        l_ip = -log( e^{a_ip} / (e^{a_ip} + sum_{n in N(i)} e^{s_in}) )
    'all' (SupCon's L_out with the margin on every positive):
        l_ip = -log( e^{a_ip} / (sum_{p' in P(i)} e^{a_ip'} + sum_{n in N(i)} e^{s_in}) )

    L_EM = mean over anchors with |P(i)| >= 1 of  (1/|P(i)|) sum_{p in P(i)} l_ip

A batch in which no anchor has a positive gives 0 (with a graph, so backward works).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DENOMINATORS = ("positive_and_negatives", "all")


def embedding_margin_loss(features: torch.Tensor, target: torch.Tensor, margins: torch.Tensor, *,
                          temperature: float = 0.1, denominator: str = "positive_and_negatives") -> torch.Tensor:
    """L_EM of features (B, D), target (B,) int64 and per-class margins (C,) -> scalar.

    Computed in the features' dtype (the `elm` method passes float32)."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {', '.join(map(repr, DENOMINATORS))}, got {denominator!r}")
    u = F.normalize(features, dim=1)
    cos = u @ u.t()  # (B, B)
    same = target[:, None] == target[None, :]
    eye = torch.eye(len(target), dtype=torch.bool, device=target.device)
    pos, neg = same & ~eye, ~same
    rho = margins.to(cos.dtype)[target][:, None]  # (B, 1), the anchor's class margin
    a = (cos - rho) / temperature  # positive logits with the margin
    s = cos / temperature  # negative logits
    neg_inf = torch.finfo(cos.dtype).min
    neg_lse = torch.logsumexp(s.masked_fill(~neg, neg_inf), dim=1, keepdim=True)  # (B, 1)
    if denominator == "positive_and_negatives":
        # -log(e^a / (e^a + e^N)) = softplus(N - a); no negatives: N = -inf -> 0
        per_pair = F.softplus(neg_lse - a)
    else:
        pos_lse = torch.logsumexp(a.masked_fill(~pos, neg_inf), dim=1, keepdim=True)
        per_pair = torch.logaddexp(pos_lse, neg_lse) - a
    per_pair = per_pair.masked_fill(~pos, 0.0)
    n_pos = pos.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return features.sum() * 0.0
    per_anchor = per_pair.sum(1)[anchors] / n_pos[anchors].to(cos.dtype)
    return per_anchor.mean()
