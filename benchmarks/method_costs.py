#!/usr/bin/env python
"""What each method costs on CIFAR-10-LT's shapes: parameters and FLOPs per image (issues 24/25).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/method_costs.py [--configs A.yaml B.yaml ...]
                                                                       [--json OUT] [--batch 16]

For every config (default: configs/cifar10_lt/*.yaml but base.yaml) on stand-in data with
CIFAR-10-LT's shapes (10 classes, 32x32x3 uint8, the config's profile over 5,000 images per class,
its validation split; rows point into a pool of random images, no image is read):

- trained parameters: the tensors of the recipe's parameter groups (what the optimiser updates);
  all parameters: the network's, plus every other network the method holds while it trains (frozen
  stage-1 copies, M2m's classifier, LFME's experts, momentum encoders, the loss's own parameters).
- training FLOPs per image: real `method.training_step` + `loss.backward()` calls, wired as the
  loop wires them (a `Trainer` built on the recipe: its BatchAugment, `method.batches` with its
  `fetch` / `fetch_views` and the method's extra views), counted by torch.utils.flop_counter:
  matrix products and convolutions only, 2 FLOPs per multiply-add, forward and backward
  (batch norm, activations, augmentation and the optimiser are not counted). A step is counted
  at two batch sizes (B and 2B) and fitted as a + c / B, so a per-step cost that does not grow with
  the batch (MetaSAug's meta batch of 100 validation images) is charged at the config's
  train.batch_size. M2m and RSG, whose step's work depends on the batch's content (translated
  seeds; head / tail classes present), are counted at their train.batch_size instead, the mean of
  two steps. Added to it, amortised over the run's images: the method's `on_epoch_end`
  (e.g. DRO-LT's class means over the training split, counted at the measured epoch) and one-time
  work (`build_recipe`, and what the first step does more than the second: LFME's expert pass
  over the training split), over train.epochs x the sampler's epoch length.
- inference FLOPs per image: the plain eval-mode forward of the network (what `longtail eval` /
  predict run); RIDE's router and SADE's test-time aggregation are noted, not counted.
- x CE: training FLOPs per image over CE's (ce.yaml) when it is in the list.

Phase: every step is counted in the config's last epoch, where every "from epoch E" switch is on
(DRW, M2m's generation and over-sampling, MetaSAug's meta step, RSG's generation phase, IB, SWRM);
CMO mixes only in epochs start_data_aug < e < epochs - end_data_aug, so it is counted in the last
of those, with the mixing coin forced on (train.cutmix_prob = 1: the FLOPs do not depend on it).

Methods that need other runs (a stage-2 method's method.params.stage1, M2m's classifier, LFME's
experts, RIDE's router on its RIDE stage 1, SSP-started runs' model.weights) get tiny stand-in
runs made here in a temporary folder: the config that writes that run (the first line's --out, or
the run folder's name less "cifar10_lt_") trained for one epoch (its own epochs where one epoch is
refused) on 4 random 32x32 images per class plus 1 for validation, batch 16. Their weights are
random-ish; FLOPs of a data-dependent step (M2m: how many seeds are translated) are those of
these weights and these images.

Prints a markdown table, the CPU (longtail.dist.cpu_model()) and torch version; --json OUT saves
every row. A config that cannot be measured is one line with the reason, not a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from longtail.config import config_from_dict, read_config_file
from longtail.data.build import LTData, Split
from longtail.data.profiles import class_counts as profile_counts
from longtail.dist import cpu_model
from longtail.errors import ConfigError
from longtail.engine.loop import Trainer
from longtail.methods.base import Method
from longtail.runs import build_run_recipe, train_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLOB = "configs/cifar10_lt/*.yaml"
SOURCE_PER_CLASS = 5000  # CIFAR-10's training images per class
POOL = 256  # random images the stand-in rows point into
# Methods whose step's work depends on the batch's content (M2m: how many seeds are translated; RSG:
# the head / tail classes present): counted at the config's own train.batch_size, two steps averaged.
FULL_BATCH = ("m2m", "rsg")
RUN_KEYS = ("stage1", "classifier", "teacher", "experts", "similarity_run")  # method.params naming other runs


# ----------------------------------------------------------------------------- stand-in data


def stand_in(data_cfg, *, seed: int = 0) -> LTData:
    """CIFAR-10-LT's shapes without images: the profile's class counts over 5,000 per class, the
    validation split taken as build_data takes it, every row pointing into POOL random uint8 images."""
    c = 10
    counts = np.asarray(profile_counts(data_cfg.profile, c, SOURCE_PER_CLASS, data_cfg.imbalance_ratio,
                                       step_fraction=data_cfg.step_fraction, pareto_shape=data_cfg.pareto_shape)
                        if data_cfg.profile not in ("none", "counts") else
                        (data_cfg.counts if data_cfg.profile == "counts" else [SOURCE_PER_CLASS] * c), dtype=np.int64)
    k = data_cfg.val_per_class
    counts = counts - np.maximum(0, k - (SOURCE_PER_CLASS - counts))  # the head class gives its own shortfall
    counts = np.maximum(counts, 1)
    names = [str(i) for i in range(c)]  # as the arrays source names them (the stand-in runs' data)
    if data_cfg.class_subset is not None:
        keep = [names.index(s) if isinstance(s, str) else int(s) for s in data_cfg.class_subset]
        counts, names = counts[keep], [names[i] for i in keep]
        c = len(keep)
    rs = np.random.RandomState(seed)
    pool = rs.randint(0, 256, (POOL, 32, 32, 3), dtype=np.uint8)

    def split(per_class) -> Split:
        labels = np.repeat(np.arange(c), per_class).astype(np.int64)
        return Split(pool, rs.randint(0, POOL, len(labels)).astype(np.int64), labels)

    mean = tuple(data_cfg.mean) if data_cfg.mean is not None else (0.5,) * 3
    std = tuple(data_cfg.std) if data_cfg.std is not None else (0.25,) * 3
    return LTData(train=split(counts), val=split(k) if k else None, test=split(10), class_counts=counts,
                  class_names=names, source_counts=np.full(c, SOURCE_PER_CLASS), mean=mean, std=std,
                  description="stand-in: CIFAR-10-LT shapes, random images")


def tiny_arrays(num_classes: int = 10, per_class: int = 5, seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    return {"train_images": rs.randint(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), "train_labels": labels,
            "test_images": rs.randint(0, 256, (num_classes, 32, 32, 3), dtype=np.uint8),
            "test_labels": np.arange(num_classes)}


# ----------------------------------------------------------------------------- other runs a config needs


def _run_name(path: str) -> str:
    """The run folder's name of a run folder or of a checkpoint inside its checkpoints/ folder."""
    p = Path(path)
    return p.parent.parent.name if p.suffix == ".pt" else p.name


def _producer(run_name: str, folder: Path) -> Path | None:
    """The config in `folder` that writes the run folder `run_name`: its first line's --out, else
    <name less 'cifar10_lt_'>.yaml."""
    for path in sorted(folder.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        parts = first.split()
        if "--out" in parts and parts.index("--out") + 1 < len(parts) and \
                Path(parts[parts.index("--out") + 1]).name == run_name:
            return path
    guess = folder / (run_name.removeprefix("cifar10_lt_") + ".yaml")
    return guess if guess.is_file() else None


class Runs:
    """Tiny stand-in runs of the configs other configs need, made once each in `root`."""

    def __init__(self, root: Path):
        self.root, self.made, self.notes = root, {}, {}

    def run_for(self, reference: str, folder: Path, chain: tuple = ()) -> Path:
        name = _run_name(reference)
        if name in self.made:
            return self.made[name]
        config = _producer(name, folder)
        if config is None:
            raise LookupError(f"no config in {folder} writes the run '{name}' it needs")
        if config.stem in chain:
            raise LookupError(f"configs need each other: {' -> '.join(chain + (config.stem,))}")
        values = self.resolved(config, chain + (config.stem,))
        data = {k: v for k, v in values["data"].items() if k in ("mean", "std", "class_subset", "class_order")}
        values["data"] = {**data, "source": "arrays", "profile": "none", "val_per_class": 1, "seed": 0}
        t = values.setdefault("train", {})
        t.update(batch_size=16, eval_batch_size=64, progress=False, device="cpu", save_epochs=[])
        out = self.root / name
        try:
            try:
                train_run(config_from_dict({**values, "train": {**t, "epochs": 1}}), out, evaluate=False,
                          arrays=tiny_arrays())
                how = "1 epoch"
            except ConfigError:  # one epoch refused (a start epoch beyond it): the config's own length
                shutil.rmtree(out, ignore_errors=True)
                train_run(config_from_dict(values), out, evaluate=False, arrays=tiny_arrays())
                how = f"{values['train'].get('epochs', '?')} epochs"
        except Exception as err:
            raise LookupError(f"the stand-in run of {config.name} failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err
        self.made[name] = out
        self.notes[name] = f"{config.name}, {how}"
        return out

    def resolved(self, config: Path, chain: tuple = ()) -> dict:
        """The config's values with every other run it names replaced by a tiny stand-in run."""
        values = read_config_file(config)
        folder = config.parent
        model = values.setdefault("model", {})
        if model.get("weights"):
            model["weights"] = str(self.checkpoint(model["weights"], folder, chain))
        params = values.setdefault("method", {}).setdefault("params", {}) or {}
        for key in RUN_KEYS:
            v = params.get(key)
            if isinstance(v, str) and v:
                params[key] = str(self.checkpoint(v, folder, chain))
            elif isinstance(v, list):
                params[key] = [str(self.checkpoint(x, folder, chain)) for x in v]
        values["method"]["params"] = params
        return values

    def checkpoint(self, reference: str, folder: Path, chain: tuple) -> Path:
        run = self.run_for(reference, folder, chain)
        return run / "checkpoints" / Path(reference).name if Path(reference).suffix == ".pt" else run


# ----------------------------------------------------------------------------- counting


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _modules_of(obj, seen: set) -> list[torch.nn.Module]:
    """nn.Modules an object holds (directly, in lists / tuples / dicts, or as `.model` of a holder)."""
    out = []

    def visit(v, depth=0):
        if id(v) in seen or depth > 2:
            return
        if isinstance(v, torch.nn.Module):
            seen.add(id(v))
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x, depth + 1)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, depth + 1)
        elif hasattr(v, "__dict__") and isinstance(getattr(v, "model", None), torch.nn.Module):
            visit(v.model, depth + 1)

    for v in vars(obj).values():
        visit(v)
    return out


def parameter_counts(recipe) -> tuple[int, int, dict]:
    """(trained, all, {part: count}) of a recipe; each tensor counted once."""
    trained = {id(p): p.numel() for g in recipe.param_groups for p in g.params if p.requires_grad}
    every, parts = {}, {}

    def add(name, params):
        n = 0
        for p in params:
            if id(p) not in every:
                every[id(p)] = p.numel()
                n += p.numel()
        if n:
            parts[name] = parts.get(name, 0) + n

    add("network", recipe.model.parameters())
    if recipe.loss is not None:
        add("loss", recipe.loss.parameters())
    for m in _modules_of(recipe.method, {id(recipe.model), id(recipe.loss)}):
        add(f"method {type(m).__name__}", m.parameters())
    for g in recipe.param_groups:
        add("other trained", g.params)
    return sum(trained.values()), sum(every.values()), parts


def active_epoch(cfg, method) -> tuple[int, str]:
    """The 0-idx epoch whose steps are counted, and the phase in words."""
    t, p = cfg.train, dict(cfg.method.params or {})
    e = t.epochs - 1
    if cfg.method.name == "cmo":
        start, end = method.start_data_aug, method.end_data_aug
        e = t.epochs - end - 1
        return e, f"epoch {e + 1}/{t.epochs} (CMO mixing on: {start} < e < {t.epochs - end}, coin forced)"
    switches = [f"{k} {v}" for k, v in sorted(p.items()) if "epoch" in k and isinstance(v, int)]
    if cfg.reweight.scheme != "none":
        switches.append(f"reweight from {cfg.reweight.start_epoch}")
    return e, f"epoch {e + 1}/{t.epochs} (last" + (f"; {', '.join(switches)}" if switches else "") + ")"


def measure(config: Path, runs: Runs, *, batch: int = 16) -> dict:
    """One config's row (see the module docstring)."""
    values = runs.resolved(config, (config.stem,))
    t = values.setdefault("train", {})
    t.update(device="cpu", compile=False, progress=False, tensorboard=False)
    if values.get("method", {}).get("name") == "cmo":
        t["cutmix_prob"] = 1.0
    cfg = config_from_dict(values)
    data = stand_in(cfg.data)
    recipe_box = {}
    build_flops = count_flops(lambda: recipe_box.setdefault("r", build_run_recipe(cfg, data)))
    recipe = recipe_box["r"]
    method = recipe.method
    trained, total, parts = parameter_counts(recipe)
    row = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
           "method": cfg.method.name, "model": cfg.model.name, "loss": cfg.loss.name, "sampler": cfg.sampler.name,
           "trained_params": trained, "all_params": total, "param_parts": parts, "batch_size": cfg.train.batch_size,
           "epochs": cfg.train.epochs}
    notes = []
    inference_batch = torch.from_numpy(data.test.batch(np.arange(batch))).permute(0, 3, 1, 2).float() / 255.0
    if not method.trains:
        notes.append("post-hoc: no gradient steps")
        row.update(train_flops=0.0, phase="post-hoc fit")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, data, Path(tmp) / "run", recipe=recipe)
            epoch, phase = active_epoch(cfg, method)
            row["phase"] = phase
            method.on_epoch_start(epoch, trainer.loss_fn)
            method.set_train_mode(trainer.model)
            order = trainer.sampler.indices(epoch)
            step_box = [0]

            def step(size: int):
                i = step_box[0]
                step_box[0] += 1
                pos = np.resize(order[i * size:], size) if len(order) > i * size else np.resize(order, size)
                gen = torch.Generator().manual_seed(1000 + i)
                if trainer.views:
                    images, target, trainer.batches.views = trainer.train_views(pos, gen)
                else:
                    images, target = trainer.train_batch(pos, gen)
                trainer.batches.epoch, trainer.batches.step, trainer.batches.global_size = epoch, i, size

                def counted():
                    out = method.training_step(trainer.model, trainer.forward, images, target, trainer.loss_fn, gen)
                    out.loss.backward()

                flops = count_flops(counted)
                trainer.optimizer.zero_grad(set_to_none=True)
                try:  # not counted (no matrix products: momentum updates, constraints)
                    method.after_step(trainer.model)
                except Exception as err:
                    notes.append(f"after_step raised {type(err).__name__} (not counted)")
                return flops

            if cfg.method.name in FULL_BATCH:
                size = cfg.train.batch_size
                first, f1 = step(size), step(size)
                steady, per_step, once = (first + f1) / (2 * size), 0.0, build_flops
                notes.append(f"data-dependent: mean of 2 steps at batch {size}")
            else:
                first, f1, f2 = step(batch), step(batch), step(2 * batch)
                per_image = (f2 - f1) / batch  # a + c / B fitted through B and 2B
                per_step = f1 - per_image * batch
                once = build_flops + max(0, first - f1) if first - f1 > 0.02 * f1 else build_flops
                steady = per_image + per_step / cfg.train.batch_size
            epoch_images = len(order)
            run_images = epoch_images * cfg.train.epochs
            hook = 0.0
            if type(method).on_epoch_end is not Method.on_epoch_end:
                # every epoch but the last as the one before the last, the last as itself
                last = count_flops(lambda: method.on_epoch_end(epoch, trainer.model, trainer.device))
                before = count_flops(lambda: method.on_epoch_end(epoch - 1, trainer.model, trainer.device)) \
                    if epoch > 0 else last
                hook = (before * epoch + last) / (epoch + 1)  # per epoch, mean over the run
            row.update(step_flops_per_image=steady, step_fixed_flops=per_step, epoch_end_flops=hook,
                       one_time_flops=once, epoch_images=epoch_images,
                       train_flops=steady + hook / epoch_images + once / run_images)
            if abs(per_step) > 0.01 * f1:
                notes.append(f"per-step fixed {per_step / 1e6:.0f} MFLOPs at batch {cfg.train.batch_size}")
            if hook / epoch_images > 0.05e6:
                notes.append(f"on_epoch_end {hook / epoch_images / 1e6:.1f} M/img")
            if once / run_images > 0.05e6:
                notes.append(f"one-time {once / run_images / 1e6:.1f} M/img")
    model = recipe.model.eval()  # (counted with autograd on: FlopCounterMode's module hooks trip on LCReg's
    # latent pool under no_grad; the forward's FLOPs are the same)
    inf = count_flops(lambda: model.head(model.forward_head(model.forward_features(inference_batch),
                                                            pre_logits=True)))
    row["inference_flops"] = inf / batch
    if cfg.method.name == "ride_router":
        notes.append("routed inference: fewer experts per image (eval.json routing.flops)")
    if getattr(method, "aggregates_at_test_time", False):
        notes.append("test-agnostic eval adds expert-weight learning")
    row["notes"] = "; ".join(dict.fromkeys(notes))
    return row


# ----------------------------------------------------------------------------- table


def table(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    ce = next((r["train_flops"] for r in rows if Path(r["config"]).name == "ce.yaml"), None)
    lines = ["| method | config | trained params | all params | train MFLOPs/img | x CE | inference MFLOPs/img "
             "| phase measured | notes |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        x = f"{r['train_flops'] / ce:.2f}" if ce and r["train_flops"] else "-"
        lines.append(f"| {r['method']} | {Path(r['config']).name} | {r['trained_params']:,} | {r['all_params']:,} | "
                     f"{r['train_flops'] / 1e6:.1f} | {x} | {r['inference_flops'] / 1e6:.1f} | {r['phase']} | "
                     f"{r['notes']} |")
    for config, reason in skipped:
        lines.append(f"| - | {Path(config).name} | | | | | | skipped | {reason} |")
    return "\n".join(lines)


def measure_all(configs: list[Path], *, batch: int = 16, workdir: Path | None = None) -> tuple[list, list, dict]:
    """(rows, [(config, reason)], {stand-in run: how it was made}) for `configs`."""
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        runs = Runs(Path(tmp))
        for config in configs:
            config = Path(config).resolve()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    torch.manual_seed(0)
                    rows.append(measure(config, runs, batch=batch))
            except Exception as err:  # one line per config that cannot be measured
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                skipped.append((str(config), reason))
                logging.getLogger(__name__).debug("%s", traceback.format_exc())
        return rows, skipped, dict(runs.notes)


def config_paths(given: list[str] | None) -> list[Path]:
    """The configs named on the command line, else every DEFAULT_GLOB config but base.yaml."""
    if given:
        return [Path(c) for c in given]
    return [p for p in sorted(REPO.glob(DEFAULT_GLOB)) if p.name != "base.yaml"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", help=f"config files (default {DEFAULT_GLOB} less base.yaml)")
    ap.add_argument("--batch", type=int, default=16, help="images per counted step (also 2x this)")
    ap.add_argument("--json", help="save the rows to this JSON file")
    args = ap.parse_args(argv)
    configs = config_paths(args.configs)
    tic = time.time()
    logging.disable(logging.WARNING)  # the stand-in runs' and recipes' lines; restored for the caller
    try:
        rows, skipped, made = measure_all(configs, batch=args.batch)
    finally:
        logging.disable(logging.NOTSET)
    machine = (f"cpu: {cpu_model()}; torch {torch.__version__}; python {platform.python_version()}; "
               f"{torch.get_num_threads()} thread(s); {time.time() - tic:.0f} s")
    print(table(rows, skipped))
    print()
    print("FLOPs: matrix products and convolutions, forward + backward, 2 per multiply-add "
          "(torch.utils.flop_counter); stand-in runs: " + "; ".join(f"{k} ({v})" for k, v in made.items()))
    print(machine)
    if args.json:
        payload = {"machine": machine, "command": "python benchmarks/method_costs.py " + " ".join(argv or sys.argv[1:]),
                   "batch": args.batch, "rows": rows, "skipped": [{"config": c, "reason": r} for c, r in skipped],
                   "stand_in_runs": made}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
