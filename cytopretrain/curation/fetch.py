"""Resumable, verified file fetches: HTTP(S) with Range requests and retries, file:// and local
copies. Only the standard library speaks HTTP here: a partial file ``<dest>.part`` survives
dropped connections and interrupted runs and is continued with a ``Range`` request."""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cytopretrain.core.errors import (
    ChecksumError,
    DownloadError,
)
from cytopretrain.core.tables import file_sha256

log = logging.getLogger(__name__)
RETRYABLE_STATUS = (408, 429)
MAX_BACKOFF_SECONDS = 60.0
PROGRESS_EVERY_SECONDS = 10.0


class _Retryable(Exception):
    """A transient failure: the attempt may be repeated."""


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 60,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` atomically (via ``dest.part``), resuming and verifying.

    Retries (up to ``retries`` times in a row without progress, sleeping ``backoff * 2**k``)
    on 5xx, 408, 429, connection errors, timeouts and short reads; other 4xx fail at once.
    ``file://`` URLs and local paths are copied. Raises :class:`ChecksumError` (and deletes
    the download) when ``sha256`` is given and does not match.
    """
    return fetch_with_digest(url, Path(dest), sha256, retries, backoff, timeout, chunk_size)[0]


def fetch_with_digest(
    url: str,
    dest: Path,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 60,
    chunk_size: int = 1 << 20,
) -> tuple[Path, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        _download_with_retries(url, part, retries, backoff, timeout, chunk_size)
    elif scheme in ("file", ""):
        _copy_local(url, part, chunk_size)
    else:
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r}")
    digest = file_sha256(part, chunk_size)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ChecksumError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {digest}")
    os.replace(part, dest)
    log.info("fetched %s -> %s (%d bytes, sha256 %s)", url, dest, dest.stat().st_size, digest)
    return dest, digest


def _local_source_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(unquote(parts.path)))
    return Path(url)


def _copy_local(url: str, part: Path, chunk_size: int) -> None:
    source = _local_source_path(url)
    if not source.is_file():
        raise DownloadError(f"{url}: local file not found ({source})")
    with open(source, "rb") as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, chunk_size)


def _download_with_retries(url, part: Path, retries, backoff, timeout, chunk_size) -> None:
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _download_once(url, part, timeout, chunk_size)
            return
        except _Retryable as exc:
            after = part.stat().st_size if part.exists() else 0
            # A drop after real progress is not a failure of the same kind: only consecutive
            # attempts that add nothing count against `retries` (the part only ever grows).
            failures = 0 if after > before else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: giving up after {failures} failed attempts in a row: {exc}") from None
            delay = min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF_SECONDS)
            log.warning("%s: %s; retrying in %.2f s (%d bytes kept)", url, exc, delay, after)
            time.sleep(delay)


def _download_once(url: str, part: Path, timeout: float, chunk_size: int) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cytopretrain-download/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _handle_unsatisfiable_range(url, part, offset, exc.headers.get("Content-Range"))
            return
        if exc.code >= 500 or exc.code in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"connection failed: {exc}") from None
    with response:
        mode, start, total = _response_plan(url, response, offset)
        _stream_body(url, response, part, mode, start, total, chunk_size)


def _handle_unsatisfiable_range(url: str, part: Path, offset: int, content_range: str | None) -> None:
    """416 on a resume: the part is complete when the server's size equals it, else restart."""
    match = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    if match and int(match.group(1)) == offset:
        return
    part.unlink()
    raise _Retryable(f"server refused range from byte {offset} ({content_range}); restarting")


def _response_plan(url: str, response, offset: int) -> tuple[str, int, int | None]:
    """(file mode, first byte, total size) for a 200 or 206 answer to a possibly ranged request."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if not match or int(match.group(1)) != offset:
            raise DownloadError(f"{url}: asked for bytes {offset}-, got Content-Range {content_range!r}")
        total = None if match.group(3) == "*" else int(match.group(3))
        return "ab", offset, total
    if response.status != 200:
        raise DownloadError(f"{url}: unexpected HTTP {response.status}")
    if offset:
        log.info("%s: server ignored the range request; restarting from byte 0", url)
    return "wb", 0, int(length) if length is not None else None


def _stream_body(url, response, part: Path, mode: str, start: int, total, chunk_size: int) -> None:
    expected = response.headers.get("Content-Length")
    expected = int(expected) if expected is not None else None
    received = 0
    last_report = time.monotonic()
    began = last_report
    try:
        with open(part, mode) as out:
            while True:
                block = response.read(chunk_size)
                if not block:
                    break
                out.write(block)
                received += len(block)
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY_SECONDS:
                    _log_progress(url, start + received, total, received / max(now - began, 1e-9))
                    last_report = now
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"connection lost after {start + received} bytes: {exc!r}") from None
    if expected is not None and received < expected:
        raise _Retryable(f"short read: {received} of {expected} bytes from byte {start}")


def _log_progress(url: str, done: int, total: int | None, rate: float) -> None:
    share = f" ({100 * done / total:.1f}% of {total})" if total else ""
    log.info("%s: %d bytes%s at %.1f MB/s", url, done, share, rate / 1e6)
