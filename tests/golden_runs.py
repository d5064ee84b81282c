"""Short CIFAR-10 (JPEG) runs whose metrics lines must not change when the code is reshaped.

The architecture work (issue 20) moves the loop, the methods and the run folders around; the
numbers must stay bitwise the same. This module trains seven 2-epoch ResNet-32 runs through the
real command line (ce, ldam_drw on the cosine head with DRW from epoch 1, swrm switching at
epoch 1, mislas stage 1 + stage 2, lcreg stage 1 + stage 2), each on a 500-to-5 long tail of
the shared archive, and compares their metrics.jsonl lines (without wall-time fields) and the
eval.json headline numbers with the lines stored in tests/golden/arch_metrics.json.

The golden lines were recorded when metrics.jsonl counted epochs from 0; metrics.jsonl now
counts them from 1 (epochs done, as the console and eval.json), so `train_case` reads the rows
through RunDir.read_metrics (1-based) and stores "epoch" - 1: the golden file's numbering, never
edited (a --record writes it the same way).

Bitwise equality needs the same CPU kernels, and these 2-epoch runs on a tiny subset are
chaotic: on another CPU the same code ends elsewhere (2026-12-07, an AVX512 AMD EPYC against
the Xeon recording: CE's epoch-2 train loss 2.297 against 2.171, MiSLAS stage 2 diverging to
3e8 where the Xeon run ended at 4.9, with the recorded code and today's alike). So the lines are
only compared with lines of the same machine fingerprint (CPU model, torch version, torch's CPU
capability): one recording per fingerprint, tests/golden/arch_metrics*.json, each made with the
code before the architecture change, RECORDED_CODE. On a CPU with no recording the test trains
RECORDED_CODE itself (from a git worktree of this clone) and compares with that.

Record for this CPU (a worktree of the recorded code, then its runs):
    git worktree add --detach /tmp/recorded RECORDED_CODE
    python tests/golden_runs.py --record --cwd /tmp/recorded
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from longtail.dist import cpu_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOLDEN = HERE / "golden" / "arch_metrics.json"
TIME_KEYS = ("seconds", "per_s", "time", "wall")

# fp32 as recorded, on every CPU (train.precision auto would be bf16 on a CPU with native bf16)
COMMON = ["train.epochs=2", "data.max_count=500", "train.progress=false", "train.num_threads=1", "train.precision=fp32"]
# (name, config file, extra overrides, stage-1 case it builds on)
CASES = [
    ("ce", "ce.yaml", [], None),
    ("ldam_drw", "ldam_drw.yaml", ["reweight.start_epoch=1"], None),
    ("swrm", "swrm.yaml", ["method.params.start_epoch=1"], None),
    ("mislas_stage1", "mislas_stage1.yaml", [], None),
    ("mislas", "mislas.yaml", [], "mislas_stage1"),
    # lr 0.1 with 10 steps per epoch diverges at epoch 2 on this small subset (loss 2e13, then nan)
    ("lcreg_stage1", "lcreg_stage1.yaml", ["train.lr=0.02"], None),
    ("lcreg", "lcreg.yaml", [], "lcreg_stage1"),
]


# the code the golden lines come from: the commit before the architecture change (issue 20)
RECORDED_CODE = "2b37e14f0891e59c05bfbb901f890d8ca0b2aa7b"


def fingerprint(python: str = sys.executable) -> dict:
    """CPU model, torch version and torch's CPU capability (the kernels ATen dispatches to: AVX2,
    AVX512, ...) of the interpreter that trains: what bitwise equality needs. The CPU model alone
    does not tell an AVX2-only AMD EPYC from an AVX512 one."""
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {"cpu": cpu_model(), "torch": out[0], "capability": out[1]}


def recordings() -> list[dict]:
    """Every recording, {'fingerprint', 'cases'}: tests/golden/arch_metrics*.json."""
    return [json.loads(p.read_text()) for p in sorted(GOLDEN.parent.glob("arch_metrics*.json"))]


def recording_for(fp: dict) -> dict | None:
    """The recording made on this fingerprint: every key it records equal (the first recording
    predates the capability key)."""
    return next((r for r in recordings() if all(fp.get(k) == v for k, v in r["fingerprint"].items())), None)


def record_path(fp: dict) -> Path:
    """Where --record writes: a file named by the fingerprint (the first recording,
    arch_metrics.json, is the Xeon's and stays as it was recorded)."""
    slug = re.sub(r"[^a-z0-9]+", "_", f"{fp['cpu']} {fp['capability']} torch {fp['torch']}".lower()).strip("_")
    return GOLDEN.parent / f"arch_metrics_{slug}.json"


def _clean(line: dict) -> dict:
    return {k: v for k, v in line.items() if not any(t in k for t in TIME_KEYS)}


def train_case(name: str, archive: Path, out_root: Path, python: str = sys.executable,
               cwd: Path = REPO) -> dict:
    """Train one case (its stage 1 must be in out_root already) and return its cleaned outputs."""
    _, cfg_file, extra, stage1 = next(c for c in CASES if c[0] == name)
    over = [*COMMON, f"data.root={archive}", *extra]
    if stage1 is not None:
        over.append(f"method.params.stage1={out_root / stage1 / 'checkpoints' / 'last.pt'}")
    run = out_root / name
    # the code of `cwd` (its src/ first on the path), one thread
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(cwd / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([python, "-m", "longtail", "train", str(cwd / "configs" / "cifar10_lt" / cfg_file),
                           *over, "--out", str(run)], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    from longtail.rundir import RunDir

    # the golden file's 0-based "epoch" (module docstring): 1-based rows, one subtracted
    lines = [_clean({**r, "epoch": r["epoch"] - 1}) for r in RunDir(run).read_metrics()]
    ev = json.loads((run / "eval.json").read_text())
    headline = {k: ev[k] for k in ("top1", "many", "medium", "few", "per_class") if k in ev}
    return {"metrics": lines, "eval": headline}


def train_all(archive: Path, out_root: Path, python: str = sys.executable, cwd: Path = REPO) -> dict:
    return {name: train_case(name, archive, out_root, python, cwd) for name, *_ in CASES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="write this fingerprint's tests/golden/arch_metrics_*.json")
    ap.add_argument("--python", default=sys.executable, help="interpreter whose longtail trains")
    ap.add_argument("--cwd", default=str(REPO), help="folder to run from (the checkout whose code is used)")
    ap.add_argument("--archive", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_all(Path(args.archive).resolve(), Path(tmp), args.python, Path(args.cwd))
    payload = {"fingerprint": fingerprint(args.python), "cases": result}
    if args.record:
        path = record_path(payload["fingerprint"])
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}")
    else:
        print(json.dumps(payload)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
