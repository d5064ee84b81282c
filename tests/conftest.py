"""Shared fixtures: tiny datasets written in the real formats, and the ../shared location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def benchmark_script(name: str):
    """benchmarks/NAME.py loaded as a module (the benchmark scripts are no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
SHARED = Path(os.environ.get("LONGTAIL_SHARED", REPO.parent / "shared"))
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg.tar.gz"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its prepared stores into a private cache, never ~/.cache."""
    monkeypatch.setenv("LONGTAIL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def needs_shared():
    return pytest.mark.skipif(not CIFAR10_JPEG.is_file(),
                              reason=f"needs ../shared/data/cifar10-jpeg.tar.gz (not found at {CIFAR10_JPEG})")


def tiny_arrays(num_classes: int = 4, per_class: int = 40, test_per_class: int = 6, size: int = 8, seed: int = 0,
                channels: int = 3) -> dict:
    """Class-dependent images (brightness by class), so a tiny model can learn them."""
    rs = np.random.RandomState(seed)

    def make(n):
        labels = np.repeat(np.arange(num_classes), n)
        base = (labels * (200 // max(num_classes - 1, 1)))[:, None, None, None]
        noise = rs.randint(0, 40, size=(len(labels), size, size, channels))
        return np.clip(base + noise, 0, 255).astype(np.uint8), labels

    tr_x, tr_y = make(per_class)
    te_x, te_y = make(test_per_class)
    return {"train_images": tr_x, "train_labels": tr_y, "test_images": te_x, "test_labels": te_y}


def tiny_config(**over) -> dict:
    cfg = {
        "data": {"source": "arrays", "profile": "exp", "imbalance_ratio": 4, "seed": 0},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "loss": {"name": "ce"},
        # precision fp32 on every CPU: train.precision auto (bf16 where the CPU has native bf16) is
        # the default, and a test's numbers must not depend on the machine (tests/test_precision_auto.py covers auto)
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 1, "milestones": [1],
                  "progress": False, "eval_batch_size": 32, "precision": "fp32",
                  "augment": {"crop_padding": 1, "flip": True}},
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def tiny_recipe(**over):
    """(cfg, data, recipe) of `tiny_config(**over)` on `tiny_arrays()`, the recipe built after
    seeding the global RNG with 0 (as `train_run` seeds before building)."""
    from longtail.config import config_from_dict
    from longtail.data.build import build_data
    from longtail.methods import build_recipe

    cfg = config_from_dict(tiny_config(**over))
    data = build_data(cfg.data, arrays=tiny_arrays())
    torch.manual_seed(0)
    return cfg, data, build_recipe(cfg, data)


def last_checkpoints(full: Path, cut: Path) -> tuple[dict, dict]:
    """The last.pt of an uninterrupted run and of its resumed twin (`full_and_resumed`)."""
    from longtail.io import safe_torch_load

    return safe_torch_load(full / "checkpoints" / "last.pt"), safe_torch_load(cut / "checkpoints" / "last.pt")


def split_forward(model):
    """The loop's forward contract for a bare model: images -> (pooled features (B, D), logits (B, C))."""
    def forward(images):
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        return pooled, model.head(pooled)
    return forward


def full_and_resumed(cfg: dict, root: Path, monkeypatch, *, stop_after_epoch: int, arrays: dict,
                     evaluate: bool = True) -> tuple[Path, Path, dict]:
    """Train `cfg` uninterrupted into root/full and, into root/cut, stop right after the
    checkpoint of 0-idx epoch `stop_after_epoch`, then `--resume` it to the end.

    Returns (full run folder, resumed run folder, the interrupted checkpoint).
    """
    from longtail.config import config_from_dict
    from longtail.runs import train_run

    train_run(config_from_dict(cfg), root / "full", arrays=arrays, evaluate=evaluate)
    cut = interrupted_then_resumed(cfg, root / "cut", monkeypatch, stop_after_epoch=stop_after_epoch, arrays=arrays,
                                   evaluate=evaluate)
    return root / "full", root / "cut", cut


def interrupted_then_resumed(cfg: dict, run: Path, monkeypatch, *, stop_after_epoch: int, arrays: dict,
                             evaluate: bool = True) -> dict:
    """Train `cfg` into `run`, stop right after the checkpoint of 0-idx epoch
    `stop_after_epoch`, `--resume` to the end; returns the interrupted checkpoint."""
    from longtail.config import config_from_dict
    from longtail.runs import train_run
    from longtail.io import safe_torch_load
    from longtail.engine.loop import Trainer

    original_save = Trainer.save

    def save_then_stop(self, epoch):
        original_save(self, epoch)
        if epoch == stop_after_epoch:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train_run(config_from_dict(cfg), run, arrays=arrays, evaluate=evaluate)
    cut = safe_torch_load(run / "checkpoints/last.pt")
    train_run(None, run, resume=True, arrays=arrays, evaluate=evaluate)
    return cut


def check_expert_step(**over) -> None:
    """A multi-expert method's step (RIDE, NCL) is its loss of the network's (E, B, C) expert logits
    with the same BatchNorm batch statistics, its accuracy logits the expert mean, and the eval
    forward the expert mean."""
    import torch

    _, _, recipe = tiny_recipe(**over)
    model, loss, method = recipe.model, recipe.loss, recipe.method
    model.train()
    images, target = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(1)
    result = method.training_step(model, split_forward(model), images, target, loss, torch.Generator())
    torch.manual_seed(1)
    logits = model.expert_logits(images)  # same BN batch statistics, train mode
    torch.testing.assert_close(result.loss, loss(logits, target))
    torch.testing.assert_close(result.logits, logits.mean(0))
    model.eval()
    torch.testing.assert_close(model(images), model.expert_logits(images).mean(0))
