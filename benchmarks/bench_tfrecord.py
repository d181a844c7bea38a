"""TFRecord shards: writing with the ``tfrecord`` package (what curation.tfrecord does) against
Parquet shards of the same rows, and reading them back.

Shard rows of real cells: every yeast_toy cell (64 x 64, GFP + RFP as uint8, 2 channels ->
stored raw) and every bbbc021_cells crop (68 x 68 x 3 -> RGB PNG), with the shard schema's
metadata. Per format, the best of ``--repeat`` passes of: building the features (PNG encoding
and metadata), writing every example, and reading every example back to a shard row; a check
that the package's own reader finds every record.

The hand-written encoder this module had before was measured with an earlier version of this
script (commit 9c8e824): the package wrote the same examples in 0.63-0.64 of its time;
benchmarks/README.md has the figures.

    python benchmarks/bench_tfrecord.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from harness import DATA, TESTS, best  # noqa: E402

sys.path.insert(0, str(TESTS))

from cell_images import to_uint8  # noqa: E402

from cytopretrain.core.tables import ParquetStreamWriter, encode_pixels  # noqa: E402
from cytopretrain.curation import tfrecord  # noqa: E402
from cytopretrain.curation.shards import SHARD_SCHEMA, features_to_sample, iter_shard, sample_to_features  # noqa: E402


def shard_rows() -> list[dict]:
    images = []
    for gfp in sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif")):
        images.append(
            (
                gfp.parent.name.lower(),
                to_uint8([tifffile.imread(gfp), tifffile.imread(str(gfp).replace("_gfp", "_rfp"))]),
            )
        )
    cells = pd.read_csv(DATA / "bbbc021_cells" / "cells.csv")
    for row in cells.itertuples():
        array = np.load(DATA / "bbbc021_cells" / row.file)
        images.append((row.moa.lower(), to_uint8([array[..., c] for c in range(3)])))
    rows = []
    for n, (label, pixels) in enumerate(images):
        h, w = pixels.shape[:2]
        rows.append(
            {
                "crop_id": f"img{n}-c0",
                "idx": f"img{n}",
                "class_index": n % 7,
                "label": label,
                "category": "gene",
                "crop": False,
                "scaling": 1.0,
                "x_min": 0,
                "x_max": w,
                "y_min": 0,
                "y_max": h,
                "database": "test",
                "name": "bench",
                "dir_name": "bench",
                "path": "/x",
                "filename": f"img{n}.tif",
                "organism": "",
                "cell_type": "",
                "cell_visible": "",
                "phenotype": "",
                "compound": "",
                "sirna": "",
                "gene": label,
                "microscopy": "fluorescence",
                "channels": "a|b",
                "plate": "",
                "well": "",
                "batch": "",
                "split": "",
                "concentration": float("nan"),
                "channel_paths": ["/x/a.tif", "/x/b.tif"],
                **encode_pixels(pixels),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from tfrecord.reader import tfrecord_iterator

    rows = shard_rows()
    n = len(rows)
    with tempfile.TemporaryDirectory() as folder:
        record_path, parquet_path = Path(folder) / "s.tfrecord", Path(folder) / "s.parquet"
        build = best(lambda: [sample_to_features(r) for r in rows], args.repeat)
        features = [sample_to_features(r) for r in rows]

        def write_tfrecord() -> None:
            with tfrecord.TFRecordWriter(record_path) as writer:
                for f in features:
                    writer.write(f)

        def write_parquet() -> None:
            with ParquetStreamWriter(parquet_path, SHARD_SCHEMA, rows_per_group=64) as writer:
                for r in rows:
                    writer.write({name: r[name] for name in SHARD_SCHEMA.names})

        write_t, write_p = best(write_tfrecord, args.repeat), best(write_parquet, args.repeat)
        read_t = best(
            lambda: [features_to_sample(tfrecord.decode_example(r)) for r in tfrecord.read_records(record_path)],
            args.repeat,
        )
        read_p = best(lambda: list(iter_shard(parquet_path)), args.repeat)
        assert sum(1 for _ in tfrecord_iterator(str(record_path))) == n
        print(f"{n} shard examples ({sum(r['n_channels'] == 3 for r in rows)} PNG-encoded, the rest raw)")
        tfrecord_mb, parquet_mb = record_path.stat().st_size / 1e6, parquet_path.stat().st_size / 1e6
        print(
            f"TFRecord: features {1e6 * build / n:6.1f} us/example, write {1e6 * write_t / n:6.1f}, "
            f"read back {1e6 * read_t / n:6.1f}; {tfrecord_mb:.1f} MB"
        )
        print(
            f"Parquet:  write {1e6 * write_p / n:6.1f} us/example, read back {1e6 * read_p / n:6.1f}; "
            f"{parquet_mb:.1f} MB"
        )


if __name__ == "__main__":
    main()
