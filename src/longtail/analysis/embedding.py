"""t-SNE of test features (seed 000, Sec. 5.2, Fig. 5) and a class-separation number.

scikit-learn's TSNE (Barnes-Hut, PCA initialisation, learning rate 'auto') on a seeded
subsample of the pooled pre-logit features; the silhouette (scikit-learn, Euclidean, in the
feature space itself, not in the 2-D map) of the same subsample with the class labels
gives one number for Fig. 5's "clearer class boundaries", overall and per class.
"""

from __future__ import annotations

import time

import numpy as np


def seeded_subsample(n: int, samples: int, seed: int) -> np.ndarray:
    """Sorted indices of min(samples, n) distinct rows, drawn with numpy's PCG64 from `seed`."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))


def tsne_of_features(features: np.ndarray, labels: np.ndarray, *, samples: int = 2000, seed: int = 0,
                     perplexity: float = 30.0) -> dict:
    """2-D t-SNE map and silhouettes of a seeded subsample.

    Args:
        features: (N, D) float. labels: (N,) int class labels.

    Returns: indices (n,), coords (n, 2), labels (n,), perplexity (lowered to (n - 1) / 3
    when the subsample is small), kl_divergence, silhouette (overall, or None with fewer than
    2 classes) and silhouette_per_class ({class index: mean}), seconds.
    """
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_samples

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"need (N, D) features and (N,) labels, got {features.shape} and {labels.shape}")
    if len(features) < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {len(features)}")
    idx = seeded_subsample(len(features), samples, seed)
    x, y = features[idx], labels[idx]
    perplexity = float(min(perplexity, (len(idx) - 1) / 3))
    tic = time.perf_counter()
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    coords = tsne.fit_transform(x)
    seconds = time.perf_counter() - tic
    present = np.unique(y)
    silhouette, per_class = None, {}
    if 2 <= len(present) < len(y):
        s = silhouette_samples(x, y)
        silhouette = float(s.mean())
        per_class = {int(c): float(s[y == c].mean()) for c in present}
    return {"indices": idx, "coords": coords, "labels": y, "perplexity": perplexity,
            "kl_divergence": float(tsne.kl_divergence_), "silhouette": silhouette,
            "silhouette_per_class": per_class, "seconds": seconds}
