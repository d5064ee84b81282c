"""Distributed data parallel on PyTorch's own engine, launched by torchrun.

`torchrun --nproc_per_node N -m longtail train CONFIG --out RUN_DIR` sets RANK,
WORLD_SIZE and LOCAL_RANK; `init()` then joins the process group (gloo on CPU, nccl on
CUDA, device cuda:LOCAL_RANK). Without those variables everything runs in one process
and every helper here is a no-op.

Conventions (docs/distributed.md): `train.batch_size` is the *global* batch, each rank
takes batch_size / world_size, so the learning rate of a config means the same thing on
any number of processes. Every rank computes the same global epoch order from (seed,
epoch) and takes positions rank, rank + W, ... of each global batch, so the ranks together
hold exactly the images of the single-process batch; augmentation draws are made for the global batch and sliced the
same way. Only rank 0 writes.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import LongtailError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> DistContext:
    """Join the torchrun process group if launched by torchrun (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ctx


def context() -> DistContext:
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); returns the tensor."""
    if context().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' tensors along dim 0, in rank order.

    The first dimension may differ between ranks (the last global batch of an epoch can
    split unevenly): sizes are exchanged first and every part is padded to the largest.
    """
    ctx = context()
    if not ctx.enabled:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes)])


def barrier() -> None:
    if context().enabled:
        dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LongtailError(f"train.device is '{name}' but CUDA is not available")
    return torch.device(name)


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix arithmetic


def cpu_bf16_features() -> list[str]:
    """The CPU's native bf16 instruction sets among BF16_CPU_FLAGS (/proc/cpuinfo flags on Linux;
    elsewhere torch's AVX512-BF16 probe), [] when bf16 is emulated. On such a CPU bf16 autocast
    (train.precision: bf16) trained ResNet-32 2.0x as fast as fp32 (docs/speed.md); without them it
    was about ten times slower."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in BF16_CPU_FLAGS if f in flags]
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return ["avx512_bf16"] if probe is not None and probe() else []


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The precision train.precision means on `device`: 'fp32' or 'bf16' as given, and for 'auto'
    bf16 on a CPU with native bf16 (cpu_bf16_features non-empty) and fp32 everywhere else.

    Why: on a CPU with AMX-BF16 / AVX512-BF16, bf16 autocast trained ResNet-32 2.0x as fast as
    fp32 (its accuracy against fp32 over 3 seeds: benchmarks/RESULTS.md, "bf16 against fp32 on a
    CPU with native bf16"); where bf16 is emulated it was about ten times slower; on an H200 it
    was not faster for this launch-bound network (docs/speed.md, "On a GPU"), so 'auto' keeps
    CUDA in fp32."""
    if precision != "auto":
        return precision
    kind = device.type if isinstance(device, torch.device) else resolve_device(device).type
    return "bf16" if kind == "cpu" and cpu_bf16_features() else "fp32"


def autocast_dtype(train) -> torch.dtype | None:
    """torch.bfloat16 when a TrainConfig's precision resolves to bf16 on its device (resolve_precision),
    else None: what every training pass and method-owned extra pass autocasts to."""
    return torch.bfloat16 if resolve_precision(train.precision, train.device) == "bf16" else None


def pin_precision(cfg, *, like=None):
    """`cfg` (a RunConfig) with train.precision 'auto' replaced by a concrete value: `like`'s
    (the saved config of the run it continues or branches from, so a run keeps the precision it
    started in on any machine), or this machine's choice (resolve_precision). The run folder's
    config.yaml records the pinned value. A concrete precision is returned unchanged."""
    t = cfg.train
    if t.precision != "auto":
        return cfg
    chosen = like.train.precision if like is not None and like.train.precision != "auto" else \
        resolve_precision("auto", t.device)
    return replace(cfg, train=replace(t, precision=chosen))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform's answer elsewhere): printed next
    to every speed figure, and part of the fingerprint bitwise reproducibility depends on."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def machine_record(device: torch.device, precision: str) -> dict:
    """What a training session ran on (RunDir.SESSIONS; docs/training.md, "Run folders"): the device's name (the GPU's,
    or the CPU model with torch's CPU capability: an AVX2 and an AVX512 AMD EPYC share the model
    name), torch's version, its intra-op threads, the resolved precision, and a one-line `label`
    for tables."""
    capability = torch.backends.cpu.get_cpu_capability()
    cpu, threads = cpu_model(), torch.get_num_threads()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = f"{name}, {precision}"
    else:
        name = f"{cpu} ({capability})"
        label = f"{name}, {threads} thread{'s' if threads != 1 else ''}, {precision}"
    return {"device": str(device), "name": name, "cpu": cpu, "cpu_capability": capability,
            "torch": torch.__version__, "threads": threads, "precision": precision, "label": label}
