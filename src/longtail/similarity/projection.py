"""Category similarity modelling of SWRM (seed 001, Sec. 3.2): class prototypes and their
1-D t-SNE projection.

prototype p_c = mean pooled pre-logit feature of the training images of class c (all of
them, eval mode, no augmentation; `class_prototypes` below). The C prototypes
are projected to one dimension with scikit-learn's t-SNE (exact method, PCA init, Euclidean
distances, `random_state` = the seed); the projection vector orders the classes for the
similarity windows. t-SNE needs perplexity < C; the default is min(30, max(1, (C - 1) / 3))
(scikit-learn's 30 for C >= 91; 3 for CIFAR-10). The learning rate is max(C / 12, 1) (the
N / early-exaggeration rule of Belkina et al. 2019), not scikit-learn's 'auto', whose floor
of 50 is far too large for a few dozen points in 1-D: on synthetic prototypes (10 classes in
5 clusters, 32-D) each class's nearest prototype ended up next to it in the order for 30 %
of classes with 'auto', 70 % with the PCA initialisation alone and 100 % with this rate
(docs/swrm.md). The result is deterministic for a given input, seed and scikit-learn version.
Above TSNE_EXACT_MAX_CLASSES (1,000) classes the exact method (C x C affinities, O(C^2) per
iteration) gives way to scikit-learn's Barnes-Hut approximation (sparse nearest-neighbour
affinities; 1-D is within its n_components < 4), so iNaturalist's 8,142 classes take seconds,
not hours (docs/evaluation.md, "Many classes").
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import ConfigError


def prototypes_from_features(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) float64 mean feature per class; every class must have an image."""

    protos, used = class_prototypes([(features, labels)], num_classes)
    if (used == 0).any():
        missing = np.nonzero(used == 0)[0].tolist()
        raise ConfigError(f"classes without training images have no prototype: {missing[:10]}")
    return protos


TSNE_EXACT_MAX_CLASSES = 1000  # above: method="barnes_hut"


def default_perplexity(num_classes: int) -> float:
    return float(min(30.0, max(1.0, (num_classes - 1) / 3.0)))


def tsne_projection(prototypes: np.ndarray, *, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """(C,) float64 1-D t-SNE coordinates of the (C, D) prototypes (module docstring)."""
    from sklearn.manifold import TSNE

    protos = np.asarray(prototypes, dtype=np.float64)
    if protos.ndim != 2 or not np.isfinite(protos).all():
        raise ConfigError("prototypes must be a finite (C, D) array")
    C = protos.shape[0]
    if C < 2:
        return np.zeros(C)
    perp = default_perplexity(C) if perplexity is None else float(perplexity)
    if not 0 < perp < C:
        raise ConfigError(f"perplexity must be in (0, {C}) for {C} classes, got {perplexity}")
    method = "exact" if C <= TSNE_EXACT_MAX_CLASSES else "barnes_hut"
    tsne = TSNE(n_components=1, perplexity=perp, init="pca", method=method, random_state=int(seed),
                learning_rate=max(C / 12.0, 1.0))
    return tsne.fit_transform(protos)[:, 0].astype(np.float64)


def class_prototypes(batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature per class from (features (B, D), labels (B,)) batches.

    Returns (prototypes (C, D) float64, images used per class (C,)); a class without
    images has a row of NaN.
    """
    sums, used = None, np.zeros(num_classes, dtype=np.int64)
    for feats, labels in batches:
        feats = np.asarray(feats, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if sums is None:
            sums = np.zeros((num_classes, feats.shape[1]))
        np.add.at(sums, labels, feats)
        used += np.bincount(labels, minlength=num_classes)
    if sums is None:
        raise ConfigError("no readable training images to compute class prototypes from")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / used[:, None], used
