#!/usr/bin/env python
"""Does `train.cuda_graph` train every method exactly as the eager loop does? (issue 21)

    PYTHONPATH=src python benchmarks/cuda_graph_check.py [--device cuda | --standin] [--configs A.yaml ...]
                                                         [--steps 4] [--batch 16] [--json OUT]

For every config (default: configs/cifar10_lt/*.yaml but base.yaml) two trainers are built from the
same seed on benchmarks/method_costs.py's stand-in data (CIFAR-10-LT's class counts, random uint8
images; the stand-in runs host_sync_audit.py uses for the runs a config names): one eager, one whose
training forward is `engine.graphs.GraphedForward`. Both run `--steps` steps of the config's last
epoch (method_costs.active_epoch, every "from epoch E" switch on), each as the loop runs one
(host_sync_audit.loop_step, with the graph's `begin_step`), from the same batches and generators;
then their parameters and buffers are compared: bitwise equal, or the largest absolute difference.
Also per config: how many passes per step were replayed and how many ran eager (a method whose
passes all run eager gains nothing from the graphs: two views concatenated, a pass under no_grad).

--device cuda (default when CUDA is available) uses torch.cuda.make_graphed_callables, with
`train.deterministic=true` in both trainers. --standin runs on the CPU with `StandInGraph`, which
replays eagerly but keeps the real function's contract (static output buffers overwritten by each
replay, an error for a replay before the previous replay's backward or for another input shape,
warm-up passes that move BatchNorm statistics): the test suite runs it over every config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longtail.config import config_from_dict
from longtail.dist import cpu_model
from longtail.engine.graphs import GraphedForward
from longtail.engine.loop import Trainer
from longtail.runs import build_run_recipe

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MC = _load("method_costs")
HS = _load("host_sync_audit")


class StandInGraph(torch.nn.Module):
    """What torch.cuda.make_graphed_callables(module, (sample,)) returns, replayed eagerly on the CPU.

    It keeps the contract a caller must respect and fails loudly where the real graphs would
    silently compute something else: warm-up passes on the sample (forward and autograd.grad,
    moving BatchNorm statistics as the real warm-up does); outputs and parameter gradients that are
    static buffers, overwritten by every replay (so a gradient that autograd keeps without a copy
    is overwritten too, as with the real graphs); a backward that cannot be differentiated again
    (once_differentiable); an AssertionError for a replay before the previous
    replay's backward (the real replay would overwrite the saved activations) and for an input of
    another shape (the real one copies it into the static input).
    """

    def __init__(self, module: torch.nn.Module, sample: torch.Tensor, warmup_iters: int):
        super().__init__()
        self.module, self.static_input = module, sample
        trainable = tuple(p for p in module.parameters() if p.requires_grad)
        for _ in range(warmup_iters):
            outs = [o for o in module(sample) if o.requires_grad]
            if outs:
                torch.autograd.grad(outs, trainable, [torch.ones_like(o) for o in outs], allow_unused=True)
        with torch.no_grad():
            self.static_outputs = tuple(torch.zeros_like(o) for o in module(sample))
        self.pending = False
        self.static_grads: dict[int, torch.Tensor] = {}
        self.replay = self._replay_function()

    def _replay_function(self):
        graph = self

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, images, *params):
                if graph.pending:
                    raise AssertionError("replayed before the previous replay's backward")
                if images.shape != graph.static_input.shape:
                    raise AssertionError(f"replayed with shape {tuple(images.shape)}, captured "
                                         f"{tuple(graph.static_input.shape)}")
                graph.static_input.copy_(images)
                with torch.enable_grad():
                    ctx.outs = graph.module(graph.static_input)
                ctx.params = params
                for static, out in zip(graph.static_outputs, ctx.outs):
                    static.copy_(out.detach())
                graph.pending = True
                return tuple(o.detach() for o in graph.static_outputs)

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, *grads):
                graph.pending = False
                wanted = [p for p in ctx.params if p.requires_grad]
                live = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad]
                got = torch.autograd.grad([o for o, _ in live], wanted, [g for _, g in live], allow_unused=True,
                                          retain_graph=True)  # the real backward graph can be replayed again
                out = []
                for p, g in zip(wanted, got):  # static gradient buffers, returned detached, as the real graph's
                    if g is None:
                        out.append(None)
                        continue
                    static = graph.static_grads.setdefault(id(p), torch.empty_like(g))
                    static.copy_(g)
                    out.append(static.detach())
                by_id = {id(p): g for p, g in zip(wanted, out)}
                return (None, *(by_id.get(id(p)) for p in ctx.params))

        return Replay

    def forward(self, images):
        return self.replay.apply(images, *self.module.parameters())


def standin(module: torch.nn.Module, sample: torch.Tensor, warmup_iters: int) -> StandInGraph:
    """The `capture` of GraphedForward for CPU checks."""
    return StandInGraph(module, sample, warmup_iters)


def _recipe(cfg, data):
    torch.manual_seed(0)
    return build_run_recipe(cfg, data)


def compare(config: Path, runs, *, device: str, standin_capture: bool, steps: int = 4, batch: int = 16) -> dict:
    """One config's row: eager against graphed after `steps` steps of its active epoch."""
    values = runs.resolved(config, (config.stem,))
    t = values.setdefault("train", {})
    t.update(device=device, compile=False, progress=False, tensorboard=False, batch_size=batch, deterministic=True)
    eager_cfg = config_from_dict(values)
    t["cuda_graph"] = not standin_capture
    graph_cfg = config_from_dict(values)
    data = MC.stand_in(eager_cfg.data)
    row = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
           "method": eager_cfg.method.name, "loss": eager_cfg.loss.name}
    recipe = _recipe(eager_cfg, data)
    if not recipe.method.trains:
        row.update(equal=True, max_abs_diff=0.0, replays=0, eager_calls=0, note="post-hoc: no gradient steps")
        return row
    with tempfile.TemporaryDirectory() as tmp:
        eager = Trainer(eager_cfg, data, Path(tmp) / "eager", recipe=recipe)
        graphed = Trainer(graph_cfg, data, Path(tmp) / "graphed", recipe=_recipe(graph_cfg, data))
        if standin_capture:
            graphed.forward = graphed.graph = GraphedForward(graphed.forward, batch_size=batch, capture=standin)
        if graphed.graph is None:
            raise RuntimeError("the graphed trainer has no GraphedForward (train.cuda_graph not applied)")
        epoch, phase = MC.active_epoch(eager_cfg, eager.method)
        losses = {}
        for name, trainer in (("eager", eager), ("graphed", graphed)):
            trainer.method.on_epoch_start(epoch, trainer.loss_fn)
            trainer.method.set_train_mode(trainer.model)
            order = trainer.sampler.indices(epoch)
            correct = torch.zeros((), dtype=torch.int64, device=trainer.device)
            out = []
            for i in range(steps):
                pos = np.resize(order[i * batch:], batch) if len(order) > i * batch else np.resize(order, batch)
                if trainer.graph is not None:
                    trainer.graph.begin_step()
                out.append(HS.loop_step(trainer, pos, torch.Generator().manual_seed(1000 + i), epoch, i, correct))
            losses[name] = torch.stack([v.float().reshape(()) for v in out]).cpu()
        diffs = [(k, (a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
                 for (k, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values())]
        counters = graphed.graph.counters()
        row.update(equal=all(d == 0.0 for _, d in diffs) and torch.equal(losses["eager"], losses["graphed"]),
                   max_abs_diff=max((d for _, d in diffs), default=0.0),
                   worst=max(diffs, key=lambda kd: kd[1])[0] if diffs else None,
                   replays=counters["replays"] / steps, eager_calls=counters["eager_calls"] / steps,
                   captures=counters["captures"], disabled=graphed.graph.disabled, phase=phase, note="")
    return row


def check_all(configs: list[Path], *, device: str, standin_capture: bool, steps: int = 4, batch: int = 16,
              workdir: Path | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, [(config, reason)]) for `configs`."""
    return HS.each_config(configs, lambda config, runs: compare(config, runs, device=device,
                                                                 standin_capture=standin_capture, steps=steps,
                                                                 batch=batch), workdir=workdir)


def table(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    lines = ["| config | method | loss | equal | max abs diff | replays / step | eager passes / step | note |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        note = r["note"] or (f"disabled: {r['disabled']}" if r.get("disabled") else "")
        lines.append(f"| {Path(r['config']).name} | {r['method']} | {r['loss']} | {'yes' if r['equal'] else 'NO'} | "
                     f"{r['max_abs_diff']:.3g} | {r['replays']:g} | {r['eager_calls']:g} | {note} |")
    for config, reason in skipped:
        lines.append(f"| {Path(config).name} | | | | | | | skipped: {reason} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="cuda (the real graphs; default when CUDA is available)")
    ap.add_argument("--standin", action="store_true", help="on the CPU, with StandInGraph instead of CUDA graphs")
    ap.add_argument("--configs", nargs="+", help="config files (default configs/cifar10_lt/*.yaml less base.yaml)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per config")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--json", help="save the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.standin:
        device = "cpu"
    elif args.device is None or not args.device.startswith("cuda"):
        print("cuda_graph_check: CUDA graphs need a CUDA device; pass --standin for the CPU check", file=sys.stderr)
        return 2
    else:
        device = args.device
    tic = time.time()
    logging.disable(logging.WARNING)
    try:
        rows, skipped = check_all(MC.config_paths(args.configs), device=device, standin_capture=args.standin,
                                  steps=args.steps, batch=args.batch)
    finally:
        logging.disable(logging.NOTSET)
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu: {cpu_model()} (stand-in)"
    machine = f"{where}; torch {torch.__version__}; python {platform.python_version()}; {time.time() - tic:.0f} s"
    print(table(rows, skipped))
    print()
    print(machine)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows, "skipped": skipped}, indent=1))
    return 0 if all(r["equal"] for r in rows) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
