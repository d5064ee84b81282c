"""Unreadable and duplicate images.

Files: each is read, hashed (SHA-1 of its bytes: identical files are duplicates) and
decoded with Pillow as training would (`data/images.decode_image`); a file that cannot
be read or decoded is reported with its error. In-memory sources (CIFAR pickles, IDX,
digits) have no files: their decoded images are hashed instead (identical pixels).
A duplicate group is flagged `cross_class` when its copies carry different labels
(label noise) and `cross_split` when it spans splits (e.g. train/test leakage).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..data.build import Split
from ..data.images import decode_image
from ..errors import DataError
from ..preprocess import error_text
from .inventory import ImageFile


def _check_file(f: ImageFile) -> tuple[str | None, str | None, str | None]:
    """(sha1, 'WxH', error) of one file."""
    try:
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        return None, None, f"cannot read image {f.rel}: {err.strerror or err}"
    digest = hashlib.sha1(data).hexdigest()
    try:
        array = decode_image(data, f.rel)
    except (DataError, Image.DecompressionBombError) as err:
        return digest, None, error_text(err)
    return digest, f"{array.shape[1]}x{array.shape[0]}", None


def _groups(keyed: dict[str, list[dict]]) -> list[dict]:
    out = []
    for digest, items in keyed.items():
        if len(items) > 1:
            out.append({"sha1": digest, "items": items,
                        "cross_class": len({i["class"] for i in items}) > 1,
                        "cross_split": len({i["split"] for i in items}) > 1})
    return sorted(out, key=lambda g: (not g["cross_class"], not g["cross_split"], -len(g["items"]), g["sha1"]))


def scan_files(files: list[ImageFile], class_names: list[str], *, workers: int = 4, progress: bool = False) -> dict:
    """{'unreadable': [{path, split, class, error}], 'duplicates': [groups], 'sizes': {'WxH': n}}."""
    from tqdm import tqdm

    keyed: dict[str, list[dict]] = defaultdict(list)
    unreadable, sizes = [], Counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_file, files, chunksize=32)
        results = tqdm(results, total=len(files), desc="checking files", unit="img", leave=False,
                       disable=not progress)
        for f, (digest, size, error) in zip(files, results, strict=True):
            item = {"path": f.rel, "split": f.split, "class": class_names[f.label] if 0 <= f.label < len(class_names)
                    else str(f.label)}
            if digest is not None:
                keyed[digest].append(item)
            if error is not None:
                unreadable.append({**item, "error": error})
            else:
                sizes[size] += 1
    return {"unreadable": unreadable, "duplicates": _groups(keyed), "sizes": dict(sizes.most_common())}


def scan_arrays(splits: dict[str, Split], class_names: list[str]) -> dict:
    """Identical-pixel duplicates within and across in-memory splits; same keys as `scan_files`."""
    keyed: dict[str, list[dict]] = defaultdict(list)
    sizes = Counter()
    for name, split in splits.items():
        if split is None:
            continue
        h, w = split.images.shape[1:3]
        sizes[f"{w}x{h}"] += len(split)
        for pos, (row, label) in enumerate(zip(split.index, split.labels, strict=True)):
            digest = hashlib.sha1(split.images[row].tobytes()).hexdigest()
            keyed[digest].append({"path": f"{name}[{pos}]", "split": name, "class": class_names[int(label)]})
    return {"unreadable": [], "duplicates": _groups(keyed), "sizes": dict(sizes.most_common())}
