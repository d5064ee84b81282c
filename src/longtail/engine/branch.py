"""Branching a run off another run's checkpoint: share a training prefix between methods.

Methods that train exactly like plain cross-entropy for their first epochs and only change
later (DRW re-weighting, SWRM / DySWRM after their switch epoch) need not repeat that
prefix: `longtail train CONFIG --out RUN --branch-from SOURCE` starts RUN from SOURCE's
checkpoint at epoch E (model, optimiser momentum, RNG state, epoch counter, best-on-
validation record and the metrics of epochs < E) and trains epochs E+1 ... with CONFIG's
method. Because every random draw of the loop depends only on (train.seed, epoch), the
branched run ends with the same weights as training CONFIG from scratch (bitwise on CPU
with train.deterministic; tests/test_branch.py checks it).

That equivalence is only claimed where it holds, so a branch is refused unless

- the two configs are equal except in the sections / keys of `FREE_KEYS` (loss, method,
  reweight, eval, train.epochs and keys that do not change the numbers) and in the LR
  schedule keys (`SCHEDULE_KEYS`) where both schedules give the same LR for every epoch
  before E (IB lowers the LR at its switch epoch), where a different
  train.epochs is allowed only when nothing before the branch depends on it (the step and
  constant LR schedules; not the cosine schedule or the progressive sampler), and
- E is at most the number of leading epochs in which *both* configs train as plain CE
  (`Method.plain_ce_epochs()`: a standard run with unweighted `ce` until its re-weighting
  starts, SWRM / DySWRM until `start_epoch`; 0 for every other method, which therefore
  cannot branch).

SOURCE is a checkpoint file (a run's `checkpoints/epoch<E>.pt`, kept with
`train.save_epochs: [E]`, or `checkpoints/last.pt`) or a run folder (its last.pt).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import SESSION_KEYS, RunConfig, config_from_dict, diff_configs
from ..errors import CheckpointError, ConfigError
from ..io import safe_torch_load
from ..optim.schedule import learning_rate
from ..rundir import RunDir

# keys that may differ between a branch and its source (dotted prefixes)
FREE_KEYS = ("loss", "method", "reweight", "eval", "train.epochs", "train.save_epochs", *SESSION_KEYS)


# LR schedule keys that may differ where they give the same LR for every epoch before the branch
SCHEDULE_KEYS = ("train.lr_schedule", "train.warmup_epochs", "train.milestones", "train.lr_decay", "train.min_lr")


def same_lr_prefix(cfg: RunConfig, source_cfg: RunConfig, epoch: int) -> bool:
    """Whether both configs' LR schedules agree on every 0-idx epoch < `epoch`."""
    def lr(c: RunConfig, e: int) -> float:
        t = c.train
        return learning_rate(e, base_lr=t.lr, epochs=t.epochs, schedule=t.lr_schedule, warmup_epochs=t.warmup_epochs,
                             milestones=t.milestones, decay=t.lr_decay, min_lr=t.min_lr)
    return all(lr(cfg, e) == lr(source_cfg, e) for e in range(epoch))


def source_checkpoint(source: str | Path) -> Path:
    """The checkpoint file a branch starts from: SOURCE itself, or SOURCE/checkpoints/last.pt."""
    path = Path(source)
    if path.is_dir():
        path = RunDir(path).last
    if not path.is_file():
        raise CheckpointError(f"--branch-from: no checkpoint at {path}")
    return path


def check_branch(cfg: RunConfig, source_cfg: RunConfig, epoch: int, *, plain_epochs: float,
                 source_plain_epochs: float, source: Path) -> None:
    """Refuse a branch whose result would differ from training `cfg` from scratch."""
    bound = [k for k in diff_configs(cfg, source_cfg)
             if not any(k == f or k.startswith(f + ".") for f in FREE_KEYS)]
    if any(k in SCHEDULE_KEYS for k in bound) and same_lr_prefix(cfg, source_cfg, epoch):
        bound = [k for k in bound if k not in SCHEDULE_KEYS]  # e.g. IB's LR drop at its switch epoch
    if bound:
        raise ConfigError(f"cannot branch from {source}: the configs differ in {', '.join(bound)} "
                          f"(only {', '.join(FREE_KEYS)} may differ)")
    if cfg.train.epochs != source_cfg.train.epochs:
        uses = [what for what, yes in (("the cosine LR schedule", cfg.train.lr_schedule == "cosine"),
                                       ("the progressive sampler", cfg.sampler.name == "progressive")) if yes]
        if uses:
            raise ConfigError(f"cannot branch from {source}: train.epochs differs ({source_cfg.train.epochs} there, "
                              f"{cfg.train.epochs} here) and {' and '.join(uses)} depend on it")
    if epoch > cfg.train.epochs:
        raise ConfigError(f"cannot branch from {source}: it is at epoch {epoch}, after this run's "
                          f"train.epochs = {cfg.train.epochs}")
    for name, plain, c in (("this config", plain_epochs, cfg), ("the source run", source_plain_epochs, source_cfg)):
        if epoch > plain:
            raise ConfigError(f"cannot branch from {source} at epoch {epoch}: {name} (method '{c.method.name}', "
                              f"loss '{c.loss.name}') trains as plain CE for its first {_epochs(plain)} only")


def _epochs(n: float) -> str:
    return "epochs" if math.isinf(n) else f"{int(n)} epoch{'s' * (n != 1)}"


def load_optimizer_prefix(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a source run's optimiser state into `optimizer` whose groups may hold more
    parameters at their end (DySWRM's similarity vector follows the model's parameters):
    the saved state of parameter i of a group goes to parameter i of the same group."""
    current = optimizer.state_dict()
    groups, saved_groups = current["param_groups"], saved["param_groups"]
    if len(groups) != len(saved_groups) or any(len(g["params"]) < len(s["params"])
                                               for g, s in zip(groups, saved_groups)):
        raise CheckpointError("the source run's optimiser does not fit this run's parameters")
    state = {}
    for group, saved_group in zip(groups, saved_groups):
        for new_id, old_id in zip(group["params"], saved_group["params"]):
            if old_id in saved["state"]:
                state[new_id] = saved["state"][old_id]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def copy_best_val(source_ckpt: Path, run: RunDir, best_epoch) -> bool:
    """Copy the source run's best_val.pt when it still holds the best-on-validation weights
    of the prefix (0-idx epoch `best_epoch`); returns whether it did."""
    best = RunDir(source_ckpt.parent.parent).best_val
    if best_epoch is None or not best.is_file() or int(safe_torch_load(best)["epoch"]) != int(best_epoch) + 1:
        return False  # none yet, or overwritten by a later epoch of the source run
    run.write_bytes(RunDir.BEST_VAL, best.read_bytes())
    return True


def write_branch_record(run: RunDir, source_ckpt: Path, epoch: int) -> None:
    """branch.json: the source checkpoint (absolute, so the record holds from any folder) and epoch."""
    run.write_json(RunDir.BRANCH, {"from": str(Path(source_ckpt).absolute()), "epoch": epoch})


def source_run_config(source: str | Path) -> RunConfig:
    """The config a branch source (checkpoint file or run folder) was trained with."""
    path = source_checkpoint(source)
    return source_config(safe_torch_load(path), path)


def source_config(ckpt: dict, path: Path) -> RunConfig:
    if "config" not in ckpt or "epoch" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f"--branch-from: {path} is not a training checkpoint (no config / optimiser / epoch)")
    return config_from_dict(ckpt["config"])
