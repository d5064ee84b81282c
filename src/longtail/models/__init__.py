"""Models: backbones with the forward_features / forward_head contract, and heads."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..registry import HEADS, MODELS
from . import causal_norm, cifar_resnet, imagenet_resnet, small_cnn  # noqa: F401  (registration)
from .base import Classifier
from .heads import NormedLinear, build_head


def build_model(name: str, *, num_classes: int, in_channels: int = 3, head: str = "linear",
                params: dict | None = None) -> Classifier:
    HEADS.get(head)  # unknown head -> ConfigError with a did-you-mean
    return MODELS.build(name, num_classes=num_classes, in_channels=in_channels, head=head, **(params or {}))


def load_weights(model: Classifier, path: str | Path) -> dict:
    """Load a state_dict file (e.g. torchvision weights) with weights_only=True.

    Tensors whose shape differs (a classifier for another number of classes) are skipped.
    A longtail checkpoint of a pretext pre-training run (SSP) declares its task head
    (`checkpoint["method"]["pretext_head"]`): those tensors are never loaded, whatever their
    shape, so `model`'s own head keeps its fresh initialisation, and every other tensor of
    `model` must be loaded (a partial backbone is an error). Returns {'loaded', 'skipped',
    'missing', 'head'} ('head': 'loaded' or 're-initialised'); nothing matching is an error.
    """
    from ..io import safe_torch_load

    raw = safe_torch_load(path)
    state = raw
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state_dict")
    method_state = raw.get("method") if isinstance(raw, dict) else None
    pretext_head = set(method_state.get("pretext_head", ())) if isinstance(method_state, dict) else set()
    own = model.state_dict()
    loadable = {k: v for k, v in state.items()
                if k not in pretext_head and k in own and getattr(v, "shape", None) == own[k].shape}
    if not loadable:
        raise CheckpointError(f"no parameter of {path} matches the model")
    own_head = {k for k in own if k.startswith(f"{model.head_name}.")}
    if pretext_head:
        absent = sorted(k for k in own if k not in own_head and k not in loadable)
        if absent:
            raise CheckpointError(f"pre-training checkpoint {path} does not fit model '{type(model).__name__}': "
                                  f"{len(absent)} backbone tensor(s) missing or of another shape, e.g. '{absent[0]}'")
    model.load_state_dict(loadable, strict=False)
    return {"loaded": sorted(loadable), "skipped": sorted(k for k in state if k not in loadable),
            "missing": sorted(k for k in own if k not in loadable),
            "head": "loaded" if own_head and own_head <= set(loadable) else "re-initialised"}


__all__ = ["Classifier", "NormedLinear", "build_head", "build_model", "load_weights"]
