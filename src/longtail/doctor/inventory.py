"""What a DATA-SPEC holds, before anything is decoded: classes and image files.

A DATA-SPEC is either

- an image folder, in ImageFolder layout (`train/<class>/<image>`, optional `val/` and
  `test/`, as the `imagefolder` source reads it) or flat (`<class>/<image>`, every image a
  training image); classes are the sorted class folder names, images are the files with
  an image extension directly inside a class folder (what training reads); or
- a YAML config file: its `data` section (and dotted overrides) through
  `longtail.data.build_data`, so the long-tail profile, subsampling and validation split
  apply. For `imagefolder` (a folder) and `split_list` sources its image files are listed
  too, so they can be checked before `build_data` decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..data.images import is_image_name
from ..data.sources import read_split_list
from ..errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class ImageFile:
    path: Path
    rel: str  # as reported: relative to the spec's root
    split: str  # train | val | test
    label: int


@dataclass
class FolderInventory:
    root: Path
    layout: str  # imagefolder | flat
    class_names: list[str]
    files: list[ImageFile]
    notes: list[str] = field(default_factory=list)

    def train_counts(self) -> np.ndarray:
        return train_counts(self.files, len(self.class_names))


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files directly in `folder` (sorted), and the number of images in its sub-folders."""
    direct, nested = [], 0
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_name(p.name):
            direct.append(p)
        elif p.is_dir():
            nested += sum(1 for q in p.rglob("*") if q.is_file() and is_image_name(q.name))
    return direct, nested


def folder_inventory(root: str | Path) -> FolderInventory:
    """List an image folder (ImageFolder or flat layout, see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    layout = "imagefolder" if (root / "train").is_dir() else "flat"
    base = root / "train" if layout == "imagefolder" else root
    class_names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image> or {root}/train/<class>/<image>)")
    index = {n: i for i, n in enumerate(class_names)}
    files, notes, nested = [], [], 0
    for split in SPLITS if layout == "imagefolder" else ("train",):
        folder = root / split if layout == "imagefolder" else root
        if not folder.is_dir():
            continue
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if d.name not in index:
                notes.append(f"class folder {d.relative_to(root)} is not a training class (ignored)")
                continue
            direct, n = _image_files(d)
            nested += n
            files += [ImageFile(p, p.relative_to(root).as_posix(), split, index[d.name]) for p in direct]
    loose = sum(1 for p in base.iterdir() if p.is_file() and is_image_name(p.name))
    if loose:
        notes.append(f"{loose} image(s) in {base} are not in a class folder (ignored)")
    if nested:
        notes.append(f"{nested} image(s) in sub-folders of class folders are ignored (training reads <class>/<image>)")
    if not files:
        raise DataError(f"no image files in the class folders of {root}")
    return FolderInventory(root, layout, class_names, files, notes)


def config_files(cfg: RunConfig) -> tuple[list[str], list[ImageFile]]:
    """(class names, image files) a config's data source decodes; ([], []) for sources without files."""
    d = cfg.data
    if d.source == "imagefolder" and d.root and Path(d.root).expanduser().is_dir():
        inv = folder_inventory(d.root)
        if inv.layout != "imagefolder":
            raise DataError(f"data.root {d.root} has no train/ folder (the imagefolder source needs train/<class>/*)")
        return inv.class_names, inv.files
    if d.source == "split_list" and d.root and d.train_list:
        root = Path(d.root).expanduser()
        files = []
        for split in SPLITS:
            lst = getattr(d, f"{split}_list")
            if lst:
                if not Path(lst).expanduser().is_file():
                    raise DataError(f"split list not found: {lst}")
                entries = read_split_list(Path(lst).expanduser())
                files += [ImageFile(root / rel, rel, split, label) for rel, label in entries]
        return [str(i) for i in range(max(f.label for f in files) + 1)], files
    return [], []


def train_counts(files: list[ImageFile], num_classes: int) -> np.ndarray:
    """(C,) image files per class in the training split."""
    labels = [f.label for f in files if f.split == "train"]
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
