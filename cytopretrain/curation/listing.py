"""The listing of a local source folder, so the workflow notices added, removed and rewritten files.

A ``path:`` source is a folder the user keeps filling. Snakemake compares a job's inputs by
modification time, and a folder's mtime changes only when an entry of that folder itself is
added or removed, never when a file deeper down is added or rewritten. The listing, one line
per file under the folder (relative path, size in bytes, mtime in ns; hidden entries skipped,
as the adapters skip them), is the input that changes exactly when the files do: the workflow
refreshes it whenever it builds its job graph and rewrites it only when it differs, so an
unchanged tree leaves it (and everything after it) untouched.

A file rewritten with the same size and a restored mtime (``cp -p``, ``rsync -t``) is not seen;
touch it to force the rerun.
"""

from __future__ import annotations

import os
from pathlib import Path

from cytopretrain.core.tables import atomic_path

HEADER = "path\tsize\tmtime_ns\n"


def list_tree(root: str | os.PathLike) -> str:
    """The listing of every non-hidden file under ``root`` as TSV text, sorted by path.

    One ``os.scandir`` per folder and one ``stat`` per file; symbolic links are followed (a
    linked folder is listed once, so a link cycle cannot loop).
    """
    lines: list[str] = []
    seen: set[tuple[int, int]] = set()

    def walk(folder: str, prefix: str) -> None:
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            return
        seen.add((status.st_dev, status.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    walk(entry.path, f"{prefix}{entry.name}/")
                else:
                    try:
                        status = entry.stat()
                    except FileNotFoundError:  # a dangling link, or removed while listing
                        continue
                    lines.append(f"{prefix}{entry.name}\t{status.st_size}\t{status.st_mtime_ns}\n")

    walk(os.fspath(root), "")
    lines.sort()
    return HEADER + "".join(lines)


def refresh_listing(root: str | os.PathLike, listing: str | os.PathLike) -> bool:
    """Write ``root``'s listing to ``listing`` if it differs from the file there; return
    whether it was written (its mtime then tells Snakemake what to rerun)."""
    text = list_tree(root)
    listing = Path(listing)
    try:
        if listing.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    with atomic_path(listing) as tmp:
        tmp.write_text(text)
    return True
