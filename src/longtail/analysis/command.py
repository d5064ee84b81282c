"""`longtail analyze RUN_DIR [RUN_DIR ...] --out DIR` (docs/analysis.md)."""

from __future__ import annotations


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cmd_analyze(args) -> int:
    from contextlib import nullcontext

    from ..log import warnings_only
    from .analyze import analyze_runs

    with warnings_only() if args.quiet else nullcontext():
        result = analyze_runs(args.run_dirs, args.out, checkpoint=args.checkpoint, taus=args.tau or (),
                              tsne=not args.no_tsne, tsne_samples=args.tsne_samples, seed=args.seed,
                              perplexity=args.perplexity, device=args.device)
    width = max(len(r["label"]) for r in result["table"])
    print(f"{'run':<{width}}  variance    cv     max/min  spearman  silhouette  (norms of the linear head)")
    for row in result["table"]:
        print(f"{row['label']:<{width}}  {row['variance']:.5f}  {_fmt(row['cv'], '.4f')}  "
              f"{_fmt(row['max_over_min'], '7.3f')}  {_fmt(row['spearman_vs_count'], '8.3f')}  "
              f"{_fmt(row['silhouette'], '10.4f')}")
    print(f"wrote {args.out}/analysis.json and {len(result['figures'])} figure(s): {', '.join(result['figures'])}")
    return 0


def register(sub) -> None:
    from ..rundir import CHECKPOINT_CHOICES

    p = sub.add_parser("analyze", help="classifier weight norms (and tau-normalised), t-SNE of test features: "
                                       "OUT/analysis.json + PNGs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trained run folders with a linear head")
    p.add_argument("--out", required=True, help="folder for analysis.json and the figures")
    p.add_argument("--checkpoint", choices=list(CHECKPOINT_CHOICES), default="last")
    p.add_argument("--tau", type=float, action="append", metavar="TAU",
                   help="also the norms after w/||w||^TAU (repeatable); tau 1 and a tau_norm run's own tau "
                        "are always included")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE maps (weight norms only)")
    p.add_argument("--tsne-samples", type=int, default=2000, help="seeded subsample of test images (default 2000)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample and of t-SNE")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto for feature extraction (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_analyze)
