"""List a 1,000,000-file `path:` source as the workflow does before every job graph.

Generates zero-byte files ``<folder>/<cell>_<channel>.tif`` under the temporary folder
(``--folders`` x ``--files``), then times cytopretrain.curation.listing: the first listing and
its write, the check of an unchanged tree (what every later `snakemake` run pays), and the
check after one file was added. Deletes the tree at the end. Target: under a minute.

    python benchmarks/bench_listing.py [--folders 1000] [--files 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from cytopretrain.curation.listing import refresh_listing


def make_tree(root: Path, folders: int, files: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for f in range(folders):
        folder = root / f"label{f:05d}"
        folder.mkdir()
        for i in range(files // 2):
            for channel in ("gfp", "rfp"):
                os.close(os.open(folder / f"cell{i:06d}_{channel}.tif", flags, 0o644))


def timed(label: str, function) -> object:
    start = time.perf_counter()
    result = function()
    print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", type=int, default=1000)
    parser.add_argument("--files", type=int, default=1000, help="files per folder (even)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_listing_"))
    try:
        tree, listing = work / "tree", work / "listing.tsv"
        tree.mkdir()
        timed(
            f"generate {args.folders * args.files:,} zero-byte files", lambda: make_tree(tree, args.folders, args.files)
        )
        written = timed("first listing (written)", lambda: refresh_listing(tree, listing))
        print(f"  listing file: {listing.stat().st_size / 1e6:.1f} MB, written={written}")
        unchanged = timed("unchanged tree (checked, not rewritten)", lambda: refresh_listing(tree, listing))
        (tree / "label00000" / "newcell_gfp.tif").touch()
        added = timed("one file added (rewritten)", lambda: refresh_listing(tree, listing))
        print(f"  rewritten: unchanged={unchanged}, added={added}")
    finally:
        timed("delete the tree", lambda: shutil.rmtree(work))


if __name__ == "__main__":
    main()
