"""Defective images made on purpose (blank, saturated, binary, burned-in text, truncated and empty
files) and the image writers that can produce the file-level defects."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont

NO_BOX = ("",) * 4  # ground-truth box columns of defects other than text
DEFECT_KINDS = ("blank", "saturated", "binary", "text", "truncated", "empty_file", "missing")


def text_overlay(shape: tuple[int, int], text: str) -> np.ndarray:
    """Pixels of annotation lettering (bool, ``shape``), like a chart label burned into a field.

    Its place depends only on the text and the image shape, so the ground truth can state the
    lettering's box (:func:`text_box`) without rendering the field.
    """
    h, w = shape
    digest = zlib.crc32(text.encode())
    x, y = 1 + digest % max(1, w // 6 - 1), 1 + (digest >> 16) % max(1, h // 3 - 1)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    font = ImageFont.load_default(size=max(8, h // 9))
    for line in text.split("\n"):
        draw.text((x, y), line, fill=255, font=font)
        y += max(9, h // 8)
    return np.asarray(mask) > 96


def text_box(shape: tuple[int, int], text: str) -> tuple[int, int, int, int]:
    """(x_min, y_min, x_max, y_max), half-open: the smallest box holding the lettering."""
    rows, cols = np.nonzero(text_overlay(shape, text))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def apply_defect(planes: list[np.ndarray], defect: str, max_value: float, text: str = "") -> list[np.ndarray]:
    """Pixel defects on all channels of one image (file-level defects are written later)."""
    if defect == "blank":
        return [np.full_like(p, np.round(np.median(p))) for p in planes]
    if defect == "saturated":
        # Overexposed: 99.95 % of the pixels hit the camera maximum.
        return [np.clip((p + 1.0) * (max_value * 1.05 / (np.percentile(p, 0.05) + 1.0)), 0, max_value) for p in planes]
    if defect == "binary":
        return [np.where(p > p.mean(), max_value, 0.0) for p in planes]
    if defect == "text":
        # One overlay at one place in every channel, as annotation software burns it in.
        lettering = text_overlay(planes[0].shape, text)
        return [np.where(lettering, max_value, p) for p in planes]
    return planes


def _to_dtype(plane: np.ndarray, fmt: str) -> np.ndarray:
    if fmt in ("tiff16", "stack16"):
        return np.rint(plane).astype(np.uint16)
    if fmt == "png8":
        return np.rint(plane).astype(np.uint8)
    if fmt == "float32":
        return (plane / 65535.0).astype(np.float32)
    raise ValueError(f"unknown image format {fmt!r}")


def _write_tiff(path: Path, array: np.ndarray) -> None:
    tifffile.imwrite(path, array, photometric="minisblack", metadata=None)


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_image(paths: tuple[str, ...], planes: list[np.ndarray], fmt: str, file_defect: str = "") -> None:
    """Write channel planes (one file each, or one multi-page file for ``stack16``).

    ``truncated`` keeps 60 % of the first file's bytes; ``empty_file`` leaves it with 0 bytes.
    """
    arrays = [_to_dtype(p, fmt) for p in planes]
    targets = [Path(p) for p in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "stack16":
        _write_tiff(targets[0], np.stack(arrays))
    else:
        for target, array in zip(targets, arrays):
            (_write_png if fmt == "png8" else _write_tiff)(target, array)
    if file_defect == "truncated":
        data = targets[0].read_bytes()
        targets[0].write_bytes(data[: int(len(data) * 0.6)])
    elif file_defect == "empty_file":
        targets[0].write_bytes(b"")


FILE_DEFECTS = ("truncated", "empty_file")
