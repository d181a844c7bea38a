"""The whole collection: render every layout's jobs in worker processes, write the ground truth and
zip each layout as a download archive."""

from __future__ import annotations

import csv
import os
import shutil
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cytopretrain.core.tables import atomic_path
from cytopretrain.synthetic.defects import FILE_DEFECTS, write_image
from cytopretrain.synthetic.layouts import (
    LAYOUTS,
    LayoutPlan,
    plan_bbbc021,
    plan_coos7,
    plan_cyclops,
    plan_hpa,
    plan_rxrx1,
    plan_synthetic,
)
from cytopretrain.synthetic.rendering import CellJob, FieldJob, render_cell, render_field

GROUND_TRUTH_COLUMNS = ("layout", "path", "defect", "x_min", "y_min", "x_max", "y_max")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def run_job(job: FieldJob | CellJob) -> None:
    planes = render_field(job) if isinstance(job, FieldJob) else render_cell(job)
    file_defect = job.defect if job.defect in FILE_DEFECTS else ""
    write_image(job.paths, planes, job.fmt, file_defect)


def _run_jobs(jobs: list, workers: int) -> None:
    if workers <= 1 or len(jobs) < 8:
        for job in jobs:
            run_job(job)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(run_job, jobs, chunksize=8):
            pass


def plan_layout(layout: str, root: Path, seed: int, scale: float, size: int) -> LayoutPlan:
    if layout == "bbbc021":
        return plan_bbbc021(root, seed, scale, size)
    if layout == "rxrx1":
        return plan_rxrx1(root, seed, scale, size)
    if layout == "hpa":
        return plan_hpa(root, seed, scale, size)
    if layout == "cyclops":
        return plan_cyclops(root, seed, scale)
    if layout == "coos7":
        return plan_coos7(root, seed, scale)
    return plan_synthetic(root, seed, scale, size)


def _write_csv(path: Path, rows: list[list]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)


def zip_folder(root: Path, archive: Path) -> int:
    """Zip every file under ``root`` (entries relative to it) with fixed timestamps; return count.

    Entries are stored, not deflated: noisy 16-bit pixels deflate to only about half their
    size, and deflating would take a large share of the generation time.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with atomic_path(archive) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for path in files:
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
    return len(files)


def generate_collection(
    out_dir: str | os.PathLike,
    *,
    seed: int = 7,
    scale: float = 1.0,
    layouts: list[str] | tuple[str, ...] | None = None,
    image_size: int = 256,
    workers: int = 1,
) -> dict:
    """Write the synthetic collection under ``out_dir`` and zip each layout.

    Each layout goes to ``out_dir/<layout>/`` (replaced if present) and to
    ``out_dir/archives/<layout>.zip`` (entries relative to the layout root);
    ``out_dir/ground_truth.csv`` lists the defective files of the generated layouts.
    Returns a summary: per layout its image count (fields or crops), file count, defect
    count, root and archive path. Same seed -> same bytes, for any ``workers``.
    """
    chosen = list(LAYOUTS if layouts is None else layouts)
    unknown = sorted(set(chosen) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown synthetic layout(s) {unknown}; choose from {list(LAYOUTS)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    out = Path(out_dir)
    summary: dict = {"seed": seed, "scale": scale, "image_size": image_size, "layouts": {}}
    ground_truth: list[list[str]] = [list(GROUND_TRUTH_COLUMNS)]
    for layout in chosen:
        root = out / layout
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        plan = plan_layout(layout, root.resolve(), seed, scale, image_size)
        _run_jobs(plan.jobs, workers)
        for name, rows in plan.tables.items():
            _write_csv(root / name, rows)
        for name, text in (plan.raw_tables or {}).items():
            with atomic_path(root / name) as tmp:
                tmp.write_text(text)
        archive = out / "archives" / f"{layout}.zip"
        n_files = zip_folder(root, archive)
        ground_truth += [[layout, *row] for row in sorted(plan.defects)]
        summary["layouts"][layout] = {
            "images": plan.images,
            "files": n_files,
            "defects": len(plan.defects),
            "root": str(root),
            "archive": str(archive),
        }
    _write_csv(out / "ground_truth.csv", ground_truth)
    summary["ground_truth"] = str(out / "ground_truth.csv")
    return summary
