"""`longtail export RUN_DIR --out model.pt2`: the trained network as a torch.export program.

The file is a `torch.export` ExportedProgram (`torch.export.save`), loadable by plain
PyTorch with `torch.export.load(path).module()` without longtail installed. TorchScript
was not chosen: `torch.jit.trace` / `torch.jit.script` are deprecated in torch 2.13.

Input: uint8 images (B, H, W, C) in the run's size and channels (what
`numpy.asarray(PIL image)` gives), any batch size B >= 1. The program scales by 1/255,
normalises with the run's mean / std and returns the network's raw logits, float32
(B, num_classes), with no logit adjustment. A wrong dtype, size or channel count fails
with torch's guard error. Resizing and channel conversion are the caller's job (Pillow:
`img.convert('RGB' or 'L').resize((W, H), Image.BILINEAR)` when the size differs, as
`longtail.preprocess` does).

Metadata rides along as the extra file `longtail.json`: class_names, class_counts,
image_shape [H, W], channels, mean, std, the run, checkpoint and epoch, and the input /
output description (`torch.export.load(path, extra_files={"longtail.json": ""})`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from .errors import LongtailError
from .inference import Predictor, load
from .io import atomic_write_bytes

METADATA_FILE = "longtail.json"


class ExportError(LongtailError):
    """The network cannot be exported (an operation torch.export does not support for every batch size)."""


class UInt8Classifier(nn.Module):
    """uint8 (B, H, W, C) -> logits (B, num_classes): x / 255, (x - mean) / std, network."""

    def __init__(self, network: nn.Module, *, mean, std):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return self.network((x - self.mean) / self.std)


def metadata(predictor: Predictor) -> dict:
    s = predictor.spec
    return {"format": "longtail-export-1", "longtail_version": _version(), "torch_version": torch.__version__,
            "input": f"uint8 (B, {s.height}, {s.width}, {s.channels}), B >= 1",
            "output": f"float32 logits (B, {predictor.num_classes}), no logit adjustment",
            "class_names": predictor.class_names, "class_counts": predictor.class_counts.tolist(),
            "image_shape": [s.height, s.width], "channels": s.channels, "mean": list(s.mean), "std": list(s.std),
            "run": str(predictor.run_dir), "checkpoint": str(predictor.checkpoint), "epoch": predictor.epoch}


def export_program(predictor: Predictor) -> torch.export.ExportedProgram:
    """The predictor's network with its normalisation, exported with a dynamic batch size (CPU)."""
    s = predictor.spec
    wrapper = UInt8Classifier(predictor.model.to("cpu").eval(), mean=s.mean, std=s.std).eval()
    example = torch.zeros(2, s.height, s.width, s.channels, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes={"images": {0: batch}})
    except Exception as err:  # noqa: BLE001 - torch.export raises many kinds; report the first line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("- ")), lines[0] if lines else type(err).__name__)
        raise ExportError(f"torch.export cannot export this network for any batch size "
                          f"({type(err).__name__}: {detail.lstrip('- ')})") from None


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str = "last") -> dict:
    """Export a run's network to `out` (atomic); returns the metadata written with it."""
    predictor = load(run_dir, checkpoint=checkpoint, device="cpu")
    program = export_program(predictor)
    meta = metadata(predictor)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(meta)})
    atomic_write_bytes(out, buffer.getvalue())
    return meta


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("longtail")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
