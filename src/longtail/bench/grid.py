"""Grid files for `longtail bench`: methods x imbalance ratios x seeds, validated up front.

A grid file (YAML)::

    name: CIFAR-10-LT, CPU benchmark budget      # optional title of the tables
    base: configs/cifar10_lt/ce.yaml               # config of methods that name none
    out: runs/grids/cifar10_lt_cpu                 # cell folders OUT/<method>/ratio<R>/seed<S>/
    imbalance_ratios: [100]                        # sets data.imbalance_ratio per cell
    seeds: [0, 1, 2]                               # sets every key of seed_keys per cell
    seed_keys: [train.seed]                        # optional; default [train.seed]
    overrides: {train.epochs: 30}                  # optional, every cell ({key: value} or ["k=v"])
    baseline: ce                                   # optional: the method the gain table subtracts
    groups: three                                  # optional: table columns many / medium / few
                                                   #   (three, default) or many / medium / few / rare
                                                   #   (four: eval.json four_group, docs/evaluation.md)
    methods:
      - name: ce
        config: configs/cifar10_lt/ce.yaml         # optional; default: base
        logit_adjust_tau: 1.0                      # optional: also eval_logit_adjusted.json
      - name: ce_lr005
        overrides: {train.lr: 0.05}                # optional, on top of the grid's overrides
      - name: crt
        config: configs/cifar10_lt/crt.yaml
        stage1: ce                                 # stage-2 methods: the grid method they start from
      - name: swrm
        config: configs/cifar10_lt/swrm.yaml
        branch_from: ce                            # optional: start from ce's checkpoint after
        branch_epoch: 24                           #   epoch 24 (shared plain-CE prefix)
        imbalance_ratios: [100]                    # optional: a subset of the grid's ratios
      - name: ssp_drw
        config: configs/cifar10_lt/ssp_drw.yaml
        weights_from: ssp                          # optional: model.weights = ssp's cell's last.pt
        published: {100: 72.1}                     # optional: the paper's top-1 per ratio, and
        published_source: "Paper et al., Table 2"  #   where it is printed (a table column)
        published_baseline: {100: 70.4}            # optional: the same table's number of the
                                                   #   grid's `baseline` (the paper's own gain)

Paths of the grid file (`base`, `config`, `out`) are relative to the folder `longtail bench`
runs in, like command-line arguments and overrides; paths inside a method's config (`data.root`)
are relative to that config's folder, as with `longtail train`. A stage-2 method's `method.params.stage1` is
set to its stage-1 cell's `checkpoints/last.pt` of the same ratio and seed, so every
stage-2 method of a ratio and seed shares one stage-1 run. Unknown keys, missing
configs, invalid cell configs, unknown stage-1 references, stage-1 references of
methods that take none (or none where the method needs one) and cycles are refused
with a one-line ConfigError before anything runs.

A method with `branch_from: NAME` and `branch_epoch: E` starts each of its cells from the
same ratio and seed's NAME cell at epoch E (`longtail train --branch-from`,
docs/training.md): the NAME cells get `train.save_epochs` with E so they keep
`checkpoints/epoch<E>.pt`, and whether the two configs really share that plain-CE prefix
is checked when the cell starts.

With `baseline: NAME`, the tables add each method's gain over the NAME cell of the same ratio
and seed; a method's `published_baseline` is the paper's number of that baseline in the table
its `published` comes from, so the paper's own gain (published - published_baseline) stands
beside the measured one (bench/table.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, apply_overrides, config_from_dict, read_config_file, read_yaml
from ..errors import ConfigError, did_you_mean
from ..rundir import RunDir

GRID_KEYS = ("name", "base", "out", "imbalance_ratios", "seeds", "seed_keys", "overrides", "baseline", "groups",
             "methods")
GROUPS = ("three", "four")
METHOD_KEYS = ("name", "config", "overrides", "stage1", "logit_adjust_tau", "branch_from", "branch_epoch",
               "imbalance_ratios", "published", "published_source", "published_baseline", "weights_from")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
GRID_SET_KEYS = ("data.imbalance_ratio", "method.params.stage1", "train.save_epochs")  # set per cell by the grid


@dataclass
class MethodSpec:
    """One method (row) of the grid."""

    name: str
    config: str  # the YAML config the method's cells start from
    overrides: list[str] = field(default_factory=list)
    stage1: str | None = None  # name of the grid method whose cells are this method's stage 1
    logit_adjust_tau: float | None = None
    branch_from: str | None = None  # name of the grid method whose checkpoint at branch_epoch this one starts from
    branch_epoch: int | None = None
    ratios: list[float] | None = None  # the ratios this method runs at (None: all of the grid's)
    published: dict[float, float] = field(default_factory=dict)  # ratio -> the paper's top-1
    published_source: str | None = None
    published_baseline: dict[float, float] = field(default_factory=dict)  # ratio -> that table's baseline top-1
    weights_from: str | None = None  # name of the grid method whose last.pt initialises this one's model

    @property
    def needs(self) -> str | None:
        """The grid method whose cells must finish before this method's cells start."""
        return self.stage1 or self.branch_from or self.weights_from


BENCH_RECORD = "bench.json"  # a cell's wall time, written by the runner beside the run's own files


@dataclass
class Cell:
    """One run of the grid: a method at one imbalance ratio and one seed."""

    method: str
    ratio: float
    seed: int
    dir: Path
    cfg: RunConfig
    stage1: "Cell | None" = None
    logit_adjust_tau: float | None = None
    branch_source: "Cell | None" = None
    branch_epoch: int | None = None
    weights_source: "Cell | None" = None  # the cell whose last.pt is this cell's model.weights

    @property
    def needs(self) -> "Cell | None":
        return self.stage1 or self.branch_source or self.weights_source

    @property
    def need_kind(self) -> str:
        """What the cell it needs is to it: 'stage 1', 'branch source' or 'pre-training'."""
        return "stage 1" if self.stage1 else "branch source" if self.branch_source else "pre-training"

    @property
    def run(self) -> RunDir:
        return RunDir(self.dir)

    @property
    def branch_checkpoint(self) -> Path | None:
        if self.branch_source is None:
            return None
        return self.branch_source.run.epoch_checkpoint(self.branch_epoch)

    @property
    def key(self) -> str:
        return f"{self.method}/{ratio_name(self.ratio)}/seed{self.seed}"


@dataclass
class Grid:
    """A validated grid: methods in dependency order and every cell with its config."""

    path: Path
    name: str
    base: str | None
    out: Path
    ratios: list[float]
    seeds: list[int]
    seed_keys: list[str]
    methods: list[MethodSpec]  # the file's order (the tables' rows)
    cells: list[Cell]  # by seed, then ratio, then method with each stage 1 before its stage 2
    groups: str = "three"  # shot groups of the tables: "three" (many/medium/few) or "four" (+ rare)
    baseline: str | None = None  # the method whose cells the gain table subtracts (grid key `baseline`)

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.methods if m.name == name)

    def cells_of(self, method: str) -> list[Cell]:
        return [c for c in self.cells if c.method == method]


def ratio_name(ratio: float) -> str:
    """Folder name of an imbalance ratio: ratio100, ratio50, ratio12.5."""
    return f"ratio{ratio:g}"


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _overrides(value, where: str) -> list[str]:
    """`{a.b: v}` or `["a.b=v"]` -> ["a.b=v"] (values re-serialised as YAML flow)."""
    import yaml

    if value is None:
        return []
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            _need(isinstance(k, str) and k, f"{where}: override keys must be dotted config keys, got {k!r}")
            out.append(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
        return out
    _need(isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value),
          f"{where} must be a mapping {{key: value}} or a list of 'key=value' strings")
    return list(value)


def _takes_stage1(method_name: str) -> bool:
    """Whether a registered method continues a stage-1 run (its class declares `stage = 2`)."""
    from .. import methods  # noqa: F401  (registration)
    from ..registry import METHODS

    return METHODS.get(method_name).stage == 2


def is_posthoc(method_name: str) -> bool:
    """True for methods that train no epochs (their class sets `trains = False`)."""
    from .. import methods  # noqa: F401  (registration)
    from ..registry import METHODS

    return getattr(METHODS.get(method_name), "trains", True) is False


def _order(methods: list[MethodSpec]) -> list[MethodSpec]:
    """Stage 1 before stage 2 (stable otherwise); a cycle is a ConfigError naming it."""
    by_name = {m.name: m for m in methods}
    done: list[MethodSpec] = []
    state: dict[str, str] = {}

    def visit(m: MethodSpec, path: list[str]) -> None:
        if state.get(m.name) == "done":
            return
        if state.get(m.name) == "active":
            cycle = path[path.index(m.name):] + [m.name]
            raise ConfigError(f"stage-1 / branch references form a cycle: {' -> '.join(cycle)}")
        state[m.name] = "active"
        if m.needs is not None:
            visit(by_name[m.needs], path + [m.name])
        state[m.name] = "done"
        done.append(m)

    for m in methods:
        visit(m, [])
    return done


def _method_spec(entry, index: int, base: str | None) -> MethodSpec:
    where = f"grid methods[{index}]"
    _need(isinstance(entry, dict), f"{where} must be a mapping with a name")
    for key in entry:
        _need(key in METHOD_KEYS, f"unknown key '{key}' in {where}{did_you_mean(key, METHOD_KEYS)}; "
                                  f"known: {', '.join(METHOD_KEYS)}")
    name = entry.get("name")
    _need(isinstance(name, str) and bool(NAME_PATTERN.match(name or "")),
          f"{where}: name must be letters, digits, '_', '.', '+' or '-' (a folder name), got {name!r}")
    where = f"grid method '{name}'"
    config = entry.get("config", base)
    _need(config is not None, f"{where} has no config and the grid has no base config")
    _need(isinstance(config, str), f"{where}: config must be a path, got {config!r}")
    stage1 = entry.get("stage1")
    _need(stage1 is None or isinstance(stage1, str), f"{where}: stage1 must be a method name, got {stage1!r}")
    tau = entry.get("logit_adjust_tau")
    _need(tau is None or (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau >= 0),
          f"{where}: logit_adjust_tau must be a number >= 0, got {tau!r}")
    branch_from, branch_epoch = entry.get("branch_from"), entry.get("branch_epoch")
    _need((branch_from is None) == (branch_epoch is None), f"{where}: branch_from and branch_epoch go together")
    _need(branch_from is None or isinstance(branch_from, str),
          f"{where}: branch_from must be a method name, got {branch_from!r}")
    _need(branch_epoch is None or (isinstance(branch_epoch, int) and not isinstance(branch_epoch, bool)
                                   and branch_epoch >= 1),
          f"{where}: branch_epoch must be an integer >= 1, got {branch_epoch!r}")
    _need(branch_from is None or stage1 is None, f"{where}: a stage-2 method cannot also branch (stage1 and branch_from)")
    weights_from = entry.get("weights_from")
    _need(weights_from is None or isinstance(weights_from, str),
          f"{where}: weights_from must be a method name, got {weights_from!r}")
    _need(weights_from is None or (stage1 is None and branch_from is None),
          f"{where}: weights_from cannot go with stage1 or branch_from (a cell starts from one other cell)")
    ratios = entry.get("imbalance_ratios")
    _need(ratios is None or _ratio_list(ratios), f"{where}: imbalance_ratios must be a non-empty list of numbers "
                                                 f">= 1, got {ratios!r}")
    published = _percentages(entry, "published", where)
    baseline = _percentages(entry, "published_baseline", where)
    for r in baseline:
        _need(r in published, f"{where}: published_baseline at ratio {r:g} needs the method's own published number "
                              "there (both from one table)")
    source = entry.get("published_source")
    _need(source is None or (isinstance(source, str) and source.strip()),
          f"{where}: published_source must be a text naming the paper and table, got {source!r}")
    _need(not published or source is not None, f"{where}: published numbers need published_source (paper, table)")
    return MethodSpec(name=name, config=config, overrides=_overrides(entry.get("overrides"), f"{where} overrides"),
                      stage1=stage1, logit_adjust_tau=None if tau is None else float(tau), branch_from=branch_from,
                      branch_epoch=branch_epoch, ratios=None if ratios is None else [float(r) for r in ratios],
                      published=published, published_source=source, published_baseline=baseline,
                      weights_from=weights_from)


def _percentages(entry: dict, key: str, where: str) -> dict[float, float]:
    """A method's `published` / `published_baseline`: {ratio: top-1 %}, validated."""
    value = entry.get(key) or {}
    _need(isinstance(value, dict) and all(_ratio_list([r]) and isinstance(v, (int, float))
                                          and not isinstance(v, bool) and 0 <= v <= 100 for r, v in value.items()),
          f"{where}: {key} must map imbalance ratios to top-1 percentages, e.g. {{100: 70.4}}, got {value!r}")
    return {float(r): float(v) for r, v in value.items()}


def _ratio_list(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 1 for r in value))


def _set(values: dict, dotted: str, value) -> None:
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _read_config(spec: MethodSpec) -> dict:
    """The method's config file as a dictionary, its `base:` files merged in, each file's relative
    paths made relative to its folder."""
    try:
        return read_config_file(spec.config)
    except ConfigError as err:
        raise ConfigError(f"grid method '{spec.name}': {err}") from None


def _cell_config(spec: MethodSpec, grid_overrides: list[str], *, ratio: float, seed: int, seed_keys: list[str],
                 stage1_path: str | None, extra: list[str], save_epochs: list[int] | None = None,
                 weights_path: str | None = None) -> RunConfig:
    """The method's config, then the grid's overrides, the method's, the command line's; then
    the grid's per-cell values (ratio, seeds, stage-1 checkpoint, branch points to keep)."""
    try:
        values = apply_overrides(_read_config(spec), [*grid_overrides, *spec.overrides, *extra])
        _set(values, "data.imbalance_ratio", float(ratio))
        for key in seed_keys:
            _set(values, key, seed)
        if stage1_path is not None:
            _set(values, "method.params.stage1", stage1_path)
        if weights_path is not None:
            _set(values, "model.weights", weights_path)
        if save_epochs:
            _set(values, "train.save_epochs", sorted(set(save_epochs)))
        return config_from_dict(values)
    except ConfigError as err:
        msg = str(err)
        if not msg.startswith("grid method"):
            msg = f"grid method '{spec.name}' ({spec.config}): {msg}"
        raise ConfigError(msg) from None


def load_grid(path: str | Path, *, out: str | Path | None = None, overrides: list[str] | None = None) -> Grid:
    """Read and validate a grid file; `out` replaces the grid's output folder, `overrides`
    (["a.b=c"]) apply to every cell after the grid's own overrides."""
    path = Path(path)
    raw = read_yaml(path)
    for key in raw:
        _need(key in GRID_KEYS, f"unknown key '{key}' in grid {path}{did_you_mean(key, GRID_KEYS)}; "
                                f"known: {', '.join(GRID_KEYS)}")
    for key in ("methods", "imbalance_ratios", "seeds"):
        _need(key in raw, f"grid {path} needs '{key}'")
    base = raw.get("base")
    _need(base is None or isinstance(base, str), f"grid key 'base' must be a config path, got {base!r}")
    out = out if out is not None else raw.get("out")
    _need(isinstance(out, (str, Path)) and str(out) != "", f"grid {path} needs 'out' (or give --out)")
    ratios = raw["imbalance_ratios"]
    _need(_ratio_list(ratios), f"grid key 'imbalance_ratios' must be a non-empty list of numbers >= 1, got {ratios!r}")
    _need(len({float(r) for r in ratios}) == len(ratios), f"grid key 'imbalance_ratios' repeats a value: {ratios!r}")
    seeds = raw["seeds"]
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                    for s in seeds),
          f"grid key 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    _need(len(set(seeds)) == len(seeds), f"grid key 'seeds' repeats a value: {seeds!r}")
    seed_keys = raw.get("seed_keys", ["train.seed"])
    _need(isinstance(seed_keys, list) and seed_keys and all(isinstance(k, str) and k.endswith("seed")
                                                            for k in seed_keys),
          f"grid key 'seed_keys' must be a list of dotted seed keys such as train.seed, got {seed_keys!r}")
    groups = raw.get("groups", "three")
    _need(groups in GROUPS, f"grid key 'groups' must be one of {', '.join(GROUPS)}, got {groups!r}")
    grid_overrides = _overrides(raw.get("overrides"), "grid key 'overrides'")
    entries = raw["methods"]
    _need(isinstance(entries, list) and entries, "grid key 'methods' must be a non-empty list")
    specs = [_method_spec(e, i, base) for i, e in enumerate(entries)]
    names = [s.name for s in specs]
    for s in specs:
        _need(names.count(s.name) == 1, f"grid method '{s.name}' is listed twice")
    for s in specs:
        for text in s.overrides + grid_overrides + list(overrides or []):
            key = text.split("=", 1)[0]
            _need(key not in GRID_SET_KEYS and key not in seed_keys,
                  f"override '{text}': the grid sets {key} per cell")
        for key, ref in (("stage1", s.stage1), ("branch_from", s.branch_from), ("weights_from", s.weights_from)):
            if ref is not None:
                _need(ref in names, f"grid method '{s.name}': {key} '{ref}' is not a method of the grid"
                                    f"{did_you_mean(ref, names)}")
                _need(ref != s.name, f"grid method '{s.name}' names itself as its {key}")
        grid_ratios = {float(r) for r in ratios}
        for r in [*(s.ratios or []), *s.published]:
            _need(r in grid_ratios, f"grid method '{s.name}': ratio {r:g} is not one of the grid's imbalance_ratios "
                                    f"{ratios!r}")
    baseline = raw.get("baseline")
    if baseline is not None:
        _need(isinstance(baseline, str) and baseline in names,
              f"grid key 'baseline': {baseline!r} is not a method of the grid{did_you_mean(str(baseline), names)}")
    for s in specs:
        _need(not s.published_baseline or baseline is not None,
              f"grid method '{s.name}': published_baseline needs the grid key 'baseline' (the method it is the "
              "paper's number of)")
    by_name = {s.name: s for s in specs}
    for s in specs:
        if s.needs is not None:
            mine, theirs = _ratios_of(s, ratios), _ratios_of(by_name[s.needs], ratios)
            missing = [r for r in mine if r not in theirs]
            if missing:
                kind = "stage 1" if s.stage1 else "branch source" if s.branch_from else "pre-training"
                raise ConfigError(f"grid method '{s.name}' runs at ratio {missing[0]:g}, where '{s.needs}' (its "
                                  f"{kind}) does not run")

    ordered = _order(specs)
    extra = list(overrides or [])
    save_epochs: dict[str, list[int]] = {}
    for s in specs:
        if s.branch_from is not None:
            source = next(m for m in specs if m.name == s.branch_from)
            _need(source.needs is None, f"grid method '{s.name}': branch_from '{s.branch_from}' must be a one-stage "
                                        "method that branches from nothing itself")
            last = _cell_config(source, grid_overrides, ratio=float(ratios[0]), seed=seeds[0], seed_keys=seed_keys,
                                stage1_path=None, extra=extra).train.epochs
            _need(s.branch_epoch <= last, f"grid method '{s.name}': branch_epoch {s.branch_epoch} is after the last "
                                          f"epoch of '{s.branch_from}' ({last})")
            save_epochs.setdefault(s.branch_from, []).append(s.branch_epoch)
    for s in ordered:
        # the method name may come from an override: resolve it as the cells will
        method_name = _cell_config(s, grid_overrides, ratio=float(ratios[0]), seed=seeds[0], seed_keys=seed_keys,
                                   stage1_path="stage1.pt" if s.stage1 else None, extra=extra).method.name
        try:
            stage2 = _takes_stage1(method_name)
        except ConfigError as err:
            raise ConfigError(f"grid method '{s.name}' ({s.config}): {err}") from None
        if stage2:
            _need(s.stage1 is not None, f"grid method '{s.name}' ({method_name}) is a stage-2 method: name its "
                                        "stage-1 method of the grid with 'stage1: NAME'")
        else:
            _need(s.stage1 is None, f"grid method '{s.name}' ({method_name}) takes no stage 1, but names "
                                    f"stage1 '{s.stage1}'")
    out = Path(out)
    cells: list[Cell] = []
    index: dict[tuple, Cell] = {}
    for seed in seeds:
        for ratio in ratios:
            for s in ordered:
                if float(ratio) not in _ratios_of(s, ratios):
                    continue
                cell_dir = out / s.name / ratio_name(ratio) / f"seed{seed}"
                first = index.get((s.stage1, ratio, seed)) if s.stage1 else None
                stage1_path = str(first.run.last) if first else None
                pretrained = index.get((s.weights_from, ratio, seed)) if s.weights_from else None
                cfg = _cell_config(s, grid_overrides, ratio=ratio, seed=seed, seed_keys=seed_keys,
                                   stage1_path=stage1_path, extra=extra, save_epochs=save_epochs.get(s.name),
                                   weights_path=str(pretrained.run.last) if pretrained else None)
                source = index.get((s.branch_from, ratio, seed)) if s.branch_from else None
                cell = Cell(method=s.name, ratio=float(ratio), seed=seed, dir=cell_dir, cfg=cfg, stage1=first,
                            logit_adjust_tau=s.logit_adjust_tau, branch_source=source, branch_epoch=s.branch_epoch,
                            weights_source=pretrained)
                index[(s.name, ratio, seed)] = cell
                cells.append(cell)
    name = raw.get("name") or path.stem
    _need(isinstance(name, str), f"grid key 'name' must be a string, got {name!r}")
    return Grid(path=path, name=name, base=base, out=out, ratios=[float(r) for r in ratios], seeds=list(seeds),
                seed_keys=list(seed_keys), methods=specs, cells=cells, groups=groups, baseline=baseline)


def _ratios_of(spec: MethodSpec, grid_ratios) -> list[float]:
    """The imbalance ratios a method's cells run at: its own list, or all of the grid's."""
    return list(spec.ratios) if spec.ratios is not None else [float(r) for r in grid_ratios]
