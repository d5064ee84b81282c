#!/usr/bin/env python
"""Several seeds of one config as one packed network against separate models (issue 21, speed).

    python benchmarks/packed_seeds.py [--device cpu|cuda] [--members 1,2,4,8] [--precision fp32|bf16]
                                      [--steps N] [--warmup N] [--repeats R] [--threads T] [--quick]
                                      [--out packed.json]

Times training steps (forward, mean CE per member, backward, SGD with momentum 0.9 and weight
decay 2e-4) of CIFAR ResNet-32 (option A, 10 classes), batch 128 per member, random 32x32 images
already on the device (no data loading or augmentation: the model's step only), after untimed
warm-up steps, with torch.cuda.synchronize around each timed stretch on CUDA. Layouts per K:

  plain       one model (K = 1), the reference
  sequential  K separate models trained one after another in this process (one optimiser each)
  grouped     longtail.models.packed.pack(mode="grouped"): one network of grouped convolutions
  vmap        pack(mode="vmap"): functional_call under torch.func.vmap over stacked parameters

img/s counts every member's images (K x batch per step). Each repeat measures every layout once,
in the order above, and the median over repeats is reported; ratios are within this one run only
(x plain: img/s over the plain model's; x seq: over `sequential` at the same K). img/CPU-s (the
process's CPU time) is less sensitive to other load on the machine than img/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from longtail.dist import cpu_model
from longtail.io import atomic_write_json
from longtail.models.cifar_resnet import CifarResNet
from longtail.models.packed import pack

LAYOUTS = ("plain", "sequential", "grouped", "vmap")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--members", default="1,2,4,8", help="comma-separated K values (default 1,2,4,8)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"subset of {','.join(LAYOUTS)}")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128, help="images per member per step")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, --quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="measurements per layout (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--nondet", action="store_true", help="CUDA: cudnn.benchmark (autotuning) on")
    ap.add_argument("--quick", action="store_true", help="K in 1,2,4 unless --members is given; 1 warm-up, "
                                                          "2 timed steps, 1 repeat")
    ap.add_argument("--out", default=None, help="write the printed numbers and the settings as JSON")
    args = ap.parse_args(argv)
    if args.quick and "--members" not in (argv if argv is not None else sys.argv[1:]):
        args.members = "1,2,4"
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 3)
    try:
        args.members = sorted({int(k) for k in args.members.split(",")})
    except ValueError:
        ap.error(f"--members takes integers, e.g. 1,2,4,8, got {args.members!r}")
    if not args.members or min(args.members) < 1:
        ap.error("--members must be integers >= 1")
    args.layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in args.layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"unknown layout {bad[0]!r}; choose from {','.join(LAYOUTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


def make_nets(k: int, args, device) -> list[CifarResNet]:
    nets = []
    for i in range(k):
        torch.manual_seed(i)  # seed i: member i
        nets.append(CifarResNet(depth=args.depth, num_classes=args.classes).to(device))
    return nets


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)


class Stepper:
    """One training step of a layout on fixed batches (K, B, 3, H, W)."""

    def __init__(self, layout: str, k: int, args, device):
        self.layout, self.k, self.device = layout, k, device
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(k, args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
        self.target = torch.randint(0, args.classes, (k, args.batch_size), generator=g).to(device)
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if args.precision == "bf16" else nullcontext())
        nets = make_nets(k, args, device)
        if layout in ("plain", "sequential"):
            self.nets = nets
            self.opts = [sgd(n.parameters()) for n in nets]
        else:
            self.packed = pack(nets, mode=layout)
            self.opt = sgd(self.packed.parameters())
            del nets

    def step(self) -> None:
        if self.layout in ("plain", "sequential"):
            for i, (net, opt) in enumerate(zip(self.nets, self.opts)):
                opt.zero_grad(set_to_none=True)
                with self.autocast:
                    loss = F.cross_entropy(net(self.images[i]), self.target[i])
                loss.backward()
                opt.step()
            return
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            logits = self.packed(self.images)  # (K, B, C)
            # sum over members of each member's mean CE
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.target.flatten()) * self.k
        loss.backward()
        self.opt.step()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(stepper: Stepper, *, steps: int, warmup: int, batch: int) -> dict:
    for _ in range(warmup):
        stepper.step()
    sync(stepper.device)
    if stepper.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(stepper.device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        stepper.step()
    sync(stepper.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = steps * stepper.k * batch
    out = {"images_per_s": images / wall, "images_per_cpu_s": images / cpu if cpu > 0 else None,
           "step_ms": 1000 * wall / steps}
    if stepper.device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(stepper.device) / 2**20
    return out


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def plan(args) -> list[tuple[int, str]]:
    cells = []
    if "plain" in args.layouts:
        cells.append((1, "plain"))
    for k in args.members:
        for layout in ("sequential", "grouped", "vmap"):
            if layout in args.layouts and not (layout == "sequential" and k == 1):
                cells.append((k, layout))
    return cells


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(args.nondet)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info = {"device": args.device, "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_affinity": affinity, "precision": args.precision, "depth": args.depth,
            "batch_size": args.batch_size, "image_size": args.image_size, "classes": args.classes,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "nondet": bool(args.nondet), "command": " ".join(sys.argv if argv is None else ["packed_seeds.py", *argv])}
    print(f"device {info['device_name']} ({args.device}), torch {info['torch']}, threads {info['threads']}, "
          f"OMP_NUM_THREADS={info['omp_num_threads']}, cpus {affinity}, {args.precision}, ResNet-{args.depth}, "
          f"batch {args.batch_size} per member, {args.image_size}x{args.image_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repeat(s)", flush=True)
    cells = plan(args)
    steppers, errors, samples = {}, {}, {c: [] for c in cells}
    for cell in cells:
        try:
            steppers[cell] = Stepper(cell[1], cell[0], args, device)
        except Exception as exc:  # a layout that cannot train here is reported, not fatal
            errors[cell] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    for _ in range(args.repeats):
        for cell in cells:
            if cell in errors:
                continue
            try:
                samples[cell].append(measure(steppers[cell], steps=args.steps, warmup=args.warmup,
                                             batch=args.batch_size))
            except Exception as exc:
                traceback.print_exc()
                errors[cell] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    rows = []
    for cell in cells:
        k, layout = cell
        row = {"k": k, "layout": layout}
        if cell in errors:
            row["error"] = errors[cell]
        elif samples[cell]:
            for key in samples[cell][0]:
                vals = [s[key] for s in samples[cell] if s[key] is not None]
                row[key] = statistics.median(vals) if vals else None
            row["images_per_s_all"] = [s["images_per_s"] for s in samples[cell]]
        rows.append(row)
    by = {(r["k"], r["layout"]): r for r in rows}
    plain = by.get((1, "plain"), {}).get("images_per_s")
    for r in rows:
        if "images_per_s" not in r:
            continue
        r["x_plain"] = r["images_per_s"] / plain if plain else None
        seq = by.get((r["k"], "sequential"), {}).get("images_per_s") or (plain if r["k"] == 1 else None)
        r["x_sequential"] = r["images_per_s"] / seq if seq else None
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{'K':>2} {'layout':<11} {'img/s':>9} {'img/CPU-s':>9} {'step ms':>9} {'x plain':>8} {'x seq':>6}"
          + ("  CUDA MiB" if device.type == "cuda" else ""))
    for r in rows:
        if "error" in r:
            print(f"{r['k']:>2} {r['layout']:<11} does not run: {r['error']}")
            continue
        line = (f"{r['k']:>2} {r['layout']:<11} {fmt(r.get('images_per_s'), '9.1f')} "
                f"{fmt(r.get('images_per_cpu_s'), '9.1f')} {fmt(r.get('step_ms'), '9.1f')} "
                f"{fmt(r.get('x_plain'), '8.2f')} {fmt(r.get('x_sequential'), '6.2f')}")
        if device.type == "cuda":
            line += f"  {fmt(r.get('cuda_peak_mib'), '8.0f')}"
        print(line)
    if args.out:
        atomic_write_json(args.out, {**info, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
