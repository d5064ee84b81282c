"""`longtail dlsa RUN_DIR --out DIR`: DLSA vs the classifier alone on a run's frozen features.

Writes DIR/dlsa.json (configuration, metrics, per-filter separation, flow histories, wall
times) and DIR/summary.csv (one row per model and epoch choice), both atomically. Features
come from `longtail.features.extract_features` (cached in RUN_DIR/features/).
"""

from __future__ import annotations

import csv
import io

from ..errors import ConfigError
from ..rundir import CHECKPOINT_CHOICES, RunDir

# (flag, DLSAConfig field, type, help); defaults come from DLSAConfig
_OPTIONS = (
    ("--clusters", "clusters", int, "K, mixture components (default round(500 sqrt(C/1000)): 50 for 10 classes)"),
    ("--depth", "depth", int, "number of Flow Filters (default 3)"),
    ("--filter-share", "filter_share", float, "share of the remaining training samples each filter passes to "
                                                "its cluster-aided classifier (default 0.3)"),
    ("--q", "q", float, "likelihood weights n_c^-q (default 2)"),
    ("--eta", "eta", float, "balancedness momentum (default 0.7)"),
    ("--lambda-lh", "lambda_lh", float, "weight of the weighted likelihood loss (default 2)"),
    ("--lambda-bal", "lambda_bal", float, "weight of the balancedness loss (default 1)"),
    ("--lambda-pure", "lambda_pure", float, "weight of the purity loss (default 0.02)"),
    ("--center-std", "center_std", float, "std of the fixed mixture means (default 0.05)"),
    ("--scale-clamp", "scale_clamp", float, "soft clamp of the MADE log-scale, 0 = off (default 5)"),
    ("--flow-epochs", "flow_epochs", int, "epochs per flow (default 50)"),
    ("--flow-batch", "flow_batch", int, "flow batch size (default 512)"),
    ("--flow-lr", "flow_lr", float, "flow SGD learning rate (default 0.2)"),
    ("--flow-noise", "flow_noise", float, "std of the dequantisation noise added to every flow training batch of "
                                          "standardised features, 0 = off (default 0.05)"),
    ("--flow-retries", "flow_retries", int, "restarts of a flow from its last finite epoch with the learning rate "
                                            "halved, before giving up (default 5)"),
    ("--std-floor", "std_floor", float, "standardisation divides by max(std, this x the median std), 0 = off "
                                        "(default 0.1)"),
    ("--flow-select", "flow_select", str, "flow epoch: 'clusters' (official purity/size rule) or 'last'"),
    ("--cls-epochs", "cls_epochs", int, "classifier epochs (default 150)"),
    ("--cls-batch", "cls_batch", int, "classifier batch size (default 128)"),
    ("--cls-lr", "cls_lr", float, "classifier SGD learning rate (default 0.01)"),
    ("--eval-every", "eval_every", int, "classifier snapshot interval for the validation choice (default 5)"),
    ("--tail-threshold", "tail_threshold", float, "tail classes: training count <= this (default: the median count)"),
    ("--seed", "seed", int, "seed of the flows, means, pairs and classifiers (default 0)"),
)

_SUMMARY_KEYS = ("top1", "many", "medium", "few", "head", "tail", "mcc", "nmi")


def config_from_args(args):
    from .cascade import DLSAConfig

    values = {}
    for _, key, _, _ in _OPTIONS:
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if values.get("scale_clamp") == 0:
        values["scale_clamp"] = None
    values["device"] = args.device
    values["init_from_head"] = bool(args.init_from_head)
    return DLSAConfig.from_dict(values)


def summary_rows(result: dict) -> list[dict]:
    rows = [{"model": "run head", "epoch_choice": "-", "epoch": "-",
             **{k: result["run_head"][k] for k in _SUMMARY_KEYS}}]
    for choice, m in result["classifier_alone"].items():
        rows.append({"model": "classifier_alone", "epoch_choice": choice, "epoch": m["epoch"],
                     **{k: m[k] for k in _SUMMARY_KEYS}})
    for depth, by_choice in result["dlsa_by_depth"].items():
        for choice, m in by_choice.items():
            rows.append({"model": f"dlsa_depth{depth}", "epoch_choice": choice, "epoch": m["epoch"],
                         **{k: m[k] for k in _SUMMARY_KEYS}})
    sel = result.get("dlsa_val_selected")
    if sel is not None:
        rows.append({"model": f"dlsa_depth{sel['depth']}", "epoch_choice": "val_selected_depth_and_epoch",
                     "epoch": sel["epoch"], **{k: sel[k] for k in _SUMMARY_KEYS}})
    return rows


def _fmt(v, width=6, digits=2):
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{digits}f}"


def format_result(result: dict) -> str:
    ht = result["head_tail"]
    lines = [f"{'model':<48}{'top1':>7}{'many':>7}{'medium':>7}{'few':>7}{'head':>7}{'tail':>7}{'mcc':>7}{'nmi':>7}"]
    for r in summary_rows(result):
        name = r["model"] if r["epoch_choice"] == "-" else f"{r['model']} ({r['epoch_choice']} {r['epoch']})"
        accuracies = "".join(f" {_fmt(r[k])}" for k in ("top1", "many", "medium", "few", "head", "tail"))
        lines.append(f"{name:<48}{accuracies} {_fmt(r['mcc'], 6, 3)} {_fmt(r['nmi'], 6, 3)}")
    lines.append(f"tail classes (training count <= {ht['tail_threshold']:g}): {ht['tail_classes']}")
    for fl in result["filters"]:
        t = fl["test"]
        lines.append(f"filter {fl['filter']}: train {fl['train_filtered']}/{fl['train_remaining']} filtered, "
                     f"test {t['filtered']}/{t['reached']}; separation accuracy "
                     f"{_fmt(t['separation_accuracy'], 0, 1)} % (random: {_fmt(t['tail_share_reached'], 0, 1)} %); "
                     f"its classifier {_fmt(t['classifier_top1'], 0, 1)} % "
                     f"vs alone {_fmt(t['alone_top1_same_samples'], 0, 1)} % on the same test samples; "
                     f"flow epoch {fl['flow']['selected_epoch']}, {fl['flow_seconds']:.0f} s"
                     + (f"; {len(fl['flow']['restarts'])} flow restart(s), lr {fl['flow']['final_lr']:g}"
                        if fl["flow"].get("restarts") else ""))
    reg = result["regular_classifier"]
    lines.append(f"regular classifier: train {reg['train']} ({reg['train_tail']} tail), test {reg['test']} "
                 f"({reg['test_tail']} tail); {_fmt(reg['classifier_top1'], 0, 1)} % vs alone "
                 f"{_fmt(reg['alone_top1_same_samples'], 0, 1)} %")
    w, c = result["wall_seconds"], result["cpu_seconds"]
    lines.append(f"wall time {w['total']:.0f} s (flows {w['flows']:.0f} s), CPU time {c['total']:.0f} s "
                 f"(flows {c['flows']:.0f} s); seed {result['config']['seed']}")
    return "\n".join(lines)


def _cmd_dlsa(args) -> int:
    from pathlib import Path

    from ..features import extract_features
    from ..runlock import lock_if_inside
    from ..io import atomic_write_json, atomic_write_text
    from .cascade import run_dlsa

    cfg = config_from_args(args)  # validate before any work
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    fs = extract_features(args.run_dir, checkpoint=args.checkpoint,
                          device=None if args.device == "cpu" else args.device)
    run_cfg = RunDir(args.run_dir).read_config()
    result = run_dlsa(fs, cfg, many_threshold=run_cfg.eval.many_threshold, few_threshold=run_cfg.eval.few_threshold)
    result["run"] = str(args.run_dir)
    result["checkpoint"] = args.checkpoint
    buffer = io.StringIO()
    rows = summary_rows(result)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with lock_if_inside(out, args.run_dir):  # an --out inside the run folder: not while another process writes there
        atomic_write_json(out / "dlsa.json", result)
        atomic_write_text(out / "summary.csv", buffer.getvalue())
    print(format_result(result))
    print(f"wrote {out / 'dlsa.json'} and {out / 'summary.csv'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("dlsa", help="DLSA (dynamic label space adjustment) on a run's frozen features, "
                                    "vs the same classifier alone; per-filter head-tail separation")
    p.add_argument("run_dir", help="a trained run folder (features are extracted and cached in RUN_DIR/features/)")
    p.add_argument("--out", required=True, help="folder for dlsa.json and summary.csv")
    p.add_argument("--checkpoint", choices=sorted(CHECKPOINT_CHOICES), default="last")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    for flag, key, kind, text in _OPTIONS:
        p.add_argument(flag, dest=key, type=kind, default=None, help=text)
    p.add_argument("--init-from-head", action="store_true",
                   help="start every classifier's feature layer from the run's own linear head (the official "
                        "PaCo configs, used with --cls-lr 0.0001) instead of a random init")
    p.set_defaults(func=_cmd_dlsa)
