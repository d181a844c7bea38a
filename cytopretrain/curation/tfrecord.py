"""TFRecord files of ``tf.train.Example`` records, written with the ``tfrecord`` package and read
here, without TensorFlow.

Wire format (protocol buffers, proto3, tensorflow/core/example):
``Example{1: Features}``, ``Features{1: map<string, Feature>}`` where every map entry is a
message ``{1: key, 2: value}``, and ``Feature`` is a oneof of ``BytesList{1: repeated bytes}``
(field 1), ``FloatList{1: packed float}`` (field 2) or ``Int64List{1: packed int64}`` (field 3).
Integers are plain varints; a negative int64 is its 64-bit two's complement (10 bytes), zigzag
is not used.

Framing of every record: uint64 length (little endian), uint32 masked CRC-32C of those 8 bytes,
the data, uint32 masked CRC-32C of the data, with
``mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)``.

Python values map to features as follows: ``bytes``/``str`` (UTF-8) -> BytesList; ``bool`` and
integers -> Int64List; floats -> FloatList (float32: TensorFlow has no float64 feature, so a
float64 value is rounded to float32); a list, tuple or 1-D numpy array gives a list of the type
of its elements (an empty list or tuple is refused because its type is unknown; an empty numpy
array takes its dtype's type). :func:`decode_example` returns every feature as a full list:
``list[bytes]``, ``np.ndarray[float32]`` or ``np.ndarray[int64]``.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator

import crc32c
import numpy as np
from PIL import Image
from tfrecord.writer import TFRecordWriter as PackageWriter

from cytopretrain.core.errors import TFRecordError
from cytopretrain.core.tables import AtomicFileWriter

FeatureValue = list[bytes] | np.ndarray

_MASK_DELTA = 0xA282EAD8
_UINT32 = 0xFFFFFFFF
_UINT64 = 0xFFFFFFFFFFFFFFFF
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")

# Wire types and the field numbers of tf.train.Feature's oneof.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3

# Channel counts that PNG stores natively (grayscale, RGB); any other count is stored raw.
_PNG_MODES = {1: "L", 3: "RGB"}


# --------------------------------------------------------------------------- checksums


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _UINT32


# --------------------------------------------------------------------------- writing
#
# Examples are serialized by the PyPI ``tfrecord`` package (protobuf): benchmarks/README.md,
# "bench_tfrecord", measured it 1.6x faster than this module's former hand-written encoder on
# real shard rows. Here the values only get their Feature kind, checked so that an empty,
# mixed or out-of-range value is an error naming its feature.

# Element types accepted by each Feature kind, tried in this order.
_KIND_TYPES = (
    ("byte", (str, bytes, bytearray, memoryview, np.bytes_, np.str_)),
    ("int", (bool, int, np.integer, np.bool_)),
    ("float", (float, np.floating)),
)
_KIND_OF_DTYPE = {"S": "byte", "U": "byte", "b": "int", "i": "int", "u": "int", "f": "float"}


def _as_bytes(value: object) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def feature_values(key: str, value: object) -> tuple[list, str]:
    """A feature's values as a plain list and its kind ("byte", "int" or "float"), as the
    ``tfrecord`` package's writer takes them; TypeError names the feature when the value has
    no TFRecord type (an empty list, mixed element types, an int beyond int64, a 2-D array)."""
    if isinstance(value, np.ndarray) and value.dtype.kind != "O":
        if value.ndim > 1:
            raise TypeError(f"feature {key!r}: arrays must be 1-D, got shape {value.shape}")
        if value.dtype.kind not in _KIND_OF_DTYPE:
            raise TypeError(f"feature {key!r}: unsupported array dtype {value.dtype}")
        kind, values = _KIND_OF_DTYPE[value.dtype.kind], np.atleast_1d(value).tolist()
    else:
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        if not values:
            raise TypeError(f"feature {key!r}: empty list, its feature type is unknown")
        kind = next((k for k, types in _KIND_TYPES if all(isinstance(v, types) for v in values)), None)
        if kind is None:
            kinds = sorted({type(v).__name__ for v in values})
            raise TypeError(f"feature {key!r}: unsupported or mixed value types {kinds}")
    if kind == "byte":
        return [_as_bytes(v) for v in values], kind
    if kind == "int":
        values = [int(v) for v in values]
        if any(not _INT64_MIN <= v <= _INT64_MAX for v in values):
            raise TypeError(f"feature {key!r}: a value does not fit in int64")
        return values, kind
    return [float(v) for v in values], kind


def typed_features(features: dict[str, object]) -> dict[str, tuple[list, str]]:
    """Plain values (see the module docstring) as the writer's (values, kind) pairs."""
    return {key: feature_values(key, value) for key, value in features.items()}


class TFRecordWriter(AtomicFileWriter):
    """Write Examples to ``path`` with the ``tfrecord`` package's writer; the file appears only
    when :meth:`close` succeeds. ``write`` takes feature name -> (list of values, kind), kind
    "byte", "int" or "float" (typed_features makes them from plain values; callers that know
    their types, like the shard writer, build them directly)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.n_records = 0
        self._writer = PackageWriter(str(self._tmp))

    def write(self, datum: dict[str, tuple[list, str]]) -> None:
        self._writer.write(datum)
        self.n_records += 1

    def _finish(self, complete: bool) -> None:
        self._writer.close()


# --------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike, verify_crc: bool = True) -> Iterator[bytes]:
    """Yield the data of every record of a TFRecord file; a bad CRC or a truncated record raises
    :class:`TFRecordError` naming the file, the record number and its byte offset."""
    with open(path, "rb") as fh:
        number = 0
        while True:
            offset = fh.tell()
            header = fh.read(_HEADER.size)
            if not header:
                return
            where = f"{path}: record {number} at byte {offset}"
            if len(header) < _HEADER.size:
                raise TFRecordError(f"{where}: truncated header")
            length, length_crc = _HEADER.unpack(header)
            if verify_crc and masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(f"{where}: length CRC mismatch")
            data = fh.read(length)
            footer = fh.read(_FOOTER.size)
            if len(data) < length or len(footer) < _FOOTER.size:
                raise TFRecordError(f"{where}: truncated record (length {length})")
            if verify_crc and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
                raise TFRecordError(f"{where}: data CRC mismatch")
            yield data
            number += 1


def _read_varint(buffer: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise TFRecordError("malformed varint in Example")
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _UINT64, pos
        shift += 7


def _fields(buffer: memoryview) -> Iterator[tuple[int, int, object]]:
    """Yield (field number, wire type, value) of a message; value is an int or a memoryview."""
    pos = 0
    while pos < len(buffer):
        tag, pos = _read_varint(buffer, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buffer, pos)
        elif wire_type == _LENGTH_DELIMITED:
            size, pos = _read_varint(buffer, pos)
            value, pos = buffer[pos : pos + size], pos + size
        elif wire_type in (_FIXED32, _FIXED64):
            size = 4 if wire_type == _FIXED32 else 8
            value, pos = buffer[pos : pos + size], pos + size
        else:
            raise TFRecordError(f"unsupported wire type {wire_type} in Example")
        if pos > len(buffer):
            raise TFRecordError("field runs past the end of its message in Example")
        yield field, wire_type, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_list(kind: int, message: memoryview) -> FeatureValue:
    """Values of a BytesList, FloatList or Int64List, packed or not."""
    if kind == _BYTES_LIST:
        return [bytes(v) for f, _, v in _fields(message) if f == 1]
    floats: list[np.ndarray] = []
    ints: list[int] = []
    for field, wire_type, value in _fields(message):
        if field != 1:
            continue
        if kind == _FLOAT_LIST:
            # packed (length-delimited) and unpacked (fixed32) encodings are both legal
            floats.append(np.frombuffer(value, dtype="<f4"))
        elif wire_type == _VARINT:
            ints.append(_signed64(value))
        else:
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos)
                ints.append(_signed64(item))
    if kind == _FLOAT_LIST:
        return np.concatenate(floats).astype(np.float32) if floats else np.empty(0, np.float32)
    return np.array(ints, dtype=np.int64)


def _decode_feature(message: memoryview) -> FeatureValue:
    value: FeatureValue = []  # a Feature with no kind set is an empty list
    for field, wire_type, payload in _fields(message):
        if field in (_BYTES_LIST, _FLOAT_LIST, _INT64_LIST) and wire_type == _LENGTH_DELIMITED:
            value = _decode_list(field, payload)  # a later oneof member wins, as in protobuf
    return value


def decode_example(data: bytes | memoryview) -> dict[str, FeatureValue]:
    """Parse a serialized ``tf.train.Example`` into name -> list of values."""
    out: dict[str, FeatureValue] = {}
    for field, _, features in _fields(memoryview(data)):
        if field != 1:
            continue
        for entry_field, _, entry in _fields(features):
            if entry_field != 1:
                continue
            key, value = "", memoryview(b"")
            for part, _, payload in _fields(entry):
                if part == 1:
                    key = bytes(payload).decode("utf-8")
                elif part == 2:
                    value = payload
            out[key] = _decode_feature(value)
    return out


# --------------------------------------------------------------------------- images


def image_features(image: np.ndarray) -> dict[str, tuple[list, str]]:
    """Features of one uint8 (H, W, C) image, as the writer's (values, kind) pairs.

    1 channel -> grayscale PNG, 3 channels -> RGB PNG under ``image/encoded`` with
    ``image/format`` b"png"; any other channel count -> the raw C-order bytes under
    ``image/raw`` with ``image/format`` b"raw". Always ``image/height``, ``image/width``,
    ``image/channels``.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise TypeError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    shape = {"image/height": ([height], "int"), "image/width": ([width], "int"), "image/channels": ([channels], "int")}
    mode = _PNG_MODES.get(channels)
    if mode is None:
        return {
            "image/raw": ([np.ascontiguousarray(image).tobytes()], "byte"),
            "image/format": ([b"raw"], "byte"),
            **shape,
        }
    buffer = io.BytesIO()
    pixels = image[:, :, 0] if channels == 1 else image
    # compress_level 1: shards are written once per run and PNG time dominates the stage
    Image.fromarray(np.ascontiguousarray(pixels), mode=mode).save(buffer, format="PNG", compress_level=1)
    return {"image/encoded": ([buffer.getvalue()], "byte"), "image/format": ([b"png"], "byte"), **shape}


def _single(features: dict[str, FeatureValue], key: str) -> object:
    values = features.get(key)
    if values is None or len(values) != 1:
        raise TFRecordError(f"feature {key!r}: expected one value, got {values!r}")
    return values[0]


def decode_image(features: dict[str, FeatureValue]) -> np.ndarray:
    """Inverse of :func:`image_features` on decoded features: a uint8 (H, W, C) array."""
    height = int(_single(features, "image/height"))
    width = int(_single(features, "image/width"))
    channels = int(_single(features, "image/channels"))
    kind = _single(features, "image/format")
    if kind == b"png":
        with Image.open(io.BytesIO(_single(features, "image/encoded"))) as png:
            if png.mode != _PNG_MODES.get(channels):
                raise TFRecordError(f"PNG mode {png.mode} does not hold {channels} uint8 channel(s)")
            image = np.asarray(png)
    elif kind == b"raw":
        image = np.frombuffer(_single(features, "image/raw"), dtype=np.uint8)
    else:
        raise TFRecordError(f"unknown image/format {kind!r}")
    if image.size != height * width * channels:
        raise TFRecordError(f"decoded image has shape {image.shape}, features say {height}x{width}x{channels}")
    return image.reshape(height, width, channels)
