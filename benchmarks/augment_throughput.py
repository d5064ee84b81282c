#!/usr/bin/env python
"""Throughput of the batched augmentation pipelines on CIFAR-sized batches (docs/speed.md).

    python benchmarks/augment_throughput.py [--batch 128] [--steps 50] [--threads 1] [--device cpu]
                                            [--data random|cifar] [--out results.json]

Times BatchAugment (uint8 (B, 32, 32, 3) on the device -> normalised float (B, 3, 32, 32)) for
crop/flip (the default), + Cutout 16, + AutoAugment (CIFAR-10 policy) + Cutout 16 (the PaCo /
ProCo CIFAR pipeline), RandAugment n=2 m=10, the SimCLR view (RandomResizedCrop, flip,
ColorJitter p 0.8, grayscale p 0.2; BCL's contrastive views), SimCLR + RandAugment, and two views of AutoAugment + Cutout, each over
`--steps` batches after 5 warm-up batches, one fresh generator per pipeline. Prints images/s
and microseconds per image with the CPU model (longtail.dist.cpu_model()). `--data cifar`
reads the first CIFAR-10 (JPEG) training images (--root) (real histograms); `random`
(default) uses uniform noise, which costs the histogram ops the same.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from longtail.data.augment import BatchAugment
from longtail.dist import cpu_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
PIPELINES = {
    "crop/flip (default)": {},
    "crop/flip + cutout 16": {"cutout": 16},
    "crop/flip + autoaugment + cutout 16": {"policy": "autoaugment", "cutout": 16},
    "crop/flip + randaugment n2 m10": {"policy": "randaugment", "randaugment_n": 2, "randaugment_m": 10},
    "simclr (resized crop, flip, jitter p0.8, gray p0.2)": {"simclr": True},
    "simclr + randaugment n2 m10": {"simclr": True, "policy": "randaugment"},
}


def _images(kind: str, n: int, root: str) -> np.ndarray:
    if kind == "cifar":
        from longtail.config import DataConfig
        from longtail.data import build_data
        data = build_data(DataConfig(source="imagefolder", root=root, profile="none"))
        return data.train.batch(np.arange(n))
    return np.random.RandomState(0).randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", choices=("random", "cifar"), default="random")
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"),
                   help="--data cifar: the CIFAR-10 (JPEG) archive")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pool = torch.from_numpy(_images(args.data, args.batch * 4, args.root)).to(device)
    results = {}
    for name, kw in list(PIPELINES.items()) + [("two views of autoaugment + cutout 16", None)]:
        aug = BatchAugment(mean=MEAN, std=STD, crop_padding=4, flip=True, device=device, channels_last=True,
                           **(kw if kw is not None else {"policy": "autoaugment", "cutout": 16}))
        run = (lambda x, g: aug(x, g)) if kw is not None else (lambda x, g: aug.two_views(x, g))
        gen = torch.Generator().manual_seed(0)
        for step in range(5):
            run(pool[(step % 4) * args.batch:(step % 4 + 1) * args.batch], gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for step in range(args.steps):
            run(pool[(step % 4) * args.batch:(step % 4 + 1) * args.batch], gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        images = args.steps * args.batch
        results[name] = {"images_per_s": images / seconds, "us_per_image": 1e6 * seconds / images}
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; device {device}; threads {args.threads}; "
          f"batch {args.batch}; steps {args.steps}; data {args.data}")
    print(f"| pipeline | images/s | us / image | x crop/flip |")
    print("|---|---:|---:|---:|")
    base = results["crop/flip (default)"]["us_per_image"]
    for name, r in results.items():
        print(f"| {name} | {r['images_per_s']:.0f} | {r['us_per_image']:.1f} | {r['us_per_image'] / base:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_model(), "torch": torch.__version__, "args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
