"""Run folders: train into one, evaluate one. The CLI and the Python API both use these.

A run folder holds::

    config.yaml            the resolved config (written first)
    data.json              class names, training counts, split sizes, normalisation
    metrics.jsonl          one line per finished epoch
    checkpoints/last.pt    model, optimiser, epoch, RNG state (atomic, each epoch)
    checkpoints/best_val.pt  the best-on-validation weights (when a validation split is set)
    predictions.npz        test logits and labels (+ best_val_logits)
    eval.json              test metrics of the last epoch, and of best-on-validation

Nothing is created before the config, the data and every component have been checked,
and a run that fails before its first checkpoint removes the folder it created.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, config_from_dict, diff_configs, dump_config, read_yaml
from .data.build import LTData, build_data
from .errors import CheckpointError, ConfigError
from .eval.metrics import compute_metrics
from .eval.predict import predict
from .methods import build_method
from .train import distributed
from .train.branch import source_checkpoint
from .train.checkpoint import (atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text,
                               safe_torch_load)
from .train.loop import BEST_VAL, CHECKPOINT, fit, resolve_device


def data_info(data: LTData) -> dict:
    return {"description": data.description, "class_names": data.class_names,
            "class_counts": [int(v) for v in data.class_counts],
            "source_counts": [int(v) for v in data.source_counts],
            "num_train": len(data.train), "num_val": 0 if data.val is None else len(data.val),
            "num_test": len(data.test), "mean": list(data.mean), "std": list(data.std),
            "image_shape": list(data.image_shape), "channels": data.channels}


def check_components(cfg: RunConfig, data: LTData) -> None:
    """Build method, model, loss and sampler once, so bad names or parameters fail early."""
    method = _built(cfg, "method", lambda: build_method(cfg, data))
    for section, build in (("model", method.build_model), ("loss", method.build_loss),
                           ("sampler", method.build_sampler)):
        _built(cfg, section, build)


def _built(cfg: RunConfig, section: str, build):
    """build(), with a component's own parameter check (ValueError) as a ConfigError naming it."""
    try:
        return build()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{section} '{getattr(cfg, section).name}': {str(err).splitlines()[0]}") from None


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"not a run folder (no config.yaml): {run_dir}")
    return config_from_dict(read_yaml(path))


def train_run(cfg: RunConfig | None, out: str | Path, *, resume: bool = False, evaluate: bool = True,
              arrays: dict | None = None, branch_from: str | Path | None = None, log=print) -> dict:
    """Train (or resume) into `out`, then evaluate; returns the eval.json content.

    `branch_from` (a checkpoint file or run folder) starts a new run from another run's
    checkpoint instead of from scratch, where both train as plain CE up to it (train/branch.py).

    Under torchrun every process calls this; all check the inputs before rank 0 creates
    anything, only rank 0 writes, and only rank 0 evaluates (the others return {}).
    """
    out = Path(out)
    if branch_from is not None and resume:
        raise ConfigError("--branch-from starts a new run; a branched run continues with --resume alone")
    if branch_from is not None:
        source_checkpoint(branch_from)  # a missing source fails before any data is read
    if cfg is None and resume:
        cfg = load_run_config(out)
    ctx = distributed.init(cfg.train.device if cfg is not None else "cpu")
    result = _train_run(cfg, out, resume=resume, evaluate=evaluate, arrays=arrays, ctx=ctx, branch_from=branch_from,
                        log=log if ctx.is_main else (lambda *a: None))
    if ctx.enabled and torch.distributed.is_initialized():
        # Only after a success, and together: a rank that tore its gloo connections down while
        # rank 0 was still evaluating sometimes aborted ("terminate called without an active
        # exception") once rank 0 closed its end. After a failure torchrun stops the others.
        distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _train_run(cfg, out: Path, *, resume: bool, evaluate: bool, arrays, ctx, log, branch_from=None) -> dict:
    created = False
    if resume:
        saved = load_run_config(out)
        if cfg is not None and diff_configs(cfg, saved):
            raise ConfigError(f"config differs from the one saved in {out}: {', '.join(diff_configs(cfg, saved))}")
        cfg = saved
        distributed.barrier()
        if ctx.is_main:
            for stale in [*out.glob(".*.tmp"), *out.glob("checkpoints/.*.tmp")]:
                stale.unlink()  # temporary files of a write that a crash interrupted
        if not (out / CHECKPOINT).is_file():
            resume = False  # crashed before the first checkpoint: start over in place
    else:
        if cfg is None:
            raise ConfigError("a config is required to start a new run")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"run folder {out} already exists and is not empty; use --resume or another --out")
    data = build_data(cfg.data, arrays=arrays, progress=cfg.train.progress and ctx.is_main)
    check_components(cfg, data)
    resolve_device(cfg.train.device)
    log(data.summary())
    distributed.barrier()  # every process has checked its inputs before anything is created
    if ctx.is_main and not out.exists():
        out.mkdir(parents=True)
        created = True
    try:
        if not resume and ctx.is_main:
            atomic_write_text(out / "config.yaml", dump_config(cfg))
            atomic_write_json(out / "data.json", data_info(data))
        distributed.barrier()
        done = int(safe_torch_load(out / CHECKPOINT)["epoch"]) if resume else 0
        if not build_method(cfg, data).trains:
            if branch_from is not None:
                raise ConfigError(f"method '{cfg.method.name}' is post-hoc; it takes no --branch-from")
            if not resume and ctx.is_main:
                fit_posthoc_run(cfg, data, out, log=log)
        elif done < cfg.train.epochs:
            fit(cfg, data, out, resume=resume, branch_from=branch_from, log=log)
    except BaseException:
        if created and not (out / CHECKPOINT).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not ctx.is_main:
        return {}
    return evaluate_run(out, cfg=cfg, data=data, log=log) if evaluate else {}


def fit_posthoc_run(cfg: RunConfig, data: LTData, out: Path, *, log=print) -> dict:
    """Post-hoc methods (tau_norm, ncm): fit on train / validation data, save as epoch 0."""
    device = resolve_device(cfg.train.device)
    method = build_method(cfg, data)
    model = method.build_model().to(device)
    info = method.fit_posthoc(model, device)
    atomic_write_json(out / "posthoc.json", info)
    atomic_torch_save({"model": model.state_dict(), "epoch": 0, "posthoc": info}, out / CHECKPOINT)
    log(f"{cfg.method.name}: {', '.join(f'{k} {v}' for k, v in info.items() if not isinstance(v, list))}")
    return info


def _posthoc_logit_adjustment(run_dir: Path, cfg: RunConfig, tau: float) -> dict:
    from .logit_adjust import adjust_logits, check_tau, train_prior

    tau = check_tau(tau)
    path = run_dir / "predictions.npz"
    if not path.is_file():
        raise CheckpointError(f"no predictions.npz in {run_dir}: run `longtail eval {run_dir}` first")
    info = json.loads((run_dir / "data.json").read_text())
    counts = np.asarray(info["class_counts"])
    pi = train_prior(counts)
    uniform = np.full(len(counts), 1.0 / len(counts))
    e = cfg.eval
    kw = dict(many_threshold=e.many_threshold, few_threshold=e.few_threshold, rare_threshold=e.rare_threshold,
              ece_bins=e.ece_bins, class_names=info["class_names"])
    with np.load(path) as preds:
        if preds["logits"].shape[1] != len(counts):  # an SSP pre-training run predicts rotations, not classes
            raise ConfigError(f"{run_dir} predicts {preds['logits'].shape[1]} outputs for {len(counts)} classes: "
                              "post-hoc logit adjustment needs a classification run")
        result = {"run": str(run_dir), "split": "test", "checkpoint": "last", "posthoc": "logit adjustment",
                  "tau": tau, "target_prior": "uniform"}
        adjusted = adjust_logits(torch.from_numpy(preds["logits"]), pi_train=pi, pi_target=uniform, tau=tau)
        result.update(compute_metrics(adjusted.numpy(), preds["labels"], counts, **kw))
        if "best_val_logits" in preds:
            adjusted = adjust_logits(torch.from_numpy(preds["best_val_logits"]), pi_train=pi, pi_target=uniform,
                                     tau=tau)
            result["best_val"] = compute_metrics(adjusted.numpy(), preds["labels"], counts, **kw)
    result["epoch"] = int(safe_torch_load(run_dir / CHECKPOINT).get("epoch", 0))
    atomic_write_json(run_dir / "eval_logit_adjusted.json", result)
    return result


def _load_model(cfg: RunConfig, data: LTData, path: Path, device) -> torch.nn.Module:
    model = build_method(cfg, data).build_model()
    state = safe_torch_load(path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit the run's model: {str(err).splitlines()[0]}") from None
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, int(state.get("epoch", 0))


def evaluate_run(run_dir: str | Path, *, cfg: RunConfig | None = None, data: LTData | None = None,
                 arrays: dict | None = None, logit_adjust_tau: float | None = None, log=print) -> dict:
    """Write predictions.npz and eval.json for the last epoch (and best-on-validation).

    With `logit_adjust_tau`, the metrics are of post-hoc logit adjustment toward a uniform
    test prior (Menon et al., ICLR 2021, Eq. 5): argmax_y z_y - tau * log pi_y, pi the
    training prior; tau is given, not tuned on test. They go to eval_logit_adjusted.json and
    predictions.npz / eval.json are left as they are.
    """
    run_dir = Path(run_dir)
    if logit_adjust_tau is not None:
        return _posthoc_logit_adjustment(run_dir, cfg or load_run_config(run_dir), logit_adjust_tau)
    cfg = cfg or load_run_config(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise CheckpointError(f"no checkpoint in {run_dir} (train it first)")
    data = data or build_data(cfg.data, arrays=arrays)
    device = resolve_device(cfg.train.device)
    e = cfg.eval
    kw = dict(many_threshold=e.many_threshold, few_threshold=e.few_threshold, rare_threshold=e.rare_threshold,
              ece_bins=e.ece_bins, class_names=data.class_names)
    pkw = dict(mean=data.mean, std=data.std, batch_size=cfg.train.eval_batch_size, device=device,
               channels_last=cfg.train.channels_last)
    pretext = getattr(build_method(cfg, data), "pretext_metrics", None)  # SSP pre-training: its own task

    def score(net, split) -> tuple[dict, dict]:
        if pretext is not None:
            return pretext(net, split, **pkw, **kw)
        out = predict(net, split, **pkw)
        return compute_metrics(out["logits"], out["labels"], data.class_counts, **kw), out

    model, epoch = _load_model(cfg, data, run_dir / CHECKPOINT, device)
    test_metrics, arrays_out = score(model, data.test)
    result = {"run": str(run_dir), "split": "test", "checkpoint": "last", "epoch": epoch, **test_metrics}
    if data.val is not None and len(data.val):
        result["val"] = {k: v for k, v in score(model, data.val)[0].items()
                         if k in ("top1", "many", "medium", "few", "mcc", "nmi", "ece", "num_samples")}
        if (run_dir / BEST_VAL).is_file():
            best, best_epoch = _load_model(cfg, data, run_dir / BEST_VAL, device)
            best_metrics, bt = score(best, data.test)
            result["best_val"] = {"epoch": best_epoch, "selected_on": "validation top1", **best_metrics}
            arrays_out["best_val_logits"] = bt["logits"]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays_out)
    atomic_write_bytes(run_dir / "predictions.npz", buffer.getvalue())
    atomic_write_json(run_dir / "eval.json", result)
    return result
