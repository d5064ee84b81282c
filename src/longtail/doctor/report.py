"""`longtail doctor DATA-SPEC`: look at a dataset before training on it.

Writes OUT/doctor.json and OUT/class_counts.png and returns the report:
classes and training counts, imbalance ratio, effective numbers, many / medium / few
group sizes (`stats`), the count histogram (`plot`), image sizes, duplicate and
unreadable files (`scan`), and with a trained run as feature extractor the confusable
head-tail pairs (`confusable`). `format_report` is the readable summary the CLI prints.

Counts: for an image folder, the image files of each training class folder; for a
config, `build_data`'s training counts (after the long-tail profile and the validation
split). A config whose image files include unreadable ones cannot be built (`build_data`
stops at the first), so its counts are then the files' counts before the profile, and
a note says so.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..config import load_config
from ..data.build import LTData, build_data
from ..errors import ConfigError, DataError
from ..io import atomic_write_json
from ..log import bar_enabled
from ..rundir import RunDir
from ..similarity.projection import class_prototypes
from .confusable import confusable_pairs, describe_pairs, sample_per_class
from .inventory import ImageFile, config_files, folder_inventory, train_counts
from .plot import plot_class_counts
from .scan import scan_arrays, scan_files
from .stats import class_statistics, group_of

FIGURE = "class_counts.png"
REPORT = "doctor.json"


def _file_batches(predictor, files: list[ImageFile], batch_size: int, progress: bool):
    from tqdm import tqdm

    from ..preprocess import read_image_file

    def read(f):
        try:
            return read_image_file(f.path, predictor.spec)
        except DataError:
            return None

    bar = tqdm(total=len(files), desc="features", unit="img", leave=False, disable=not progress)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            arrays = list(pool.map(read, chunk))
            good = [(a, f.label) for a, f in zip(arrays, chunk, strict=True) if a is not None]
            bar.update(len(chunk))
            if good:
                yield predictor.features(np.stack([a for a, _ in good])).numpy(), np.array([lab for _, lab in good])
    bar.close()


def _split_batches(predictor, data: LTData, positions: np.ndarray, batch_size: int, progress: bool):
    from tqdm import tqdm

    for start in tqdm(range(0, len(positions), batch_size), desc="features", unit="batch", leave=False,
                      disable=not progress):
        pos = positions[start:start + batch_size]
        yield predictor.features(data.train.batch(pos)).numpy(), data.train.labels[pos]


def confusable_report(predictor, *, counts, class_names, groups, files=None, data=None, min_ratio=2.0,
                      top=10, max_per_class=100, batch_size=128, progress=False) -> dict:
    """Prototypes of the training images under `predictor`, ranked head-tail pairs (`confusable`)."""
    C = len(class_names)
    if data is not None:
        positions = sample_per_class(data.train.labels, C, max_per_class)
        batches = _split_batches(predictor, data, positions, batch_size, progress)
    else:
        train = [f for f in files if f.split == "train"]
        keep = sample_per_class(np.array([f.label for f in train]), C, max_per_class)
        batches = _file_batches(predictor, [train[i] for i in keep], batch_size, progress)
    prototypes, used = class_prototypes(batches, C)
    ranked = confusable_pairs(prototypes, counts, min_ratio=min_ratio, top=top)
    return {"run": str(predictor.run_dir), "checkpoint": str(predictor.checkpoint), "min_ratio": min_ratio,
            "images_used": used.tolist(), "num_pairs": int(ranked["num_pairs"]),
            "pairs": describe_pairs(*ranked["top"], counts, class_names, groups),
            "at_risk": describe_pairs(*ranked["first"], counts, class_names, groups)}


def _file_labels(files: list[ImageFile], split: str) -> np.ndarray:
    return np.asarray([f.label for f in files if f.split == split], dtype=np.int64)


def classes_without_test_images(class_names: list[str], counts, test_labels: np.ndarray) -> list[str]:
    """Classes with training images but no test image; [] when there is no test split at all
    (training then holds a balanced test split out of the training images)."""
    if len(test_labels) == 0:
        return []
    support = np.bincount(test_labels, minlength=len(class_names))
    return [name for name, n, k in zip(class_names, counts, support, strict=False) if n > 0 and k == 0]


def _inspect(spec: Path, overrides, progress: bool) -> dict:
    """Classes, counts, files / data and scan results of a DATA-SPEC (module docstring)."""
    if spec.is_dir():
        if overrides:
            raise ConfigError("overrides (section.key=value) apply to a config file, not to an image folder")
        inv = folder_inventory(spec)
        return {"description": f"image folder {inv.root} ({inv.layout} layout)", "class_names": inv.class_names,
                "counts": inv.train_counts(), "counts_from": "image files of the training classes",
                "files": inv.files, "data": None, "notes": list(inv.notes), "eval": None,
                "test_labels": _file_labels(inv.files, "test"),
                "scan": scan_files(inv.files, inv.class_names, progress=progress)}
    cfg = load_config(spec, list(overrides or []))
    names, files = config_files(cfg)
    scan = scan_files(files, names, progress=progress) if files else None
    out = {"files": files, "notes": [], "eval": cfg.eval, "scan": scan, "data": None}
    if scan and scan["unreadable"]:
        out.update(description=f"config {spec} (data.source {cfg.data.source}, not built)", class_names=names,
                   counts=train_counts(files, len(names)), counts_from="image files (before the long-tail profile)",
                   test_labels=_file_labels(files, "test"))
        out["notes"].append(f"{len(scan['unreadable'])} unreadable file(s): build_data would stop at the first one, "
                            "so the counts are the files' counts before the profile; remove or fix them")
        return out
    data = build_data(cfg.data, progress=progress)
    out.update(description=f"config {spec}: {data.description}", class_names=data.class_names,
               counts=data.class_counts, counts_from="build_data (after the long-tail profile and splits)", data=data,
               test_labels=data.test.labels)
    if scan is None:
        out["scan"] = scan_arrays({"train": data.train, "val": data.val, "test": data.test}, data.class_names)
    return out


def run_doctor(spec: str | Path, *, out: str | Path, overrides: list[str] | None = None,
               features: str | Path | None = None,
               checkpoint: str = "last", many_threshold: int | None = None, few_threshold: int | None = None,
               min_ratio: float = 2.0, top: int = 10, max_per_class: int = 100, device: str = "auto",
               progress: bool = False) -> dict:
    """Inspect DATA-SPEC (an image folder or a YAML config), write OUT/doctor.json and OUT/class_counts.png.

    With `features` (a trained run folder), add the confusable head-tail pairs.
    """
    for name, v in (("top", top), ("max_per_class", max_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 1 <= min_ratio < float("inf"):
        raise ConfigError(f"min_ratio must be >= 1, got {min_ratio!r}")
    spec = Path(spec).expanduser()
    if not spec.exists():
        raise DataError(f"data spec not found: {spec} (give an image folder or a YAML config)")
    if spec.is_file() and spec.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        raise DataError(f"{spec} is an archive: give a YAML config with data.source imagefolder and data.root {spec}")
    progress = bar_enabled(progress)  # bars on a terminal only (longtail.log)
    predictor = None
    if features is not None:
        from ..inference import load

        predictor = load(features, checkpoint=checkpoint, device=device)  # fail early, before the long scan
    found = _inspect(spec, overrides, progress)
    ev = found["eval"]
    many = many_threshold if many_threshold is not None else (ev.many_threshold if ev else 100)
    few = few_threshold if few_threshold is not None else (ev.few_threshold if ev else 20)
    names, counts, scan = found["class_names"], np.asarray(found["counts"]), found["scan"]
    stats = class_statistics(counts, names, many_threshold=many, few_threshold=few)
    out = Path(out)
    plot_class_counts(stats, names, out / FIGURE)
    report = {"spec": str(spec), "description": found["description"], "counts_from": found["counts_from"],
              "class_names": names, **stats, "image_sizes": scan["sizes"], "duplicates": scan["duplicates"],
              "unreadable": scan["unreadable"], "notes": found["notes"], "figure": str(out / FIGURE)}
    if len(scan["sizes"]) > 1:
        report["notes"].append(f"{len(scan['sizes'])} different image sizes: set data.image_size to train on them")
    report["no_test_images"] = classes_without_test_images(names, counts, found["test_labels"])
    report["notes"] += [f"class '{name}' has training images but no test images: its test accuracy will be "
                        f"undefined (null in {RunDir.EVAL}) and left out of the mean and shot-group accuracies"
                        for name in report["no_test_images"]]
    if predictor is not None:
        report["features"] = confusable_report(predictor, counts=counts, class_names=names, groups=group_of(stats),
                                               files=found["files"], data=found["data"], min_ratio=min_ratio, top=top,
                                               max_per_class=max_per_class, progress=progress)
    atomic_write_json(out / REPORT, report)
    report["report"] = str(out / REPORT)
    return report


def _rows(items: list, limit: int) -> tuple[list, str]:
    return items[:limit], (f"    ... {len(items) - limit} more in doctor.json" if len(items) > limit else "")


def format_report(r: dict, *, limit: int = 10) -> str:
    """The readable summary of a `run_doctor` report."""
    g, t = r["group_sizes"], r["thresholds"]
    lines = [f"doctor: {r['description']}",
             f"  classes {r['num_classes']}, training images {r['num_images']} ({r['counts_from']})",
             f"  imbalance ratio {r['imbalance_ratio']:.1f} "
             f"(largest '{r['largest']['class']}' {r['largest']['count']}, "
             f"smallest '{r['smallest']['class']}' {r['smallest']['count']}); effective-number ratio "
             + ", ".join(f"{v:.1f} (beta {b})" for b, v in r["effective_imbalance_ratio"].items()),
             f"  many / medium / few (n > {t['many']} / {t['few']}..{t['many']} / n < {t['few']}): "
             f"{g['many']} / {g['medium']} / {g['few']}"]
    if r["empty_classes"]:
        lines.append(f"  empty classes: {', '.join(r['empty_classes'])}")
    group = group_of(r)
    betas = list(r["effective_number"])
    width = max([len(n) for n in r["class_names"]] + [5])
    header = "  ".join(f"{'E_n(' + b + ')':>13}" for b in betas)
    lines.append(f"  {'class':<{width}}  {'count':>7}  {'group':<6}  {header}")
    order = list(range(r["num_classes"]))
    shown = order if len(order) <= 2 * limit else order[:limit] + [None] + order[-limit:]
    for i in shown:
        if i is None:
            lines.append(f"  ... {len(order) - 2 * limit} classes, all in doctor.json")
            continue
        name = r["class_names"][i]
        effs = "  ".join(f"{r['effective_number'][b][i]:>13.1f}" for b in betas)
        lines.append(f"  {name:<{width}}  {r['counts'][i]:>7}  {group[name]:<6}  {effs}")
    lines.append("  image sizes: " + ", ".join(f"{k} ({v})" for k, v in list(r["image_sizes"].items())[:5]))
    dups = r["duplicates"]
    redundant = sum(len(d["items"]) - 1 for d in dups)
    lines.append(f"  duplicates: {len(dups)} group(s), {redundant} redundant image(s), "
                 f"{sum(d['cross_class'] for d in dups)} across classes, "
                 f"{sum(d['cross_split'] for d in dups)} across splits")
    shown_dups, more = _rows(dups, limit)
    for d in shown_dups:
        flags = ", ".join(f for f, on in (("different classes", d["cross_class"]),
                                          ("across splits", d["cross_split"])) if on)
        lines.append("    " + " = ".join(f"{i['path']} ({i['class']})" for i in d["items"][:4])
                     + (f" ... {len(d['items'])} copies" if len(d["items"]) > 4 else "")
                     + (f"  [{flags}]" if flags else ""))
    if more:
        lines.append(more)
    lines.append(f"  unreadable: {len(r['unreadable'])} file(s)")
    shown_bad, more = _rows(r["unreadable"], limit)
    lines += [f"    {u['path']}: {u['error']}" for u in shown_bad] + ([more] if more else [])
    for note in r["notes"]:
        lines.append(f"  note: {note}")
    if "features" in r:
        f = r["features"]
        lines.append(f"  confusable head-tail pairs (prototype cosine similarity under {f['run']}, "
                     f"n_head >= {f['min_ratio']:g} x n_tail; {f['num_pairs']} pairs):")
        if f["pairs"]:
            hw = max(len(p["head"]) for p in f["pairs"] + [{"head": "head"}])
            tw = max(len(p["tail"]) for p in f["pairs"] + [{"tail": "tail"}])
            lines.append(f"    {'head':<{hw}}  {'n':>6}  {'tail':<{tw}}  {'n':>6}  {'ratio':>6}  similarity")
            for p in f["pairs"]:
                lines.append(f"    {p['head']:<{hw}}  {p['head_count']:>6}  {p['tail']:<{tw}}  {p['tail_count']:>6}  "
                             f"{p['ratio']:>6.1f}  {p['similarity']:.3f}")
        else:
            lines.append("    none (no two classes differ that much in count)")
    lines.append(f"wrote {r['report']} and {r['figure']}")
    return "\n".join(lines)
