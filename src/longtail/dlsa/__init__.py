"""DLSA, dynamic label space adjustment on frozen features (Xu et al., ECCV 2022); docs/dlsa.md.

flow.py: the Gaussian-mixture MAF; losses.py: the three Flow Filter objectives and the pair
sampler; classifier.py: cluster-aided and regular classifiers; cascade.py: filters, routing,
`run_dlsa`; command.py: `longtail dlsa RUN_DIR --out DIR`.
"""

from .cascade import DLSACascade, DLSAConfig, default_clusters, route, run_dlsa
from .flow import GaussianMixtureFlow, cluster_posterior

__all__ = ["DLSACascade", "DLSAConfig", "GaussianMixtureFlow", "cluster_posterior", "default_clusters", "route",
           "run_dlsa"]
