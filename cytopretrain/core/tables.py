"""Atomic table writing and the pixel columns that carry images between stages.

Images travel between stages inside Parquet files, one row per image, as raw uint8 bytes in
C order with their shape: columns ``pixels`` (binary), ``height``, ``width``, ``n_channels``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PIXEL_FIELDS: dict[str, pa.DataType] = {
    "pixels": pa.binary(),
    "height": pa.int32(),
    "width": pa.int32(),
    "n_channels": pa.int16(),
}


def encode_pixels(image: np.ndarray) -> dict:
    """Pixel columns of one uint8 image of shape (H, W) or (H, W, C)."""
    if image.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be 2-D or 3-D, got shape {image.shape}")
    h, w, c = image.shape
    return {
        "pixels": np.ascontiguousarray(image).tobytes(),
        "height": h,
        "width": w,
        "n_channels": c,
    }


def decode_pixels(pixels: bytes, height: int, width: int, n_channels: int) -> np.ndarray:
    """Inverse of :func:`encode_pixels`: an (H, W, C) uint8 view of the bytes."""
    array = np.frombuffer(pixels, dtype=np.uint8)
    expected = int(height) * int(width) * int(n_channels)
    if array.size != expected:
        raise ValueError(f"pixel buffer has {array.size} bytes, shape says {height}x{width}x{n_channels}")
    return array.reshape(int(height), int(width), int(n_channels))


def _create_beside(target: Path) -> Path:
    """A new empty file ``.<name>.<random>.part`` beside ``target``, created as ``open`` creates
    files (mode 0666 less the umask): ``tempfile.mkstemp`` would make it 0600, and the rename
    keeps the mode, so every output would be unreadable to the user's group on a shared folder."""
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The file gets the mode the umask gives a new file (as ``open`` would), so outputs are as
    readable as any file the user writes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_beside(target)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def write_table(frame: pd.DataFrame | pa.Table, path: str | os.PathLike, schema: pa.Schema | None = None) -> None:
    """Write a DataFrame or Arrow table atomically; format by suffix (.parquet, .tsv, .csv)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            table = (
                frame
                if isinstance(frame, pa.Table)
                else pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
            )
            pq.write_table(table, tmp, compression="zstd")
        elif path.suffix in (".tsv", ".csv"):
            data = frame.to_pandas() if isinstance(frame, pa.Table) else frame
            data.to_csv(tmp, sep="\t" if path.suffix == ".tsv" else ",", index=False)
        else:
            raise ValueError(f"{path}: unsupported table suffix {path.suffix!r}")


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a .parquet, .tsv or .csv table written by :func:`write_table`."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=columns).to_pandas()
    sep = "\t" if path.suffix == ".tsv" else ","
    frame = pd.read_csv(path, sep=sep, keep_default_na=False, dtype=str)
    return frame[columns] if columns else frame


class AtomicFileWriter:
    """A file written through a temporary path and renamed into place on ``close``; ``abort``
    (or leaving a ``with`` block by an exception) removes it. Subclasses open their writer on
    ``self._tmp`` and close it in ``_finish``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()

    def _finish(self, complete: bool) -> None:
        """Close the underlying writer; ``complete`` is False when aborting."""
        raise NotImplementedError

    def close(self) -> None:
        self._finish(complete=True)
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self._finish(complete=False)
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ParquetStreamWriter(AtomicFileWriter):
    """Append row groups to one Parquet file, renamed into place on ``close``.

    Memory stays bounded by one row group, so a chunk of thousands of full-size images can
    be written without holding them all.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, rows_per_group: int = 64):
        super().__init__(path)
        self.schema = schema
        self.rows_per_group = rows_per_group
        self._buffer: list[dict] = []
        self.n_rows = 0
        # Dictionary encoding never pays off on image bytes and costs a pass over each image.
        dictionary_columns = [f.name for f in schema if f.type != pa.binary()]
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd", use_dictionary=dictionary_columns)

    def write(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            batch = pa.Table.from_pylist(self._buffer, schema=self.schema)
            self._writer.write_table(batch)
            self.n_rows += len(self._buffer)
            self._buffer = []

    def _finish(self, complete: bool) -> None:
        if complete:
            self._flush()
        self._writer.close()


def iter_parquet_rows(
    path: str | os.PathLike, columns: list[str] | None = None, batch_size: int = 64
) -> Iterator[dict]:
    """Stream rows of a Parquet file as dicts, one record batch in memory at a time."""
    with pq.ParquetFile(path) as handle:
        for batch in handle.iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def read_row_group(path: str | os.PathLike, index: int, columns: list[str] | None = None) -> pd.DataFrame:
    """Row group ``index`` of a Parquet file (the merged table stores one chunk per row group).

    An index past the last row group gives an empty frame with the file's columns, so a
    plan of one chunk over an empty table still runs.
    """
    with pq.ParquetFile(path) as handle:
        if index < handle.num_row_groups:
            return handle.read_row_group(index, columns=columns).to_pandas()
        return handle.schema_arrow.empty_table().select(columns or handle.schema_arrow.names).to_pandas()
