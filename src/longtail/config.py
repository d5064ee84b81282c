"""Run configuration: nested dataclasses, YAML loading, dotted overrides, strict validation.

A config is YAML with the sections below; every key is optional and falls back to the
LDAM-DRW CIFAR recipe. `load_config(path, ["train.lr=0.05"])` returns a validated
`RunConfig`; an unknown key, a wrong type or an invalid value raises `ConfigError` naming
the key. A file may start from other files with `base: FILE` (read_config_file). Component
parameters (`loss.params`, `sampler.params`, `model.params`, `method.params`) are checked by
the registry when the component is built, and `data.source` by the data sources' registry
when the data is built (data/sources.py: this ground floor cannot know the registered names).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean

PROFILES = ("exp", "step", "pareto", "counts", "none")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 on a CPU with native bf16, else fp32 (dist.resolve_precision)
CONSTRAINTS = ("none", "max_norm")  # weight constraints (optim/constraints.py, CONSTRAINT_NAMES)
# shape a of the pareto profile: the one default, used by DataConfig, data/profiles.py and
# `longtail data counts` (docs/data.md explains the value)
PARETO_DEFAULT_SHAPE = 0.337


@dataclass
class DataConfig:
    """Where the images come from and how the long tail is made."""

    source: str = "cifar10"
    root: str | None = None  # folder, archive (.tar/.tar.gz) or file, depending on source
    profile: str = "exp"  # exp | step | pareto | counts (data.counts) | none (use the source's counts as they are)
    imbalance_ratio: float = 100.0  # n_max / n_min, >= 1
    max_count: int | None = None  # n_max; None: the head class's available count
    pareto_shape: float = PARETO_DEFAULT_SHAPE  # shape a of the pareto profile (docs/data.md)
    step_fraction: float = 0.5  # fraction of classes that keep n_max in the step profile
    counts: list | None = None  # profile counts: training images per class, in class-index order
    class_order: list | None = None  # head-to-tail order (class indices or names)
    class_subset: list | None = None  # keep only these classes (indices or names), after the long tail is made
    seed: int = 0  # seed of the long-tail subsampling and the splits
    val_per_class: int = 0  # balanced validation split, k images per class (0: none)
    test_per_class: int = 50  # digits / arrays without a test split: balanced test, k per class
    image_size: int | None = None  # resize decoded images to a square of this side
    cache_dir: str | None = None  # prepared store; default $LONGTAIL_CACHE or ~/.cache/longtail
    train_list: str | None = None  # split_list: "relative/path label" per line
    val_list: str | None = None
    test_list: str | None = None
    mean: list | None = None  # normalisation; None: the source's default or the train mean
    std: list | None = None


@dataclass
class ModelConfig:
    name: str = "resnet32"
    head: str = "linear"  # linear | cosine
    params: dict = field(default_factory=dict)
    weights: str | None = None  # a state_dict file to start from (e.g. torchvision weights)


@dataclass
class ComponentConfig:
    name: str = ""
    params: dict = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """The optimizer (optim/optimizers.py): `sgd` takes train.momentum / train.nesterov, `adamw`
    its `params` (betas, eps); learning rate and weight decay are train.lr / train.weight_decay."""

    name: str = "sgd"
    params: dict = field(default_factory=dict)
    no_decay_norm_bias: bool = False  # no weight decay on normalisation layers and biases


@dataclass
class ReweightConfig:
    """Per-class loss weights switched on at `start_epoch` (0: RW, later: DRW)."""

    scheme: str = "none"  # none | effective_number | inverse_frequency
    beta: float = 0.9999
    start_epoch: int = 0


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # random crop with zero padding (0: off)
    flip: bool = True
    policy: str = "none"  # none | autoaugment (CIFAR-10 policy) | randaugment (docs/training.md, strong augmentation)
    randaugment_n: int = 2  # policy randaugment: ops per image
    randaugment_m: float = 10.0  # policy randaugment: magnitude in [0, 10]
    randaugment_mstd: float = 0.0  # policy randaugment: > 0: magnitude + N(0, mstd) per op (timm's mstd)
    cutout: int = 0  # side of one zeroed square per image (0: off; PaCo / ProCo CIFAR: 16)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    lr_schedule: str = "step"  # step | cosine | constant
    warmup_epochs: int = 5
    milestones: list = field(default_factory=lambda: [160, 180])
    lr_decay: float = 0.01  # step schedule: lr multiplied by this at each milestone
    min_lr: float = 0.0  # cosine schedule floor
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    loss_check_every: int = 1  # read the loss (non-finite stop, logged loss) every N steps: one host sync per N on a GPU
    eval_batch_size: int = 100
    test_curve_from: int = 0  # diagnostic, never selection: from this epoch on, test top-1 after every epoch (0: off)
    progress: bool = True
    deterministic: bool = True  # torch.use_deterministic_algorithms
    channels_last: bool = True  # NHWC memory format: +36 % img/s for ResNet-32 on this CPU
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on a CPU with native bf16, fp32 elsewhere): autocast of the training passes (docs/speed.md)
    compile: bool = False  # torch.compile the training forward pass (docs/speed.md)
    cuda_graph: bool = False  # CUDA: replay the network's forward/backward as CUDA graphs (docs/speed.md)
    sync_bn: bool = False  # distributed runs: SyncBatchNorm across processes
    mixup_alpha: float = 0.0  # > 0: mixup batches with lam ~ Beta(alpha, alpha) (MiSLAS stage 1: 1.0)
    cutmix_alpha: float = 0.0  # > 0: CutMix with lam ~ Beta(alpha, alpha) (official CIFAR: 1.0); not with mixup
    cutmix_prob: float = 0.5  # with cutmix_alpha > 0: share of batches mixed (official CIFAR: 0.5)
    save_epochs: list = field(default_factory=list)  # also keep checkpoints/epoch<E>.pt after these epochs (branch points)
    tensorboard: bool = False  # RUN/tensorboard/ event files (pip install -e '.[tensorboard]'; docs/training.md)
    callbacks: list = field(default_factory=list)  # "package.module:Class" training callbacks (longtail.callbacks)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


LOGITS_DTYPES = ("float32", "float16", "topk")


@dataclass
class EvalConfig:
    many_threshold: int = 100  # many: n_train > many_threshold
    few_threshold: int = 20  # few: n_train < few_threshold; medium in between
    rare_threshold: int = 10  # four-group variant: rare: n_train < rare_threshold
    ece_bins: int = 15
    logits_dtype: str = "float32"  # predictions.npz logits: float32 | float16 (half the size) | topk (k largest)
    logits_topk: int = 10  # with logits_dtype topk: how many logits per image are kept


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="ce"))
    sampler: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="instance"))
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    method: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="standard"))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # a weight constraint applied by the method's after_step / on_epoch_end (optim/constraints.py)
    constraint: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="none"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- building


def _type_ok(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "list": list, "dict": dict})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is list or origin is list:
        return isinstance(value, list)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _coerce_float(value: Any, annotation: Any) -> Any:
    """'1e-3' -> 0.001 where a float is expected: PyYAML (YAML 1.1) reads 1e-3 as a string."""
    if isinstance(value, str) and _type_ok(1.5, annotation) and not _type_ok(value, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, values: Any, prefix: str, base: Any = None) -> Any:
    """`base` (default: cls()) with the keys of `values` replaced, recursively and type-checked.

    Sections start from their defaults, so `loss: {params: {...}}` keeps the default name.
    """
    base = cls() if base is None else base
    if values is None:
        return base
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix[:-1] or 'top level'}' must be a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{name}'{did_you_mean(key, known)}")
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            kwargs[key] = _build(ann, value, f"{name}.", getattr(base, key))
            continue
        value = _coerce_float(value, ann)
        if not _type_ok(value, ann):
            raise ConfigError(
                f"config key '{name}' must be {_type_name(ann)}, got {type(value).__name__} {value!r}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and ann is float:
            value = float(value)
        kwargs[key] = value
    return dataclasses.replace(base, **kwargs)


def _valid_subset(subset) -> bool:
    """data.class_subset's shape: a list of >= 2 distinct ints >= 0 or strings (names and ranges are
    checked against the data in data/build.py)."""
    if not isinstance(subset, list) or len(subset) < 2:
        return False
    ok = all((isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v)
             for v in subset)
    return ok and len(set(subset)) == len(subset)


def _check_values(cfg: RunConfig) -> None:
    d, t, e = cfg.data, cfg.train, cfg.eval

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(d.profile in PROFILES, f"config key 'data.profile' must be one of {', '.join(PROFILES)}, got '{d.profile}'{did_you_mean(d.profile, PROFILES)}")
    need(math.isfinite(d.imbalance_ratio) and d.imbalance_ratio >= 1, f"config key 'data.imbalance_ratio' must be a number >= 1, got {d.imbalance_ratio}")
    need(d.max_count is None or d.max_count >= 1, f"config key 'data.max_count' must be >= 1, got {d.max_count}")
    need(0 < d.step_fraction < 1, f"config key 'data.step_fraction' must be in (0, 1), got {d.step_fraction}")
    need(math.isfinite(d.pareto_shape) and d.pareto_shape > 0, f"config key 'data.pareto_shape' must be > 0, got {d.pareto_shape}")
    need((d.profile == "counts") == (d.counts is not None),
         "config key 'data.counts' is required by data.profile 'counts' and used by no other profile")
    need(d.counts is None or (len(d.counts) > 0 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                       for n in d.counts)),
         f"config key 'data.counts' must be a non-empty list of integers >= 1, got {d.counts!r}")
    need(d.counts is None or d.class_order is None,
         "config key 'data.class_order' cannot be combined with data.counts (counts are in class-index order)")
    need(d.class_subset is None or _valid_subset(d.class_subset),
         "config key 'data.class_subset' must be a list of at least 2 distinct class indices (integers >= 0) "
         f"or class names, got {d.class_subset!r}")
    need(d.val_per_class >= 0, f"config key 'data.val_per_class' must be >= 0, got {d.val_per_class}")
    need(d.test_per_class >= 1, f"config key 'data.test_per_class' must be >= 1, got {d.test_per_class}")
    need(d.image_size is None or d.image_size >= 1, f"config key 'data.image_size' must be >= 1, got {d.image_size}")
    for key in ("mean", "std"):
        v = getattr(d, key)
        need(v is None or (len(v) in (1, 3) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                     and math.isfinite(x) for x in v)),
             f"config key 'data.{key}' must be a list of 1 or 3 numbers, got {v!r}")
    need(d.std is None or all(x > 0 for x in d.std), "config key 'data.std' must be positive")
    need(t.epochs >= 1, f"config key 'train.epochs' must be >= 1, got {t.epochs}")
    need(t.batch_size >= 1, f"config key 'train.batch_size' must be >= 1, got {t.batch_size}")
    need(t.eval_batch_size >= 1, f"config key 'train.eval_batch_size' must be >= 1, got {t.eval_batch_size}")
    need(math.isfinite(t.lr) and t.lr > 0, f"config key 'train.lr' must be > 0, got {t.lr}")
    need(math.isfinite(t.weight_decay) and t.weight_decay >= 0, f"config key 'train.weight_decay' must be >= 0, got {t.weight_decay}")
    need(math.isfinite(t.min_lr) and t.min_lr >= 0, f"config key 'train.min_lr' must be >= 0, got {t.min_lr}")
    need(0 <= t.momentum < 1, f"config key 'train.momentum' must be in [0, 1), got {t.momentum}")
    schedules = ("step", "cosine", "constant")
    need(t.lr_schedule in schedules, f"config key 'train.lr_schedule' must be one of {', '.join(schedules)}, got '{t.lr_schedule}'{did_you_mean(t.lr_schedule, schedules)}")
    need(t.warmup_epochs >= 0, f"config key 'train.warmup_epochs' must be >= 0, got {t.warmup_epochs}")
    need(all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in t.milestones) and t.milestones == sorted(t.milestones),
         f"config key 'train.milestones' must be increasing non-negative integers, got {t.milestones!r}")
    need(isinstance(t.save_epochs, list)
         and all(isinstance(e, int) and not isinstance(e, bool) and 1 <= e <= t.epochs for e in t.save_epochs),
         f"config key 'train.save_epochs' must be a list of epochs in [1, train.epochs = {t.epochs}], got {t.save_epochs!r}")
    need(0 < t.lr_decay <= 1, f"config key 'train.lr_decay' must be in (0, 1], got {t.lr_decay}")
    need(math.isfinite(t.mixup_alpha) and t.mixup_alpha >= 0, f"config key 'train.mixup_alpha' must be >= 0, got {t.mixup_alpha}")
    need(t.num_threads is None or t.num_threads >= 1, f"config key 'train.num_threads' must be >= 1, got {t.num_threads}")
    need(t.loss_check_every >= 1, f"config key 'train.loss_check_every' must be >= 1, got {t.loss_check_every}")
    need(t.test_curve_from >= 0, f"config key 'train.test_curve_from' must be >= 0 (0: off), got {t.test_curve_from}")
    need(t.precision in PRECISIONS, f"config key 'train.precision' must be one of {', '.join(PRECISIONS)}, got '{t.precision}'{did_you_mean(t.precision, PRECISIONS)}")
    need(t.augment.crop_padding >= 0, f"config key 'train.augment.crop_padding' must be >= 0, got {t.augment.crop_padding}")
    policies = ("none", "autoaugment", "randaugment")
    need(t.augment.policy in policies, f"config key 'train.augment.policy' must be one of {', '.join(policies)}, got '{t.augment.policy}'{did_you_mean(t.augment.policy, policies)}")
    need(t.augment.randaugment_n >= 1, f"config key 'train.augment.randaugment_n' must be >= 1, got {t.augment.randaugment_n}")
    need(0 <= t.augment.randaugment_m <= 10, f"config key 'train.augment.randaugment_m' must be in [0, 10], got {t.augment.randaugment_m}")
    need(t.augment.randaugment_mstd >= 0, f"config key 'train.augment.randaugment_mstd' must be >= 0, got {t.augment.randaugment_mstd}")
    need(t.augment.cutout >= 0, f"config key 'train.augment.cutout' must be >= 0 (0: off), got {t.augment.cutout}")
    need(math.isfinite(t.cutmix_alpha) and t.cutmix_alpha >= 0, f"config key 'train.cutmix_alpha' must be >= 0, got {t.cutmix_alpha}")
    need(0 < t.cutmix_prob <= 1, f"config key 'train.cutmix_prob' must be in (0, 1], got {t.cutmix_prob}")
    need(not (t.cutmix_alpha > 0 and t.mixup_alpha > 0), "config keys 'train.cutmix_alpha' and 'train.mixup_alpha' are mutually exclusive: set one of them to 0")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda") or t.device == "mps",
         f"config key 'train.device' must be cpu, cuda, cuda:N, mps or auto, got '{t.device}'")
    schemes = ("none", "effective_number", "inverse_frequency")
    r = cfg.reweight
    need(r.scheme in schemes, f"config key 'reweight.scheme' must be one of {', '.join(schemes)}, got '{r.scheme}'{did_you_mean(r.scheme, schemes)}")
    need(0 <= r.beta < 1, f"config key 'reweight.beta' must be in [0, 1), got {r.beta}")
    need(r.start_epoch >= 0, f"config key 'reweight.start_epoch' must be >= 0, got {r.start_epoch}")
    need(e.many_threshold >= e.few_threshold > 0 and e.few_threshold >= e.rare_threshold > 0,
         f"eval thresholds must satisfy many_threshold >= few_threshold >= rare_threshold > 0, got {e.many_threshold}/{e.few_threshold}/{e.rare_threshold}")
    need(e.ece_bins >= 1, f"config key 'eval.ece_bins' must be >= 1, got {e.ece_bins}")
    need(e.logits_dtype in LOGITS_DTYPES, f"config key 'eval.logits_dtype' must be one of "
         f"{', '.join(LOGITS_DTYPES)}, got {e.logits_dtype!r}")
    need(e.logits_topk >= 1, f"config key 'eval.logits_topk' must be >= 1, got {e.logits_topk}")
    c = cfg.constraint
    need(c.name in CONSTRAINTS, f"config key 'constraint.name' must be one of {', '.join(CONSTRAINTS)}, "
         f"got '{c.name}'{did_you_mean(c.name, CONSTRAINTS)}")


# ----------------------------------------------------------------------------- paths

# The path-valued keys. A relative path in a config file is relative to the file's folder
# (load_config); one in a dotted override, a grid's per-cell value, a run folder's
# config.yaml written before paths were stored absolute, or a dictionary given in Python is
# relative to the current folder. A validated RunConfig holds them absolute, so a run
# folder's config.yaml works from any folder (docs/training.md, "Paths in a config").
PATH_KEYS = ("data.root", "data.cache_dir", "data.train_list", "data.val_list", "data.test_list",
             "model.weights", "method.params.stage1", "method.params.similarity_run",
             "method.params.classifier", "method.params.experts", "method.params.teacher")


def _absolute(value: Any, base: str | Path) -> Any:
    """A relative path string joined to the folder `base` and normalised, '~' expanded; a list
    (LFME's method.params.experts) element by element; any other value (absolute path, empty
    string, None, a wrong type left to validation) as it is."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(os.path.realpath(base), expanded))


def resolve_paths(values: dict, base: str | Path) -> dict:
    """Make the relative PATH_KEYS values of a raw config dictionary absolute against the
    folder `base`, in place (sections that are not mappings are left to validation)."""
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node = values
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            node[name] = _absolute(node[name], base)
    return values


def absolute_paths(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """`cfg` with its relative PATH_KEYS values made absolute against `base` (default: the
    current folder); no other value changes and nothing is validated."""
    resolved = resolve_paths(cfg.to_dict(), Path.cwd() if base is None else base)
    sections: dict[str, Any] = {}
    for key in PATH_KEYS:
        section, name = key.split(".")[:2]
        current = sections.get(section, getattr(cfg, section))
        sections[section] = dataclasses.replace(current, **{name: resolved[section][name]})
    return dataclasses.replace(cfg, **sections)


# Keys that change no number a run produces (how it reports, how many threads, which loggers
# listen): a resumed run may change them for its session, and a branch may differ from its source in them.
SESSION_KEYS = ("train.progress", "train.num_threads", "train.eval_batch_size", "train.tensorboard", "train.callbacks",
                "train.loss_check_every", "train.test_curve_from")


def config_from_dict(values: dict | None) -> RunConfig:
    """Validate a plain dictionary into a RunConfig (raises ConfigError, nothing else); its
    relative paths are taken relative to the current folder and made absolute (PATH_KEYS)."""
    try:
        cfg = _build(RunConfig, values, "")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid config: {err}") from err
    for section in ("loss", "sampler", "method", "optimizer"):
        if not getattr(cfg, section).name:
            raise ConfigError(f"config key '{section}.name' must be a non-empty string")
    _check_values(cfg)
    return absolute_paths(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override '{text}': value is not valid YAML ({reason})") from err
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML) to a nested dict, in place."""
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return values


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return values


# ----------------------------------------------------------------------------- inheritance


def merge_values(base: dict, update: dict) -> dict:
    """A new dictionary: `base` with `update` merged in; mappings are merged key by key,
    anything else (scalars, lists, a mapping replacing a scalar) is replaced by `update`'s. An
    empty section (`train:` with nothing under it, None) over a mapping adds nothing."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        elif value is None and isinstance(out.get(key), dict):
            continue
        else:
            out[key] = value
    return out


def _base_paths(path: Path, bases: Any) -> list[Path]:
    """The files named by `base:` in `path`, relative to its folder; ConfigError if malformed or missing."""
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"config key 'base' in {path} must be a config file path or a list of them, got {bases!r}")
    out = []
    for name in names:
        base = Path(_absolute(name, path.parent))
        if not base.is_file():
            raise ConfigError(f"base config not found: {base} (named by 'base' in {path})")
        out.append(base)
    return out


def _read_inherited(path: Path, chain: tuple[str, ...]) -> dict:
    """`path`'s values over its bases' (each loaded the same way, merged in order); `chain`
    holds the files that led here, to refuse a cycle."""
    real = os.path.realpath(path)
    if real in chain:
        cycle = " -> ".join([*chain[chain.index(real):], real])
        raise ConfigError(f"config files name each other as base in a cycle: {cycle}")
    values = resolve_paths(read_yaml(path), path.parent)  # this file's paths: relative to its folder
    if "base" not in values:
        return values
    merged: dict = {}
    for base in _base_paths(path, values.pop("base")):
        merged = merge_values(merged, _read_inherited(base, (*chain, real)))
    return merge_values(merged, values)


def read_config_file(path: str | Path) -> dict:
    """A config file's raw values with its `base:` files merged in, relative paths made absolute.

    `base: FILE` (or a list of files, merged in order) names configs this one starts from, each
    relative to this file's folder and itself free to name bases; mappings merge key by key,
    lists and scalars are replaced, the file's own keys come last. Paths in each file are
    relative to that file's folder. The result has no `base` key. A cycle or a missing base is
    a ConfigError naming the files.
    """
    return _read_inherited(Path(path), ())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (optional, with its `base:` files: read_config_file), apply dotted overrides
    (last), validate.

    Relative paths in a file are relative to that file's folder, those in `overrides` to the
    current folder (like any command-line argument); the RunConfig holds them absolute.
    """
    values = read_config_file(path) if path is not None else {}
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def diff_configs(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(prefix[:-1])

    walk(a.to_dict(), b.to_dict(), "")
    return out
