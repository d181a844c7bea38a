"""Benchmark weak-label assignment on a CytoImageNet-sized synthetic metadata table.

Usage: python benchmarks/bench_labels.py [--rows 2700000] [--seed 0] [--json results.json]

Builds the table with ``fake_metadata.make_metadata`` (timed separately), runs
``assign_weak_labels`` with CytoImageNet's thresholds (287 / 1000 / 10,000) and prints rows,
candidate labels, labels taken, images selected, wall time and memory. Peak memory of the
assignment is the kernel's resident high-water mark, reset just before the call (Linux
``/proc/self/clear_refs``); where that is unavailable the process-wide peak is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # fake_metadata

from fake_metadata import make_metadata  # noqa: E402

from cytopretrain.core.tables import atomic_path  # noqa: E402
from cytopretrain.curation.labels import assign_weak_labels  # noqa: E402

STATUS = Path("/proc/self/status")


def memory_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB, None where /proc is unavailable."""
    if not STATUS.exists():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def gib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 2**20:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_700_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    start = time.perf_counter()
    meta = make_metadata(args.rows, seed=args.seed)
    build_s = time.perf_counter() - start
    table_rss = memory_kib("VmRSS")

    exact_peak = reset_peak_rss()
    start = time.perf_counter()
    selection, report = assign_weak_labels(meta, min_count=287, take_all_max=1000, prelim_max=10000, seed=args.seed)
    assign_s = time.perf_counter() - start
    assign_peak = memory_kib("VmHWM") if exact_peak else None
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    taken = report[report.n_selected > 0]
    figures = {
        "rows": len(meta),
        "sources": int(meta["name"].nunique()),
        "build_seconds": round(build_s, 2),
        "table_rss_gib": None if table_rss is None else round(table_rss / 2**20, 3),
        "candidate_labels": len(report),
        "labels_taken": len(taken),
        "outcomes": report["outcome"].value_counts().to_dict(),
        "labels_taken_per_category": taken["category"].value_counts().to_dict(),
        "images_selected": len(selection),
        "assign_seconds": round(assign_s, 2),
        "assign_peak_rss_gib": None if assign_peak is None else round(assign_peak / 2**20, 3),
        "process_peak_rss_gib": round(process_peak / 2**20, 3),
    }
    print(f"rows                   {figures['rows']:,} from {figures['sources']} sources")
    print(f"table build            {build_s:.1f} s, table resident {gib(table_rss)}")
    print(f"candidate labels       {figures['candidate_labels']:,}")
    print(f"labels taken           {figures['labels_taken']:,}  {figures['labels_taken_per_category']}")
    print(f"outcomes               {figures['outcomes']}")
    print(f"images selected        {figures['images_selected']:,}")
    print(f"assignment wall time   {assign_s:.1f} s")
    print(f"assignment peak RSS    {gib(assign_peak)} (table included)")
    print(f"process peak RSS       {gib(process_peak)}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
