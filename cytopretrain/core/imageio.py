"""Read microscopy images in their native bit depth, with machine-readable failure reasons.

Formats (chosen by file suffix, case-insensitive):

- TIFF / OME-TIFF (``.tif``, ``.tiff``) through tifffile. The first series is read, and its
  axes (tifffile's names, from OME, ImageJ or tifffile metadata) decide what each non-spatial
  axis is: S holds colour samples and C channels; Z (depth) and T (time) are a stack of planes,
  and so are Q / I (pages without metadata) in a file that holds one channel of an image
  (``per_channel``); otherwise Q / I pages are channels. The channel axis becomes the last
  axis, (H, W, C). A stack raises ``stack`` unless a ``z_projection`` reduces it (max, mean or
  pick:<index>, see ZProjection); axes of length 1 are dropped; more than one stack or channel
  axis raises ``bad_shape``, and so does a channel (C) axis in a per-channel file, which may
  hold one plane or colour only. A file holding several single-plane series of equal shape
  (pages written one by one) reads as pages (axis I). The commonest microscopy
  TIFF, one uncompressed grey plane in a classic (not Big-) TIFF with only baseline tags, is
  read without tifffile (_plain_tiff_layout): the same array, 0.04-0.08 ms per 224 x 224 file
  against 0.28 ms, most of which was tifffile's parsing in Python (reading the bytes: 0.02 ms).
- PNG through imagecodecs (libpng): 8- and 16-bit, grayscale, grayscale+alpha, RGB, RGBA.
  Pillow is not used for PNG because it reduces 16-bit RGB(A) to 8 bits.
- JPEG and BMP through Pillow (8-bit formats); palette and bilevel images become RGB / L.
- NPY (format versions 1-3, no pickled objects) read in one system call. A 2-D array is (H, W). A 3-D array is
  (H, W, C) when its last axis has at most ``MAX_CHANNELS`` entries, otherwise (C, H, W) when
  its first axis does (returned as an (H, W, C) view); anything else raises ``bad_shape``.

The native dtype is kept (uint8, uint16, other integers, float32, float64); only bool becomes
uint8, float16 becomes float32 and byte-swapped data becomes native order. Arrays returned
for channel-first sources are (H, W, C) views whose channel planes are contiguous, which the
standardization stage reads fastest.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import stat
import struct
from collections.abc import Callable, Sequence

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from cytopretrain.core.errors import ImageReadError
from cytopretrain.core.zprojection import ZProjection

# Largest channel count accepted when an array's channel axis must be guessed (NPY files).
MAX_CHANNELS = 16

READ_REASONS = (
    "missing_file",
    "empty_file",
    "unreadable",
    "unsupported_format",
    "bad_shape",
    "stack",
    "shape_mismatch",
    "wrong_channel_count",
)

# TIFF axes (tifffile's names) that stack planes of one channel: depth and time always, unnamed
# pages (Q, I) when the file holds one channel of an image.
_STACK_AXES = "ZT"
_PAGE_AXES = "QI"


def _shape_tiff(
    array: np.ndarray, axes: str, path: str, per_channel: bool, z_projection: ZProjection | None
) -> np.ndarray:
    """A TIFF series' array with its tifffile ``axes`` as (H, W) or (H, W, C); see the module
    docstring for what each axis is."""
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError("bad_shape", f"{path}: TIFF axes {axes!r} shape {array.shape} lack Y or X")
    described = f"{path}: TIFF axes {axes!r} shape {array.shape}"
    for i in reversed(range(len(axes))):  # a length-1 axis says nothing about the pixels
        if axes[i] not in "YX" and array.shape[i] == 1:
            array, axes = array.squeeze(i), axes[:i] + axes[i + 1 :]
    stack_kinds = _STACK_AXES + (_PAGE_AXES if per_channel else "")
    stacks = [axis for axis in axes if axis in stack_kinds]
    channels = [axis for axis in axes if axis not in "YX" and axis not in stack_kinds]
    if len(stacks) > 1 or len(channels) > 1:
        raise ImageReadError("bad_shape", f"{described}; expected YX plus at most one stack and one channel axis")
    if stacks:
        axis = axes.index(stacks[0])
        if z_projection is None:
            raise ImageReadError(
                "stack",
                f"{described}: a stack of {array.shape[axis]} planes along {stacks[0]}, not one image; "
                "the source option z_projection (max, mean or pick:<index>) reduces it to one plane",
            )
        array, axes = z_projection.reduce(array, axis, path), axes.replace(stacks[0], "")
    if channels and per_channel and channels[0] != "S":
        raise ImageReadError(
            "bad_shape",
            f"{described}: {array.shape[axes.index(channels[0])]} channels along {channels[0]} in a file "
            "that should hold one channel (one plane or colour)",
        )
    return np.moveaxis(array, axes.index(channels[0]), -1) if channels else array


def _check_tiff_extent(tif: tifffile.TiffFile, path: str, size: int) -> None:
    """Reject strips or tiles that point past the end of the file (a cut-off download)."""
    for page in tif.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise ImageReadError(
                "unreadable", f"{path}: TIFF image data ends at byte {max(ends)}, file has {size} bytes"
            )


# Tags of a plain TIFF plane: those that lay out its pixels, and metadata that does not
# change how tifffile reads it. A file with any other tag (tiles, sub-IFDs, orientation,
# ImageJ / MetaMorph / LSM private tags, ...) goes to tifffile.
_PLAIN_TIFF_LAYOUT_TAGS = {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 339}
_PLAIN_TIFF_METADATA_TAGS = {
    254,
    255,
    263,
    269,
    271,
    272,
    280,
    281,
    282,
    283,
    285,
    286,
    287,
    296,
    305,
    306,
    315,
    316,
    340,
    341,
    33432,
}
# Bytes read to decide whether a TIFF is a plain plane: its header and first IFD must lie
# within them (writers put the IFD first); a file that is not plain costs tifffile this read.
_TIFF_HEAD_BYTES = 1 << 16
_TIFF_INTEGER_TYPES = {1: "B", 3: "H", 4: "I"}  # BYTE, SHORT, LONG
_TIFF_SAMPLE_KINDS = {1: "u", 2: "i", 3: "f"}  # SampleFormat


def _tiff_fields(head: bytes, order: str, ifd: int) -> dict[int, tuple | bytes] | None:
    """The entries of the IFD at ``ifd`` in a file's first bytes: integer values as tuples, the
    description as bytes; None when the file is not one plain plane (another IFD follows, an
    unlisted tag) or an entry lies beyond ``head``."""
    (count,) = struct.unpack_from(order + "H", head, ifd)
    end = ifd + 2 + 12 * count
    if end + 4 > len(head) or struct.unpack_from(order + "I", head, end)[0] != 0:
        return None
    fields: dict[int, tuple | bytes] = {}
    for entry in range(ifd + 2, end, 12):
        tag, kind, n = struct.unpack_from(order + "HHI", head, entry)
        if tag == 270 and kind == 2:
            size, code = n, None
        elif tag in _PLAIN_TIFF_LAYOUT_TAGS and kind in _TIFF_INTEGER_TYPES:
            code = _TIFF_INTEGER_TYPES[kind]
            size = n * struct.calcsize(code)
        elif tag in _PLAIN_TIFF_METADATA_TAGS:
            continue
        else:
            return None
        offset = entry + 8 if size <= 4 else struct.unpack_from(order + "I", head, entry + 8)[0]
        if offset + size > len(head):
            return None
        if code is None:
            fields[tag] = bytes(head[offset : offset + size])
        else:
            fields[tag] = struct.unpack_from(f"{order}{n}{code}", head, offset)
    return fields


def _plain_tiff_layout(head: bytes, size: int) -> tuple[np.dtype, int, int, int] | None:
    """(dtype, height, width, offset of the pixels) of a TIFF file of ``size`` bytes, from its
    first bytes, when it holds one uncompressed grey plane in one contiguous run of strips,
    with no description or tifffile's own ``{"shape": [H, W]}``; else None (tifffile reads it)."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(head[:2]))
    if order is None or len(head) < 8 or struct.unpack_from(order + "H", head, 2)[0] != 42:
        return None
    (ifd,) = struct.unpack_from(order + "I", head, 4)
    if ifd + 2 > len(head):
        return None
    fields = _tiff_fields(head, order, ifd)
    if fields is None:
        return None

    def one(tag: int, default: int | None = None) -> int | None:
        values = fields.get(tag, (default,))
        return values[0] if len(values) == 1 else None

    width, height, bits = one(256), one(257), one(258)
    kind = _TIFF_SAMPLE_KINDS.get(one(339, 1))
    plain = one(259, 1) == 1 and one(262) == 1 and one(277, 1) == 1 and one(317, 1) == 1
    if not (plain and width and height and kind and bits in (8, 16, 32, 64)) or (kind == "f" and bits == 8):
        return None
    if 270 in fields:
        try:
            shaped = json.loads(fields[270].rstrip(b"\0"))
        except ValueError:
            return None
        if not isinstance(shaped, dict) or shaped.get("shape") != [height, width]:
            return None
    offsets, counts = fields.get(273, ()), fields.get(279, ())
    dtype = np.dtype(f"{order}{kind}{bits // 8}")
    nbytes = width * height * dtype.itemsize
    if not offsets or len(offsets) != len(counts) or sum(counts) != nbytes:
        return None
    if any(offsets[i + 1] != offsets[i] + counts[i] for i in range(len(offsets) - 1)):
        return None
    if offsets[0] + nbytes > size:
        return None  # cut off: tifffile's path names the missing bytes
    return dtype, height, width, offsets[0]


def _read_tiff(path: str, size: int, per_channel: bool = False, z_projection: ZProjection | None = None) -> np.ndarray:
    with open(path, "rb") as file:
        head = file.read(_TIFF_HEAD_BYTES)
        layout = _plain_tiff_layout(head, size)
        if layout is not None:
            dtype, height, width, offset = layout
            data = bytearray(size)
            data[: len(head)] = head
            filled = len(head) + file.readinto(memoryview(data)[len(head) :])
            if offset + height * width * dtype.itemsize <= filled:  # else cut short since its stat
                return np.frombuffer(data, dtype, height * width, offset).reshape(height, width)
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        if not series:
            raise ImageReadError("unreadable", f"{path}: TIFF holds no image series")
        _check_tiff_extent(tif, path, size)
        if len(series) == 1:
            return _shape_tiff(series[0].asarray(), series[0].axes, path, per_channel, z_projection)
        shapes = [s.shape for s in series]
        if any(len(shape) != 2 for shape in shapes) or len(set(shapes)) != 1:
            raise ImageReadError(
                "bad_shape", f"{path}: TIFF has {len(series)} series of shapes {shapes}; expected equal 2-D planes"
            )
        pages = np.stack([s.asarray() for s in series])
        return _shape_tiff(pages, "IYX", path, per_channel, z_projection)


def _read_png(path: str, size: int) -> np.ndarray:
    with open(path, "rb") as file:
        return imagecodecs.png_decode(file.read())


# Pillow modes without a direct numeric meaning, and the mode each is converted to.
_PIL_CONVERSIONS = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def _read_pil(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        target = _PIL_CONVERSIONS.get(image.mode)
        if image.mode == "P" and "transparency" in image.info:
            target = "RGBA"
        return np.array(image.convert(target) if target else image)


_NPY_MAGIC = b"\x93NUMPY"
# Bytes of the header-length field per NPY format major version.
_NPY_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}


@functools.lru_cache(maxsize=256)
def _npy_header(text: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """dtype, shape and Fortran order of an NPY header. The files of one set repeat one header,
    so it is parsed once (np.load parses every header anew: half its time on 68 px crops).
    Raises ValueError or SyntaxError on a malformed header."""
    header = ast.literal_eval(text.decode("latin1"))
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= header.keys():
        raise ValueError(f"NPY header {text[:80]!r} lacks descr / fortran_order / shape")
    dtype = np.lib.format.descr_to_dtype(header["descr"])
    return dtype, tuple(int(n) for n in header["shape"]), bool(header["fortran_order"])


def _read_npy(path: str, size: int) -> np.ndarray:
    """An NPY file in one read (the format: magic, version, header length, a Python-literal
    header, then the raw array); the array is writable, as np.load's."""
    with open(path, "rb") as file:
        data = bytearray(size)
        filled = file.readinto(data)
    version = data[6] if filled > 6 and data[:6] == _NPY_MAGIC else None
    if version not in _NPY_LENGTH_BYTES:
        raise ImageReadError(
            "unreadable", f"{path}: not an NPY file of format version 1-3 (starts {bytes(data[:8])!r})"
        )
    start = 8 + _NPY_LENGTH_BYTES[version]
    offset = start + int.from_bytes(data[8:start], "little")
    dtype, shape, fortran = _npy_header(bytes(data[start:offset]))
    if dtype.hasobject:
        raise ImageReadError("unsupported_format", f"{path}: NPY holds Python objects (dtype {dtype})")
    count = math.prod(shape)
    if filled - offset < count * dtype.itemsize:
        raise ImageReadError("unreadable", f"{path}: NPY data cut short: {filled - offset} bytes for {shape} {dtype}")
    array = np.frombuffer(data, dtype, count, offset).reshape(shape, order="F" if fortran else "C")
    if array.ndim == 3 and array.shape[-1] > MAX_CHANNELS:
        if array.shape[0] > MAX_CHANNELS:
            raise ImageReadError(
                "bad_shape", f"{path}: array shape {array.shape} has no channel axis of at most {MAX_CHANNELS}"
            )
        array = np.moveaxis(array, 0, -1)
    return array


# Readers take the path and the file's size in bytes (from read_image's one stat).
_READERS: dict[str, Callable[[str, int], np.ndarray]] = {
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
    ".png": _read_png,
    ".jpg": _read_pil,
    ".jpeg": _read_pil,
    ".bmp": _read_pil,
    ".npy": _read_npy,
}
SUPPORTED_SUFFIXES = tuple(_READERS)


def _native(array: np.ndarray, path: str) -> np.ndarray:
    """Check shape and dtype; convert only what downstream numeric code cannot use as is."""
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise ImageReadError("bad_shape", f"{path}: image shape {array.shape}; expected (H, W) or (H, W, C)")
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8)
    if kind not in "uif":
        raise ImageReadError("unsupported_format", f"{path}: pixel dtype {array.dtype} is not numeric")
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


def read_image(
    path: str | os.PathLike, *, per_channel: bool = False, z_projection: ZProjection | None = None
) -> np.ndarray:
    """One image file as an (H, W) or (H, W, C) array in its native dtype.

    ``per_channel``: the file holds one channel of an image, so a TIFF's unnamed pages are a
    stack, not channels; ``z_projection`` reduces a TIFF stack to one plane (module docstring).
    Raises ImageReadError with reason missing_file, empty_file, unsupported_format,
    unreadable (corrupt or truncated; the detail names the file and the decoder's error),
    stack or bad_shape.
    """
    # plain strings and os functions: pathlib's parsing cost more than reading a 68 px crop
    path = os.fspath(path)
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageReadError("missing_file", f"{path}: no such file") from None
    except OSError as exc:
        raise ImageReadError("unreadable", f"{path}: {type(exc).__name__}: {exc}") from exc
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError("unreadable", f"{path}: not a regular file")
    if status.st_size == 0:
        raise ImageReadError("empty_file", f"{path}: file has zero bytes")
    suffix = os.path.splitext(path)[1]
    reader = _READERS.get(suffix.lower())
    if reader is None:
        raise ImageReadError("unsupported_format", f"{path}: suffix {suffix!r} not in {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        if reader is _read_tiff:
            array = _read_tiff(path, status.st_size, per_channel, z_projection)
        else:
            array = reader(path, status.st_size)
    except ImageReadError:
        raise
    # Decoders signal corrupt data with many exception types (ValueError, OSError,
    # SyntaxError in Pillow, codec-specific errors, MemoryError for absurd headers).
    except Exception as exc:
        raise ImageReadError("unreadable", f"{path}: {type(exc).__name__}: {exc}") from exc
    return _native(array, path)


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """Mean of the first three channels (alpha ignored), as CytoImageNet merges RGB sources.

    The result is float32 (float64 for float64 input) so no intensity level is lost.
    """
    dtype = np.float64 if image.dtype == np.float64 else np.float32
    return image[:, :, :3].mean(axis=2, dtype=dtype)


def _single_channel(image: np.ndarray, path: str) -> np.ndarray:
    """A per-channel file (read with ``per_channel``) as a 2-D plane: gray as is, RGB(A)
    averaged to gray."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    if image.shape[2] in (3, 4):
        return rgb_to_gray(image)
    raise ImageReadError("bad_shape", f"{path}: a per-channel file must be gray or RGB(A), got shape {image.shape}")


def _stack_planes(paths: Sequence[str], z_projection: ZProjection | None) -> np.ndarray:
    """Read one plane per file into a (C, H, W) buffer, checking shapes as files arrive."""
    first = _single_channel(read_image(paths[0], per_channel=True, z_projection=z_projection), paths[0])
    planes = np.empty((len(paths),) + first.shape, dtype=first.dtype)
    planes[0] = first
    for c, path in enumerate(paths[1:], start=1):
        plane = _single_channel(read_image(path, per_channel=True, z_projection=z_projection), path)
        if plane.shape != first.shape:
            raise ImageReadError(
                "shape_mismatch",
                f"{path}: shape {plane.shape} differs from {paths[0]}: shape {first.shape}",
            )
        if plane.dtype != planes.dtype:
            planes = planes.astype(np.result_type(planes.dtype, plane.dtype))
        planes[c] = plane
    return planes


def read_channels(
    paths: Sequence[str | os.PathLike],
    expected_channels: int | None = None,
    z_projection: ZProjection | str | None = None,
) -> np.ndarray:
    """The channels of one image as an (H, W, C) array in the sources' dtype.

    Several paths: one file per channel, each one plane or colour (an RGB(A) file is averaged
    to one gray channel); the result is a view of a (C, H, W) buffer. One path: that file holds
    all channels (multi-page TIFF, NPY, multi-channel PNG); if ``expected_channels`` is 1 it is
    a per-channel file, and RGB(A) is averaged to gray. A TIFF stack (Z, T, or pages in a
    per-channel file) is reduced by ``z_projection`` (a ZProjection or its text) or raises
    ``stack``. Raises ImageReadError: read failures as in read_image, ``shape_mismatch`` when
    channel files differ in shape, ``wrong_channel_count`` when the channel count differs from
    ``expected_channels``.
    """
    if isinstance(z_projection, str):
        z_projection = ZProjection.parse(z_projection)
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ImageReadError("wrong_channel_count", "no channel files given")
    if expected_channels is not None and len(paths) > 1 and len(paths) != expected_channels:
        raise ImageReadError(
            "wrong_channel_count",
            f"{paths[0]}: {len(paths)} channel files given, {expected_channels} expected",
        )
    if len(paths) > 1:
        return _stack_planes(paths, z_projection).transpose(1, 2, 0)
    image = read_image(paths[0], per_channel=expected_channels == 1, z_projection=z_projection)
    if image.ndim == 2:
        image = image[:, :, None]
    elif expected_channels == 1 and image.shape[2] in (3, 4):
        image = rgb_to_gray(image)[:, :, None]
    if expected_channels is not None and image.shape[2] != expected_channels:
        raise ImageReadError(
            "wrong_channel_count",
            f"{paths[0]}: file holds {image.shape[2]} channels, {expected_channels} expected",
        )
    return image
