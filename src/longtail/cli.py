"""The `longtail` command line. Thin: parse, call one function per subcommand, print.

Errors caused by the user (LongtailError) print one line `longtail: error: ...` and exit
with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .errors import LongtailError


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


def _cmd_counts(args) -> int:
    import numpy as np

    from .data.profiles import class_counts

    presets = {"cifar10": (10, 5000), "cifar100": (100, 500), "imagenet_lt": (1000, 1280)}
    num_classes, max_count = presets.get(args.dataset, (None, None))
    num_classes = args.num_classes or num_classes
    max_count = args.max_count or max_count
    if num_classes is None or max_count is None:
        raise LongtailError("give --dataset (cifar10, cifar100, imagenet_lt) or both --num-classes and --max-count")
    kw = {"pareto_shape": args.pareto_shape} if args.pareto_shape is not None else {}
    counts = class_counts(args.profile, num_classes, max_count, args.imbalance_ratio, **kw)
    width = len(str(num_classes - 1))
    for i, n in enumerate(counts):
        print(f"class {i:>{width}}  {n}")
    many, few = int((counts > 100).sum()), int((counts < 20).sum())
    print(f"total {int(np.sum(counts))}  (classes {num_classes}, max {counts.max()}, min {counts.min()}, "
          f"many/medium/few {many}/{num_classes - many - few}/{few})")
    return 0


def _cmd_train(args) -> int:
    from .config import load_config
    from .runs import train_run

    if args.config is None and not args.resume:
        raise LongtailError("give a CONFIG file (or --resume with an existing --out)")
    cfg = load_config(args.config, args.overrides) if args.config is not None else None
    if cfg is not None and args.no_progress:
        cfg.train.progress = False
    result = train_run(cfg, args.out, resume=args.resume)
    _print_eval(result)
    return 0


def _print_eval(result: dict) -> None:
    from .eval.metrics import format_summary

    if not result:
        return
    print(format_summary(f"last (epoch {result['epoch']})", result))
    if "best_val" in result:
        print(format_summary(f"best-val (epoch {result['best_val']['epoch']})", result["best_val"]))
    print(f"wrote {result['run']}/eval.json")


def _cmd_eval(args) -> int:
    from .runs import evaluate_run

    _print_eval(evaluate_run(args.run_dir))
    return 0


def _cmd_validate(args) -> int:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_methods(args) -> int:
    from . import losses, methods, models  # noqa: F401  (registration)
    from .data import samplers  # noqa: F401
    from .registry import HEADS, LOSSES, METHODS, MODELS, SAMPLERS

    for reg in (METHODS, LOSSES, SAMPLERS, MODELS, HEADS):
        print(f"{reg.kind}{'es' if reg.kind.endswith('s') else 's'}:")
        for name in reg.names():
            print(f"  {name:<16} {reg.summary(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    c.add_argument("--pareto-shape", type=float)
    c.set_defaults(func=_cmd_counts)

    t = sub.add_parser("train", help="train a run: longtail train CONFIG [a.b=c ...] --out RUN_DIR")
    t.add_argument("config", nargs="?", help="YAML config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.05")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a run folder: predictions.npz and eval.json")
    e.add_argument("run_dir")
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("validate", help="check a config and print it resolved")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=_cmd_validate)

    m = sub.add_parser("methods", help="list registered methods, losses, samplers, models, heads")
    m.set_defaults(func=_cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
