"""Plan a CytoImageNet-scale run: a 2.7 M-image metadata table, then `snakemake -n` on it.

Prints the time to build and merge the metadata (run once, outside the timing), the dry-run
planning time, and the job count per rule. Target: planning under a minute with at most a few
thousand jobs.

    python benchmarks/bench_dag.py [--rows 2700000] [--chunk-size 4000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # fake_metadata: the test-data generator

from fake_metadata import make_metadata  # noqa: E402
from workflow_helpers import snakemake  # noqa: E402

from cytopretrain.core.schema import CANONICAL_SCHEMA  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_700_000)
    parser.add_argument("--chunk-size", type=int, default=4000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dag_"))
    source_dir = workdir / "metadata_only"
    source_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    table = make_metadata(args.rows, seed=0)
    pq.write_table(
        pa.Table.from_pandas(table, schema=CANONICAL_SCHEMA, preserve_index=False), source_dir / "metadata.parquet"
    )
    print(f"metadata: {len(table):,} rows built and written in {time.perf_counter() - start:.1f} s")
    config = {
        "chunk_size": args.chunk_size,
        "sources": {"cytoimagenet_scale": {"adapter": "canonical", "path": str(source_dir)}},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))

    start = time.perf_counter()
    merged = snakemake(workdir, "--cores", "2", "results/metadata/chunks.json", timeout=None)
    if merged.returncode:
        sys.exit(merged.stderr[-3000:])
    print(f"clean_metadata + merge_metadata on {args.rows:,} rows: {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    plan = snakemake(workdir, "-n", "--quiet", "rules", timeout=None)
    elapsed = time.perf_counter() - start
    if plan.returncode:
        sys.exit(plan.stderr[-3000:])
    jobs = Counter()
    for line in (plan.stdout + plan.stderr).splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
    print(f"dry-run planning: {elapsed:.1f} s for {sum(jobs.values()):,} jobs")
    for rule, count in sorted(jobs.items()):
        print(f"  {rule:20s} {count:6d}")


if __name__ == "__main__":
    main()
