"""Cost of one MetaSAug training step against one ISDA step (docs/methods.md, "MetaSAug").

ResNet-32 on synthetic 32x32 CIFAR-sized images (10 classes, batch 128, meta batch 100 from a
20-per-class validation split), the loop's forward (TrainForward, bf16 autocast with --bf16):
forward, method step, backward and SGD step, timed in alternating rounds so both methods see the
same machine load; prints the median seconds per step of each and their ratio, with the CPU.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/metasaug_cost.py [--bf16] [--rounds 3 --steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from longtail.config import config_from_dict
from longtail.data.augment import BatchAugment
from longtail.data.build import build_data
from longtail.dist import cpu_model
from longtail.engine.loop import TrainForward
from longtail.methods import build_recipe


def arrays(num_classes: int = 10, per_class: int = 160, seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    test = np.repeat(np.arange(num_classes), 2)
    return {"train_images": rs.randint(0, 256, size=(len(labels), 32, 32, 3)).astype(np.uint8),
            "train_labels": labels,
            "test_images": rs.randint(0, 256, size=(len(test), 32, 32, 3)).astype(np.uint8), "test_labels": test}


def setup(method: dict, data_arrays: dict, bf16: bool):
    cfg = config_from_dict({
        "data": {"source": "arrays", "profile": "none", "val_per_class": 20, "seed": 0},
        "model": {"name": "resnet32"}, "loss": {"name": "ce"}, "method": method,
        "train": {"epochs": 30, "batch_size": 128, "lr": 0.1, "progress": False,
                  "precision": "bf16" if bf16 else "fp32", "augment": {"crop_padding": 4, "flip": True}}})
    data = build_data(cfg.data, arrays=data_arrays)
    torch.manual_seed(0)
    recipe = build_recipe(cfg, data)
    recipe.method.on_epoch_start(25, recipe.loss)
    recipe.model.train()
    forward = TrainForward(recipe.model, autocast_dtype=torch.bfloat16 if bf16 else None)
    optimizer = torch.optim.SGD(recipe.model.parameters(), lr=0.001, momentum=0.9)
    augment = BatchAugment(mean=data.mean, std=data.std, crop_padding=4, flip=True)
    return recipe, forward, optimizer, augment, data


def timed_steps(state, steps: int, generator: torch.Generator) -> list[float]:
    recipe, forward, optimizer, augment, data = state
    out = []
    for _ in range(steps):
        pos = torch.randint(len(data.train), (128,), generator=generator).numpy()
        images = augment(torch.from_numpy(data.train.batch(pos)), generator)
        target = torch.from_numpy(data.train.labels[pos])
        tic = time.perf_counter()
        step = recipe.method.training_step(recipe.model, forward, images, target, recipe.loss, generator)
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        out.append(time.perf_counter() - tic)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    data_arrays = arrays()
    states = {"isda": setup({"name": "isda", "params": {"lambda0": 0.75}}, data_arrays, args.bf16),
              "metasaug": setup({"name": "metasaug", "params": {"lambda0": 0.75, "start_epoch": 0}}, data_arrays,
                                args.bf16)}
    g = torch.Generator().manual_seed(0)
    times = {name: [] for name in states}
    for name, state in states.items():
        timed_steps(state, 1, g)  # warm-up
    for _ in range(args.rounds):
        for name, state in states.items():
            times[name] += timed_steps(state, args.steps, g)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"cpu: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"precision {'bf16' if args.bf16 else 'fp32'}")
    for name, m in med.items():
        print(f"{name}: median {m:.3f} s/step over {len(times[name])} steps")
    print(f"ratio metasaug / isda: {med['metasaug'] / med['isda']:.2f}")


if __name__ == "__main__":
    main()
