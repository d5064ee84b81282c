"""A trained run's network, rebuilt from its run folder alone.

The one way every command gets a run's model (evaluation, `longtail.load`, features,
analysis): the run's method rebuilds the architecture from config.yaml and data.json
(`methods.rebuild_model`: no images, no stage-1 file, no initial weights file), and the
checkpoint's weights are loaded; a corrupt last.pt falls back to prev.pt (RunDir).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig
from .data.build import DataInfo
from .dist import resolve_device
from .errors import CheckpointError, LongtailError
from .methods import rebuild_model
from .rundir import RunDir


def load_run_model(run_dir: str | Path | RunDir, *, which: str = "last", device: str | torch.device = "cpu",
                   cfg: RunConfig | None = None, info: DataInfo | None = None,
                   action: str = "using") -> tuple[torch.nn.Module, int, Path]:
    """(model on `device` in eval mode, the epoch it was saved after, the checkpoint file read).

    `cfg` / `info` default to the run folder's config.yaml / data.json. `which`: 'last' or
    'best_val'. A last.pt that fails its integrity check falls back to prev.pt with one logged
    warning ("... ; {action} RUN/checkpoints/prev.pt (epoch E)").
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.require()
    cfg = cfg or run.read_config()
    info = info or DataInfo.from_json(run.read_data_info())
    state, path = run.load_checkpoint(which, action=action)
    try:
        model = rebuild_model(cfg, info, state)
    except CheckpointError:
        raise
    except LongtailError as err:
        raise CheckpointError(f"cannot rebuild the network of method '{cfg.method.name}' for {path}: "
                              f"{str(err).splitlines()[0]}") from None
    except (KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit the run's model: {str(err).splitlines()[0]}") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = model.to(dev)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), int(state.get("epoch", 0)), path
