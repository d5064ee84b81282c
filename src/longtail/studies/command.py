"""`longtail study toy | mixup-similarity | gaussian`: the unified-perspective paper's analyses."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

# Defaults per --data: (epochs, small_cnn width); --quick: tiny grids, 2 epochs (for tests and smoke runs).
BUDGETS = {"cifar10": (5, 16), "digits": (30, 32)}
TOY_COUNTS = {"cifar10": (100, 5000, 1225), "digits": (10, 120, 10)}  # min, max, step
MIXUP_DATA = {"cifar10": 100.0, "digits": 10.0}  # imbalance ratio of the long-tailed set
QUICK_EPOCHS = 2

TOY_HELP = """\
Section 3's toy example. Case 1: classes 1-9 have n images each (n = --min-count ...
--max-count by --step), class-10 (the last class) keeps --min-count. Case 2: classes 1-9 keep
--max-count, class-10 has n. Each point trains small_cnn from scratch with plain CE and records
per-class test accuracy; OUT/results.json, results.csv and toy.png are rewritten after every
point, finished points are skipped when the command is run again.

Default budget, --data cifar10 (CIFAR-10 (JPEG), --root, full 10,000-image test set):
n = 100, 1325, 2550, 3775, 5000 (step 1225; the paper steps by 100), small_cnn width 16,
5 epochs, batch 128, SGD lr 0.05 cosine, crop+flip, seed 0: 9 trainings (the point
5000 x 9 / 100 is shared), 1.54 M training images seen in all; about 2 h on one busy core of
the project's 2-core CPU (small_cnn width 16 trains at about 218 img/s there).
--data digits: scikit-learn digits (50 test images per class), n = 10 ... 120 by 10,
small_cnn width 32, 30 epochs, batch 32: 23 trainings, 17 min measured at nice 10 on one
busy core. --quick: the two end points of each case, 2 epochs."""

MIXUP_HELP = """\
Section 4.2's simulation. On the long-tailed set (exponential profile), a fraction rho of the
majority class's (--major, default class 0) images x_i is replaced by lam*x_i + (1-lam)*x_j,
x_j a random minority (--minor, default the last class) image, keeping the majority label;
rho is swept at lam = --lam-fixed (Figure 3) and lam at rho = --rho-fixed (Figure 4), and the
majority's and minority's test accuracies recorded. Results are rewritten after every point;
finished points are skipped when the command is run again.

Default budget, --data cifar10: CIFAR-10-LT (JPEG) at imbalance ratio 100 (12,406 images,
5,000 ... 50), rho 0,0.1,0.2,0.3,0.4,0.5 at lam 0.2 and lam 0.2,0.4,0.6,0.8,1 at rho 0.2
(9 distinct trainings), small_cnn width 16, 5 epochs, batch 128, seed 0: 0.56 M training
images seen; about 45 min on one busy CPU core (218 img/s). --data digits: ratio 10 (128 ... 12
images, 50 test images per class), small_cnn width 32, 30 epochs, batch 32: 2.7 min per seed
measured at nice 10 on one busy core. --quick: rho 0,0.5 and lam 0.2,1 (3 trainings), 2 epochs."""

GAUSSIAN_HELP = """\
Theorems 1 and 2 by Monte Carlo (pure numpy + scikit-learn's logistic regression; about 10 s
of CPU). Theorem 1: the shift of f~B = (mean+ + mean-)/2 from (mu1+mu2)/2 against the printed
Delta = (1-beta)(1-p/2)(mu2-mu1) and the Delta the setup implies, (1-beta)(1-p)(mu2-mu1)/2,
and how often |shift - Delta| <= alpha against the theorem's probability bound. Theorem 2:
the Bayes boundary's shift along the mean line under unequal priors, Eq. (3) against
logistic-regression and plug-in estimates from samples."""


def _budget(args, quick_epochs: bool):
    from ._points import Budget, check_budget

    epochs_default, width_default = BUDGETS.get(args.data, (None, None))
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if quick_epochs else epochs_default)
    width = args.width if args.width is not None else width_default
    check_budget(data=args.data, epochs=epochs, width=width)
    root = None
    if args.data == "cifar10":
        from ._points import DEFAULT_CIFAR10_ROOT

        root = str(Path(args.root or DEFAULT_CIFAR10_ROOT).expanduser().resolve())
    elif args.root:
        raise ConfigError("--root is only used with --data cifar10")
    return Budget(data=args.data, epochs=epochs, width=width, root=root, device=args.device)


def _cmd_toy(args) -> int:
    from ._points import parse_numbers
    from .toy import run_toy

    budget = _budget(args, args.quick)
    lo, hi, step = TOY_COUNTS[args.data]
    lo = args.min_count if args.min_count is not None else lo
    hi = args.max_count if args.max_count is not None else hi
    step = args.step if args.step is not None else (max(hi - lo, 1) if args.quick else step)
    cases = parse_numbers(args.cases, "--cases", int)
    seeds = parse_numbers(args.seeds, "--seeds", int)
    out = Path(args.out or f"runs/studies/toy-{args.data}")
    run_toy(out, budget=budget, min_count=lo, max_count=hi, step=step, cases=cases, seeds=seeds)
    print(f"wrote {out}/results.json, results.csv, toy.png (run folders under {out}/runs)")
    return 0


def _cmd_mixup(args) -> int:
    from ._points import parse_numbers
    from .mixup_similarity import run_mixup_similarity

    budget = _budget(args, args.quick)
    rhos = parse_numbers(args.rhos or ("0,0.5" if args.quick else "0,0.1,0.2,0.3,0.4,0.5"), "--rhos")
    lams = parse_numbers(args.lams or ("0.2,1" if args.quick else "0.2,0.4,0.6,0.8,1"), "--lams")
    seeds = parse_numbers(args.seeds, "--seeds", int)
    ratio = args.imbalance_ratio if args.imbalance_ratio is not None else MIXUP_DATA[args.data]
    if not ratio >= 1:
        raise ConfigError(f"--imbalance-ratio must be >= 1, got {ratio}")
    out = Path(args.out or f"runs/studies/mixup-similarity-{args.data}")
    run_mixup_similarity(out, budget=budget, imbalance_ratio=ratio, max_count=args.max_count, rhos=rhos, lams=lams,
                         rho_fixed=args.rho_fixed, lam_fixed=args.lam_fixed, major=args.major, minor=args.minor,
                         seeds=seeds)
    print(f"wrote {out}/results.json, results.csv, mixup_similarity.png (run folders under {out}/runs)")
    return 0


def _cmd_gaussian(args) -> int:
    from .gaussian import run_gaussian

    run_gaussian(args.out, trials=args.trials, repeats=args.repeats, n=args.n, alpha=args.alpha, seed=args.seed)
    return 0


def _training_options(p) -> None:
    p.add_argument("--data", choices=sorted(BUDGETS), default="cifar10",
                   help="cifar10: CIFAR-10 (JPEG) ImageFolder archive (--root); digits: scikit-learn digits")
    p.add_argument("--root", help="cifar10 only: the CIFAR-10 (JPEG) archive or folder "
                                  "(default ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--out", help="study folder (default runs/studies/<study>-<data>)")
    p.add_argument("--epochs", type=int, help="epochs per training (default: the budget above)")
    p.add_argument("--width", type=int, help="small_cnn width (default: 16 for cifar10, 32 for digits)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (data subset and training), e.g. 0,1,2")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quick", action="store_true", help="tiny grid, 2 epochs (tests and smoke runs)")


def register(sub) -> None:
    import argparse

    p = sub.add_parser("study", help="analyses of the unified-perspective paper: toy, mixup-similarity, gaussian")
    studies = p.add_subparsers(dest="study", required=True)

    t = studies.add_parser("toy", help="Section 3 toy example (per-class accuracy vs counts)", description=TOY_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _training_options(t)
    t.add_argument("--min-count", type=int, help="class-10's count in case 1 and the smallest n (default 100 / 10)")
    t.add_argument("--max-count", type=int, help="classes 1-9's count in case 2 and the largest n (default 5000 / 120)")
    t.add_argument("--step", type=int, help="step of n (default 1225 for cifar10, 10 for digits; the paper: 100)")
    t.add_argument("--cases", default="1,2", help="which cases: 1, 2 or 1,2")
    t.set_defaults(func=_cmd_toy)

    m = studies.add_parser("mixup-similarity", help="Section 4.2 simulation (majority images mixed with the minority)",
                           description=MIXUP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _training_options(m)
    m.add_argument("--rhos", help="rho sweep (default 0,0.1,0.2,0.3,0.4,0.5)")
    m.add_argument("--lams", help="lam sweep (default 0.2,0.4,0.6,0.8,1)")
    m.add_argument("--rho-fixed", type=float, default=0.2, help="rho of the lam sweep (default 0.2, the paper's)")
    m.add_argument("--lam-fixed", type=float, default=0.2, help="lam of the rho sweep (default 0.2, the paper's)")
    m.add_argument("--imbalance-ratio", type=float, help="of the long-tailed set (default 100 cifar10, 10 digits)")
    m.add_argument("--max-count", type=int, help="head class count (default: all its images)")
    m.add_argument("--major", type=int, default=0, help="majority class index (default 0, the paper's class-1)")
    m.add_argument("--minor", type=int, default=-1, help="minority class index (default -1: the last class)")
    m.set_defaults(func=_cmd_mixup)

    g = studies.add_parser("gaussian", help="Theorems 1-2 as Monte Carlo checks (seconds)", description=GAUSSIAN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--out", help="folder for gaussian.json, gaussian_theorem1.csv, gaussian_theorem2.csv, "
                                 "gaussian.png (default: print only)")
    g.add_argument("--trials", type=int, default=4000, help="simulated training sets per Theorem 1 row")
    g.add_argument("--repeats", type=int, default=20, help="samples per Theorem 2 row")
    g.add_argument("--n", type=int, default=4000, help="sample size of each Theorem 2 sample")
    g.add_argument("--alpha", type=float, default=0.2, help="Theorem 1's alpha")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_gaussian)
