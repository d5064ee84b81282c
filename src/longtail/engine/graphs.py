"""CUDA-graph replay of the training forward and backward pass (`train.cuda_graph`, issue 21).

ResNet-32 at batch 128 runs at 2-3 % of an H200's peak: each of its ~400 kernels per step is
tiny, so the step is bound by kernel launches and Python, not by arithmetic (docs/speed.md,
"On a GPU"). `GraphedForward` replaces the loop's training forward module (`TrainForward`:
images -> (pooled features, logits)) by a graphed copy made with
`torch.cuda.make_graphed_callables` (PyTorch's "partial-network capture"): the network's forward
pass is one CUDA-graph replay and its backward pass another, inside one autograd node. The rest of
the step stays eager: augmentation, the method's loss and its state (DRW weights, GHM-C / seesaw
statistics, SWRM windows, ...), the optimiser step (foreach SGD on CUDA, a handful of multi-tensor
kernels; `optimizer.params.fused=true` for one), the accuracy count. So every method and loss runs
unchanged, with no per-method capture rules; what is replayed is only the network, which has no
host syncs and no value-dependent shapes.

A call is replayed only when replaying it is exactly what the eager module would compute; else it
runs the eager module (same parameters), counted in `eager_calls`:

- static shape: the batch shape of the capture (a full `train.batch_size` batch). The epoch's last,
  partial batch and a method's differently shaped passes (e.g. two views concatenated) run eager,
  so no batch is padded or dropped and no weighting changes;
- gradients on: a pass under `torch.no_grad()` (a method's teacher or statistics pass) runs eager;
- images that do not require grad (the capture's input does not);
- the first pass with gradients of a training step (`begin_step()`, called by the loop, starts a
  step): the replay's activations live in the graph's static memory until its backward, so a
  second replay before that backward would overwrite them, and a capture (whose warm-up passes
  are undone by restoring BatchNorm's buffers in place) would change tensors that an earlier
  pass's pending backward has saved; later passes with gradients in the step run eager;
- the model declares no hidden input or output for this pass: its `graph_capturable` attribute
  (True when absent) is False while a pass reads something other than the images (RSG's hook,
  which takes the labels; BBN's bilateral mixing weight) or keeps a side output for the loss
  (LCReg's latent output), none of which a replay would see or produce;
- the first such pass of a module state runs eager (a model may create lazy state in its first
  pass); the second is captured and replayed;
- the module state of the capture: every submodule's train/eval flag, every parameter (identity
  and `requires_grad`) and every buffer (identity). When it changes (a stage freezes the backbone,
  a method replaces its head) the pass is captured again, at most `max_captures` times; after that
  the run stays eager and logs why;
- every other attribute of every submodule is the object it was at the capture (and no attribute
  or hook was added): a changed one is a hidden input the graph would ignore, so that pass runs
  eager (logged once, naming it). Hooks present at the capture (a forward hook that collects
  features) turn the graphs off for the run: a replay would not call them. An attribute that the capture's own passes set (a side output
  the model did not declare) turns the graphs off for the run, naming it.

Outputs are cloned out of the graph's static output buffers (two small copies), so a method that
keeps features across steps (a queue, a memory bank) never sees them overwritten by a later replay.
The graph's backward hands autograd its static gradient buffers; where a parameter has no
gradient yet, autograd keeps the buffer itself as `.grad` (no copy). That is sound because the loop
sets gradients to None before every step and the next replay, which rewrites the buffer, comes
only in the next step; a second pass in the same step runs eager and adds into `.grad`.
The capture's warm-up (three forward and backward passes on the batch of the capture, on a side
stream) would update BatchNorm's running statistics; every buffer is restored after it, and the
CUDA RNG state too, so a graphed run follows the eager run's trajectory. bf16 autocast runs inside
the captured module with its weight-cast cache off, as make_graphed_callables requires.

A capture that fails (an operation that cannot be captured) is logged with its error and the run
goes on eager. The graphs need CUDA: `unsupported_reason` says why a run does not use them (not
CUDA, data parallel, torch.compile).
"""

from __future__ import annotations

import logging
import operator
from typing import Callable

import torch

log = logging.getLogger(__name__)


def unsupported_reason(device: torch.device, *, distributed: bool, compiled: bool) -> str | None:
    """Why `train.cuda_graph` cannot be used by this run, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this run is on {device.type}"
    if distributed:
        return "not combined with data-parallel training (DistributedDataParallel's hooks are not captured)"
    if compiled:
        return "not combined with train.compile (choose one; torch.compile mode='reduce-overhead' graphs on its own)"
    return None


def _make_graphed(module: torch.nn.Module, sample: torch.Tensor, warmup_iters: int) -> torch.nn.Module:
    return torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=warmup_iters,
                                             allow_unused_input=True)


class GraphedForward(torch.nn.Module):
    """The training forward module with its forward and backward replayed as CUDA graphs.

    eager: the loop's `TrainForward` (or any module images (B, 3, H, W) -> tuple of tensors with
    a `model` attribute, the network whose parameters it uses, and a `graph_copy()` method that
    returns a new module of the same computation for capture). batch_size: the batch size of
    replayed calls. capture(module, sample, warmup_iters) -> graphed module: defaults to
    torch.cuda.make_graphed_callables (tests pass a CPU stand-in).
    """

    def __init__(self, eager: torch.nn.Module, *, batch_size: int, capture: Callable | None = None,
                 max_captures: int = 4, warmup_iters: int = 3):
        super().__init__()
        if batch_size < 1 or max_captures < 1 or warmup_iters < 1:
            raise ValueError("batch_size, max_captures and warmup_iters must be >= 1")
        self.eager = eager
        self.batch_size = batch_size
        self.max_captures = max_captures
        self.warmup_iters = warmup_iters
        self._capture = capture or _make_graphed
        self._graphed: torch.nn.Module | None = None
        self._shape: tuple | None = None
        self._grad_passes = 0  # passes with gradients in this step so far
        self._state: _Snapshot | None = None  # the model at the capture
        self._seen: _Snapshot | None = None  # the model at the current state's first (eager) pass
        self._logged: set[str] = set()
        self.disabled: str | None = None  # why the run went eager for good
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.eager.model

    def begin_step(self) -> None:
        """A new training step: its first pass with gradients may be replayed."""
        self._grad_passes = 0

    def counters(self) -> dict:
        """{'captures', 'replays', 'eager_calls'} since the last call (captures: in total); resets the others."""
        out = {"captures": self.captures, "replays": self.replays, "eager_calls": self.eager_calls}
        self.replays = self.eager_calls = 0
        return out

    def forward(self, images: torch.Tensor):
        if self._eligible(images):
            if self._graphed is not None and self._state.same():
                return self._replay(images)
            if self._graphed is not None and self._state.kind() == "attribute":
                self._log_once(self._state.first_difference())
            elif self._seen is None or not self._seen.same():  # a new state's first pass runs eager
                self.eager_calls += 1
                out = self.eager(images)
                self._seen = _Snapshot(self.model)  # after the pass: what it set lazily is part of the state
                return out
            elif self._capture_for(images):
                return self._replay(images)
        self.eager_calls += 1
        return self.eager(images)

    def _replay(self, images: torch.Tensor):
        self.replays += 1
        return tuple(out.clone() for out in self._graphed(images))

    def _eligible(self, images: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        self._grad_passes += 1
        if self.disabled is not None or self._grad_passes > 1:
            return False
        model = self.model
        if images.requires_grad or not model.training or images.shape[0] != self.batch_size:
            return False
        if not getattr(model, "graph_capturable", True):
            return False
        return self._shape is None or tuple(images.shape) == self._shape

    def _log_once(self, where: str) -> None:
        if where not in self._logged:
            self._logged.add(where)
            log.info("train.cuda_graph: %s differs from the capture's: such passes run eager", where)

    def _capture_for(self, images: torch.Tensor) -> bool:
        """Capture the pass on `images`; False (and eager from now on) when that is not possible."""
        hooked = _hooked(self.model)
        if hooked is not None:
            self._disable(f"{hooked} has module hooks, which a replay would not run")
            return False
        if self.captures >= self.max_captures:
            self._disable(f"the module state changed after {self.captures} captures (a method that switches "
                          "train/eval flags, requires_grad or parameters every few steps)")
            return False
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        state = _Snapshot(self.model)
        cuda_rng = torch.cuda.get_rng_state(images.device) if images.device.type == "cuda" else None
        try:
            graphed = self._capture(self.eager.graph_copy(), images.detach(), self.warmup_iters)
        except RuntimeError as err:
            self._disable(f"capture failed: {str(err).splitlines()[0]}")
            return False
        finally:  # the warm-up passes must not count as training steps: BatchNorm statistics, RNG
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, images.device)
            written = None if state.same() else state.first_difference()
            state.restore()  # what the capture's passes set is not this step's
        if written is not None:
            self._disable(f"the model's forward sets {written}, a side output that a replay would not set "
                          "(declare it with the model's graph_capturable)")
            return False
        self._graphed, self._state, self._shape = graphed, state, tuple(images.shape)
        self.captures += 1
        log.info("train.cuda_graph: captured the forward and backward pass for batches of shape %s (capture %d)",
                 tuple(images.shape), self.captures)
        return True

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self._graphed = None
        log.warning("train.cuda_graph: this run goes on eager: %s", reason)


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(model: torch.nn.Module) -> str | None:
    """The first submodule with forward or backward hooks (or 'global' for torch's global module
    hooks), None without any."""
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, f"_global{t}", None) for t in _HOOK_TABLES):
        return "global"
    for name, m in model.named_modules():
        if any(getattr(m, t, None) for t in _HOOK_TABLES):
            return name or "model"
    return None


# the entries of a module's __dict__ whose change is a new module state (captured again), not a hidden input
_STATE_KEYS = ("training", "_parameters", "_buffers")


class _Snapshot:
    """Every attribute of every submodule of a model, the items of its dict-valued attributes
    (parameters, buffers, submodules, hook tables) and every parameter's requires_grad, taken by
    identity; `same()` compares in C-level iteration (~2,300 entries for ResNet-32)."""

    def __init__(self, model: torch.nn.Module):
        self.dicts, self.keys, self.values, self.names, self.sized, self.sized_names = [], [], [], [], [], []
        for name, module in model.named_modules():
            d = vars(module)
            self.sized.append(d)
            self.sized_names.append(name or "model")
            for key, value in d.items():
                self._add(d, key, value, f"{name or 'model'}.{key}")
                if isinstance(value, dict):  # _parameters, _buffers, _modules, the hook tables
                    self.sized.append(value)
                    self.sized_names.append(f"{name or 'model'}.{key}")
                    for k, v in value.items():
                        self._add(value, k, v, f"{name or 'model'}.{key}[{k!r}]")
        self.lens = list(map(len, self.sized))
        self.params = list(model.parameters())
        self.grads = [p.requires_grad for p in self.params]

    def _add(self, d: dict, key, value, name: str) -> None:
        self.dicts.append(d)
        self.keys.append(key)
        self.values.append(value)
        self.names.append(name)

    def same(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.values))
                and list(map(len, self.sized)) == self.lens
                and [p.requires_grad for p in self.params] == self.grads)

    def _changed_entry(self) -> str | None:
        """The name of the first attribute entry that is no longer the snapshot's object, or None."""
        for d, key, value, name in zip(self.dicts, self.keys, self.values, self.names):
            if d.get(key, _MISSING) is not value:
                return name
        return None

    def first_difference(self) -> str:
        """Where the model differs from the snapshot, in words ('layer1.0.bn1.momentum')."""
        name = self._changed_entry()
        if name is not None:
            return name
        for d, size, where in zip(self.sized, self.lens, self.sized_names):
            if len(d) != size:
                known = {k for dd, k in zip(self.dicts, self.keys) if dd is d}
                added = [repr(k) if where.endswith("]") or "._" in where else str(k) for k in d if k not in known]
                return f"{where} (entries added)" if "._" in where else f"{where}.{', '.join(added)} (added)"
        return "a parameter's requires_grad"

    def kind(self) -> str:
        """'state' (train/eval flags, parameters, buffers, requires_grad: captured again) or 'attribute'."""
        if [p.requires_grad for p in self.params] != self.grads:
            return "state"
        name = self._changed_entry()
        return "state" if name is not None and any(f".{k}" in name for k in _STATE_KEYS) else "attribute"

    def restore(self) -> None:
        """Put back the attribute objects of the snapshot and drop attributes added since."""
        for d, key, value in zip(self.dicts, self.keys, self.values):
            d[key] = value
        kept = {}
        for d, key in zip(self.dicts, self.keys):
            kept.setdefault(id(d), set()).add(key)
        for d in self.sized:
            for extra in [k for k in d if k not in kept.get(id(d), ())]:
                del d[extra]


_MISSING = object()
