"""Post-hoc logit adjustment toward a stated deployment label distribution.

Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021), post-hoc form,
generalised from a uniform target to any target distribution pi_target:

    adjusted_c = logit_c - tau * log(pi_train_c) + tau * log(pi_target_c)

pi_train_c = n_c / sum(n) from the run's training counts. With tau = 1 this is Bayes'
rule under label shift: softmax(adjusted) = p_train(c | x) * pi_target_c / pi_train_c,
renormalised. pi_target uniform removes the training prior (the paper's balanced-error
setting); pi_target = pi_train changes nothing. A target weight of 0 gives the class a
logit of -inf (never predicted). tau = 0 changes nothing.

A prior is given as ``"uniform"``, ``"train"``, a sequence of C non-negative weights in
class order, or a file (`read_prior_file`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError, did_you_mean

NAMED_PRIORS = ("uniform", "train")


def train_prior(class_counts) -> np.ndarray:
    """pi_train (C,) float64 = n_c / sum(n)."""
    n = np.asarray(class_counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n <= 0).any():
        raise ConfigError("training counts must be positive for every class")
    return n / n.sum()


def normalise_weights(weights, num_classes: int, where: str) -> np.ndarray:
    """C non-negative finite weights (not all zero) -> a distribution (C,) float64."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != num_classes:
        raise ConfigError(f"{where} has {w.size} weights, the run has {num_classes} classes")
    if not np.isfinite(w).all() or (w < 0).any():
        bad = next(v for v in w if not math.isfinite(v) or v < 0)
        raise ConfigError(f"{where}: weights must be finite and >= 0, got {bad}")
    if w.sum() <= 0:
        raise ConfigError(f"{where}: all weights are zero")
    return w / w.sum()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _by_name(pairs: list[tuple[str, float, str]], class_names: list[str], path: Path) -> list[float]:
    index = {n: i for i, n in enumerate(class_names)}
    weights: list[float | None] = [None] * len(class_names)
    for name, value, where in pairs:
        if name not in index:
            raise ConfigError(f"{where}: unknown class '{name}'{did_you_mean(name, class_names)}")
        if weights[index[name]] is not None:
            raise ConfigError(f"{where}: class '{name}' is given twice")
        weights[index[name]] = value
    missing = [class_names[i] for i, v in enumerate(weights) if v is None]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConfigError(f"prior file {path} has no weight for class(es) {', '.join(missing[:5])}{more}")
    return weights


def _split_line(line: str) -> list[str]:
    for sep in (",", "\t"):
        if sep in line:
            return [part.strip() for part in line.rsplit(sep, 1)]
    return line.rsplit(None, 1)


def read_prior_file(path: str | Path, class_names: list[str]) -> np.ndarray:
    """Read a target prior file -> distribution (C,) float64 in the run's class order.

    Formats: JSON, a list of C weights (class order) or an object {class name: weight};
    text / CSV, one class per line, either `weight` (class order) or `name,weight`
    (also tab- or space-separated; the name is everything before the last separator).
    Blank lines and lines starting with # are skipped; a first line whose weight is not
    a number (`class,weight`) is a header. Weights are non-negative and normalised.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read prior file {path}: {getattr(err, 'strerror', None) or err}") from None
    C = len(class_names)
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"prior file {path} is not valid JSON: {err.msg} (line {err.lineno})") from None
        if isinstance(obj, dict):
            pairs = [(str(k), v, f"prior file {path}") for k, v in obj.items()]
            for name, v, where in pairs:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{where}: weight of class '{name}' must be a number, got {v!r}")
            return normalise_weights(_by_name(pairs, class_names, path), C, f"prior file {path}")
        if isinstance(obj, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            return normalise_weights(obj, C, f"prior file {path}")
        raise ConfigError(f"prior file {path} must hold a list of numbers or an object {{class: weight}}")
    rows = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append((no, _split_line(line)))
    if rows and len(rows[0][1]) == 2 and _number(rows[0][1][1]) is None:
        rows = rows[1:]  # header
    if not rows:
        raise ConfigError(f"prior file {path} has no weights")
    widths = {len(parts) for _, parts in rows}
    if len(widths) > 1:
        raise ConfigError(f"prior file {path} mixes 'weight' and 'name,weight' lines")
    parsed = []
    for no, parts in rows:
        value = _number(parts[-1])
        if value is None:
            raise ConfigError(f"{path}:{no}: weight {parts[-1]!r} is not a number")
        parsed.append((parts[0], value, f"{path}:{no}"))
    if widths == {1}:
        return normalise_weights([v for _, v, _ in parsed], C, f"prior file {path}")
    return normalise_weights(_by_name(parsed, class_names, path), C, f"prior file {path}")


def resolve_prior(prior, *, class_names: list[str], class_counts) -> np.ndarray:
    """'uniform' | 'train' | a file path | C weights -> target distribution (C,) float64."""
    C = len(class_names)
    if isinstance(prior, str) and prior == "uniform":
        return np.full(C, 1.0 / C)
    if isinstance(prior, str) and prior == "train":
        return train_prior(class_counts)
    if isinstance(prior, (str, Path)):
        if not Path(prior).is_file():
            raise DataError(f"prior must be uniform, train or a file; no such file: {prior}")
        return read_prior_file(prior, class_names)
    return normalise_weights(prior, C, "prior")


def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ConfigError(f"tau must be a finite number >= 0, got {tau!r}")
    return float(tau)


def adjust_logits(logits: torch.Tensor, *, pi_train: np.ndarray, pi_target: np.ndarray,
                  tau: float = 1.0) -> torch.Tensor:
    """(B, C) logits -> (B, C) logits + tau * (log pi_target - log pi_train) (module docstring)."""
    tau = check_tau(tau)
    if tau == 0:
        return logits
    with np.errstate(divide="ignore"):
        shift = tau * (np.log(np.asarray(pi_target, dtype=np.float64)) - np.log(np.asarray(pi_train, dtype=np.float64)))
    return logits + torch.as_tensor(shift, dtype=logits.dtype, device=logits.device)


LOGIT_PRIORS = ("train", "uniform")


def logit_prior_name(cfg) -> str:
    """The label distribution a run's raw logits are calibrated to: its loss's `logit_prior` class
    attribute ('train' by default and for a run with no config or an unregistered loss; 'uniform'
    for LADE, whose logits are post-compensated by training)."""
    if cfg is None:
        return "train"
    from . import losses  # noqa: F401  (registration; losses stand below this floor)
    from .registry import LOSSES

    name = cfg.loss.name
    value = getattr(LOSSES.get(name), "logit_prior", "train") if name in LOSSES else "train"
    if value not in LOGIT_PRIORS:
        raise ConfigError(f"loss '{name}' states logit_prior {value!r}; allowed: {', '.join(LOGIT_PRIORS)}")
    return value


def source_prior(cfg, class_counts) -> np.ndarray:
    """pi_source (C,) float64 that post-hoc adjustment of a run's logits starts from
    (`adjust_logits(pi_train=...)`): what the run's loss calibrates its logits to
    (`Loss.calibrated_prior`): the training prior; uniform for balanced softmax and LADE (LADE:
    adjusted = logits + tau * (log pi_target - log(1/C)), the official logits + log p_t up to a
    constant); pi^(1 - tau) for the logit-adjusted loss."""
    pi = train_prior(class_counts)
    if cfg is None:
        return pi
    logit_prior_name(cfg)  # a loss stating an unknown logit_prior is refused
    from .registry import LOSSES

    if cfg.loss.name not in LOSSES:
        return pi
    return LOSSES.get(cfg.loss.name).calibrated_prior(class_counts, dict(cfg.loss.params or {}))
