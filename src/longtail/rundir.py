"""RunDir: the one class that knows a run folder's files, reads and writes them, and validates a folder.

A run folder holds::

    config.yaml               the resolved config (written first)
    data.json                 what the run needs of its data without the images (DataInfo)
    metrics.jsonl             one line per finished epoch; "epoch" counts the epochs done (1, 2, ...),
                              as the console and eval.json do (files written before counted from 0:
                              read_metrics converts them)
    config_history.jsonl      each change of config.yaml made by `--resume` (train.epochs: extend a run)
    checkpoints/last.pt       model, optimiser, epoch, RNG, method / loss state (atomic, each epoch)
    checkpoints/prev.pt       the checkpoint before last.pt (fallback when last.pt is corrupt)
    checkpoints/best_val.pt   the best-on-validation weights (when a validation split is set)
    checkpoints/epoch<E>.pt   kept branch points (train.save_epochs)
    branch.json               where a branched run started (source checkpoint, epoch)
    posthoc.json              what a post-hoc method fitted (tau_norm's tau, ...)
    predictions.npz           test logits and labels (+ best_val_logits)
    eval.json                 test metrics of the last epoch, and of best-on-validation
    eval_logit_adjusted.json  post-hoc logit adjustment of predictions.npz
    eval_arrays.npz           eval.json's per-class arrays and confusion matrix, above INLINE_MAX_CLASSES
                              classes (eval_logit_adjusted_arrays.npz likewise); read_eval_arrays
    features/<checkpoint>.npz cached frozen features (longtail features)
    tensorboard/              TensorBoard event files (train.tensorboard; longtail.callbacks)
    .lock                     the single writer's lock (runlock.py)

Every command reaches these files through a RunDir; no other module spells their names.
All writes are atomic (io.py); checkpoint loads are integrity-checked and a corrupt last.pt
falls back to prev.pt with one logged warning.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, apply_overrides, config_from_dict, dump_config, read_yaml
from .errors import CheckpointError, ConfigError
from .io import (append_line, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text,
                 keep_previous, load_with_fallback, safe_torch_load)
from .runlock import RunLock, lock_holder

CHECKPOINT_CHOICES = ("last", "best_val")
# Above this many classes eval.json keeps its scalars only: the per-class arrays (ARRAY_KEYS) and the
# confusion matrix go to a compressed .npz beside it, the confusion as (row, col, count) triplets
# where that is smaller than the dense matrix. At or below it eval.json is as it always was.
INLINE_MAX_CLASSES = 100
ARRAY_KEYS = ("per_class", "train_counts", "groups", "class_names", "confusion")
TOPK_ROW_BLOCK = 2048  # rows per block of top_k_indices (bounds its temporaries)


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """(N, k) int64: per row the column indices of the k largest values, descending, ties to the
    lower column; equal to `np.argsort(-values, axis=1, kind="stable")[:, :k]` without the full
    sort (np.argpartition finds the k-th value, then the k chosen columns are sorted). Rows with
    a NaN take the full sort."""
    values = np.asarray(values)
    N, C = values.shape
    k = int(k)
    if not 1 <= k <= C:
        raise ValueError(f"k must be in [1, {C}], got {k}")
    out = np.empty((N, k), dtype=np.int64)
    for start in range(0, N, TOPK_ROW_BLOCK):
        block = values[start:start + TOPK_ROW_BLOCK]
        kth = -np.partition(-block, k - 1, axis=1)[:, k - 1:k]  # the k-th largest value of each row
        above = block > kth
        tied = block == kth
        keep = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
        ok = keep.sum(axis=1) == k  # False only for rows with a NaN
        chosen = np.nonzero(keep[ok])[1].reshape(-1, k)  # ascending column order per row
        rows = np.take_along_axis(block[ok], chosen, axis=1)
        picked = np.take_along_axis(chosen, np.argsort(-rows, axis=1, kind="stable"), axis=1)
        part = out[start:start + len(block)]
        part[ok] = picked
        if not ok.all():
            part[~ok] = np.argsort(-block[~ok], axis=1, kind="stable")[:, :k]
    return out


LOGITS_TOPK_ERROR = ("{path} holds only the top-{k} logits of each image (eval.logits_dtype=topk); {what} needs "
                     "full logits: set eval.logits_dtype: float32 in {run}/config.yaml and rerun `longtail eval {run}`")
DATA_KEYS = ("class_names", "class_counts", "image_shape", "channels", "mean", "std")


# Keys whose default changed after runs were saved without them: config.yaml dumps every key, so a
# missing one means the run predates the key and trained with the value given here, not today's
# default. train.precision: the default became 'auto' (bf16 on a CPU with native bf16); a run
# saved before the key existed trained in fp32 and must resume in fp32.
TRAINED_WITHOUT_KEY = {("train", "precision"): "fp32"}


class RunDir:
    """A run folder at `path` (which need not exist yet: a new run creates it)."""

    CONFIG = "config.yaml"
    DATA = "data.json"
    METRICS = "metrics.jsonl"
    CONFIG_HISTORY = "config_history.jsonl"
    SESSIONS = "sessions.jsonl"
    CHECKPOINTS = "checkpoints"
    LAST = "checkpoints/last.pt"
    PREV = "checkpoints/prev.pt"
    BEST_VAL = "checkpoints/best_val.pt"
    BRANCH = "branch.json"
    POSTHOC = "posthoc.json"
    PREDICTIONS = "predictions.npz"
    EVAL = "eval.json"
    EVAL_LOGIT_ADJUSTED = "eval_logit_adjusted.json"
    EVAL_TEST_AGNOSTIC = "eval_test_agnostic.json"
    EVAL_ARRAYS = {"eval.json": "eval_arrays.npz", "eval_logit_adjusted.json": "eval_logit_adjusted_arrays.npz"}
    FEATURES = "features"
    TENSORBOARD = "tensorboard"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # -- paths
    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether the run folder holds the file `name` (RunDir.EVAL, RunDir.PREDICTIONS, ...)."""
        return (self.path / name).is_file()

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    @property
    def prev(self) -> Path:
        return self.path / self.PREV

    @property
    def best_val(self) -> Path:
        return self.path / self.BEST_VAL

    @property
    def tensorboard(self) -> Path:
        """The folder of the run's TensorBoard event files (train.tensorboard)."""
        return self.path / self.TENSORBOARD

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.path / self.CHECKPOINTS / f"epoch{int(epoch)}.pt"

    @staticmethod
    def check_which(which: str) -> str:
        """`which` when it names a checkpoint ('last' or 'best_val'); a ConfigError naming them otherwise."""
        if which not in CHECKPOINT_CHOICES:
            raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}, got {which!r}")
        return which

    def checkpoint(self, which: str = "last") -> Path:
        """checkpoints/last.pt or checkpoints/best_val.pt."""
        return self.last if self.check_which(which) == "last" else self.best_val

    def features_cache(self, which: str = "last") -> Path:
        return self.path / self.FEATURES / f"{which}.npz"

    # -- validation
    def is_run(self) -> bool:
        return (self.path / self.CONFIG).is_file()

    def is_trained(self) -> bool:
        return self.last.is_file()

    def require(self, *, trained: bool = False) -> "RunDir":
        """This folder, or a one-line error: not a folder, not a run folder, or (trained) no checkpoint."""
        if not self.path.is_dir():
            raise CheckpointError(f"run folder not found: {self.path}")
        if not self.is_run():
            raise CheckpointError(f"not a run folder (no {self.CONFIG}): {self.path}")
        if trained and not self.is_trained():
            raise CheckpointError(f"no checkpoint in {self.path} (train it first)")
        return self

    # -- config and data
    def read_config(self, overrides: list[str] | None = None) -> RunConfig:
        """config.yaml, validated; dotted `overrides` (a.b=c, paths relative to the current folder)
        applied first, as `longtail train --resume --out RUN train.epochs=300` does."""
        if not self.is_run():
            raise CheckpointError(f"not a run folder (no {self.CONFIG}): {self.path}")
        saved = read_yaml(self.path / self.CONFIG)
        for (section, key), value in TRAINED_WITHOUT_KEY.items():
            if isinstance(saved.get(section), dict) and key not in saved[section]:
                saved[section][key] = value
        return config_from_dict(apply_overrides(saved, list(overrides or [])))

    def read_config_mapping(self) -> dict:
        """config.yaml as written (a mapping, not validated against today's RunConfig: the report and
        analysis read old runs too); an unreadable file is a CheckpointError naming the run."""
        if not self.is_run():
            raise CheckpointError(f"not a run folder (no {self.CONFIG}): {self.path}")
        try:
            return read_yaml(self.path / self.CONFIG)
        except ConfigError as err:  # reworded as a run-folder problem
            raise CheckpointError(f"{self.CONFIG} in {self.path} cannot be read: {str(err).splitlines()[0]}") from None

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.path / self.CONFIG, dump_config(cfg))

    def append_config_history(self, entry: dict) -> None:
        """One line of config_history.jsonl: a change of config.yaml (what, when, after which epoch)."""
        append_line(self.path / self.CONFIG_HISTORY, json.dumps(entry))

    def append_session(self, entry: dict) -> None:
        """One line of sessions.jsonl: a training session (new, resumed or branched) starting after
        epoch `start_epoch`, with the machine it ran on (dist.machine_record)."""
        append_line(self.path / self.SESSIONS, json.dumps(entry))

    def read_sessions(self) -> list[dict]:
        """sessions.jsonl rows, oldest first ([] for a run trained before sessions were recorded)."""
        return self._read_jsonl(self.path / self.SESSIONS)

    def keep_sessions_before(self, epoch: int, source: "RunDir") -> None:
        """sessions.jsonl := `source`'s sessions that trained any of its first `epoch` epochs (a
        branch's prefix, like keep_metrics_before)."""
        rows = [r for r in source.read_sessions() if r.get("start_epoch", math.inf) < epoch]
        atomic_write_text(self.path / self.SESSIONS, "".join(json.dumps(r) + "\n" for r in rows))

    def epoch_machines(self) -> dict[int, str]:
        """{epoch (1-based): label of the machine that trained it}, from sessions.jsonl: a session
        that starts after epoch S trains S+1 up to the next session's start ({} without sessions)."""
        sessions = self.read_sessions()
        trained = [r["epoch"] for r in self.read_metrics() if isinstance(r.get("epoch"), int)]
        epochs = {}
        for i, session in enumerate(sessions):  # a later session's epochs replace an earlier one's
            start = int(session.get("start_epoch", 0))
            end = int(sessions[i + 1].get("start_epoch", 0)) if i + 1 < len(sessions) else math.inf
            label = str((session.get("machine") or {}).get("label", "unknown"))
            epochs.update({e: label for e in trained if start < e <= end})
        return epochs

    def read_config_history(self) -> list[dict]:
        """config_history.jsonl rows, oldest first ([] when the config never changed)."""
        return self._read_jsonl(self.path / self.CONFIG_HISTORY)

    def read_data_info(self) -> dict:
        """data.json as a dict, checked for the keys a run's network needs (data.DataInfo.from_json
        makes the object)."""
        path = self.path / self.DATA
        if not path.is_file():
            raise CheckpointError(f"run folder {self.path} has no {self.DATA}")
        info = self._read_json(path)
        missing = [k for k in DATA_KEYS if not isinstance(info, dict) or k not in info]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}")
        if len(info["class_names"]) != len(info["class_counts"]):
            raise CheckpointError(f"{path}: class_names and class_counts differ in length")
        return info

    def write_data_info(self, info: dict) -> None:
        atomic_write_json(self.path / self.DATA, info)

    # -- metrics
    def read_metrics(self) -> list[dict]:
        """metrics.jsonl rows, "epoch" counting the epochs done (1-based; a torn last line from a
        crash is dropped).

        Reading rule for files written before epochs were counted from 1: a file whose first row
        has "epoch" 0 numbers its rows from 0 and every "epoch" is read + 1. A file written now
        never holds 0 (its first row is 1, or the branch point + 1), and every rewrite
        (keep_metrics_before) writes 1-based rows, so one file never mixes the two."""
        rows = self._read_jsonl(self.path / self.METRICS)
        if rows and rows[0].get("epoch") == 0:
            rows = [{**r, "epoch": r["epoch"] + 1} if isinstance(r.get("epoch"), int) else r for r in rows]
        return rows

    @staticmethod
    def _read_jsonl(path: Path) -> list[dict]:
        """The JSON rows of a .jsonl file of the run ([] when absent; a torn last line dropped)."""
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def append_metrics(self, row: dict) -> None:
        append_line(self.path / self.METRICS, json.dumps(row))

    def keep_metrics_before(self, epoch: int, source: "RunDir | None" = None) -> None:
        """metrics.jsonl := the rows of `source` (default: this run) of its first `epoch` epochs
        ("epoch" <= `epoch`; those trained before 0-idx epoch `epoch`), written 1-based."""
        rows = [r for r in (source or self).read_metrics() if r.get("epoch", math.inf) <= epoch]
        atomic_write_text(self.path / self.METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    # -- checkpoints
    def require_checkpoint(self, which: str = "last") -> Path:
        """checkpoint(which), or a one-line error: an unknown choice, no best_val.pt (no validation
        split), or no checkpoint at all (train it first)."""
        path = self.checkpoint(which)
        if which == "best_val" and not path.is_file() and self.is_run():
            raise CheckpointError(f"no best_val checkpoint in {self.path} (the run had no validation split)")
        if not path.is_file():
            raise CheckpointError(f"no checkpoint in {self.path} (train it first)")
        return path

    def load_checkpoint(self, which: str = "last", *, action: str = "loading", warn: bool = True) -> tuple[Any, Path]:
        """(state, path loaded). A last.pt that is empty, truncated or fails its CRC check falls
        back to prev.pt, with one logged warning (unless `warn` is False)."""
        path = self.require_checkpoint(which)
        return load_with_fallback(path, self.prev if which == "last" else None, action=action, warn=warn)

    def checkpoint_epoch(self, which: str = "last") -> int | None:
        """The epoch a checkpoint was saved after; None when it is absent."""
        path = self.checkpoint(which)
        if not path.is_file():
            return None
        state = self.load_checkpoint(which, warn=False)[0] if which == "last" else safe_torch_load(path)
        return int(state.get("epoch", 0))

    def save_checkpoint(self, state: dict, *, keep_prev: bool = True) -> None:
        """checkpoints/last.pt := state, atomically; the previous last.pt kept as prev.pt first."""
        self.last.parent.mkdir(parents=True, exist_ok=True)
        if keep_prev and self.last.is_file():
            keep_previous(self.last, self.prev)
        atomic_torch_save(state, self.last)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a write that a crash interrupted."""
        for stale in [*self.path.glob(".*.tmp"), *self.path.glob(f"{self.CHECKPOINTS}/.*.tmp")]:
            stale.unlink()

    # -- results
    def require_result(self, name: str | None = None) -> Path:
        """The path of an evaluation output (default eval.json; predictions.npz, ...), or a one-line
        error naming the command that writes it."""
        path = self.path / (name or self.EVAL)
        if not path.is_file():
            raise CheckpointError(f"no {path.name} in {self.path}: run `longtail eval {self.path}` first")
        return path

    def read_eval(self, name: str | None = None) -> dict:
        return self._read_json(self.require_result(name))

    def read_optional_json(self, name: str) -> dict | None:
        """A JSON object file of the run (posthoc.json, eval_logit_adjusted.json, ...); None when absent."""
        path = self.path / name
        return self._read_json(path) if path.is_file() else None

    def read_predictions(self) -> dict[str, np.ndarray]:
        """predictions.npz as arrays (logits, labels, optional best_val_logits)."""
        path = self.require_result(self.PREDICTIONS)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None

    def read_logits(self, key: str = "logits", *, what: str = "this command", preds: dict | None = None) -> np.ndarray:
        """Full (N, C) float32 logits from predictions.npz (`key`: logits or best_val_logits; `preds`: its
        arrays when already read), whatever their storage (float32, float16); a one-line
        CheckpointError when only the top-k were stored."""
        preds = self.read_predictions() if preds is None else preds
        if f"{key}_topk_indices" in preds:
            raise CheckpointError(LOGITS_TOPK_ERROR.format(path=self.path / self.PREDICTIONS, what=what, run=self.path,
                                                           k=preds[f"{key}_topk_indices"].shape[1]))
        return np.asarray(preds[key], dtype=np.float32)

    def write_predictions(self, arrays: dict[str, np.ndarray], *, dtype: str = "float32", topk: int = 10) -> None:
        """predictions.npz := arrays (labels, logits, best_val_logits, ...); the logits stored as float32,
        float16 (half the size) or `topk` (per image the k largest: <key>_topk_indices (N, k) int32 in
        descending order, ties to the lower class, and <key>_topk_values float32, plus num_classes)."""
        import io

        out = {}
        for key, value in arrays.items():
            if not key.endswith("logits") or dtype == "float32":
                out[key] = value
            elif dtype == "float16":
                out[key] = np.asarray(value, dtype=np.float16)
            else:
                value = np.asarray(value)
                k = min(int(topk), value.shape[1])
                idx = top_k_indices(value, k).astype(np.int32)
                out[f"{key}_topk_indices"] = idx
                out[f"{key}_topk_values"] = np.take_along_axis(value, idx, axis=1).astype(np.float32)
                out["num_classes"] = np.asarray(value.shape[1])
        buffer = io.BytesIO()
        np.savez(buffer, **out)
        self.write_bytes(self.PREDICTIONS, buffer.getvalue())

    # -- eval.json and its arrays
    def write_eval(self, result: dict, name: str | None = None) -> None:
        """eval.json (or eval_logit_adjusted.json) := result; above INLINE_MAX_CLASSES classes its
        ARRAY_KEYS (also best_val's) go to the compressed .npz beside it (EVAL_ARRAYS) and each section
        names that file under "arrays". The npz is written first, so a JSON that names it finds it."""
        name = name or self.EVAL
        arrays_name = self.EVAL_ARRAYS[name]
        sections = {"": result, **({"best_val": result["best_val"]} if isinstance(result.get("best_val"), dict) else {})}
        if max(len(s.get("train_counts", ())) for s in sections.values()) <= INLINE_MAX_CLASSES:
            (self.path / arrays_name).unlink(missing_ok=True)
            atomic_write_json(self.path / name, _jsonable(result))
            return
        packed, trimmed = {}, {}
        for prefix, section in sections.items():
            packed.update(_pack_arrays(section, prefix))
            trimmed[prefix] = {**{k: v for k, v in section.items() if k not in ARRAY_KEYS}, "arrays": arrays_name}
        small = {**trimmed[""], **({"best_val": trimmed["best_val"]} if "best_val" in trimmed else {})}
        import io

        buffer = io.BytesIO()
        np.savez_compressed(buffer, **packed)
        self.write_bytes(arrays_name, buffer.getvalue())
        atomic_write_json(self.path / name, _jsonable(small))

    def read_eval_arrays(self, name: str | None = None, *, section: str | None = None) -> dict:
        """The per-class arrays of eval.json (or eval_logit_adjusted.json; `section` 'best_val' for its
        best-on-validation part), whatever their storage (inline in old or small runs, or the .npz):
        per_class (list, None where undefined), train_counts (list), groups (dict of lists),
        class_names (list or None), confusion (scipy.sparse.csr_matrix, int64, C x C)."""
        ev = self.read_eval(name)
        if section:
            if not isinstance(ev.get(section), dict):
                raise CheckpointError(f"{name or self.EVAL} in {self.path} has no {section!r} section")
            ev = ev[section]
        return self._arrays_of(ev, name or self.EVAL, section or "")

    def read_eval_full(self, name: str | None = None) -> dict:
        """eval.json with its arrays in place (read_eval_arrays; the confusion as a csr_matrix), for
        the top level and best_val."""
        name = name or self.EVAL
        ev = self.read_eval(name)
        full = {**ev, **self._arrays_of(ev, name, "")}
        if isinstance(ev.get("best_val"), dict):
            full["best_val"] = {**ev["best_val"], **self._arrays_of(ev["best_val"], name, "best_val")}
        return full

    def _arrays_of(self, ev: dict, name: str, prefix: str) -> dict:
        from scipy import sparse

        if "arrays" not in ev:  # inline: small or old runs
            missing = [k for k in ARRAY_KEYS if k not in ev and k != "class_names"]
            if missing:
                raise CheckpointError(f"{name} in {self.path} lacks {', '.join(map(repr, missing))}: "
                                      f"rerun `longtail eval {self.path}`")
            cm = np.asarray(ev["confusion"], dtype=np.int64).reshape(len(ev["confusion"]), -1)
            return {"per_class": list(ev["per_class"]), "train_counts": [int(v) for v in ev["train_counts"]],
                    "groups": dict(ev["groups"]), "class_names": ev.get("class_names"),
                    "confusion": sparse.csr_matrix(cm)}
        path = self.path / self.EVAL_ARRAYS[name]
        if not path.is_file():
            raise CheckpointError(f"{name} in {self.path} names {path.name}, which is missing: "
                                  f"rerun `longtail eval {self.path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                return _unpack_arrays({k: z[k] for k in z.files}, prefix)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.path / name, data)

    @staticmethod
    def _read_json(path: Path) -> dict:
        """A JSON object file of a run folder; a one-line CheckpointError naming it otherwise."""
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path.name} in {path.parent} is not valid JSON ({err.msg}, line {err.lineno})"
                                  ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path.name} in {path.parent} must hold a JSON object")
        return value

    # -- the single writer
    def lock(self, hint: str = "wait for it to finish") -> RunLock:
        return RunLock(self.path, hint=hint)

    def lock_holder(self) -> str | None:
        """Who holds the run's lock now ('this process', 'pid N', ...), None when nobody does;
        asks without taking it (runlock.lock_holder)."""
        return lock_holder(self.path)


def _jsonable(obj: Any) -> Any:
    """obj with any sparse matrix made a nested list (a confusion of INLINE_MAX_CLASSES classes or fewer)."""
    if hasattr(obj, "toarray"):
        return obj.toarray().tolist()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def _pack_arrays(section: dict, prefix: str) -> dict[str, np.ndarray]:
    """One eval section's ARRAY_KEYS as npz arrays named '<prefix>/<key>'; the confusion as
    (row, col, count) triplets where 3 x nonzeros < C^2, dense otherwise."""
    from scipy import sparse

    p = f"{prefix}/" if prefix else ""
    out = {}
    if "per_class" in section:
        out[p + "per_class"] = np.array([np.nan if v is None else v for v in section["per_class"]], dtype=np.float64)
    if "train_counts" in section:
        out[p + "train_counts"] = np.asarray(section["train_counts"], dtype=np.int64)
    for g, idx in (section.get("groups") or {}).items():
        out[f"{p}groups/{g}"] = np.asarray(idx, dtype=np.int64)
    if section.get("class_names") is not None:
        out[p + "class_names"] = np.asarray([str(n) for n in section["class_names"]])
    if "confusion" in section:
        cm = sparse.coo_matrix(section["confusion"]) if not sparse.issparse(section["confusion"]) \
            else section["confusion"].tocoo()
        cm.sum_duplicates()
        if 3 * cm.nnz < cm.shape[0] * cm.shape[1]:
            out.update({p + "confusion/rows": cm.row.astype(np.int32), p + "confusion/cols": cm.col.astype(np.int32),
                        p + "confusion/counts": cm.data.astype(np.int64),
                        p + "confusion/shape": np.asarray(cm.shape, dtype=np.int64)})
        else:
            out[p + "confusion/dense"] = cm.toarray().astype(np.int64)
    return out


def _unpack_arrays(z: dict, prefix: str) -> dict:
    """The inverse of _pack_arrays for one section (KeyError when an array is missing)."""
    from scipy import sparse

    p = f"{prefix}/" if prefix else ""
    if p + "confusion/dense" in z:
        cm = sparse.csr_matrix(z[p + "confusion/dense"].astype(np.int64))
    else:
        cm = sparse.csr_matrix((z[p + "confusion/counts"].astype(np.int64),
                                (z[p + "confusion/rows"], z[p + "confusion/cols"])),
                               shape=tuple(int(v) for v in z[p + "confusion/shape"]))
    per_class = z[p + "per_class"]
    groups = {k[len(p + "groups/"):]: z[k].tolist() for k in z if k.startswith(p + "groups/")}
    return {"per_class": [None if np.isnan(v) else float(v) for v in per_class],
            "train_counts": z[p + "train_counts"].tolist(), "groups": groups,
            "class_names": z[p + "class_names"].tolist() if p + "class_names" in z else None, "confusion": cm}
