"""Train into a run folder and evaluate one. The CLI and the Python API both use these.

The run folder's files are RunDir's (rundir.py); the network of a trained run is rebuilt
by runmodel.load_run_model. Nothing is created before the config, the data and every
component (the run's recipe, built once) have been checked, and a run that fails before its
first checkpoint removes the folder it created. A run folder has one writer at a time:
training and evaluation hold its lock (runlock.py).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import dist as distributed
from .callbacks import check_callbacks
from .config import SESSION_KEYS, RunConfig, absolute_paths, diff_configs
from .data.build import LTData, build_data, stand_in_data
from .dist import resolve_device
from .engine.branch import source_checkpoint, source_run_config
from .engine.loop import check_optimizer, fit
from .errors import ConfigError, LongtailError
from .eval.metrics import compute_metrics
from .methods import Recipe, Services, build_method, build_recipe
from .methods.base import logits_prior
from .registry import METHODS
from .rundir import RunDir
from .runlock import LOCK_NAME, RunLock
from .runmodel import load_run_model

log = logging.getLogger(__name__)


def _run_features(run_dir: str):
    from .features import extract_features

    fs = extract_features(run_dir)
    return fs["train"]["features"], fs["train"]["labels"], fs.num_classes


def build_run_recipe(cfg: RunConfig, data: LTData) -> Recipe:
    """The run's recipe, built once: seeded first (the model's initial weights depend on train.seed
    alone), every component checked (bad names or parameters raise ConfigError)."""
    check_optimizer(cfg)
    check_callbacks(cfg)
    torch.manual_seed(cfg.train.seed)
    return build_recipe(cfg, data, Services(run_features=_run_features))


def check_run_config(cfg: RunConfig) -> str:
    """Check everything `train_run` checks before it creates a run folder, without reading images
    (`longtail validate`): the data source's paths and class count (data.build.stand_in_data), the
    device, and every component (method, model, loss, sampler, optimizer) built on that stand-in,
    which also loads model.weights and method.params.stage1 and checks method.params.similarity_run.
    The same one-line errors as train; returns a one-line summary."""
    cfg = absolute_paths(cfg)
    data = stand_in_data(cfg.data)
    resolve_device(cfg.train.device)
    recipe = build_run_recipe(cfg, data)
    return (f"checked: data {cfg.data.source} ({data.num_classes} classes, {data.channels} channel"
            f"{'s' * (data.channels != 1)}), method {cfg.method.name}, model {cfg.model.name}, loss {cfg.loss.name}, "
            f"sampler {cfg.sampler.name}, optimizer {cfg.optimizer.name}"
            f"{'' if recipe.method.trains else ' (post-hoc)'}")


def load_run_config(run_dir: str | Path) -> RunConfig:
    """A run folder's config.yaml (RunDir.read_config)."""
    return RunDir(run_dir).read_config()


def train_run(cfg: RunConfig | None, out: str | Path, *, resume: bool = False, evaluate: bool = True,
              arrays: dict | None = None, branch_from: str | Path | None = None,
              callbacks: list | None = None) -> dict:
    """Train (or resume) into `out`, then evaluate; returns the eval.json content.

    `branch_from` (a checkpoint file or run folder) starts a new run from another run's
    checkpoint instead of from scratch, where both train as plain CE up to it (engine/branch.py).

    `callbacks`: objects of the longtail.callbacks protocol (on_epoch_end, on_validation, ...),
    called on rank 0 after those of train.tensorboard and train.callbacks (docs/training.md).

    With `resume`, `cfg` (None: the saved config.yaml) may differ from the saved config only in
    train.epochs, which extends (or shortens, not below the epochs done) the run: written to
    config.yaml and config_history.jsonl, the schedule recomputed for the new length, a finished
    run trained on and evaluated again; and in RESUME_SESSION_KEYS (this session only).

    Under torchrun every process calls this; all check the inputs before rank 0 creates
    anything, only rank 0 writes, logs and evaluates (the others return {}). Progress lines
    go to the `logging` module (`longtail.log.setup()` shows them as the command line does).
    """
    out = Path(out)
    if branch_from is not None and resume:
        raise ConfigError("--branch-from starts a new run; a branched run continues with --resume alone")
    if branch_from is not None:
        source_checkpoint(branch_from)  # a missing source fails before any data is read
    if cfg is None and resume:
        cfg = load_run_config(out)
    if cfg is not None:  # config.yaml holds absolute paths: the run folder works from any folder
        cfg = absolute_paths(cfg)
    ctx = distributed.init(cfg.train.device if cfg is not None else "cpu")
    lock = RunLock(out, hint="wait for it to finish" + ("" if resume else " or choose another --out"))
    try:  # rank 0, the only writer, takes the lock in _train_run once the folder exists
        result = _train_run(cfg, out, resume=resume, evaluate=evaluate, arrays=arrays, ctx=ctx, lock=lock,
                            branch_from=branch_from, callbacks=callbacks)
    finally:
        lock.release()
    if ctx.enabled and torch.distributed.is_initialized():
        # Only after a success, and together (after a failure torchrun stops the others). The
        # trainer's DistributedDataParallel wrapper sits in reference cycles; left to the
        # interpreter's final clean-up, its gloo work objects were released after the process
        # group and the rank sometimes aborted ("terminate called without an active exception",
        # 2 of 20 two-process runs). Collect it first, while the group is alive.
        gc.collect()
        distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _check_new_run_dir(out: Path) -> None:
    """A new run needs `out` to be absent or empty (a lock file left by a killed process aside)."""
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_NAME for p in out.iterdir())):
        raise ConfigError(f"run folder {out} already exists and is not empty; use --resume or another --out")


def _make_run_dir(out: Path) -> bool:
    """Create `out`; True when this call created it (False when it exists already)."""
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as err:
        raise LongtailError(f"cannot create run folder {out}: {err.strerror or err}") from None
    return True


# What `--resume` may change in a run's saved config: train.epochs extends (or shortens) the run
# and is written to config.yaml and config_history.jsonl; the session keys change no number and
# hold for this session only. Any other difference is refused (resumed_config).
RESUME_EPOCHS_KEY = "train.epochs"
RESUME_SESSION_KEYS = SESSION_KEYS


def _dotted(cfg: RunConfig, key: str):
    node = cfg.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def resumed_config(cfg: RunConfig | None, saved: RunConfig, out: Path) -> tuple[RunConfig, dict]:
    """(the config a resumed run trains with, {key: (saved value, new value)}) where `cfg` (a
    CONFIG or overrides given with --resume) differs from the saved one; a one-line ConfigError
    naming any key a resumed run cannot change."""
    if cfg is None:
        return saved, {}
    cfg = distributed.pin_precision(cfg, like=saved)  # train.precision 'auto' continues in the saved precision
    keys = diff_configs(cfg, saved)
    fixed = [k for k in keys if k != RESUME_EPOCHS_KEY and k not in RESUME_SESSION_KEYS]
    if fixed:
        raise ConfigError(f"--resume cannot change {', '.join(fixed)} of {out} (it continues the run's saved "
                          f"{RunDir.CONFIG}); a resumed run may change only {RESUME_EPOCHS_KEY} (to extend it) "
                          f"and {', '.join(RESUME_SESSION_KEYS)}")
    return cfg, {k: (_dotted(saved, k), _dotted(cfg, k)) for k in keys}


def _check_new_length(out: Path, new: int) -> int:
    """The epochs `out` has trained; a ConfigError when train.epochs would end the run before them."""
    done = RunDir(out).checkpoint_epoch("last") or 0
    if new < done:
        raise ConfigError(f"cannot set {RESUME_EPOCHS_KEY}={new} on --resume of {out}: it has trained {done} "
                          f"epochs already; give {done} or more")
    return done


def _length_note(cfg: RunConfig, old: int, done: int) -> str:
    """What a new train.epochs does to the rest of the run, in words (the resume line)."""
    t, new = cfg.train, cfg.train.epochs
    def span(first: int, last: int) -> str:
        return f"epochs {first}-{last}" if last > first else (f"epoch {last}" if last == first else "no epoch")

    rest = span(done + 1, new)
    if t.lr_schedule == "cosine":
        note = (f"the cosine LR schedule is recomputed for {new} epochs: {rest} follow it ({span(1, done)} "
                f"followed its {old}-epoch form)")
    elif t.lr_schedule == "step":
        note = (f"the step LR schedule does not depend on {RESUME_EPOCHS_KEY}: {rest} follow it (warm-up "
                f"{t.warmup_epochs}, milestones {t.milestones}, x{t.lr_decay:g} at each)")
    else:
        note = f"the {t.lr_schedule} LR schedule does not depend on {RESUME_EPOCHS_KEY}: {rest} follow it"
    if cfg.sampler.name == "progressive":
        note += f"; the progressive sampler is recomputed for {new} epochs too"
    return note


def _record_resume_changes(run: RunDir, cfg: RunConfig, saved: RunConfig, changes: dict, done: int) -> None:
    """Write a new train.epochs to config.yaml and config_history.jsonl, and say what changed."""
    session = {k: v for k, v in changes.items() if k in RESUME_SESSION_KEYS}
    if session:
        log.info("resuming %s with %s for this session only (%s keeps its values)", run,
                 ", ".join(f"{k}={new} (saved: {old})" for k, (old, new) in session.items()), RunDir.CONFIG)
    if RESUME_EPOCHS_KEY not in changes:
        return
    old, new = changes[RESUME_EPOCHS_KEY]
    run.write_config(dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=new)))
    run.append_config_history({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "after_epoch": done, "changed": {RESUME_EPOCHS_KEY: [old, new]}})
    log.info("%s %s from %d to %d epochs (%d trained); %s", "extending" if new > old else "shortening", run, old,
             new, done, _length_note(cfg, old, done))


def shared_precision(run_dirs) -> str | None:
    """The one train.precision the existing run folders among `run_dirs` were run in; None when
    none exists yet or they differ. A new run of a set (a grid's cells, a study's points) whose
    config says 'auto' takes it, so a set begun in fp32 (before 'auto' became the default, or on
    a CPU without native bf16) is not finished in bf16 elsewhere: one table, one precision."""
    seen = {RunDir(d).read_config().train.precision for d in run_dirs if RunDir(d).is_run()}
    return seen.pop() if len(seen) == 1 else None


def _pin_new_run_precision(cfg: RunConfig, branch_from, *, say: bool) -> RunConfig:
    """A new run's config with train.precision 'auto' made concrete (dist.pin_precision): the
    source run's precision for a branch, else this machine's choice; with `say`, one log line."""
    if cfg.train.precision != "auto":
        return cfg
    source = source_run_config(branch_from) if branch_from is not None else None
    cfg = distributed.pin_precision(cfg, like=source)
    if source is not None and source.train.precision != "auto":
        why = "the precision of the run it branches from"
    elif resolve_device(cfg.train.device).type != "cpu":
        why = "fp32 on every GPU"
    else:
        why = f"{', '.join(distributed.cpu_bf16_features()) or 'no native bf16'} on {distributed.cpu_model()}"
    if say:
        log.info("train.precision auto: %s (%s); %s records it", cfg.train.precision, why, RunDir.CONFIG)
    return cfg


def _train_run(cfg, out: Path, *, resume: bool, evaluate: bool, arrays, ctx, lock: RunLock,
               branch_from=None, callbacks=None) -> dict:
    created, new_run, run = False, not resume, RunDir(out)
    changes, done_before, saved = {}, 0, None
    if resume:
        saved = run.read_config()
        cfg, changes = resumed_config(cfg, saved, out)
        if RESUME_EPOCHS_KEY in changes and run.is_trained():
            done_before = _check_new_length(out, changes[RESUME_EPOCHS_KEY][1])
        distributed.barrier()
        if ctx.is_main:
            lock.acquire()
            run.remove_stale_temporaries()
        if not run.is_trained():
            resume = False  # crashed before the first checkpoint: start over in place
    else:
        if cfg is None:
            raise ConfigError("a config is required to start a new run")
        _check_new_run_dir(out)
        cfg = _pin_new_run_precision(cfg, branch_from, say=ctx.is_main)
    data = build_data(cfg.data, arrays=arrays, progress=cfg.train.progress and ctx.is_main)
    recipe = build_run_recipe(cfg, data)
    resolve_device(cfg.train.device)
    if ctx.is_main:
        log.info(data.summary())
    distributed.barrier()  # every process has checked its inputs before anything is created
    if ctx.is_main:
        created = _make_run_dir(out)
        lock.acquire()  # fails (nothing removed) while another process writes into `out`
        if new_run:
            _check_new_run_dir(out)  # again, as its only writer: another run may have filled it meanwhile
    try:
        if not resume and ctx.is_main:
            run.write_config(cfg)
            run.write_data_info(data.info.to_json())
        elif changes and ctx.is_main:
            _record_resume_changes(run, cfg, saved, changes, done_before)
        distributed.barrier()
        done = run.checkpoint_epoch("last") if resume else 0
        if not recipe.method.trains:
            if branch_from is not None:
                raise ConfigError(f"method '{cfg.method.name}' is post-hoc; it takes no --branch-from")
            if not resume and ctx.is_main:
                fit_posthoc_run(cfg, data, out, recipe=recipe)
        elif done < cfg.train.epochs:
            fit(cfg, data, out, recipe=recipe, resume=resume, branch_from=branch_from, callbacks=callbacks)
    except BaseException:
        if created and not run.last.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not ctx.is_main:
        return {}
    return evaluate_run(out, cfg=cfg, data=data) if evaluate else {}


def fit_posthoc_run(cfg: RunConfig, data: LTData, out: Path, *, recipe: Recipe | None = None) -> dict:
    """Post-hoc methods (tau_norm, ncm): fit on train / validation data, save as epoch 0."""
    device = resolve_device(cfg.train.device)
    recipe = recipe or build_run_recipe(cfg, data)
    method = recipe.method
    model = recipe.model.to(device)
    info = method.fit_posthoc(model, device)
    run = RunDir(out)
    run.write_json(RunDir.POSTHOC, info)
    run.save_checkpoint({"model": model.state_dict(), "epoch": 0, "posthoc": info, "config": cfg.to_dict(),
                         "method": method.state_dict()}, keep_prev=False)
    log.info(f"{cfg.method.name}: {', '.join(f'{k} {v}' for k, v in info.items() if not isinstance(v, list))}")
    return info


def _posthoc_logit_adjustment(run: RunDir, cfg: RunConfig, tau: float) -> dict:
    from .logit_adjust import adjust_logits, check_tau

    tau = check_tau(tau)
    run.require_result(RunDir.PREDICTIONS)
    info = run.read_data_info()
    counts = np.asarray(info["class_counts"])
    pi = logits_prior(cfg, counts)  # the training prior; uniform for LADE (already post-compensated)
    uniform = np.full(len(counts), 1.0 / len(counts))
    e = cfg.eval
    kw = dict(many_threshold=e.many_threshold, few_threshold=e.few_threshold, rare_threshold=e.rare_threshold,
              ece_bins=e.ece_bins, class_names=info["class_names"])
    what = "post-hoc logit adjustment"
    preds = run.read_predictions()
    logits, labels = run.read_logits(what=what, preds=preds), preds["labels"]
    if logits.shape[1] != len(counts):  # an SSP pre-training run predicts rotations, not classes
        raise ConfigError(f"{run} predicts {logits.shape[1]} outputs for {len(counts)} classes: "
                          "post-hoc logit adjustment needs a classification run")
    result = {"run": str(run), "split": "test", "checkpoint": "last", "posthoc": "logit adjustment",
              "tau": tau, "target_prior": "uniform"}
    adjusted = adjust_logits(torch.from_numpy(logits), pi_train=pi, pi_target=uniform, tau=tau)
    result.update(compute_metrics(adjusted.numpy(), labels, counts, **kw))
    if "best_val_logits" in preds:
        adjusted = adjust_logits(torch.from_numpy(run.read_logits("best_val_logits", what=what, preds=preds)), pi_train=pi,
                                 pi_target=uniform, tau=tau)
        result["best_val"] = {"epoch": run.checkpoint_epoch("best_val"), "selected_on": "validation top1",
                              **compute_metrics(adjusted.numpy(), labels, counts, **kw)}
    result["epoch"] = run.checkpoint_epoch("last")
    run.write_eval(result, RunDir.EVAL_LOGIT_ADJUSTED)
    return result


def evaluate_test_agnostic(run_dir: str | Path, distributions=None, *, seed: int = 0, aggregate: bool = True,
                           arrays: dict | None = None) -> dict:
    """SADE's test-agnostic protocol (eval/test_agnostic.py) on a run's stored test logits
    (predictions.npz; no forward pass): for each named distribution (default SADE's eleven, forward50
    ... uniform ... backward50) the class metrics on that subset of the test set, and the same with
    the test prior known (an oracle: logits adjusted from the run's calibrated prior to the subset's
    class frequencies, `adjust_logits` with tau 1, as LADE's post-compensation). Last epoch and
    best-on-validation where stored. Written to eval_test_agnostic.json.

    A method with test-time aggregation (`Method.aggregates_at_test_time`, SADE) also adapts to each
    subset's unlabelled images (`Method.test_time_aggregation`: the run's network and test images are
    loaded), and each distribution gets an "aggregated" entry beside the plain one: the learned
    details (SADE: the expert weights) and the same metrics of the adapted logits. `aggregate=False`
    skips it (the plain table only); `arrays`: the images of an in-memory (`arrays`) run.
    """
    from .eval.test_agnostic import SADE_DISTRIBUTIONS, parse_distribution, shifted_indices, class_prior
    from .logit_adjust import adjust_logits

    names = list(SADE_DISTRIBUTIONS if distributions is None else distributions)
    if not names:
        raise ConfigError("no test distribution given")
    try:
        parsed = {name: parse_distribution(name) for name in names}
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run = RunDir(run_dir)
    cfg = run.read_config()
    with run.lock():
        run.require_result(RunDir.PREDICTIONS)
        info = run.read_data_info()
        counts = np.asarray(info["class_counts"])
        e = cfg.eval
        kw = dict(many_threshold=e.many_threshold, few_threshold=e.few_threshold, rare_threshold=e.rare_threshold,
                  ece_bins=e.ece_bins, class_names=info["class_names"])
        what = "the test-agnostic evaluation"
        preds = run.read_predictions()
        labels = preds["labels"]
        if run.read_logits(what=what, preds=preds).shape[1] != len(counts):
            raise ConfigError(f"{run} does not predict its {len(counts)} classes (a pre-training run?): "
                              "the test-agnostic evaluation needs a classification run")
        pi = logits_prior(cfg, counts)
        keys = ["logits"] + (["best_val_logits"] if "best_val_logits" in preds else [])
        try:
            subsets = {n: shifted_indices(labels, counts, r, rev, seed=seed) for n, (r, rev) in parsed.items()}
        except ValueError as err:
            raise ConfigError(f"{run}: {err}") from None
        result = {"run": str(run), "split": "test", "protocol": "test-agnostic (SADE)", "seed": seed,
                  "epoch": run.checkpoint_epoch("last")}
        adapted = None
        if aggregate and getattr(METHODS.get(cfg.method.name), "aggregates_at_test_time", False):
            adapted = _test_time_adapter(run, cfg, labels, subsets, seed, arrays)
            result["test_time_aggregation"] = {"method": cfg.method.name, "views": "train.augment",
                                               "seed": seed, "unlabelled": True}
        pick = ("top1", "many", "medium", "few", "mean_per_class")
        for key in keys:
            logits = run.read_logits(key, what=what, preds=preds)
            table = {}
            for name, idx in subsets.items():
                z, y = logits[idx], labels[idx]
                plain = compute_metrics(z, y, counts, **kw)
                known = compute_metrics(adjust_logits(torch.from_numpy(np.ascontiguousarray(z)), pi_train=pi,
                                                      pi_target=class_prior(y, len(counts))).numpy(), y, counts, **kw)
                table[name] = {"num_samples": int(len(idx)),
                               "test_counts": np.bincount(y, minlength=len(counts)).tolist(),
                               **{k: plain.get(k) for k in pick},
                               "prior_known": {k: known.get(k) for k in pick}}
            if adapted is not None:
                for name, idx in subsets.items():
                    found = adapted(key)[name]
                    z, y = found.pop("logits"), labels[idx]
                    m = compute_metrics(z, y, counts, **kw)
                    table[name]["aggregated"] = {**found, **{k: m.get(k) for k in pick}}
            if key == "logits":
                result["distributions"] = table
            else:
                result["best_val"] = {"epoch": run.checkpoint_epoch("best_val"), "selected_on": "validation top1",
                                      "distributions": table}
        run.write_json(RunDir.EVAL_TEST_AGNOSTIC, result)
    return result


def _test_time_adapter(run: RunDir, cfg: RunConfig, labels: np.ndarray, subsets: dict, seed: int, arrays=None):
    """`adapted(key) -> {name: {...}}`: the method's test-time aggregation on each subset for the
    checkpoint of the stored logits `key` ('logits': last, 'best_val_logits': best_val), computed once
    per key on the run's network and test images (the subsets index both)."""
    data = build_data(cfg.data, arrays=arrays)
    if not np.array_equal(np.asarray(data.test.labels), labels):
        raise ConfigError(f"{run}: the data source's test set no longer matches {RunDir.PREDICTIONS}; "
                          "re-run `longtail eval` first")
    device = resolve_device(cfg.train.device)
    method = build_method(cfg, data)
    done: dict[str, dict] = {}

    def adapted(key: str) -> dict:
        if key == "best_val_logits" and key not in done and "logits" in done and _same_weights(run):
            log.info("%s: the best-on-validation checkpoint has the last one's weights; its aggregation "
                     "is the last one's", run)
            done[key] = done["logits"]
        if key not in done:
            which = "last" if key == "logits" else "best_val"
            model = load_run_model(run, which=which, device=device, cfg=cfg, info=data.info,
                                   action="test-time aggregation with")[0]
            log.info("%s: test-time aggregation on %d test distribution(s), %s checkpoint", run, len(subsets), which)
            done[key] = method.test_time_aggregation(model, data.test, subsets, mean=data.mean, std=data.std,
                                                     batch_size=cfg.train.eval_batch_size, device=device,
                                                     channels_last=cfg.train.channels_last, seed=seed)
        return {name: dict(entry) for name, entry in done[key].items()}

    return adapted


def _same_weights(run: RunDir) -> bool:
    """Whether the run's best_val.pt holds exactly the weights of its last.pt (best on the last epoch)."""
    last = run.load_checkpoint("last", warn=False)[0]["model"]
    best = run.load_checkpoint("best_val", warn=False)[0]["model"]
    return last.keys() == best.keys() and all(torch.equal(last[k], best[k]) for k in last)


def evaluate_run(run_dir: str | Path, *, cfg: RunConfig | None = None, data: LTData | None = None,
                 arrays: dict | None = None, logit_adjust_tau: float | None = None) -> dict:
    """Write predictions.npz and eval.json for the last epoch (and best-on-validation).

    With `logit_adjust_tau`, the metrics are of post-hoc logit adjustment toward a uniform
    test prior (Menon et al., ICLR 2021, Eq. 5): argmax_y z_y - tau * log pi_y, pi the
    training prior; tau is given, not tuned on test. They go to eval_logit_adjusted.json and
    predictions.npz / eval.json are left as they are. A LADE run's logits are already calibrated
    to a uniform prior (`logit_adjust.source_prior`), so its adjusted metrics equal eval.json's.
    """
    run = RunDir(run_dir)
    cfg = cfg or run.read_config()
    with run.lock():  # not while a training or another evaluation writes into the run
        if logit_adjust_tau is not None:
            return _posthoc_logit_adjustment(run, cfg, logit_adjust_tau)
        return _evaluate(run, cfg, data=data, arrays=arrays)


def _evaluate(run: RunDir, cfg: RunConfig, *, data: LTData | None, arrays: dict | None) -> dict:
    run.require(trained=True)
    data = data or build_data(cfg.data, arrays=arrays)
    device = resolve_device(cfg.train.device)
    e = cfg.eval
    kw = dict(many_threshold=e.many_threshold, few_threshold=e.few_threshold, rare_threshold=e.rare_threshold,
              ece_bins=e.ece_bins, class_names=data.class_names)
    pkw = dict(mean=data.mean, std=data.std, batch_size=cfg.train.eval_batch_size, device=device,
               channels_last=cfg.train.channels_last)
    method = build_method(cfg, data)

    def score(net, split) -> tuple[dict, dict]:
        return method.evaluate(net, split, **pkw, **kw)  # a pretext pre-training run (SSP): its own task

    def load(which: str, **kw_load):
        return load_run_model(run, which=which, device=device, cfg=cfg, info=data.info, **kw_load)[:2]

    model, epoch = load("last", action="evaluating")
    test_metrics, arrays_out = score(model, data.test)
    result = {"run": str(run), "split": "test", "checkpoint": "last", "epoch": epoch, **test_metrics}
    if data.val is not None and len(data.val):
        result["val"] = {k: v for k, v in score(model, data.val)[0].items()
                         if k in ("top1", "top5", "many", "medium", "few", "mcc", "nmi", "ece", "num_samples")}
        if run.best_val.is_file():
            best, best_epoch = load("best_val")
            best_metrics, bt = score(best, data.test)
            result["best_val"] = {"epoch": best_epoch, "selected_on": "validation top1", **best_metrics}
            arrays_out["best_val_logits"] = bt["logits"]
    run.write_predictions(arrays_out, dtype=e.logits_dtype, topk=e.logits_topk)
    run.write_eval(result)
    return result
