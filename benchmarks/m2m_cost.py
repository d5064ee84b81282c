"""Cost of one M2m generating step against one plain CE step (ResNet-32, 32x32, batch 128).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/m2m_cost.py [--precision bf16] [--steps 3]

CIFAR-10-LT ratio-100 class counts (5000 ... 50) on random images; batches drawn class-balanced,
as M2m's over-sampling loader draws them from its start epoch. g is an untrained ResNet-32 here
(the cost does not depend on g's weights). Prints the CPU (`longtail.dist.cpu_model()`), torch
threads, seconds per plain step, per generating step, their ratio and the mean number of
translated seeds per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from longtail.config import config_from_dict
from longtail.data.build import build_data
from longtail.dist import cpu_model
from longtail.engine.loop import TrainForward
from longtail.methods import build_recipe
from longtail.methods.m2m import M2m
from longtail.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    rs = np.random.RandomState(0)
    labels = np.repeat(np.arange(10), 5000)  # the exp profile keeps 5000 ... 50
    arrays = {"train_images": rs.randint(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), "train_labels": labels,
              "test_images": rs.randint(0, 256, (100, 32, 32, 3), dtype=np.uint8),
              "test_labels": np.repeat(np.arange(10), 10)}
    cfg = config_from_dict({
        "data": {"source": "arrays", "profile": "exp", "imbalance_ratio": 100},
        "model": {"name": "resnet32", "head": "linear"},
        "method": {"name": "m2m", "params": {"classifier": "unused", "start_epoch": 0}},
        "train": {"epochs": 2, "batch_size": args.batch, "precision": args.precision, "progress": False}})
    data = build_data(cfg.data, arrays=arrays)
    M2m.load_classifier = lambda self: build_model("resnet32", num_classes=10, in_channels=3,  # noqa: E731
                                                   head="linear", params={}).eval().requires_grad_(False)
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    method, model, loss = recipe.method, recipe.model, recipe.loss
    forward = TrainForward(model, autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.on_epoch_start(0, loss)
    model.train()
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    order = method.build_sampler().indices(0)  # the class-balanced over-sampled order

    def batch(i):
        pos = order[i * args.batch:(i + 1) * args.batch]
        images = torch.from_numpy(data.train.batch(pos)).permute(0, 3, 1, 2).float() / 255
        return (images - mean) / std, torch.from_numpy(data.train.labels[pos])

    def timed(step_fn, n):
        times = []
        for i in range(n + 1):  # the first is a warm-up
            images, target = batch(i)
            tic = time.perf_counter()
            out = step_fn(images, target)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            times.append(time.perf_counter() - tic)
        return float(np.mean(times[1:]))

    plain = timed(lambda im, t: super(M2m, method).training_step(model, forward, im, t, loss, gen), args.steps)
    seeds = []

    def generating(im, t):
        out = method.training_step(model, forward, im, t, loss, gen)
        seeds.append(method.last_stats["slots"])
        return out

    m2m = timed(generating, args.steps)
    print(f"cpu: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.precision}, "
          f"batch {args.batch}, attack_iters {method.attack_iters}")
    print(f"plain CE step: {plain:.3f} s; M2m generating step: {m2m:.3f} s; ratio {m2m / plain:.1f}x; "
          f"seeds translated per step: {np.mean(seeds[1:]):.1f} of {args.batch}")


if __name__ == "__main__":
    main()
