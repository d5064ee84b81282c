#!/usr/bin/env python
"""Training throughput of ResNet-32 on CIFAR-10-LT (ratio 100): a classic pipeline against longtail.

    python benchmarks/throughput.py [--data cifar|random] [--epochs N | --steps N] [--threads T]
                                    [--device cpu|cuda] [--pipelines classic,default,fastest | all]
                                    [--quick] [--out results.json]
    python benchmarks/throughput.py --costs RUN_DIR [--out costs.json]

Pipelines (docs/speed.md), each timed over whole training epochs (loading, augmentation,
forward, backward, optimiser step) after untimed warm-up epochs, each in its own forked
process so that peak memory is per pipeline:

  classic   the style of the official LDAM-DRW code (`cifar_train.py`): a Dataset whose
            __getitem__ pads by 4, crops and flips one image at a time (torch ops, no PIL),
            a DataLoader with 2 workers (shuffle, pin_memory on CUDA), eager fp32 NCHW
            ResNet-32, SGD with momentum 0.9, loss.item() and top-1/top-5 every step.
  default   longtail's `Trainer.train_epoch` at the default config (batched augmentation on
            the training device, channels_last).
  fastest   the same with the fastest options (--fastest; default per device below).
  nchw, bf16, auto, compile, nondet, lazyloss   single-option variants of `default` (with --pipelines
            all); lazyloss reads the loss every 50 steps (train.loss_check_every), not every step.
  graph     `default` with train.cuda_graph=true (CUDA only); graph_lazy adds lazyloss and nondet.
  ddp2      `default` in 2 data-parallel processes (gloo), one thread each (CPU only).

Reported per pipeline: images/s (wall), images per CPU-second (process + DataLoader
workers, robust to other load on the machine), the ratio to `classic`, peak RSS of the
training process and of the largest DataLoader worker, CUDA peak memory, and the achieved
GFLOP/s: FLOPs per image of forward + backward counted by torch.utils.flop_counter (matmul
and convolution only), times images/s, against the measured peak of a large matmul and of a
large 3x3 convolution at the pipeline's precision and thread count.

With --costs RUN_DIR it times instead the feature-level extras on a finished run (SWRM's
similarity modelling, DLSA, report generation) as shares of that run's training time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longtail.config import apply_overrides, config_from_dict
from longtail.data.build import LTData, build_data
from longtail.data.profiles import class_counts as profile_counts
from longtail.errors import LongtailError
from longtail.models import build_model
from longtail.io import atomic_write_json
from longtail.dist import cpu_bf16_features, cpu_model, resolve_device, resolve_precision
from longtail.rundir import RunDir
from longtail.engine.loop import Trainer
from longtail.optim.schedule import learning_rate

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = Path(os.environ.get("LONGTAIL_SHARED", REPO.parent / "shared")) / "data" / "cifar10-jpeg.tar.gz"
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]  # LDAM-DRW's normalisation

# Options of the `fastest` pipeline per device. CPU: torch.compile and train.precision auto, which
# is bf16 on a CPU with native bf16 (2.09x classic on the AMX Xeon) and fp32 where bf16 is emulated
# and ten times slower (the AVX2 EPYC). CUDA: cuDNN autotuning (train.deterministic=false), the
# fastest measured on an H200; compile and bf16 were slower there for this small, launch-bound
# model (docs/speed.md, "On a GPU").
FASTEST = {
    "cpu": ["train.compile=true", "train.precision=auto"],
    "cuda": ["train.deterministic=false"],
}
VARIANTS = {
    "nchw": ["train.channels_last=false"],
    "fp32": ["train.precision=fp32"],  # the default before train.precision auto (what earlier figures ran)
    "bf16": ["train.precision=bf16"],
    "auto": ["train.precision=auto"],  # the default since the precision study
    "compile": ["train.compile=true"],
    "nondet": ["train.deterministic=false"],
    "lazyloss": ["train.loss_check_every=50"],
    "graph": ["train.cuda_graph=true"],
    "graph_lazy": ["train.cuda_graph=true", "train.loss_check_every=50", "train.deterministic=false"],
}
CUDA_ONLY = ("graph", "graph_lazy")  # train.cuda_graph (engine/graphs.py)
# Data-parallel variants, CPU only: the default pipeline in W processes joined by a gloo
# process group (as `torchrun --nproc_per_node W` would), one torch thread each; each process
# takes batch / W of every global batch (docs/distributed.md). BatchNorm then normalises each
# half batch on its own, so the numbers of a run change.
DDP = {"ddp2": 2}
CORE = ("classic", "default", "fastest")


# ----------------------------------------------------------------------------- data


def load_data(args) -> LTData:
    """CIFAR-10-LT (JPEG) ratio 100 as in docs/benchmark_budget.md, or random images with the same counts."""
    if args.data == "cifar":
        cfg = config_from_dict({"data": data_section(args)}).data
        return build_data(cfg)
    counts = profile_counts("exp", 10, 64 if args.quick else 5000, 10 if args.quick else 100)
    counts = np.maximum(np.asarray(counts), 1)
    if not args.quick:
        counts[0] -= 20  # the budget's 20 validation images come out of the head class: 12,386 images
    rs = np.random.RandomState(0)
    labels = rs.permutation(np.repeat(np.arange(10), counts))
    arrays = {"train_images": rs.randint(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8),
              "train_labels": labels,
              "test_images": np.zeros((10, 32, 32, 3), np.uint8), "test_labels": np.arange(10)}
    data = build_data(config_from_dict({"data": data_section(args)}).data, arrays=arrays)
    data.description = f"random uint8 32x32 images, CIFAR-10-LT counts ({counts.max()} ... {counts.min()})"
    return data


def data_section(args) -> dict:
    if args.data == "cifar":
        return {"source": "imagefolder", "root": str(CIFAR10_JPEG), "profile": "exp", "imbalance_ratio": 100,
                "val_per_class": 20, "seed": 0, "mean": MEAN, "std": STD}
    return {"source": "arrays", "profile": "none", "mean": MEAN, "std": STD}


# ----------------------------------------------------------------------------- classic pipeline


class ClassicDataset(torch.utils.data.Dataset):
    """One image at a time, as torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip,
    ToTensor, Normalize in LDAM-DRW's `cifar_train.py`, written with torch ops (no PIL)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, mean, std, padding: int = 4):
        self.images, self.labels, self.padding = images, labels, padding
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # uint8 (C, H, W)
        _, h, w = img.shape
        p = self.padding
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = F.pad(img, (p, p, p, p))[:, top:top + h, left:left + w]
        if torch.rand(()) < 0.5:
            img = img.flip(2)
        return (img.float().div(255.0) - self.mean) / self.std, int(self.labels[i])


class ClassicRunner:
    def __init__(self, data: LTData, args, device: torch.device):
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as cifar_train.py
        split = data.train
        dataset = ClassicDataset(split.batch(np.arange(len(split))), split.labels, mean=data.mean, std=data.std)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                                  num_workers=args.workers, pin_memory=device.type == "cuda")
        self.model = build_model("resnet32", num_classes=data.num_classes).to(device)
        self.criterion = torch.nn.CrossEntropyLoss().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.device = device

    def epoch(self, epoch: int, max_steps: int | None) -> int:
        """One (possibly truncated) epoch; returns the number of images trained on."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(epoch, base_lr=0.1, epochs=200, warmup_epochs=5, milestones=[160, 180])
        self.model.train()
        seen, loss_sum, top1_sum, top5_sum = 0, 0.0, 0.0, 0.0
        it = iter(self.loader)
        for step, (images, target) in enumerate(it):
            images = images.to(self.device, non_blocking=True)
            target = target.to(self.device, non_blocking=True)
            output = self.model(images)
            loss = self.criterion(output, target)
            top5 = output.topk(5, 1).indices == target[:, None]  # accuracy(output, target, topk=(1, 5))
            top1_sum += float(top5[:, 0].float().sum())
            top5_sum += float(top5.any(1).float().sum())
            loss_sum += loss.item() * len(target)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            seen += len(target)
            if max_steps is not None and step + 1 >= max_steps:
                break
        del it  # shuts the workers down (and joins them) before the clock stops
        if not math.isfinite(loss_sum):
            raise LongtailError(f"classic pipeline: non-finite loss in epoch {epoch}")
        return seen


# ----------------------------------------------------------------------------- longtail pipelines


class _Truncated:
    """A sampler limited to the first `n` positions of each epoch's order (--steps)."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n

    def indices(self, epoch: int) -> np.ndarray:
        return self.inner.indices(epoch)[: self.n]

    def __len__(self) -> int:
        return min(self.n, len(self.inner))


class _NoBar:
    def set_description(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass


class LongtailRunner:
    def __init__(self, data: LTData, args, device: torch.device, overrides: list[str]):
        values = {
            "data": data_section(args),
            "model": {"name": "resnet32"},
            "loss": {"name": "ce"},
            "train": {"batch_size": args.batch_size, "device": str(device), "progress": False,
                      "num_threads": args.threads},
        }
        self.cfg = config_from_dict(apply_overrides(values, overrides))
        self.tmp = tempfile.TemporaryDirectory(prefix="longtail-throughput-")
        self.trainer = Trainer(self.cfg, data, self.tmp.name)
        self.full_sampler = self.trainer.sampler

    def epoch(self, epoch: int, max_steps: int | None) -> int:
        t = self.trainer
        t.sampler = self.full_sampler if max_steps is None else _Truncated(self.full_sampler,
                                                                            max_steps * self.cfg.train.batch_size)
        t.train_epoch(epoch, _NoBar())
        return len(t.sampler.indices(epoch))


# ----------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure_pipeline(name: str, overrides: list[str] | None, args) -> dict:
    """Warm up, then time whole epochs (or --steps steps) of one pipeline; runs in a forked child."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = load_data(args)
    runner = ClassicRunner(data, args, device) if overrides is None else LongtailRunner(data, args, device, overrides)
    steps = args.steps
    tic = time.perf_counter()
    for e in range(args.warmup):
        runner.epoch(e, args.warmup_steps if steps else None)
    _sync(device)
    warmup_s = time.perf_counter() - tic
    images, cpu0, tic = 0, _cpu_seconds(), time.perf_counter()
    for e in range(args.warmup, args.warmup + args.epochs):
        images += runner.epoch(e, steps)
    _sync(device)
    seconds, cpu = time.perf_counter() - tic, _cpu_seconds() - cpu0
    out = {
        "pipeline": name, "overrides": overrides, "images": images, "seconds": seconds,
        "images_per_s": images / seconds, "cpu_seconds": cpu, "images_per_cpu_s": images / cpu if cpu > 0 else None,
        "warmup_seconds": warmup_s, "threads": torch.get_num_threads(),
        # the precision the pipeline ran at (train.precision 'auto' resolved here), whose peak it is compared with
        "precision": "fp32" if overrides is None else resolve_precision(runner.cfg.train.precision, device),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                                if overrides is None and args.workers else None),
        "train_images": len(data.train), "data_description": data.description,
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return best


def measure_peaks(args, precisions: list[str]) -> dict:
    """FLOPs per image of ResNet-32 (forward + backward) and the machine's matmul / 3x3-conv peaks."""
    from torch.utils.flop_counter import FlopCounterMode

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = build_model("resnet32", num_classes=10)
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), target).backward()
    out = {"flops_per_image": counter.get_total_flops() / 2, "threads": torch.get_num_threads(), "peaks": {}}
    n = 512 if args.quick else 2048
    b, c, s = (4, 32, 16) if args.quick else (32, 128, 32)
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, w = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        mm = 2 * n**3 / _best_seconds(lambda: a @ w, device, 3 if args.quick else 5)
        x = torch.randn(b, c, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        k = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = 2 * b * c * c * 9 * s * s / _best_seconds(lambda: F.conv2d(x, k, padding=1), device,
                                                         3 if args.quick else 5)
        out["peaks"][precision] = {
            "matmul_gflops": mm / 1e9, "conv3x3_gflops": conv / 1e9,
            "matmul_shape": [n, n, n], "conv_shape": {"batch": b, "channels": c, "size": s, "channels_last": True},
        }
    return out


def in_child(fn, *fn_args) -> dict:
    """Run fn(*fn_args) in a forked process (own peak RSS); returns its dict or {'error': ...}."""
    return _forked(1, lambda rank: fn(*fn_args))


def in_ddp_children(world: int, fn, *fn_args) -> dict:
    """Run fn(*fn_args) in `world` forked processes joined by a gloo process group, as torchrun
    would start them (RANK, WORLD_SIZE, MASTER_ADDR / PORT); returns rank 0's dict (its peak RSS
    is rank 0's) or the first error."""
    import socket

    import torch.distributed as dist

    from longtail import dist as distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def run(rank):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        distributed.init("cpu")
        result = {**fn(*fn_args), "processes": world}
        distributed.barrier()  # tear down together, as longtail.runs.train_run does
        dist.destroy_process_group()
        return result

    return _forked(world, run)


def _forked(world: int, run) -> dict:
    """run(rank) in `world` forked processes; returns rank 0's dict, or the first error as
    {'error': ..., 'traceback': ...}."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target(rank):
        try:
            result = run(rank)
            if rank == 0:
                send.send(result)
        except BaseException as err:  # noqa: BLE001  (reported by the parent)
            where = f"rank {rank}: " if world > 1 else ""
            send.send({"error": f"{where}{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                       "traceback": traceback.format_exc()})

    procs = [ctx.Process(target=target, args=(rank,)) for rank in range(world)]
    for proc in procs:
        proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = {"error": "the measuring process died without a result"}
    for proc in procs:
        proc.join(timeout=60 if world > 1 else None)
        if proc.is_alive():  # a rank left waiting in a collective after another one failed
            proc.terminate()
            proc.join()
    if world == 1 and procs[0].exitcode not in (0, None) and "error" not in result:
        result["error"] = f"the measuring process exited with code {procs[0].exitcode}"
    return result


# ----------------------------------------------------------------------------- costs of the extras


def measure_costs(run_dir: Path, out: Path) -> dict:
    """Wall time of the feature-level tools on a finished run, as shares of its training time.

    Training time: the sum of the epochs' `seconds` in RUN_DIR/metrics.jsonl (training epochs
    only, without validation and evaluation). Each tool runs as its own `python -m longtail`
    process (start-up included, measured alone as `startup`). `features` extracts the frozen
    features into RUN_DIR/features/ (--refresh: from scratch); `similarity` (SWRM's category
    similarity modelling: prototypes, 1-D t-SNE, windows, weights, margins) and `dlsa` (flow
    filters and classifiers) then read that cache; `report` renders the run's HTML report.
    """
    import subprocess

    rows = RunDir(run_dir).read_metrics()
    train_s = sum(float(r.get("seconds", 0.0)) for r in rows)
    if not rows or train_s <= 0:
        raise LongtailError(f"{run_dir}/{RunDir.METRICS} has no timed training epochs")
    steps = {
        "startup": ["--help"],
        "features": ["features", str(run_dir), "--refresh"],
        "similarity": ["similarity", str(run_dir), "--out", str(out / "similarity")],
        "dlsa": ["dlsa", str(run_dir), "--out", str(out / "dlsa")],
        "report": ["report", str(run_dir), "--out", str(out / "report.html")],
    }
    result = {"run_dir": str(run_dir), "train_seconds": train_s, "epochs": len(rows), "steps": {}}
    for name, argv in steps.items():
        print(f"timing longtail {' '.join(argv)} ...", end=" ", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "longtail", *argv], capture_output=True, text=True)
        seconds = time.perf_counter() - tic
        print(f"{seconds:.1f} s", file=sys.stderr, flush=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise LongtailError(f"'longtail {' '.join(argv)}' failed (exit {proc.returncode}): {tail}")
        result["steps"][name] = {"seconds": seconds, "command": "longtail " + " ".join(argv)}
    st = result["steps"]
    totals = {
        "swrm_similarity_modelling": st["features"]["seconds"] + st["similarity"]["seconds"] - st["startup"]["seconds"],
        "dlsa": st["features"]["seconds"] + st["dlsa"]["seconds"] - st["startup"]["seconds"],
        "report": st["report"]["seconds"],
    }
    result["shares"] = {k: {"seconds": v, "share_of_training": v / train_s} for k, v in totals.items()}
    return result


def render_costs(costs: dict) -> str:
    lines = [f"run: {costs['run_dir']}, {costs['epochs']} epochs, {costs['train_seconds']:.0f} s of training "
             "(sum of the epochs' seconds in metrics.jsonl)", ""]
    for name, step in costs["steps"].items():
        lines.append(f"  {step['seconds']:8.1f} s  {step['command']}")
    lines.append("")
    labels = {"swrm_similarity_modelling": "SWRM similarity modelling (features + similarity, one start-up)",
              "dlsa": "DLSA (features + flows + classifiers, one start-up)", "report": "report generation"}
    for key, v in costs["shares"].items():
        lines.append(f"{labels[key]}: {v['seconds']:.1f} s = {100 * v['share_of_training']:.2f} % of the training run")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "usable_cores": cores, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_bf16_features()}


def summarise(results: dict) -> None:
    """Ratios to classic and achieved GFLOP/s against the peaks, added in place."""
    rows, peaks = results["pipelines"], results.get("peaks", {})
    base = rows.get("classic", {}).get("images_per_s")
    base_cpu = rows.get("classic", {}).get("images_per_cpu_s")
    for row in rows.values():
        if "error" in row:
            continue
        if base:
            row["ratio_to_classic"] = row["images_per_s"] / base
        if base_cpu and row.get("images_per_cpu_s"):
            row["cpu_ratio_to_classic"] = row["images_per_cpu_s"] / base_cpu
        fpi = peaks.get("flops_per_image")
        if fpi:
            row["achieved_gflops"] = fpi * row["images_per_s"] / 1e9
            p = peaks.get("peaks", {}).get(row["precision"])
            if p:
                row["fraction_of_matmul_peak"] = row["achieved_gflops"] / p["matmul_gflops"]
                row["fraction_of_conv_peak"] = row["achieved_gflops"] / p["conv3x3_gflops"]
    for key, name in (("default", "b/a"), ("fastest", "c/a")):
        if "ratio_to_classic" in rows.get(key, {}):
            results[f"ratio_{name.replace('/', '_over_')}"] = rows[key]["ratio_to_classic"]


def render(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} ({m['cpu_capability']}), "
        f"native bf16: {', '.join(m.get('cpu_native_bf16') or []) or 'none'}, "
        f"device {s['device']}{' (' + results['device_name'] + ')' if results.get('device_name') else ''}",
        f"data: {s['data_description']}, {s['train_images']} training images, batch {s['batch_size']}, "
        + (f"{s['epochs']} timed epoch(s) of {s['steps']} steps after {s['warmup']} warm-up epoch(s) of "
           f"{s['warmup_steps']} steps" if s["steps"] else
           f"{s['epochs']} timed epoch(s) after {s['warmup']} warm-up epoch(s)")
        + f", torch threads {results.get('threads', '?')}",
        "",
        f"{'pipeline':<9} {'img/s':>8} {'x classic':>9} {'img/CPU-s':>9} {'x classic':>9} {'GFLOP/s':>8} "
        f"{'%mm peak':>8} {'%conv pk':>8} {'RSS MiB':>8} {'worker':>7} {'warm-up s':>9}  options",
    ]
    for name, row in results["pipelines"].items():
        if "error" in row:
            lines.append(f"{name:<9} failed: {row['error']}")
            continue

        def f(key, fmt, scale=1.0):
            v = row.get(key)
            return format(v * scale, fmt) if v is not None else "-"

        cuda = f"  cuda peak {row['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in row else ""
        opts = "classic" if row["overrides"] is None else (" ".join(row["overrides"]) or "defaults")
        if row.get("processes"):
            opts += f" in {row['processes']} data-parallel processes"
        lines.append(
            f"{name:<9} {f('images_per_s', '8.1f')} {f('ratio_to_classic', '9.2f')} {f('images_per_cpu_s', '9.1f')} "
            f"{f('cpu_ratio_to_classic', '9.2f')} {f('achieved_gflops', '8.1f')} "
            f"{f('fraction_of_matmul_peak', '8.1f', 100)} {f('fraction_of_conv_peak', '8.1f', 100)} "
            f"{f('peak_rss_mib', '8.0f')} {f('worker_peak_rss_mib', '7.0f')} {f('warmup_seconds', '9.1f')}  "
            f"{opts}{cuda}")
    lines.append("")
    for key, label in (("ratio_b_over_a", "b/a (default / classic)"), ("ratio_c_over_a", "c/a (fastest / classic)")):
        if key in results:
            lines.append(f"{label}: {results[key]:.2f}")
    p = results.get("peaks", {})
    if "error" in p:
        lines.append(f"peaks: failed: {p['error']}")
    elif p:
        lines.append(f"FLOPs per image, forward + backward (matmul and convolution, torch.utils.flop_counter): "
                     f"{p['flops_per_image'] / 1e9:.3f} GFLOP")
        for precision, v in p["peaks"].items():
            c = v["conv_shape"]
            lines.append(f"measured peak {precision} ({p['threads']} threads): matmul {v['matmul_gflops']:.1f} GFLOP/s "
                         f"({'x'.join(map(str, v['matmul_shape']))}), 3x3 conv {v['conv3x3_gflops']:.1f} GFLOP/s "
                         f"(batch {c['batch']}, {c['channels']}->{c['channels']} ch, {c['size']}x{c['size']})")
    lines.append("peak RSS: the training process (it includes ~the imported libraries); worker: the largest "
                 "DataLoader worker (shares the dataset with the parent)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("cifar", "random"), default="cifar",
                   help="cifar: CIFAR-10-LT (JPEG) ratio 100 from ../shared (prepared store cached); "
                        "random: random images with the same class counts")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up epochs first (default 1; "
                   "covers torch.compile of both batch shapes)")
    p.add_argument("--steps", type=int, default=None,
                   help="time this many steps per epoch instead of whole epochs (warm-up: --warmup-steps)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the classic pipeline")
    p.add_argument("--pipelines", default=",".join(CORE),
                   help=f"comma-separated, from {', '.join([*CORE, *VARIANTS, *DDP])}, or 'all'")
    p.add_argument("--fastest", default=None,
                   help="space-separated config overrides of the fastest pipeline "
                        f"(default cpu: '{' '.join(FASTEST['cpu'])}'; cuda: '{' '.join(FASTEST['cuda'])}')")
    p.add_argument("--no-peaks", action="store_true", help="skip the FLOP count and the matmul / conv peaks")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small random data (with --data random), batch 16, 2 timed steps after 1, small peaks")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--costs", metavar="RUN_DIR", default=None,
                   help="instead of the pipelines: time `longtail features / similarity / dlsa / report` on this "
                        "finished run as shares of its training time (writes RUN_DIR/features/)")
    p.add_argument("--costs-out", default=None, help="folder for the tools' outputs (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size = min(args.batch_size, 16)
        args.steps = args.steps or 2
        args.warmup_steps = 1
        args.epochs = 1
    known = [*CORE, *VARIANTS, *DDP]
    cpu = args.device == "cpu"
    names = ([n for n in known if (n not in CUDA_ONLY if cpu else n not in DDP)] if args.pipelines == "all"
             else [n.strip() for n in args.pipelines.split(",") if n.strip()])
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        p.error(f"unknown pipeline(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    if not cpu and any(n in DDP for n in names):
        p.error(f"{', '.join(n for n in names if n in DDP)} runs on the CPU only (--device cpu)")
    if cpu and any(n in CUDA_ONLY for n in names):
        p.error(f"{', '.join(n for n in names if n in CUDA_ONLY)} needs CUDA (--device cuda)")
    for key in ("epochs", "batch_size", "warmup_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.workers < 0 or (args.steps is not None and args.steps < 1) or (args.threads or 1) < 1:
        p.error("--warmup and --workers must be >= 0, --steps and --threads >= 1")
    if args.steps and not args.warmup:
        args.warmup = 1
    args.names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.costs:
        return costs_main(args)
    # Imported once here, before the measuring processes are forked (only imports: no torch
    # thread pool or CUDA context exists in this process, so forking is safe). The Trainer's
    # torch.use_deterministic_algorithms imports torch._inductor, several seconds each time.
    import torch._inductor.config  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    if args.data == "cifar" and not CIFAR10_JPEG.is_file():
        print(f"skipped: {CIFAR10_JPEG} not found (../shared is absent); run with --data random instead")
        return 0
    if args.device != "cpu":  # checked in a child: this process must not initialise CUDA before forking
        check = in_child(lambda: {"device": str(resolve_device(args.device))})
        if "error" in check:
            print(f"throughput: error: {check['error'].split(': ', 1)[-1]}", file=sys.stderr)
            return 2
    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    fastest = args.fastest.split() if args.fastest is not None else FASTEST[device_kind]
    plans = {"classic": None, "default": [], "fastest": fastest, **VARIANTS}
    results = {
        "machine": machine(),
        "settings": {"data": args.data, "data_description": None, "device": args.device,
                     "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
                     "warmup": args.warmup, "warmup_steps": args.warmup_steps if args.steps else None,
                     "threads": args.threads, "workers": args.workers, "quick": args.quick,
                     "train_images": None, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
        "baseline_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pipelines": {},
    }
    for name in args.names:
        print(f"measuring {name} ...", end=" ", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        if name in DDP:
            row = in_ddp_children(DDP[name], measure_pipeline, name, ["train.num_threads=1"], args)
        else:
            row = in_child(measure_pipeline, name, plans[name], args)
        print(f"{time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
        if "error" in row:
            print(f"{name} failed: {row['error']}\n{row.get('traceback', '')}", file=sys.stderr)
        else:
            results["settings"]["train_images"] = row["train_images"]
            results["settings"]["data_description"] = row["data_description"]
            if name not in DDP:
                results["threads"] = row["threads"]
            if row.get("device_name"):
                results["device_name"] = row["device_name"]
        results["pipelines"][name] = row
    if not args.no_peaks:
        precisions = sorted({r["precision"] for r in results["pipelines"].values() if "precision" in r} or {"fp32"})
        print("measuring FLOPs and peaks ...", end=" ", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        results["peaks"] = in_child(measure_peaks, args, precisions)
        print(f"{time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    summarise(results)
    print(render(results))
    if args.out:
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results["pipelines"].values()) else 0


def costs_main(args) -> int:
    run_dir = Path(args.costs)
    if not RunDir(run_dir).has(RunDir.METRICS):
        print(f"throughput: error: {run_dir} is not a trained run folder (no {RunDir.METRICS})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="longtail-costs-") as tmp:
        out = Path(args.costs_out) if args.costs_out else Path(tmp)
        try:
            costs = measure_costs(run_dir, out)
        except LongtailError as err:
            print(f"throughput: error: {err}", file=sys.stderr)
            return 2
    costs["machine"] = machine()
    print(render_costs(costs))
    if args.out:
        atomic_write_json(args.out, costs)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
