"""`longtail predict RUN_DIR PATH... --out predictions.csv`: classify image files and folders.

Files named on the command line are always tried; folders are walked recursively
(sorted) for image file names (`data/images.is_image_name`). Images are decoded in a
thread pool, batch by batch, with the run's own preprocessing, and classified with
post-hoc logit adjustment (`longtail.logit_adjust`; prior 'auto' by default, see
`Predictor.choose_prior`). A file that cannot be read or decoded becomes a row with
status `error` and its error; the rest are still classified.

CSV columns: path, status (ok | error), error, then top1_class, top1_prob, ...,
topk_class, topk_prob (k capped at the number of classes). Written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .data.images import is_image_name
from .errors import ConfigError, DataError
from .inference import Predictor, check_k
from .logit_adjust import adjust_logits, check_tau
from .preprocess import error_text, read_image_file
from .io import atomic_write_text


def gather_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursive, sorted); in order, no repeats."""
    if not paths:
        raise ConfigError("give at least one image file or folder")
    out, seen = [], set()
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = []
            for dirpath, dirnames, files in os.walk(p):
                dirnames.sort()
                found.extend(Path(dirpath) / f for f in sorted(files) if is_image_name(f))
            if not found:
                raise DataError(f"no image files under {p}")
        elif p.exists():
            found = [p]
        else:
            raise DataError(f"no such file or folder: {p}")
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def _read(path: Path, spec) -> tuple[np.ndarray | None, str]:
    try:
        return read_image_file(path, spec), ""
    except (DataError, MemoryError) as err:
        return None, error_text(err)


def classify_files(predictor: Predictor, files: list[Path], *, k: int = 5, prior="auto", tau: float = 1.0,
                   batch_size: int = 64, workers: int = 4, progress: bool = True) -> list[dict]:
    """One row per file, in order: {'path', 'status', 'error', 'classes' (k names), 'probs' (k floats)}."""
    k = min(check_k(k), predictor.num_classes)
    tau = check_tau(tau)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    pi_train, pi_target = predictor.target_shift(prior)
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(files), desc="predict", unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                decoded = list(pool.map(lambda f: _read(f, predictor.spec), chunk))
                good = [a for a, _ in decoded if a is not None]
                probs = top_i = None
                if good:
                    logits = adjust_logits(predictor.logits(np.stack(good)), pi_train=pi_train,
                                           pi_target=pi_target, tau=tau)
                    probs, top_i = logits.softmax(dim=1).topk(k, dim=1)
                    probs, top_i = probs.tolist(), top_i.tolist()
                j = 0
                for path, (array, error) in zip(chunk, decoded, strict=True):
                    if array is None:
                        rows.append({"path": str(path), "status": "error", "error": error, "classes": [], "probs": []})
                        continue
                    rows.append({"path": str(path), "status": "ok", "error": "",
                                 "classes": [predictor.class_names[i] for i in top_i[j]], "probs": probs[j]})
                    j += 1
                bar.update(len(chunk))
    finally:
        bar.close()
    return rows


def rows_to_csv(rows: list[dict], k: int) -> str:
    """The CSV text of `classify_files` rows (header included); probabilities with 6 decimals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["path", "status", "error"]
    for i in range(1, k + 1):
        header += [f"top{i}_class", f"top{i}_prob"]
    writer.writerow(header)
    for row in rows:
        cells = [row["path"], row["status"], row["error"]]
        for i in range(k):
            if i < len(row["classes"]):
                cells += [row["classes"][i], f"{row['probs'][i]:.6f}"]
            else:
                cells += ["", ""]
        writer.writerow(cells)
    return buffer.getvalue()


def predict_paths(predictor: Predictor, paths: list[str | Path], *, out: str | Path, k: int = 5, prior="auto",
                  tau: float = 1.0, batch_size: int = 64, progress: bool = True) -> list[dict]:
    """Gather, classify and write the CSV to `out`; returns the rows."""
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as predictions.csv")
    files = gather_images(paths)
    k = min(check_k(k), predictor.num_classes)
    rows = classify_files(predictor, files, k=k, prior=prior, tau=tau, batch_size=batch_size, progress=progress)
    atomic_write_text(out, rows_to_csv(rows, k))
    return rows
