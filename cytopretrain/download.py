"""Download stage: source descriptions, resumable verified HTTP fetches and safe extraction.

A *resource* is a dict describing one public source (see ``resources/sources/*.yaml``): where
its files live, how to reach them (``transport``: https, kaggle, aspera, manual, or local for a
folder the user already has) and which adapter reads them. :func:`download_source` turns a
resource into a folder of extracted files plus ``download_manifest.json``.

Only the standard library speaks HTTP here: a partial file ``<dest>.part`` survives dropped
connections and interrupted runs and is continued with a ``Range`` request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import unquote, urlsplit

import yaml

from cytopretrain.tables import atomic_path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES_DIR = REPO_ROOT / "resources" / "sources"
MANIFEST_NAME = "download_manifest.json"

ADAPTERS = (
    "bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "folder", "manifest", "synthetic", "canonical",
)
TRANSPORTS = ("https", "kaggle", "aspera", "manual", "local")
# The key that each transport needs besides the required ones.
TRANSPORT_KEYS = {"https": "files", "kaggle": "kaggle", "aspera": "aspera", "manual": "instructions", "local": "path"}
ARCHIVES = ("zip", "tar", "tar.gz", "tgz", "tar.bz2", "tar.xz", "none")
REQUIRED_KEYS = ("name", "title", "database", "adapter", "licence", "homepage", "citation", "transport")
OPTIONAL_KEYS = ("files", "kaggle", "aspera", "instructions", "options", "notes", "path", "role")
FILE_KEYS = ("url", "sha256", "archive", "dest", "filename")
# Keys a `sources.<name>` config entry may carry (the download script removes `synthetic`).
CONFIG_KEYS = ("resource", "url", "urls", "sha256", "archive", "adapter", "options", "path", "role")

RETRYABLE_STATUS = (408, 429)
MAX_BACKOFF_SECONDS = 60.0
PROGRESS_EVERY_SECONDS = 10.0
ASPERA_KEY_CANDIDATES = (
    "~/.aspera/connect/etc/asperaweb_id_dsa.openssh",
    "~/.aspera/cli/etc/asperaweb_id_dsa.openssh",
)


class DownloadError(RuntimeError):
    """A file could not be fetched or placed; the message names the URL or file."""


class ResourceError(ValueError):
    """A source description is invalid; the message names the file (or config entry) and key."""


class ChecksumError(DownloadError):
    """The fetched bytes do not have the expected sha256."""


class UnsafeArchiveError(DownloadError):
    """An archive entry would escape the target folder or is not a plain file or folder."""


class CredentialsRequired(DownloadError):
    """The transport needs credentials or a tool the user has not provided."""


class TransportUnavailable(DownloadError):
    """The transport's command-line tool is not installed."""


class ManualDownloadRequired(DownloadError):
    """The source has no automatic download; the message says how to obtain it."""


class _Retryable(Exception):
    """A transient failure: the attempt may be repeated."""


# ---------------------------------------------------------------------------------------------
# Source descriptions


class _Where:
    """Formats validation errors so that they name the file or the config entry and the key."""

    def __init__(self, origin: str, config_style: bool):
        self.origin = origin
        self.config_style = config_style

    def error(self, key: str, problem: str) -> ResourceError:
        if self.config_style:
            return ResourceError(f"{self.origin}.{key}: {problem}")
        return ResourceError(f"{self.origin}: key '{key}': {problem}")


def resolve_resource_path(path_or_name: str | os.PathLike) -> Path:
    """A bare name means ``resources/sources/<name>.yaml``; anything else is a path."""
    text = str(path_or_name)
    if re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        return SOURCES_DIR / f"{text}.yaml"
    return Path(text)


def load_resource(path_or_name: str | os.PathLike) -> dict:
    """Load and validate one source description (a bare name resolves in resources/sources/)."""
    path = resolve_resource_path(path_or_name)
    if not path.is_file():
        raise ResourceError(f"{path}: source description not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ResourceError(f"{path}: not valid YAML: {exc}") from exc
    where = _Where(str(path), config_style=False)
    if not isinstance(data, dict):
        raise ResourceError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    resource = validate_resource(data, where)
    if resource["name"] != path.stem:
        raise where.error("name", f"{resource['name']!r} differs from the file name {path.stem!r}")
    return resource


def validate_resource(data: dict, where: _Where) -> dict:
    """Check keys and values of a resource; return a copy with defaults filled in."""
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise where.error(unknown[0], f"unknown key (allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise where.error(key, "missing")
        if not _is_text(data[key]):
            raise where.error(key, "must be a non-empty string")
    resource = dict(data)
    _check_choice(where, "adapter", resource["adapter"], ADAPTERS)
    _check_choice(where, "transport", resource["transport"], TRANSPORTS)
    if "options" in resource and not isinstance(resource["options"], dict):
        raise where.error("options", "must be a mapping")
    transport = resource["transport"]
    needed = TRANSPORT_KEYS[transport]
    if needed not in resource:
        raise where.error(needed, f"required for transport {transport!r}")
    if transport == "https":
        resource["files"] = _validate_files(resource["files"], where)
    elif transport == "kaggle":
        resource["kaggle"] = _validate_kaggle(resource["kaggle"], where)
    elif transport == "aspera":
        resource["aspera"] = _validate_aspera(resource["aspera"], where)
    elif transport == "manual" and not _is_text(resource["instructions"]):
        raise where.error("instructions", "must be a non-empty string")
    elif transport == "local" and not _is_text(resource["path"]):
        raise where.error("path", "must be a folder path")
    return resource


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_choice(where: _Where, key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise where.error(key, f"{value!r} is not one of {', '.join(allowed)}")


def _validate_files(files, where: _Where) -> list[dict]:
    if not isinstance(files, list) or not files:
        raise where.error("files", "must be a non-empty list")
    out = []
    seen: dict[str, int] = {}
    for i, item in enumerate(files):
        key = f"files[{i}]"
        if not isinstance(item, dict):
            raise where.error(key, "must be a mapping with at least 'url'")
        unknown = sorted(set(item) - set(FILE_KEYS))
        if unknown:
            raise where.error(f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(FILE_KEYS)})")
        out.append(_validate_file_entry(item, where, key))
        name = out[-1]["filename"]
        if name in seen:
            raise where.error(f"{key}.url", f"file name {name!r} repeats files[{seen[name]}]; set 'filename'")
        seen[name] = i
    return out


def _validate_file_entry(item: dict, where: _Where, key: str) -> dict:
    url = item.get("url")
    if not isinstance(url, str) or not url.strip():
        raise where.error(f"{key}.url", "must be a non-empty string")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file", ""):
        raise where.error(f"{key}.url", f"unsupported scheme {scheme!r} (http, https, file or a local path)")
    sha = item.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise where.error(f"{key}.sha256", "must be 64 hex digits or null")
    archive = item.get("archive") or infer_archive_type(url)
    _check_choice(where, f"{key}.archive", archive, ARCHIVES)
    dest = str(item.get("dest", "."))
    if not _is_safe_relative(dest):
        raise where.error(f"{key}.dest", f"{dest!r} must be a relative folder without '..'")
    filename = item.get("filename") or url_basename(url)
    if not filename or not _is_safe_relative(filename) or "/" in filename:
        raise where.error(f"{key}.filename", f"cannot use {filename!r} as a file name; set 'filename'")
    return {
        "url": url,
        "sha256": sha.lower() if sha else None,
        "archive": "tar.gz" if archive == "tgz" else archive,
        "dest": dest,
        "filename": filename,
    }


def _validate_kaggle(spec, where: _Where) -> dict:
    if not isinstance(spec, dict) or len(set(spec) & {"competition", "dataset"}) != 1 or len(spec) != 1:
        raise where.error("kaggle", "must be {competition: NAME} or {dataset: OWNER/NAME}")
    (kind, value), = spec.items()
    if not isinstance(value, str) or not value:
        raise where.error(f"kaggle.{kind}", "must be a non-empty string")
    if kind == "dataset" and not re.fullmatch(r"[^/\s]+/[^/\s]+", value):
        raise where.error("kaggle.dataset", f"{value!r} must be OWNER/NAME")
    return {kind: value}


def _validate_aspera(spec, where: _Where) -> dict:
    if not isinstance(spec, dict):
        raise where.error("aspera", "must be a mapping with user and host")
    allowed = ("user", "host", "port", "remote_path", "rate", "key_file")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise where.error(f"aspera.{unknown[0]}", f"unknown key (allowed: {', '.join(allowed)})")
    for key in ("user", "host"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise where.error(f"aspera.{key}", "must be a non-empty string")
    port = spec.get("port", 33001)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise where.error("aspera.port", f"{port!r} is not a port number")
    return {
        "user": spec["user"],
        "host": spec["host"],
        "port": port,
        "remote_path": str(spec.get("remote_path", ".")),
        "rate": str(spec.get("rate", "100m")),
        "key_file": spec.get("key_file"),
    }


def resource_from_config(name: str, spec: dict) -> dict:
    """Turn a ``sources.<name>`` config entry into a validated resource dict.

    Forms: ``{resource: NAME_OR_PATH}`` (optionally overriding ``adapter``/``options``),
    ``{url: U, sha256: H, archive: A}``, ``{urls: [U, ...], archive: A}`` (an inline https
    source, adapter ``folder`` unless given) or ``{path: DIR}`` (a local folder; nothing to
    fetch). Errors name ``sources.<name>.<key>``.
    """
    where = _Where(f"sources.{name}", config_style=True)
    if not isinstance(spec, dict):
        raise ResourceError(f"sources.{name}: must be a mapping")
    unknown = sorted(set(spec) - set(CONFIG_KEYS))
    if unknown:
        raise where.error(unknown[0], f"unknown key (allowed: {', '.join(CONFIG_KEYS)})")
    forms = [key for key in ("resource", "url", "urls", "path") if key in spec]
    if len(forms) != 1:
        got = ", ".join(forms) or "none"
        raise ResourceError(f"sources.{name}: give exactly one of resource, url, urls, path (got {got})")
    if spec.get("sha256") is not None and "url" not in spec:
        raise where.error("sha256", "only applies to a single 'url'")
    if "archive" in spec and not ("url" in spec or "urls" in spec):
        raise where.error("archive", "only applies to 'url' or 'urls'")
    extras = {key: spec[key] for key in ("adapter", "options", "role") if key in spec}
    if "resource" in spec:
        if not isinstance(spec["resource"], str) or not spec["resource"]:
            raise where.error("resource", "must be a resource name or a path to a YAML file")
        try:
            base = load_resource(spec["resource"])
        except ResourceError as exc:
            raise ResourceError(f"sources.{name}.resource: {exc}") from exc
        # The config's name is the source's name in the workflow (ids, folders, manifest).
        return validate_resource({**base, **extras, "name": name}, where)
    resource = {
        "name": name,
        "title": f"{name} (defined in the config)",
        "database": "user-supplied",
        "licence": "unknown (user-supplied source)",
        "citation": "unknown (user-supplied source)",
        "adapter": "folder",
        **extras,
    }
    if "path" in spec:
        resource.update(transport="local", homepage=str(spec["path"]), path=spec["path"])
        return validate_resource(resource, where)
    resource.update(transport="https", files=_inline_files(spec, where))
    resource["homepage"] = resource["files"][0]["url"]
    return validate_resource(resource, where)


def _inline_files(spec: dict, where: _Where) -> list[dict]:
    """The file list of a config entry given by ``url`` or ``urls``; errors name the config key."""
    key = "url" if "url" in spec else "urls"
    urls = [spec["url"]] if key == "url" else spec["urls"]
    if not isinstance(urls, list) or not urls:
        raise where.error("urls", "must be a non-empty list of URL strings")
    sha = spec.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise where.error("sha256", "must be 64 hex digits or null")
    if "archive" in spec:
        _check_choice(where, "archive", spec["archive"], ARCHIVES)
    files = []
    for i, url in enumerate(urls):
        item = {"url": url, "sha256": sha}
        if "archive" in spec:
            item["archive"] = spec["archive"]
        try:
            files.append(_validate_file_entry(item, where, f"{key}[{i}]"))
        except ResourceError as exc:
            raise where.error(key if key == "url" else f"urls[{i}]", str(exc).split(": ", 1)[1]) from None
    names = [item["filename"] for item in files]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise where.error(key, f"several URLs end in the same file name {repeated[0]!r}")
    return files


def infer_archive_type(name: str) -> str:
    """Archive type from a file name or URL suffix; ``none`` for anything else."""
    lower = urlsplit(str(name)).path.lower() if "://" in str(name) else str(name).lower()
    for suffix, kind in (
        (".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar.bz2", "tar.bz2"),
        (".tar.xz", "tar.xz"), (".tar", "tar"), (".zip", "zip"),
    ):
        if lower.endswith(suffix):
            return kind
    return "none"


def url_basename(url: str) -> str:
    """The last path component of a URL or local path, percent-decoded."""
    return unquote(PurePosixPath(urlsplit(url).path).name) if urlsplit(url).scheme else Path(url).name


def _is_safe_relative(path: str) -> bool:
    parts = re.split(r"[\\/]", path)
    return not (path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or ".." in parts)


# ---------------------------------------------------------------------------------------------
# Fetching


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
    return _fetch(url, Path(dest), sha256, retries, backoff, timeout, chunk_size)[0]


def _fetch(
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


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


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
                raise DownloadError(
                    f"{url}: giving up after {failures} failed attempts in a row: {exc}"
                ) from None
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


# ---------------------------------------------------------------------------------------------
# Extraction


def safe_extract(
    archive: str | os.PathLike, target_dir: str | os.PathLike, archive_type: str | None = None
) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``target_dir``; return the file paths.

    Entries with an absolute path, a drive letter or a ``..`` component, and links or device
    entries raise :class:`UnsafeArchiveError`. Files go first into a temporary sibling of
    ``target_dir`` and are moved into place only when the whole archive has been read, so a
    refused or interrupted extraction writes nothing into ``target_dir``.
    """
    archive = Path(archive)
    target = Path(target_dir)
    kind = archive_type or infer_archive_type(archive.name)
    kind = "tar.gz" if kind == "tgz" else kind
    if kind not in ARCHIVES or kind == "none":
        raise DownloadError(f"{archive}: not a zip or tar archive (type {kind!r})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    try:
        relative = _extract_zip(archive, staging) if kind == "zip" else _extract_tar(archive, staging, kind)
        _merge_tree(staging, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DownloadError(f"{archive}: corrupt or unreadable {kind} archive: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(target / rel for rel in relative)


def _entry_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The checked path components of an archive entry name."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path")
    parts = tuple(p for p in re.split(r"[\\/]", name) if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} leaves the target folder ('..')")
    return parts


def _extract_zip(archive: Path, staging: Path) -> list[str]:
    files: list[str] = []
    with zipfile.ZipFile(archive) as handle:
        checked = []
        for info in handle.infolist():  # the central directory is at hand: refuse before writing
            parts = _entry_parts(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a link or device, not a file")
            checked.append((info, parts))
        for info, parts in checked:
            if not parts:
                continue
            path = staging.joinpath(*parts)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with handle.open(info) as src, open(path, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            files.append("/".join(parts))
    return _unique(files)


def _extract_tar(archive: Path, staging: Path, kind: str) -> list[str]:
    files: list[str] = []
    mode = {"tar": "r:", "tar.gz": "r:gz", "tar.bz2": "r:bz2", "tar.xz": "r:xz"}[kind]
    # Streamed: one pass over a compressed tar; a refused entry aborts before anything moves.
    with tarfile.open(archive, mode) as handle:
        for member in _iter_tar(handle):
            parts = _entry_parts(archive, member.name)
            if not (member.isreg() or member.isdir()):
                raise UnsafeArchiveError(f"{archive}: entry {member.name!r} is a link or device, not a file")
            if not parts:
                continue
            path = staging.joinpath(*parts)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with handle.extractfile(member) as src, open(path, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            files.append("/".join(parts))
    return _unique(files)


def _iter_tar(handle: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    member = handle.next()
    while member is not None:
        yield member
        handle.members = []  # keep memory bounded on archives with millions of entries
        member = handle.next()


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _merge_tree(staging: Path, target: Path) -> None:
    """Move the staged tree into ``target``, replacing files that already exist there."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        dest = target / entry.name
        if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
            _merge_tree(entry, dest)
            continue
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(entry, dest)


# ---------------------------------------------------------------------------------------------
# Whole sources


def download_source(
    resource: dict,
    target_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    fetch_options: dict | None = None,
) -> dict:
    """Fetch, verify and extract one source into ``target_dir``; write and return its manifest.

    https: each file goes to ``cache_dir/<name>/`` (default ``target_dir/.downloads``), is
    checked and extracted into ``target_dir/<dest>``; files recorded in an earlier manifest
    with the same URL and checksum are neither fetched nor extracted again. kaggle and aspera
    run their command-line tools when present and otherwise raise :class:`CredentialsRequired`
    or :class:`TransportUnavailable`; manual sources raise :class:`ManualDownloadRequired`.
    ``fetch_options`` (retries, backoff, timeout, chunk_size) are passed on to :func:`fetch`.
    """
    target = Path(target_dir)
    transport = resource["transport"]
    if transport == "manual":
        raise ManualDownloadRequired(
            f"source {resource['name']!r} has no automatic download. {resource['instructions'].strip()}"
        )
    if transport == "local":
        return _local_manifest(resource, target)
    cache = Path(cache_dir) / resource["name"] if cache_dir else target / ".downloads"
    if transport == "https":
        entries = _download_https(resource, target, cache, fetch_options or {})
    elif transport == "kaggle":
        entries = _download_kaggle(resource, target, cache)
    else:
        entries = _download_aspera(resource, target)
    manifest = _manifest(resource, files=entries)
    _write_manifest(target, manifest)
    return manifest


def _manifest(resource: dict, **fields) -> dict:
    head = {key: resource[key] for key in ("transport", "adapter")}
    return {"source": resource["name"], **head, **fields}


def read_manifest(target_dir: str | os.PathLike) -> dict | None:
    path = Path(target_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s: unreadable manifest ignored; everything is fetched again", path)
        return None


def _write_manifest(target: Path, manifest: dict) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _previous_entries(target: Path) -> dict[str, dict]:
    previous = read_manifest(target) or {}
    return {entry.get("url"): entry for entry in previous.get("files", []) if isinstance(entry, dict)}


def _download_https(resource: dict, target: Path, cache: Path, fetch_options: dict) -> list[dict]:
    previous = _previous_entries(target)
    entries = []
    for item in resource["files"]:
        done = previous.get(item["url"])
        if _still_valid(done, item, target):
            log.info("%s: already fetched and extracted (sha256 %s)", item["url"], done["sha256"])
            entries.append(done)
            continue
        local = cache / item["filename"]
        digest = _reuse_cached(local, item)
        if digest is None:
            local, digest = _fetch(item["url"], local, item["sha256"], **fetch_options)
        extracted = _place(local, item, target)
        entries.append({
            "url": item["url"],
            "filename": item["filename"],
            "sha256": digest,
            "bytes": local.stat().st_size,
            "archive": item["archive"],
            "dest": item["dest"],
            "extracted_files": extracted,
        })
    return entries


def _still_valid(done: dict | None, item: dict, target: Path) -> bool:
    """An earlier manifest entry stands if it matches the URL, checksum, placement and folder."""
    if not done or "sha256" not in done or "extracted_files" not in done:
        return False
    if item["sha256"] and done["sha256"] != item["sha256"]:
        return False
    if done.get("archive") != item["archive"] or done.get("dest") != item["dest"]:
        return False
    placed = target / item["dest"]
    return (placed / item["filename"]).is_file() if item["archive"] == "none" else placed.is_dir()


def _reuse_cached(local: Path, item: dict) -> str | None:
    """Digest of an already downloaded file when it may be reused (renamed into place = complete)."""
    if not local.is_file():
        return None
    digest = file_sha256(local)
    if item["sha256"] and digest != item["sha256"]:
        log.warning("%s: cached sha256 %s, expected %s; fetching again", local, digest, item["sha256"])
        local.unlink()
        return None
    log.info("%s: reusing cached %s", item["url"], local)
    return digest


def _place(local: Path, item: dict, target: Path) -> int:
    """Extract an archive, or put a plain file, into ``target/dest``; return the file count."""
    dest_dir = target / item["dest"]
    if item["archive"] != "none":
        return len(safe_extract(local, dest_dir, item["archive"]))
    dest = dest_dir / item["filename"]
    if dest.resolve() != local.resolve():
        with atomic_path(dest) as tmp:
            tmp.unlink()
            try:
                os.link(local, tmp)  # same file system: no second copy of a large file
            except OSError:
                shutil.copyfile(local, tmp)
    return 1


def _local_manifest(resource: dict, target: Path) -> dict:
    folder = Path(resource["path"])
    if not folder.is_dir():
        raise DownloadError(f"source {resource['name']!r}: path {folder} is not a folder")
    manifest = _manifest(resource, path=str(folder.resolve()), files=[])
    _write_manifest(target, manifest)
    return manifest


def kaggle_credentials_present() -> bool:
    """Kaggle's CLI reads KAGGLE_USERNAME + KAGGLE_KEY or kaggle.json in KAGGLE_CONFIG_DIR / ~/.kaggle."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    return (config_dir / "kaggle.json").is_file()


def _kaggle_help(resource: dict, missing: list[str]) -> str:
    spec = resource["kaggle"]
    page = (
        f"https://www.kaggle.com/c/{spec['competition']}/rules" if "competition" in spec
        else f"https://www.kaggle.com/datasets/{spec['dataset']}"
    )
    return (
        f"source {resource['name']!r} is downloaded from Kaggle, but {' and '.join(missing)}. "
        "To download it automatically: (1) install the client with `pip install kaggle`; "
        "(2) create an API token in your kaggle.com account settings (API -> Create New Token), save it as "
        "~/.kaggle/kaggle.json with `chmod 600 ~/.kaggle/kaggle.json`, or set the environment "
        f"variables KAGGLE_USERNAME and KAGGLE_KEY; (3) accept the rules on {page} while logged in. "
        f"Alternatively download and unpack the data by hand and set `path:` for sources.{resource['name']} "
        "in the config to that folder."
    )


def _download_kaggle(resource: dict, target: Path, cache: Path) -> list[dict]:
    missing = []
    executable = shutil.which("kaggle")
    if executable is None:
        missing.append("the `kaggle` command is not on PATH")
    if not kaggle_credentials_present():
        missing.append("no Kaggle API token was found (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
    if missing:
        raise CredentialsRequired(_kaggle_help(resource, missing))
    spec = resource["kaggle"]
    cache.mkdir(parents=True, exist_ok=True)
    if "competition" in spec:
        command = [executable, "competitions", "download", "-c", spec["competition"], "-p", str(cache)]
    else:
        command = [executable, "datasets", "download", "-d", spec["dataset"], "-p", str(cache)]
    _run_tool(command, resource, "kaggle")
    archives = sorted(p for p in cache.iterdir() if p.is_file() and not p.name.endswith(".part"))
    if not archives:
        raise DownloadError(f"source {resource['name']!r}: `{' '.join(command)}` left no file in {cache}")
    previous = _previous_entries(target)
    entries = []
    for local in archives:
        digest = file_sha256(local)
        url = f"kaggle:{next(iter(spec.values()))}/{local.name}"
        archive = infer_archive_type(local.name)
        item = {"url": url, "filename": local.name, "sha256": digest, "archive": archive, "dest": "."}
        done = previous.get(url)
        if _still_valid(done, item, target):
            entries.append(done)
            continue
        extracted = _place(local, item, target)
        entries.append({**item, "bytes": local.stat().st_size, "extracted_files": extracted})
    return entries


def _download_aspera(resource: dict, target: Path) -> list[dict]:
    spec = resource["aspera"]
    executable = shutil.which("ascp")
    alternative = (
        "Alternatively download the files by hand (for IDR screens see "
        "https://idr.openmicroscopy.org/about/download.html) and set `path:` for "
        f"sources.{resource['name']} in the config to that folder."
    )
    if executable is None:
        raise TransportUnavailable(
            f"source {resource['name']!r} is served over Aspera, but `ascp` is not on PATH. Install IBM Aspera "
            "Connect or the aspera-cli (`ascp` and its key file asperaweb_id_dsa.openssh) and put ascp on PATH. "
            + alternative
        )
    key = _aspera_key(spec)
    if key is None:
        raise TransportUnavailable(
            f"source {resource['name']!r}: no Aspera key file found; set aspera.key_file in the resource, the "
            f"environment variable ASPERA_KEY, or place it at {ASPERA_KEY_CANDIDATES[0]}. " + alternative
        )
    target.mkdir(parents=True, exist_ok=True)
    command = [
        executable, "-T", "-k", "1", "-l", spec["rate"], "-P", str(spec["port"]), "-i", str(key),
        f"{spec['user']}@{spec['host']}:{spec['remote_path']}", str(target),
    ]
    _run_tool(command, resource, "ascp")
    files = [p for p in target.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    return [{
        "url": f"aspera://{spec['user']}@{spec['host']}:{spec['port']}/{spec['remote_path']}",
        "sha256": None,
        "bytes": sum(p.stat().st_size for p in files),
        "archive": "none",
        "dest": ".",
        "extracted_files": len(files),
    }]


def _aspera_key(spec: dict) -> Path | None:
    candidates = [spec.get("key_file"), os.environ.get("ASPERA_KEY"), *ASPERA_KEY_CANDIDATES]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None


def _run_tool(command: list[str], resource: dict, tool: str) -> None:
    log.info("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        log.info("%s: %s", tool, line)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        forbidden = tool == "kaggle" and "403" in tail
        hint = " (403: accept the rules on the Kaggle website first)" if forbidden else ""
        raise DownloadError(
            f"source {resource['name']!r}: {tool} exited with code {result.returncode}{hint}: {tail}"
        )


__all__ = [
    "ADAPTERS", "ARCHIVES", "CONFIG_KEYS", "TRANSPORTS", "ChecksumError", "CredentialsRequired",
    "DownloadError", "ManualDownloadRequired", "ResourceError", "TransportUnavailable",
    "UnsafeArchiveError", "download_source", "fetch", "file_sha256", "infer_archive_type",
    "kaggle_credentials_present", "load_resource", "read_manifest", "resource_from_config",
    "safe_extract",
]


def transport_problem(resource: dict) -> str | None:
    """What the user must provide before this source can download, or None if nothing.

    Checked without contacting anything, so a dry run can say it up front: Kaggle needs its
    client and an API token, Aspera needs ``ascp``, manual sources need the user's download.
    """
    transport = resource["transport"]
    if transport == "kaggle":
        missing = []
        if shutil.which("kaggle") is None:
            missing.append("the `kaggle` command is not on PATH")
        if not kaggle_credentials_present():
            missing.append("no Kaggle API token was found (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
        return _kaggle_help(resource, missing) if missing else None
    if transport == "aspera" and shutil.which("ascp") is None:
        return (
            f"source {resource['name']!r} is served over Aspera, but `ascp` is not on PATH: install IBM "
            f"Aspera Connect or the aspera-cli, or download by hand and set `path:` for sources.{resource['name']}"
        )
    if transport == "manual":
        return f"source {resource['name']!r} must be downloaded by hand: {resource['instructions']}"
    return None
