"""TFRecord files of ``tf.train.Example`` records, written and read without TensorFlow.

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
from typing import BinaryIO

import crc32c
import numpy as np
from PIL import Image

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


# --------------------------------------------------------------------------- encoding


def _varint(value: int) -> bytes:
    """Base-128 varint of an unsigned value below 2**64."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _tag(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _as_bytes(value: object) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _int64_payload(values: list | np.ndarray, key: str) -> bytes:
    out = bytearray()
    for item in values:
        value = int(item)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise TypeError(f"feature {key!r}: {value} does not fit in int64")
        out += _varint(value & _UINT64)  # two's complement: negatives take 10 bytes
    return bytes(out)


# Element types accepted by each Feature kind, tried in this order.
_KIND_TYPES = (
    (_BYTES_LIST, (str, bytes, bytearray, memoryview, np.bytes_, np.str_)),
    (_INT64_LIST, (bool, int, np.integer, np.bool_)),
    (_FLOAT_LIST, (float, np.floating)),
)
_KIND_OF_DTYPE = {
    "S": _BYTES_LIST,
    "U": _BYTES_LIST,
    "b": _INT64_LIST,
    "i": _INT64_LIST,
    "u": _INT64_LIST,
    "f": _FLOAT_LIST,
}


def _feature_kind(value: object, key: str) -> tuple[int, list | np.ndarray]:
    """The Feature oneof field for ``value`` and its values as a list or 1-D array."""
    if isinstance(value, np.ndarray) and value.dtype.kind != "O":
        if value.ndim > 1:
            raise TypeError(f"feature {key!r}: arrays must be 1-D, got shape {value.shape}")
        if value.dtype.kind not in _KIND_OF_DTYPE:
            raise TypeError(f"feature {key!r}: unsupported array dtype {value.dtype}")
        return _KIND_OF_DTYPE[value.dtype.kind], np.atleast_1d(value)
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not values:
        raise TypeError(f"feature {key!r}: empty list, its feature type is unknown")
    for kind, types in _KIND_TYPES:
        if all(isinstance(v, types) for v in values):
            return kind, values
    kinds = sorted({type(v).__name__ for v in values})
    raise TypeError(f"feature {key!r}: unsupported or mixed value types {kinds}")


def _encode_feature(key: str, value: object) -> bytes:
    """One serialized ``tf.train.Feature``."""
    kind, values = _feature_kind(value, key)
    if kind == _BYTES_LIST:
        payload = b"".join(_length_delimited(1, _as_bytes(v)) for v in values)
    else:
        if kind == _FLOAT_LIST:
            packed = np.asarray(values, dtype="<f4").tobytes()
        else:
            packed = _int64_payload(values, key)
        payload = _length_delimited(1, packed) if packed else b""
    return _length_delimited(kind, payload)


def encode_example(features: dict[str, object]) -> bytes:
    """Serialize ``features`` (name -> value, see module docstring) as a ``tf.train.Example``."""
    entries = bytearray()
    for key, value in features.items():
        if not isinstance(key, str):
            raise TypeError(f"feature names must be str, got {key!r}")
        entry = _length_delimited(1, key.encode("utf-8")) + _length_delimited(
            2, _encode_feature(key, value)
        )
        entries += _length_delimited(1, entry)
    return _length_delimited(1, bytes(entries))


def frame_record(data: bytes) -> bytes:
    """``data`` wrapped in TFRecord framing (length, CRCs)."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def write_example(fh: BinaryIO, features: dict[str, object]) -> int:
    """Append one framed Example to an open binary file; return the bytes written."""
    record = frame_record(encode_example(features))
    fh.write(record)
    return len(record)


class TFRecordWriter(AtomicFileWriter):
    """Write Examples to ``path``; the file appears only when :meth:`close` succeeds."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.n_records = 0
        self._fh = open(self._tmp, "wb")

    def write(self, features: dict[str, object]) -> None:
        write_example(self._fh, features)
        self.n_records += 1

    def _finish(self, complete: bool) -> None:
        self._fh.close()


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


def image_features(image: np.ndarray) -> dict[str, object]:
    """Features of one uint8 (H, W, C) image.

    1 channel -> grayscale PNG, 3 channels -> RGB PNG under ``image/encoded`` with
    ``image/format`` b"png"; any other channel count -> the raw C-order bytes under
    ``image/raw`` with ``image/format`` b"raw". Always ``image/height``, ``image/width``,
    ``image/channels``.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise TypeError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    shape = {"image/height": height, "image/width": width, "image/channels": channels}
    mode = _PNG_MODES.get(channels)
    if mode is None:
        return {"image/raw": np.ascontiguousarray(image).tobytes(), "image/format": b"raw", **shape}
    buffer = io.BytesIO()
    pixels = image[:, :, 0] if channels == 1 else image
    # compress_level 1: shards are written once per run and PNG time dominates the stage
    Image.fromarray(np.ascontiguousarray(pixels), mode=mode).save(
        buffer, format="PNG", compress_level=1
    )
    return {"image/encoded": buffer.getvalue(), "image/format": b"png", **shape}


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
                raise TFRecordError(
                    f"PNG mode {png.mode} does not hold {channels} uint8 channel(s)"
                )
            image = np.asarray(png)
    elif kind == b"raw":
        image = np.frombuffer(_single(features, "image/raw"), dtype=np.uint8)
    else:
        raise TFRecordError(f"unknown image/format {kind!r}")
    if image.size != height * width * channels:
        raise TFRecordError(
            f"decoded image has shape {image.shape}, features say {height}x{width}x{channels}"
        )
    return image.reshape(height, width, channels)
