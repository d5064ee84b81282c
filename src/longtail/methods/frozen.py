"""Frozen networks of other runs that a method consults while it trains: M2m's classifier g, RIDE's
teacher, LFME's experts. Each is named by a config key as a run folder (its checkpoints/last.pt) or a
checkpoint file, rebuilt from the config saved with it (`rebuild_model`: no images, no stage-1 file),
and frozen. Every failure is one line naming the key and the path (`CheckpointError`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, LongtailError
from ..io import safe_torch_load
from ..models import Classifier
from ..rundir import RunDir
from .base import rebuild_model


def read_checkpoint(source, *, key: str, action: str) -> tuple[dict, RunDir | None]:
    """(checkpoint dict with model weights, its run folder or None for a file) of `source`.
    `key` names the config key in errors, `action` what the checkpoint is read for."""
    where = f"{key} ({source})"
    path = Path(source)
    run = None
    try:
        if path.is_dir():
            run = RunDir(path).require()
            state, _ = run.load_checkpoint("last", action=action)
        elif path.exists():
            state = safe_torch_load(path)
        else:
            raise CheckpointError("no such run folder or checkpoint file")
    except LongtailError as err:
        raise CheckpointError(f"{where}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{where}: not a longtail checkpoint (no model weights)")
    return state, run


def rebuild_frozen(cfg, info, state: dict, *, key: str, source, num_classes: int | None = None) -> Classifier:
    """The network of `state` rebuilt with `cfg` (its own saved config) and `info`, frozen (no
    gradients) and in eval mode; a network that does not fit (other classes, other shapes) is a
    one-line CheckpointError naming `key`."""
    where = f"{key} ({source})"
    try:
        model = rebuild_model(cfg, info, state)
    except LongtailError as err:
        raise CheckpointError(f"{where}: cannot rebuild its network: {str(err).splitlines()[0]}") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        fit = f" ({num_classes} classes)" if num_classes is not None else ""
        raise CheckpointError(f"{where}: does not fit this data{fit}: {str(err).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model.eval()
