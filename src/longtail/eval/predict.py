"""Batched inference over a data split."""

from __future__ import annotations

import numpy as np
import torch

from ..data.augment import BatchAugment
from ..data.build import Split


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, *, mean, std, batch_size: int = 100,
            device: str | torch.device = "cpu", features: bool = False,
            channels_last: bool = False) -> dict[str, np.ndarray]:
    """Logits (N, C) float32 and labels (N,) in eval mode; with features, pooled (N, D) too."""
    model.eval()
    transform = BatchAugment(mean=mean, std=std, device=device, channels_last=channels_last)
    logits, feats = [], []
    for start in range(0, len(split), batch_size):
        pos = np.arange(start, min(start + batch_size, len(split)))
        images = transform(torch.from_numpy(split.batch(pos)).to(device))
        f = model.forward_features(images)
        pooled = model.forward_head(f, pre_logits=True)
        logits.append(model.head(pooled).float().cpu())
        if features:
            feats.append(pooled.float().cpu())
    out = {"logits": torch.cat(logits).numpy() if logits else np.zeros((0, 0), np.float32),
           "labels": np.asarray(split.labels, dtype=np.int64)}
    if features:
        out["features"] = torch.cat(feats).numpy()
    return out
