"""The similarity simulation (Section 4.2): majority images made similar to the minority by mixup.

"Towards Understanding the Long-Tailed Problem: A Unified Perspective", Section 4.2, Eq. (2):
on long-tailed CIFAR-10 (imbalance ratio 100), a fraction rho of the majority class's
(class-1's) training images x_i is replaced by

    x~ = lam * x_i + (1 - lam) * x_j,    x_j drawn at random from the minority class (class-10),

keeping x_i's majority label. Figure 3 sweeps rho at lam = 0.2, Figure 4 sweeps lam at
rho = 0.2, plotting the majority's and the minority's test accuracy.

Readings chosen where the paper leaves it open (its details are in an appendix we do not
have):
- lam is a fixed number per point (the paper calls it "a hyper-parameter of mixup" that it
  "manually controls"), not a Beta draw per image. Under Eq. (2) a *smaller* lam puts more
  minority content into the majority-labelled image (more similar); lam = 1 changes nothing.
- Exactly round(rho * n_major) images are replaced (rounded half up), chosen without
  replacement by a seeded permutation of the majority's images; each gets its own partner
  drawn uniformly with replacement from the minority's training images. The permutation and
  the partner sequence depend only on the seed, so the replaced set at a smaller rho is a
  subset of the one at a larger rho, and the partners are the same.
- Mixing is done on the uint8 images in float and rounded back to uint8.
- Normalisation (mean/std) is that of the unmodified long-tailed set for every point, so
  the points differ only in the replaced images.
- rho = 0 and lam = 1 give the unmodified set: one shared baseline point.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..config import config_from_dict
from ..errors import ConfigError
from ._points import Budget, figure, png_bytes, run_point, write_png, write_results

log = logging.getLogger(__name__)


def replaced_count(rho: float, n_major: int) -> int:
    """round(rho * n_major), half up."""
    return int(math.floor(rho * n_major + 0.5))


def _check_unit(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return v


def mixup_replace(images: np.ndarray, labels: np.ndarray, *, major: int, minor: int, rho: float, lam: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. (2) on a training set: a copy of `images` with round(rho * n_major) majority images mixed.

    Args:
        images: (N, H, W, C) uint8 training images.
        labels: (N,) int labels (unchanged by this function; the replaced images keep theirs).
        major, minor: the majority and minority class indices.
        rho: fraction of the majority's images to replace, in [0, 1].
        lam: weight of the majority image, in [0, 1].
        seed: chooses the replaced images and their partners.

    Returns:
        (new_images (N, H, W, C) uint8, replaced rows (k,), partner rows (k,)), rows into `images`.
    """
    rho, lam = _check_unit("rho", rho), _check_unit("lam", lam)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ConfigError("mixup_replace needs uint8 images (N, H, W, C) and N labels")
    if major == minor:
        raise ConfigError(f"the majority and minority classes must differ, got {major} for both")
    major_rows, minor_rows = np.flatnonzero(labels == major), np.flatnonzero(labels == minor)
    if len(major_rows) == 0 or len(minor_rows) == 0:
        raise ConfigError(f"class {major if len(major_rows) == 0 else minor} has no training images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(major_rows))
    partner_sequence = rng.integers(0, len(minor_rows), size=len(major_rows))
    k = replaced_count(rho, len(major_rows))
    replaced, partners = major_rows[order[:k]], minor_rows[partner_sequence[:k]]
    out = images.copy()
    mixed = lam * images[replaced].astype(np.float32) + (1.0 - lam) * images[partners].astype(np.float32)
    out[replaced] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out, replaced, partners


def sweep_points(rhos, lams, *, rho_fixed: float, lam_fixed: float) -> list[dict]:
    """Unique (rho, lam) points of the two sweeps, each with the sweeps it belongs to."""
    points: dict[tuple, dict] = {}

    def add(rho, lam, sweep):
        rho, lam = _check_unit("rho", rho), _check_unit("lam", lam)
        key = (0.0, 1.0) if rho == 0.0 or lam == 1.0 else (rho, lam)
        points.setdefault(key, {"rho": key[0], "lam": key[1], "sweeps": []})["sweeps"].append(sweep)

    for rho in rhos:
        add(rho, lam_fixed, "rho")
    for lam in lams:
        add(rho_fixed, lam, "lam")
    return list(points.values())


def _point_name(rho: float, lam: float, seed: int) -> str:
    if rho == 0.0:
        return f"baseline_s{seed}"
    return f"rho{rho:.3f}_lam{lam:.3f}_s{seed}"


def base_config(budget: Budget, *, imbalance_ratio: float, max_count: int | None, seed: int) -> dict:
    data = {**budget.data_section(), "profile": "exp", "imbalance_ratio": imbalance_ratio, "seed": seed}
    if max_count is not None:
        data["max_count"] = max_count
    return {"data": data, "model": budget.model_section(), "loss": {"name": "ce"},
            "train": budget.train_section(seed)}


def run_mixup_similarity(out: str | Path, *, budget: Budget, imbalance_ratio: float, max_count: int | None,
                         rhos, lams, rho_fixed: float, lam_fixed: float, major: int = 0, minor: int = -1,
                         seeds=(0,)) -> dict:
    """Train every point (skipping finished ones); write results.json/csv and mixup_similarity.png."""
    from ..data.build import build_data

    out = Path(out)
    rho_fixed, lam_fixed = _check_unit("--rho-fixed", rho_fixed), _check_unit("--lam-fixed", lam_fixed)
    points = sweep_points(rhos, lams, rho_fixed=rho_fixed, lam_fixed=lam_fixed)
    results, rows = [], []
    settings = None
    for seed in seeds:
        base = base_config(budget, imbalance_ratio=imbalance_ratio, max_count=max_count, seed=seed)
        data = build_data(config_from_dict(base).data)
        C = data.num_classes
        maj, mnr = major % C if -C <= major < C else None, minor % C if -C <= minor < C else None
        if maj is None or mnr is None:
            raise ConfigError(f"--major / --minor must be class indices in [-{C}, {C}), got {major} and {minor}")
        train_images = data.train.batch(np.arange(len(data.train)))
        train_labels = data.train.labels.copy()
        test = {"test_images": data.test.batch(np.arange(len(data.test))), "test_labels": data.test.labels.copy(),
                "class_names": list(data.class_names)}
        n_major = int(data.class_counts[maj])
        if settings is None:
            settings = {"study": "mixup-similarity", "paper_section": "4.2", "data": budget.data,
                        "root": budget.root, "profile": "exp", "imbalance_ratio": imbalance_ratio,
                        "train_counts": [int(v) for v in data.class_counts], "major": maj, "minor": mnr,
                        "major_name": data.class_names[maj], "minor_name": data.class_names[mnr],
                        "model": f"small_cnn width {budget.width}", "epochs": budget.epochs,
                        "rhos": list(rhos), "lams": list(lams), "rho_fixed": rho_fixed, "lam_fixed": lam_fixed,
                        "seeds": list(seeds)}
        for p in points:
            images, replaced, _ = mixup_replace(train_images, train_labels, major=maj, minor=mnr, rho=p["rho"],
                                                lam=p["lam"], seed=seed)
            cfg = {**base, "data": {"source": "arrays", "profile": "none", "seed": seed,
                                    "mean": list(data.mean), "std": list(data.std)}}
            arrays = {"train_images": images, "train_labels": train_labels, **test}
            name = _point_name(p["rho"], p["lam"], seed)
            ev = run_point(cfg, out / "runs" / name, arrays=arrays)
            entry = {"rho": p["rho"], "lam": p["lam"], "sweeps": p["sweeps"], "seed": seed, "run": f"runs/{name}",
                     "replaced": int(len(replaced)), "n_major": n_major, "top1": ev["top1"],
                     "majority_acc": ev["per_class"][maj], "minority_acc": ev["per_class"][mnr],
                     "per_class": ev["per_class"]}
            results.append(entry)
            rows.append({k: entry[k] for k in ("rho", "lam", "seed", "replaced", "n_major")}
                        | {"sweeps": "+".join(p["sweeps"]), "top1": round(ev["top1"], 2),
                           "majority_acc": round(entry["majority_acc"], 2),
                           "minority_acc": round(entry["minority_acc"], 2)})
            write_results(out, {**settings, "points": results}, rows)
            log.info(f"[{len(results)}/{len(points) * len(seeds)}] seed {seed} rho {p['rho']:g} lam {p['lam']:g} "
                     f"({len(replaced)} of {n_major} replaced): majority {entry['majority_acc']:.1f}, "
                     f"minority {entry['minority_acc']:.1f}, top1 {ev['top1']:.1f}")
    write_png(out / "mixup_similarity.png", mixup_figure(results, settings))
    return {**settings, "points": results}


def _sweep_curve(results: list[dict], sweep: str) -> tuple[np.ndarray, dict]:
    """x values of one sweep ("rho" or "lam"); seed mean (and `<key>_sd`, population std over seeds)
    of majority / minority / overall accuracy."""

    def x_of(r):
        if r["rho"] == 0.0:  # the baseline: rho = 0 on the rho sweep, lam = 1 on the lam sweep
            return 0.0 if sweep == "rho" else 1.0
        return r[sweep]

    sel = [r for r in results if sweep in r["sweeps"]]
    xs = sorted({x_of(r) for r in sel})
    keys = ("majority_acc", "minority_acc", "top1")
    ys = {k: np.array([np.mean([r[k] for r in sel if x_of(r) == x]) for x in xs]) for k in keys}
    ys.update({f"{k}_sd": np.array([np.std([r[k] for r in sel if x_of(r) == x]) for x in xs]) for k in keys})
    return np.asarray(xs), ys


def mixup_figure(results: list[dict], settings: dict) -> bytes:
    """Figure 3 (accuracy vs rho at fixed lam) and Figure 4 (accuracy vs lam at fixed rho)."""
    fig = figure(11.0, 4.2)
    seeds = len(settings["seeds"])
    panels = (("rho", f"similar-sample fraction rho (lam = {settings['lam_fixed']:g})"),
              ("lam", f"mixup weight lam of the majority image (rho = {settings['rho_fixed']:g})"))
    for i, (sweep, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        xs, ys = _sweep_curve(results, sweep)
        if len(xs):
            for key, colour, label in (
                    ("majority_acc", "#1f77b4", f"majority (class {settings['major']}, {settings['major_name']})"),
                    ("minority_acc", "#d62728", f"minority (class {settings['minor']}, {settings['minor_name']})")):
                ax.errorbar(xs, ys[key], yerr=ys[f"{key}_sd"] if seeds > 1 else None, color=colour, marker="o",
                            capsize=3, label=label)
            ax.plot(xs, ys["top1"], color="black", ls="--", lw=1, label="all classes")
        if seeds > 1:
            ax.set_title(f"mean and std over {seeds} seeds", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png_bytes(fig)
