"""Host syncs of a training step, found on the CPU (issue 21: a step captured in a CUDA graph).

A CUDA training step that reads a device tensor's value on the host (`loss.item()`, `if mask.any():`,
`float(x)` for a log line, `x.tolist()`, `x.numpy()`, `x.cpu()`) makes the host wait for the device
and cannot be captured in a CUDA graph; neither can an operation whose output size depends on the
values (`x.nonzero()`, `torch.unique`, boolean-mask indexing `x[mask]`; `torch.bincount`, whose CUDA
kernel reads the input's maximum on the host to size its output). On CUDA
`torch.cuda.set_sync_debug_mode("warn")` reports the first kind; without a GPU `HostSyncs` is the
stand-in: while active it patches the Python entry points of those operations on `torch.Tensor`
(and `torch.nonzero` / `torch.unique` / `torch.masked_select` / `torch.where` with one argument),
records each call with its call site (the innermost frame under src/longtail, and the innermost
frame overall) and restores every patched attribute on exit.

    with HostSyncs() as syncs:       # or HostSyncs(raise_on_sync=True): HostSyncError at the first
        step()
    syncs.sites()                    # {"losses/ghm.py:88": ("item", 3), ...}

What it patches (`PATCHED`): Tensor.item, __bool__, __float__, __int__, __index__, tolist, numpy,
cpu, nonzero, unique, masked_select, argwhere, bincount, `.to(...)` with the string 'cpu' as device, and `__getitem__` /
`__setitem__` with a boolean tensor index; the module functions torch.nonzero, torch.unique,
torch.masked_select, torch.argwhere, torch.bincount and one-argument torch.where. A call made inside another patched
call counts once (the outer one).

It is conservative in one way and blind in another:

- conservative: on the CPU every tensor is on the host, so it cannot tell a device tensor from a
  tensor that would stay on the host on a GPU too (a CPU buffer a method never moves, a Python
  number wrapped in a tensor). It records them all; the audit (benchmarks/host_sync_audit.py)
  lists every site, and a site that reads a host-only tensor is either rewritten not to read a
  tensor (the cheap fix) or declared with that reason (`Method.capture_blockers`). A tensor may
  be marked as host state with `host_tensor(t)`: reads of a tensor so marked are not recorded.
- blind: syncs that do not pass through these Python entry points are not seen (a C++ op that
  synchronises internally, `.to(device)` with a device object, a non-blocking copy, a pinned-memory
  wait, `torch.cuda.synchronize`); `.to(device)` with a `torch.device` is never recorded because
  on the CPU the audit cannot tell a copy to the host from a no-op move to the step's own device.

Thread-safety: the patch is process-wide while active; use it from one thread, not around work
that other threads run concurrently.
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LongtailError

PACKAGE = Path(__file__).resolve().parents[1]  # src/longtail
TENSOR_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero",
                  "unique", "masked_select", "argwhere", "bincount")
TORCH_FUNCTIONS = ("nonzero", "unique", "masked_select", "argwhere", "bincount")
PATCHED = TENSOR_METHODS + ("to", "__getitem__", "__setitem__") + tuple(f"torch.{f}" for f in TORCH_FUNCTIONS) + \
    ("torch.where",)
_HOST_MARK = "_longtail_host_state"
_INHERITED = object()  # a patched attribute the owner only inherited: deleted again on exit


class HostSyncError(LongtailError):
    """A host sync where none was allowed (HostSyncs(raise_on_sync=True))."""


@dataclass(frozen=True)
class SyncRecord:
    """One recorded call: the operation, the innermost frame under src/longtail ("" if none) as
    'package/relative/path.py:line', and the innermost frame outside torch and this module."""

    op: str
    site: str
    origin: str


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Mark `tensor` as host state (it stays on the CPU on a GPU run too): HostSyncs does not record
    reads of it. Returns the tensor."""
    setattr(tensor, _HOST_MARK, True)
    return tensor


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_host_target(args, kwargs) -> bool:
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, str) and device == "cpu"


class HostSyncs:
    """Context manager recording (or, with `raise_on_sync`, refusing) every operation of the module
    docstring's list while active. `records` holds them in call order."""

    _active = False

    def __init__(self, *, raise_on_sync: bool = False):
        self.raise_on_sync = raise_on_sync
        self.records: list[SyncRecord] = []
        self._saved: list[tuple[object, str, object]] = []
        self._inside = threading.local()

    # -- results
    def sites(self) -> dict[str, tuple[str, int]]:
        """{site: (operations, count)}, a site being the src/longtail frame (or the origin where the
        call came from no src/longtail frame)."""
        ops: dict[str, Counter] = {}
        for r in self.records:
            ops.setdefault(r.site or r.origin, Counter())[r.op] += 1
        return {site: ("/".join(sorted(c)), sum(c.values())) for site, c in ops.items()}

    def __len__(self) -> int:
        return len(self.records)

    # -- patching
    def __enter__(self) -> "HostSyncs":
        if HostSyncs._active:
            raise RuntimeError("HostSyncs is already active (nested use is not supported)")
        HostSyncs._active = True
        for name in TENSOR_METHODS:
            self._patch(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._patch(torch.Tensor, "to", self._wrap("to('cpu')", torch.Tensor.to, when=_is_host_target))
        self._patch(torch.Tensor, "__getitem__",
                    self._wrap("x[bool mask]", torch.Tensor.__getitem__, when=lambda a, k: _is_bool_index(a[0])))
        self._patch(torch.Tensor, "__setitem__",
                    self._wrap("x[bool mask] =", torch.Tensor.__setitem__, when=lambda a, k: _is_bool_index(a[0])))
        for name in TORCH_FUNCTIONS:
            self._patch(torch, name, self._wrap(f"torch.{name}", getattr(torch, name), method=False))
        self._patch(torch, "where", self._wrap("torch.where(cond)", torch.where, method=False,
                                               when=lambda a, k: len(a) + len(k) == 1))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        HostSyncs._active = False

    def _patch(self, owner, name: str, replacement) -> None:
        self._saved.append((owner, name, owner.__dict__[name] if name in vars(owner) else _INHERITED))
        setattr(owner, name, replacement)

    def _wrap(self, op: str, original, *, method: bool = True, when=None):
        detector = self

        def patched(*args, **kwargs):
            if getattr(detector._inside, "depth", 0):
                return original(*args, **kwargs)
            tensor = args[0] if method and args else None
            rest = args[1:] if method else args
            if (tensor is None or not getattr(tensor, _HOST_MARK, False)) and (when is None or when(rest, kwargs)):
                detector._record(op)
            detector._inside.depth = 1
            try:
                return original(*args, **kwargs)
            finally:
                detector._inside.depth = 0

        patched.__name__ = getattr(original, "__name__", op)
        return patched

    def _record(self, op: str) -> None:
        site = origin = ""
        here = Path(__file__).resolve()
        torch_dir = Path(torch.__file__).resolve().parent
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename).resolve()
            if path == here:
                continue
            if not origin and not path.is_relative_to(torch_dir):
                origin = f"{path.name}:{frame.lineno}"
            if path.is_relative_to(PACKAGE):
                site = f"{path.relative_to(PACKAGE)}:{frame.lineno}"
                break
        record = SyncRecord(op=op, site=site, origin=origin)
        self.records.append(record)
        if self.raise_on_sync:
            raise HostSyncError(f"host sync: {op} at {site or origin}")
