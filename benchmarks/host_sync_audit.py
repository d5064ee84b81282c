#!/usr/bin/env python
"""Which training steps force a device-to-host sync (issue 21: a step captured in a CUDA graph).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/host_sync_audit.py [--configs A.yaml ...]
                                                                          [--steps 3] [--json OUT]

For every config (default: configs/cifar10_lt/*.yaml but base.yaml) the recipe is built on
benchmarks/method_costs.py's stand-in data (CIFAR-10-LT's class counts, random uint8 images;
with --size S the images are S x S instead of 32 x 32) with its stand-in runs for the runs a config
names (stage 1, M2m's classifier, LFME's experts), wired into a `Trainer` as the loop wires it, and
`--steps` training steps of the config's last epoch (method_costs.active_epoch: every "from epoch E"
switch on) run under `longtail.engine.host_sync.HostSyncs`, each as the loop runs one: the batch
(read, augmented, the method's extra views), `method.training_step`, zero_grad, backward, the
optimiser step, `after_step`, the loss's `sync_statistics`, the accuracy count. The loop's own
loss read every `train.loss_check_every` steps is not part of it. The first step is reported apart
(one-time work: lazy state, warm-ups); "per step" counts the steps after it.

Prints a markdown table: config, method, loss, syncs per step, the sites (src/longtail file:line and
the operation) and what the method declares (`Method.capture_blockers`); --json OUT saves the rows.
A config that cannot be built is one line with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longtail.config import config_from_dict
from longtail.dist import cpu_model
from longtail.engine.host_sync import HostSyncs
from longtail.engine.loop import Trainer
from longtail.runs import build_run_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLOB = "configs/cifar10_lt/*.yaml"


def _method_costs():
    spec = importlib.util.spec_from_file_location("method_costs", Path(__file__).with_name("method_costs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MC = _method_costs()


def loop_step(trainer: Trainer, pos: np.ndarray, gen: torch.Generator, epoch: int, step: int,
              correct: torch.Tensor) -> torch.Tensor:
    """One step as Trainer.train_epoch runs it, less its loss read; returns the detached loss."""
    if trainer.views:
        images, target, trainer.batches.views = trainer.train_views(pos, gen)
    else:
        images, target = trainer.train_batch(pos, gen)
    trainer.batches.epoch, trainer.batches.step, trainer.batches.global_size = epoch, step, len(pos)
    out = trainer.method.training_step(trainer.model, trainer.forward, images, target, trainer.loss_fn, gen)
    trainer.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    trainer.optimizer.step()
    trainer.method.after_step(trainer.model)
    sync = getattr(trainer.loss_fn, "sync_statistics", None)
    if sync is not None:
        sync()
    correct += (out.logits.detach().argmax(1) == out.target).sum()
    return out.loss.detach()


def audit(config: Path, runs, *, steps: int = 3, batch: int = 16) -> dict:
    """One config's row: the sites of its first step and of the steps after it."""
    values = runs.resolved(config, (config.stem,))
    t = values.setdefault("train", {})
    t.update(device="cpu", compile=False, progress=False, tensorboard=False, batch_size=batch)
    cfg = config_from_dict(values)
    data = MC.stand_in(cfg.data)
    torch.manual_seed(0)
    recipe = build_run_recipe(cfg, data)
    method = recipe.method
    row = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
           "method": cfg.method.name, "loss": cfg.loss.name,
           "declared": list(method.capture_blockers(recipe.loss)) if method.trains else []}
    if not method.trains:
        row.update(per_step=0.0, sites={}, first_sites={}, note="post-hoc: no gradient steps")
        return row
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, Path(tmp) / "run", recipe=recipe)
        epoch, phase = MC.active_epoch(cfg, method)
        method.on_epoch_start(epoch, trainer.loss_fn)
        method.set_train_mode(trainer.model)
        order = trainer.sampler.indices(epoch)
        correct = torch.zeros((), dtype=torch.int64)
        found = []
        for i in range(steps):
            pos = np.resize(order[i * batch:], batch) if len(order) > i * batch else np.resize(order, batch)
            with HostSyncs() as syncs:
                loop_step(trainer, pos, torch.Generator().manual_seed(1000 + i), epoch, i, correct)
            found.append(syncs)
    later = [r for s in found[1:] for r in s.records]
    row.update(per_step=len(later) / max(steps - 1, 1), sites=_sites(later), first_sites=_sites(found[0].records),
               phase=phase, note="")
    return row


def _sites(records) -> dict[str, str]:
    """{site: 'op xN, ...'} of records."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        ops = out.setdefault(r.site or f"(outside src/longtail) {r.origin}", {})
        ops[r.op] = ops.get(r.op, 0) + 1
    return {site: ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) for site, ops in sorted(out.items())}


def each_config(configs: list[Path], row, *, workdir: Path | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, [(config, reason)]): `row(config, runs)` for every config, with one set of stand-in runs
    (method_costs.Runs) for the runs the configs name; a config that fails is one (config, reason)."""
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        runs = MC.Runs(Path(tmp))
        for config in configs:
            config = Path(config).resolve()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    rows.append(row(config, runs))
            except Exception as err:  # one line per config that cannot be run
                skipped.append((str(config), f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
    return rows, skipped


def audit_all(configs: list[Path], *, steps: int = 3, batch: int = 16, workdir: Path | None = None
              ) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, [(config, reason)]) for `configs`."""
    return each_config(configs, lambda config, runs: audit(config, runs, steps=steps, batch=batch), workdir=workdir)


def table(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    lines = ["| config | method | loss | syncs / step | sites (per step) | first step only | declared |",
             "|---|---|---|---:|---|---|---|"]
    for r in rows:
        sites = "; ".join(f"`{s}` {ops}" for s, ops in r["sites"].items()) or "-"
        first = "; ".join(f"`{s}` {ops}" for s, ops in r["first_sites"].items() if s not in r["sites"]) or "-"
        declared = "; ".join(r["declared"]) or ("-" if not r["note"] else r["note"])
        lines.append(f"| {Path(r['config']).name} | {r['method']} | {r['loss']} | {r['per_step']:g} | {sites} | "
                     f"{first} | {declared} |")
    for config, reason in skipped:
        lines.append(f"| {Path(config).name} | | | | skipped: {reason} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", help=f"config files (default {DEFAULT_GLOB} less base.yaml)")
    ap.add_argument("--steps", type=int, default=3, help="steps audited per config (the first reported apart)")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--json", help="save the rows to this JSON file")
    args = ap.parse_args(argv)
    configs = MC.config_paths(args.configs)
    tic = time.time()
    logging.disable(logging.WARNING)
    try:
        rows, skipped = audit_all(configs, steps=args.steps, batch=args.batch)
    finally:
        logging.disable(logging.NOTSET)
    machine = (f"cpu: {cpu_model()}; torch {torch.__version__}; python {platform.python_version()}; "
               f"{time.time() - tic:.0f} s")
    print(table(rows, skipped))
    print()
    print(machine)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows,
                                               "skipped": [{"config": c, "reason": r} for c, r in skipped]},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
