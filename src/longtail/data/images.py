"""Decoding image files with Pillow into uint8 HWC arrays, with clear errors."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..log import bar_enabled

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes, name: str, *, channels: int = 3, size: int | None = None) -> np.ndarray:
    """Decode one encoded image to a (H, W, channels) uint8 array.

    Any Pillow mode is *converted* (grayscale, palette, RGBA, CMYK, 16-bit) to RGB, or to
    L when channels == 1; alpha is dropped. With `size`, the image is resized to
    size x size (bilinear). A zero-byte or undecodable file raises DataError naming it.
    """
    if len(data) == 0:
        raise DataError(f"image file is empty (0 bytes): {name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = img.convert("RGB" if channels == 3 else "L")
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {name}: not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {name}: {err}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def decode_many(items: list[tuple[str, bytes]] | list[tuple[str, str]], *, channels: int = 3,
                size: int | None = None, from_paths: bool = False, progress: bool = False,
                desc: str = "decoding") -> np.ndarray:
    """Decode many images (name, bytes) or (name, path) into one (N, H, W, C) uint8 array.

    All images must share one size unless `size` is given; the first mismatch raises a
    DataError naming the file and suggesting data.image_size.
    """

    def work(item):
        name, payload = item
        if from_paths:
            try:
                with open(payload, "rb") as fh:
                    payload = fh.read()
            except OSError as err:
                raise DataError(f"cannot read image {name}: {err.strerror}") from None
        return decode_image(payload, name, channels=channels, size=size)

    if not items:
        return np.zeros((0, size or 1, size or 1, channels), dtype=np.uint8)
    out = None
    first_name = items[0][0]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(work, items, chunksize=64)
        if bar_enabled(progress):  # a bar on a terminal only: no carriage returns in a log file
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc=desc, unit="img", leave=False)
        for i, (array, (name, _)) in enumerate(zip(results, items)):
            if out is None:
                out = np.empty((len(items), *array.shape), dtype=np.uint8)
            elif array.shape != out.shape[1:]:
                raise DataError(
                    f"image {name} is {array.shape[1]}x{array.shape[0]} but {first_name} is "
                    f"{out.shape[2]}x{out.shape[1]}; set data.image_size to resize all images"
                )
            out[i] = array
    return out
