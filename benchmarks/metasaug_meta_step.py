"""How much MetaSAug's meta step changes a real step, in fp32 and in bf16 (docs/methods.md, "MetaSAug").

On a finished MetaSAug run (its config.yaml, data and checkpoints/last.pt: weights and the ISDA
covariance estimate), for a few training batches of its last epoch: the covariance Sigma, the
meta-stepped Sigma_hat (methods/metasaug.py, meta_covariance_step), and the gradient of the final
loss L_train(theta, Sigma) over all trainable parameters, once with Sigma and once with Sigma_hat.
Printed per precision: max |Sigma_hat - Sigma| against max |Sigma|, the relative change of the
gradient ||g(Sigma_hat) - g(Sigma)|| / ||g(Sigma)||, and whether the two gradients are bitwise
equal (the meta step then changes nothing in that step).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/metasaug_meta_step.py RUN_DIR [--batches 2] [--epoch E]

Nothing is written; the run folder is read only.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch

from longtail.data.build import build_data
from longtail.dist import cpu_model
from longtail.engine.loop import TrainForward
from longtail.io import safe_torch_load
from longtail.methods import build_recipe
from longtail.methods.base import loop_augment
from longtail.methods.isda import isda_logits
from longtail.methods.metasaug import meta_covariance_step
from longtail.rundir import RunDir


def flat_grad(model: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def measure(run: RunDir, *, batches: int, dtype: torch.dtype | None, epoch: int | None = None) -> list[dict]:
    cfg = run.read_config()
    data = build_data(cfg.data, progress=False)
    torch.manual_seed(cfg.train.seed)
    recipe = build_recipe(cfg, data)
    model, method, loss = recipe.model, recipe.method, recipe.loss
    ckpt = safe_torch_load(run.last)
    model.load_state_dict(ckpt["model"])
    method.load_state_dict(ckpt["method"])
    if epoch is None:
        epoch = int(ckpt["epoch"]) - 1  # the last trained epoch (0-idx): its lam, inner LR and DRW weights
    method.on_epoch_start(epoch, loss)
    model.train()
    forward = TrainForward(model, autocast_dtype=dtype)
    augment = loop_augment(cfg, data, torch.device("cpu"))
    rows = []
    for b in range(batches):
        g = torch.Generator().manual_seed(1000 + b)
        pos = torch.randint(len(data.train), (cfg.train.batch_size,), generator=g).numpy()
        images = augment(torch.from_numpy(data.train.batch(pos)), g)
        target = torch.from_numpy(np.asarray(data.train.labels)[pos])
        method._epoch, method._step = epoch, b + 1  # the meta batch's stream position
        features, _ = forward(images)
        cov = method.covariance.current(len(data.class_counts), features.shape[1], features.device).to(features.dtype)
        meta_images, meta_target = method.meta_batch(images.device)
        cov_hat, _ = meta_covariance_step(model, images, target, meta_images, meta_target, cov, loss=loss,
                                          lam=method.lam, inner_lr=method._inner_lr_now, meta_lr=method.meta_lr,
                                          autocast_dtype=dtype)
        grads = []
        for sigma in (cov, cov_hat):
            _, logits = forward(images)
            value = loss(isda_logits(logits, model.head.weight, target, sigma.to(logits.dtype), method.lam), target)
            grads.append(flat_grad(model, value))
        rows.append({"sigma_max": cov.abs().max().item(), "delta_max": (cov_hat - cov).abs().max().item(),
                     "grad_rel": ((grads[1] - grads[0]).norm() / grads[0].norm()).item(),
                     "bitwise_equal": bool(torch.equal(grads[0], grads[1])), "epoch": epoch,
                     "inner_lr": method._inner_lr_now, "lam": method.lam})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished MetaSAug run folder")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--epoch", type=int, default=None,
                   help="0-idx epoch whose lam, inner LR (the run's LR then) and DRW weights the step uses; "
                        "default: the last trained one (the weights are always the last checkpoint's)")
    args = p.parse_args(argv)
    run = RunDir(args.run)
    if run.read_config().method.name != "metasaug":
        print(f"metasaug_meta_step: error: {args.run} is not a MetaSAug run", file=sys.stderr)
        return 2
    print(f"cpu: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; run {args.run}; "
          f"epoch {'last' if args.epoch is None else args.epoch}")
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        rows = measure(run, batches=args.batches, dtype=dtype, epoch=args.epoch)
        for i, r in enumerate(rows):
            print(f"{name} batch {i}: max |Sigma| {r['sigma_max']:.3e}, max |Sigma_hat - Sigma| {r['delta_max']:.3e}, "
                  f"||g(Sigma_hat) - g(Sigma)|| / ||g(Sigma)|| {r['grad_rel']:.3e}, bitwise equal: {r['bitwise_equal']}")
        print(f"{name}: epoch {rows[0]['epoch']} (inner LR {rows[0]['inner_lr']:g}, lam {rows[0]['lam']:g}): "
              f"median relative gradient change {statistics.median(r['grad_rel'] for r in rows):.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
