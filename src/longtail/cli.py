"""The `longtail` command line. Thin: parse, call one function per subcommand, print.

Errors caused by the user (LongtailError) print one line `longtail: error: ...` and exit
with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback

from .errors import ConfigError, LongtailError
from .log import setup as setup_logging


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


def _cmd_counts(args) -> int:
    import numpy as np

    from .data.profiles import PARETO_DEFAULT_SHAPE, class_counts

    presets = {"cifar10": (10, 5000), "cifar100": (100, 500), "imagenet_lt": (1000, 1280)}
    num_classes, max_count = presets.get(args.dataset, (None, None))
    num_classes = args.num_classes or num_classes
    max_count = args.max_count or max_count
    if num_classes is None or max_count is None:
        raise LongtailError("give --dataset (cifar10, cifar100, imagenet_lt) or both --num-classes and --max-count")
    shape = PARETO_DEFAULT_SHAPE if args.pareto_shape is None else args.pareto_shape  # as data.pareto_shape
    counts = class_counts(args.profile, num_classes, max_count, args.imbalance_ratio, pareto_shape=shape)
    width = len(str(num_classes - 1))
    for i, n in enumerate(counts):
        print(f"class {i:>{width}}  {n}")
    many, few = int((counts > 100).sum()), int((counts < 20).sum())
    print(f"total {int(np.sum(counts))}  (classes {num_classes}, max {counts.max()}, min {counts.min()}, "
          f"many/medium/few {many}/{num_classes - many - few}/{few})")
    return 0


def _cmd_train(args) -> int:
    from .config import load_config
    from .rundir import RunDir
    from .runs import train_run

    if args.config is None and not args.resume:
        raise LongtailError("give a CONFIG file (or --resume with an existing --out)")
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides or args.no_progress:  # --resume: the saved config, changed (runs.resumed_config)
        cfg = RunDir(args.out).read_config(args.overrides)
    else:
        cfg = None
    if cfg is not None and args.no_progress:
        cfg.train.progress = False
    result = train_run(cfg, args.out, resume=args.resume, branch_from=args.branch_from)
    _print_eval(result)
    return 0


def _print_eval(result: dict) -> None:
    from .eval.metrics import format_summary
    from .rundir import RunDir

    def epoch(m: dict) -> str:  # None: its checkpoint file is gone
        return "?" if m.get("epoch") is None else str(m["epoch"])

    if not result:
        return
    print(format_summary(f"last (epoch {epoch(result)})", result))
    if "best_val" in result:
        print(format_summary(f"best-val (epoch {epoch(result['best_val'])})", result["best_val"]))
    name = RunDir.EVAL_LOGIT_ADJUSTED if "posthoc" in result else RunDir.EVAL
    print(f"wrote {result['run']}/{name}")


def _cmd_eval(args) -> int:
    from .rundir import RunDir
    from .runs import evaluate_run

    if args.test_agnostic is not None:
        return _test_agnostic(args)
    if args.no_aggregation:
        raise ConfigError("--no-aggregation goes with --test-agnostic")
    result = evaluate_run(args.run_dir, logit_adjust_tau=args.logit_adjust_tau)
    _print_eval(result)
    if args.logit_adjust_tau is not None:
        print(f"(post-hoc logit adjustment, tau {args.logit_adjust_tau:g}: {RunDir.EVAL_LOGIT_ADJUSTED})")
    return 0


def _test_agnostic(args) -> int:
    from .rundir import RunDir
    from .runs import evaluate_test_agnostic

    names = None if args.test_agnostic == "sade" else [n.strip() for n in args.test_agnostic.split(",") if n.strip()]
    result = evaluate_test_agnostic(args.run_dir, names, aggregate=not args.no_aggregation)

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for title, section in [(f"last (epoch {result['epoch']})", result["distributions"]),
                           *([(f"best-val (epoch {result['best_val']['epoch']})", result["best_val"]["distributions"])]
                             if "best_val" in result else [])]:
        print(f"{title}: top-1 on each test distribution (many / medium / few); prior known: adjusted to its prior")
        agg = any("aggregated" in m for m in section.values())
        print(f"  {'distribution':<12} {'images':>6} {'top1':>6} {'many':>6} {'medium':>6} {'few':>6} {'prior known':>11}"
              + (f" {'aggregated':>10}  weights" if agg else ""))
        for name, m in section.items():
            extra = ""
            if "aggregated" in m:
                a = m["aggregated"]
                extra = f" {f(a['top1']):>10}  " + " / ".join(f"{w:.2f}" for w in a["weights"])
            print(f"  {name:<12} {m['num_samples']:>6} {f(m['top1']):>6} {f(m['many']):>6} {f(m['medium']):>6} "
                  f"{f(m['few']):>6} {f(m['prior_known']['top1']):>11}" + extra)
    print(f"wrote {result['run']}/{RunDir.EVAL_TEST_AGNOSTIC}")
    return 0


def _cmd_validate(args) -> int:
    from .config import dump_config, load_config
    from .data.sources import source_loader
    from .runs import check_run_config

    cfg = load_config(args.config, args.overrides)  # base: files merged, overrides last
    source_loader(cfg.data.source)  # a registered source (config.py cannot know the names)
    summary = check_run_config(cfg)  # paths, class count, every component: what train checks first
    print(dump_config(cfg), end="")
    print(f"# {summary}")
    return 0


def _cmd_methods(args) -> int:
    from . import losses, methods, models  # noqa: F401  (registration)
    from .data import samplers, sources  # noqa: F401
    from .optim import OPTIMIZERS
    from .registry import HEADS, LOSSES, METHODS, MODELS, SAMPLERS, SOURCES

    for reg in (METHODS, LOSSES, SAMPLERS, MODELS, HEADS, OPTIMIZERS, SOURCES):
        print(f"{reg.kind}{'es' if reg.kind.endswith('s') else 's'}:")
        for name in reg.names():
            print(f"  {name:<16} {reg.summary(name)}")
    return 0


def _cmd_predict(args) -> int:
    from .inference import load, rebalanced_training
    from .logit_adjust import logit_prior_name
    from .predict_files import predict_paths

    predictor = load(args.run_dir, checkpoint=args.checkpoint, device=args.device)
    prior, why_auto = predictor.choose_prior(args.prior)  # 'auto': uniform, or train for a re-balanced run
    rows = predict_paths(predictor, args.paths, out=args.out, k=args.k, prior=prior, tau=args.tau,
                         batch_size=args.batch_size, progress=not args.no_progress)
    if why_auto is not None:
        print(f"prior {prior} (auto): {why_auto}")
    why = rebalanced_training(predictor.config)
    if args.prior == "uniform" and args.tau > 0 and why and logit_prior_name(predictor.config) != "uniform":
        print(f"longtail: note: the run was trained with re-balancing ({why}); --prior uniform adjusts it "
              "again, --prior train leaves its logits as they are", file=sys.stderr)
    shown = rows[:max(args.show, 0)]
    width = max([len(r["path"]) for r in shown] + [4])
    for r in shown:
        if r["status"] == "ok":
            top = "  ".join(f"{c} {p:.3f}" for c, p in zip(r["classes"][:3], r["probs"][:3], strict=True))
            print(f"{r['path']:<{width}}  {top}")
        else:
            print(f"{r['path']:<{width}}  error: {r['error']}")
    errors = sum(r["status"] == "error" for r in rows)
    more = f" ({len(rows) - len(shown)} more rows in the file)" if len(rows) > len(shown) else ""
    print(f"wrote {args.out}: {len(rows) - errors} classified, {errors} unreadable{more}; prior {prior}, "
          f"tau {args.tau:g}")
    if errors:
        print(f"longtail: warning: {errors} file(s) could not be read; see the error column of {args.out}",
              file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    meta = export_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(f"wrote {args.out}: torch.export program, input {meta['input']}, output {meta['output']}, "
          f"{len(meta['class_names'])} classes (metadata in the extra file longtail.json)")
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import format_report, run_doctor

    report = run_doctor(args.spec, out=args.out, overrides=args.overrides, features=args.features,
                        checkpoint=args.checkpoint, many_threshold=args.many_threshold,
                        few_threshold=args.few_threshold, min_ratio=args.min_ratio, top=args.top,
                        max_per_class=args.max_per_class, device=args.device, progress=not args.no_progress)
    print(format_report(report, limit=args.top))
    return 0


def _cmd_report(args) -> int:
    from .report import build_report

    info = build_report(args.run_dirs, args.out, title=args.title)
    print(f"wrote {info['out']}: {info['runs']} run(s), {info['figures']} figures embedded, "
          f"{info['bytes'] / 1e6:.1f} MB")
    return 0


def _cmd_bench(args) -> int:
    from .bench import load_grid, plan, run_grid, write_tables
    from .outputs import check_output

    grid = load_grid(args.grid, out=args.out, overrides=args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    cells = [k.strip() for given in args.cell for k in given.split(",") if k.strip()] if args.cell else None
    if methods and cells:
        raise ConfigError("give --methods or --cell, not both")
    if args.list:
        from .runs_list import progress_text

        for cell, state in plan(grid, methods=methods, cells=cells):
            stage = f"  ({cell.need_kind}: {cell.needs.key})" if cell.needs is not None else ""
            if cell.branch_source is not None:
                stage = f"  (from {cell.branch_source.key} at epoch {cell.branch_epoch})"
            progress = f"  [{progress_text(cell.run)}]" if state == "resume" else ""
            print(f"{state:<7} {cell.key}{stage}{progress}")
        return 0
    check_output(grid.out, folder=True, name="--out" if args.out is not None else f"the out of grid {args.grid}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if cells and args.jobs == 1 and not args.table_only:  # these cells, in this process (what --jobs starts for each cell): no tables
        run_grid(grid, cells=cells, progress=False if args.no_progress else None)
        return 0
    summary = None
    if args.table_only:
        pass
    elif args.jobs > 1:
        from .bench.parallel import run_parallel

        summary = run_parallel(grid, jobs=args.jobs, grid_arg=args.grid, overrides=args.overrides, methods=methods,
                               cells=cells)
    else:
        run_grid(grid, methods=methods, progress=False if args.no_progress else None)
    tables = write_tables(grid)
    print(tables["text"], end="")
    print(f"wrote {tables['markdown']} and {tables['csv']}")
    if summary is not None:
        from .bench.parallel import check_failures

        check_failures(summary, grid)
    return 0


# Commands that live beside their feature: each module defines register(subparsers), which adds
# its parser and sets func; heavy imports stay inside the command function.
_COMMAND_MODULES: tuple[str, ...] = (
    "longtail.features",
    "longtail.analysis.command",
    "longtail.dlsa.command",
    "longtail.similarity.command",
    "longtail.studies.command",
    "longtail.runs_list",
)


def build_parser() -> argparse.ArgumentParser:
    from .config import PARETO_DEFAULT_SHAPE
    from .rundir import CHECKPOINT_CHOICES, RunDir

    p = argparse.ArgumentParser(prog="longtail", description="Long-tailed image recognition toolkit.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="long-tailed digits: CE vs a re-balancing loss, in under 2 minutes")
    d.add_argument("--out", default="longtail-demo", help="folder for the two run folders")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("counts", help="per-class counts of a long-tail profile")
    c.add_argument("--dataset", choices=["cifar10", "cifar100", "imagenet_lt"])
    c.add_argument("--imbalance-ratio", type=float, required=True)
    c.add_argument("--profile", choices=["exp", "step", "pareto"], default="exp")
    c.add_argument("--num-classes", type=int)
    c.add_argument("--max-count", type=int)
    c.add_argument("--pareto-shape", type=float,
                   help=f"shape a of the pareto profile (default {PARETO_DEFAULT_SHAPE:g}, as data.pareto_shape)")
    c.set_defaults(func=_cmd_counts)

    t = sub.add_parser("train", help="train a run: longtail train CONFIG [a.b=c ...] --out RUN_DIR")
    t.add_argument("config", nargs="?", help="YAML config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.05 (anywhere on the line)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out; with train.epochs=N, extend it to N epochs")
    t.add_argument("--branch-from", metavar="CHECKPOINT_OR_RUN",
                   help="start from another run's checkpoint (e.g. RUN/checkpoints/epoch24.pt) where both "
                        "configs train as plain CE up to it (docs/training.md, branching)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help=f"evaluate a run folder: {RunDir.PREDICTIONS} and {RunDir.EVAL}")
    e.add_argument("run_dir")
    e.add_argument("--logit-adjust-tau", type=float, metavar="TAU",
                   help=f"also: post-hoc logit adjustment toward a uniform prior (from {RunDir.PREDICTIONS})")
    e.add_argument("--test-agnostic", nargs="?", const="sade", metavar="DISTRIBUTIONS",
                   help="score the stored test logits on shifted test sets (SADE's test-agnostic protocol): "
                        "comma-separated forwardR / uniform / backwardR, default SADE's eleven (forward50 ... "
                        f"backward50) -> {RunDir.EVAL_TEST_AGNOSTIC}; a SADE run also learns its expert "
                        "aggregation on each subset's unlabelled images")
    e.add_argument("--no-aggregation", action="store_true",
                   help="with --test-agnostic: skip a method's test-time aggregation (SADE), score the stored "
                        "logits only")
    e.set_defaults(func=_cmd_eval, outputs=(("run_dir", "run"),))

    v = sub.add_parser("validate", help="check a config as train does (paths, data source, every component; "
                                        "no image read) and print it resolved")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=_cmd_validate)

    pr = sub.add_parser("predict", help="classify image files and folders with a trained run -> CSV")
    pr.add_argument("run_dir", help="a trained run folder")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (walked recursively)")
    pr.add_argument("--out", default="predictions.csv", help="CSV file to write (default predictions.csv)")
    pr.add_argument("--k", type=int, default=5, help="top-k classes per image (default 5, capped at C)")
    pr.add_argument("--prior", default="auto",
                    help="target label distribution: auto (default: uniform, or train for a run trained with "
                         "re-balancing), uniform, train (no adjustment, except for a LADE run, whose logits "
                         "are calibrated to uniform) or a file")
    pr.add_argument("--tau", type=float, default=1.0, help="logit adjustment strength (default 1)")
    pr.add_argument("--checkpoint", choices=list(CHECKPOINT_CHOICES), default="last")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    pr.add_argument("--show", type=int, default=10, help="rows to print (default 10)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_cmd_predict, outputs=(("out", "file"),))

    x = sub.add_parser("export", help="export a run's network for plain PyTorch (torch.export, .pt2)")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="file to write, e.g. model.pt2")
    x.add_argument("--checkpoint", choices=list(CHECKPOINT_CHOICES), default="last")
    x.set_defaults(func=_cmd_export, outputs=(("out", "file"),))

    dr = sub.add_parser("doctor", help="inspect a dataset before training: counts, imbalance, duplicates, "
                                        "unreadable files, confusable head-tail pairs")
    dr.add_argument("spec", metavar="DATA-SPEC", help="an image folder (train/<class>/* or <class>/*) or a YAML config")
    dr.add_argument("overrides", nargs="*", help="dotted overrides for a config, e.g. data.imbalance_ratio=50")
    dr.add_argument("--out", default="longtail-doctor", help="folder for doctor.json and class_counts.png")
    dr.add_argument("--features", metavar="RUN_DIR", help="a trained run: rank confusable head-tail class pairs")
    dr.add_argument("--checkpoint", choices=list(CHECKPOINT_CHOICES), default="last")
    dr.add_argument("--many-threshold", type=int, help="many: n > this (default: the config's, else 100)")
    dr.add_argument("--few-threshold", type=int, help="few: n < this (default: the config's, else 20)")
    dr.add_argument("--min-ratio", type=float, default=2.0, help="pairs need n_head >= this x n_tail (default 2)")
    dr.add_argument("--top", type=int, default=10, help="pairs and rows to print (default 10)")
    dr.add_argument("--max-per-class", type=int, default=100, help="images per class for the prototypes (default 100)")
    dr.add_argument("--device", default="auto")
    dr.add_argument("--no-progress", action="store_true")
    dr.set_defaults(func=_cmd_doctor)

    rp = sub.add_parser("report", help="one self-contained HTML report of run folders (figures embedded)")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=f"run folders with {RunDir.EVAL}")
    rp.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    rp.add_argument("--title", help="page title (default: the run, or the number of runs)")
    rp.set_defaults(func=_cmd_report, outputs=(("out", "file"),))

    b = sub.add_parser("bench", help="run a grid (methods x imbalance ratios x seeds), resumable; "
                                     "mean +- std tables (markdown, CSV)")
    b.add_argument("grid", metavar="GRID.yaml", help="grid file (docs/bench.md)")
    b.add_argument("overrides", nargs="*", help="dotted overrides for every cell, e.g. data.root=/data/cifar10")
    b.add_argument("--out", help="folder of the cells and tables (default: the grid's out)")
    b.add_argument("--methods", help="comma-separated methods of the grid to run (default: all)")
    b.add_argument("--table-only", action="store_true", help="only rebuild results.md / results.csv")
    b.add_argument("--list", action="store_true",
                   help="print every cell and its state (done, resume, new); a cell to resume with its epochs, "
                        "whether it is running, and its time left")
    b.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N cells at once, each in its own process: on the CPU pinned to its own cores, on GPUs "
                        "round-robin over the visible GPUs (several per GPU when N exceeds them); default 1, in "
                        "this process")
    b.add_argument("--cell", metavar="METHOD/ratioR/seedS", action="append",
                   help="run only this cell (as --list names it); repeat it or separate cells by commas for "
                        "several, run in dependency order (with --jobs N, N at once)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_cmd_bench, outputs=())  # the grid's out is checked in _cmd_bench

    m = sub.add_parser("methods", help="list registered methods, losses, samplers, models, heads, data sources")
    m.set_defaults(func=_cmd_methods)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def _check_outputs(args) -> None:
    """Every output location of the command can be written, checked before any work.

    A parser names its outputs with set_defaults(outputs=((ATTR, KIND), ...)), KIND "folder",
    "file" or "run" (a run folder the command writes into, checked when it exists); a command
    that names none writes into its --out folder, if it has one (outputs.check_output).
    """
    from pathlib import Path

    from .outputs import check_output

    outputs = getattr(args, "outputs", None)
    if outputs is None:
        outputs = (("out", "folder"),) if hasattr(args, "out") else ()
    for attr, kind in outputs:
        value = getattr(args, attr, None)
        if value is None:
            continue
        if kind == "run":
            if Path(value).is_dir():
                check_output(value, folder=True, name="run folder")
        else:
            check_output(value, folder=kind == "folder", name=f"--{attr.replace('_', '-')}")


# A dotted override: `section.key=value` (a dotted key of identifiers, then '='); no flag looks like that.
_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the dotted overrides of its subcommand, those overrides in order).

    For a subcommand that takes overrides (a positional `overrides`: train, validate, doctor,
    bench), every `section.key=value` token after the subcommand is an override, wherever it
    stands: before, between or after the options (`train CFG --out RUN loss.name=focal`). A token
    that is the value of an option (`--title a.b=c`) and everything after `--` stay as they are.
    """
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    at = next((i for i, tok in enumerate(argv) if sub is not None and tok in sub.choices), None)
    if at is None:
        return argv, []
    command = sub.choices[argv[at]]
    if not any(a.dest == "overrides" and not a.option_strings for a in command._actions):
        return argv, []
    valued = [o for a in command._actions if a.option_strings and a.nargs != 0 for o in a.option_strings]
    rest, overrides, skip = list(argv[:at + 1]), [], False
    for i, tok in enumerate(argv[at + 1:], at + 1):
        if tok == "--":
            rest += argv[i:]
            break
        if not skip and _OVERRIDE.match(tok):
            overrides.append(tok)
            continue
        rest.append(tok)
        skip = not skip and "=" not in tok and any(o == tok or (tok.startswith("--") and len(tok) > 2
                                                               and o.startswith(tok)) for o in valued)
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, overrides = split_overrides(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    setup_logging()  # the library's INFO lines on stdout, warnings on stderr
    try:
        _check_outputs(args)
        return args.func(args)
    except LongtailError as err:
        if args.debug:
            traceback.print_exc()
        print(f"longtail: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longtail: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
