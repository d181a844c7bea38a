"""Safe extraction of zip and tar archives: no absolute paths, no '..', no links; extracted into a
staging folder and merged into the target only when complete."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cytopretrain.core.errors import (
    DownloadError,
    UnsafeArchiveError,
)
from cytopretrain.curation.resources import ARCHIVES, infer_archive_type


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
