"""Does the hand-written TFRecord writer (curation.tfrecord) earn its place against the PyPI
``tfrecord`` package's writer (protobuf serialization)?

Shard rows of real cells: every yeast_toy cell (64 x 64, GFP + RFP as uint8, 2 channels ->
stored raw) and every bbbc021_cells crop (68 x 68 x 3 -> RGB PNG), with the shard schema's
metadata features (curation.shards.sample_to_features). Per writer, the best of ``--repeat``
passes of serializing and framing every example into one file (the PNG encoding, shared by both,
is timed on its own), and a check that both files hold the same examples.

    python benchmarks/bench_tfrecord.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytopretrain.core.tables import encode_pixels  # noqa: E402
from cytopretrain.curation import tfrecord as ours  # noqa: E402
from cytopretrain.curation.shards import sample_to_features  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def to_uint8(planes: list[np.ndarray]) -> np.ndarray:
    out = []
    for plane in planes:
        plane = plane.astype(np.float64)
        out.append(np.round(255 * (plane - plane.min()) / max(np.ptp(plane), 1e-12)).astype(np.uint8))
    return np.stack(out, axis=-1)


def shard_rows() -> list[dict]:
    images = []
    for gfp in sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif")):
        images.append((gfp.parent.name.lower(), to_uint8([tifffile.imread(gfp), tifffile.imread(str(gfp).replace("_gfp", "_rfp"))])))
    cells = pd.read_csv(DATA / "bbbc021_cells" / "cells.csv")
    for row in cells.itertuples():
        array = np.load(DATA / "bbbc021_cells" / row.file)
        images.append((row.moa.lower(), to_uint8([array[..., c] for c in range(3)])))
    rows = []
    for n, (label, pixels) in enumerate(images):
        h, w = pixels.shape[:2]
        rows.append({
            "crop_id": f"img{n}-c0", "idx": f"img{n}", "class_index": n % 7, "label": label, "category": "gene",
            "crop": False, "scaling": 1.0, "x_min": 0, "x_max": w, "y_min": 0, "y_max": h, "database": "test",
            "name": "bench", "dir_name": "bench", "path": "/x", "filename": f"img{n}.tif", "organism": "",
            "cell_type": "", "cell_visible": "", "phenotype": "", "compound": "", "sirna": "", "gene": label,
            "microscopy": "fluorescence", "channels": "a|b", "plate": "", "well": "", "batch": "", "split": "",
            "concentration": float("nan"), "channel_paths": ["/x/a.tif", "/x/b.tif"], **encode_pixels(pixels),
        })
    return rows


def package_datum(features: dict) -> dict:
    """The tfrecord package's (value, kind) pairs for our feature dict."""
    datum = {}
    for key, value in features.items():
        array = value if isinstance(value, np.ndarray) else None
        if isinstance(value, (bytes, str)) or (array is not None and array.dtype.kind in "SU"):
            datum[key] = (value if array is None else list(array), "byte")
        elif isinstance(value, (float, np.floating)) or (array is not None and array.dtype.kind == "f"):
            datum[key] = (value, "float")
        else:
            datum[key] = (int(value) if array is None else value, "int")
    return datum


def best(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from tfrecord.reader import tfrecord_iterator
    from tfrecord.writer import TFRecordWriter as PackageWriter

    rows = shard_rows()
    png = best(lambda: [sample_to_features(r) for r in rows], args.repeat)
    features = [sample_to_features(r) for r in rows]
    datums = [package_datum(f) for f in features]
    ours_buffer, package_buffer = io.BytesIO(), io.BytesIO()

    def write_ours() -> None:
        ours_buffer.seek(0)
        ours_buffer.truncate()
        for f in features:
            ours.write_example(ours_buffer, f)

    def write_package() -> None:
        package_buffer.seek(0)
        package_buffer.truncate()
        writer = PackageWriter.__new__(PackageWriter)
        writer.file = package_buffer
        for d in datums:
            writer.write(d)

    ours_s, package_s = best(write_ours, args.repeat), best(write_package, args.repeat)
    n = len(rows)
    print(f"{n} shard examples ({sum(r['n_channels'] == 3 for r in rows)} PNG-encoded, the rest raw)")
    print(f"sample_to_features (image encoding and metadata, shared): {1e3 * png:8.1f} ms  {1e6 * png / n:7.1f} us/example")
    print(f"curation.tfrecord writer:                                 {1e3 * ours_s:8.1f} ms  {1e6 * ours_s / n:7.1f} us/example")
    print(f"tfrecord package writer:                                  {1e3 * package_s:8.1f} ms  {1e6 * package_s / n:7.1f} us/example")
    print(f"package / ours: {package_s / ours_s:.2f}; bytes {len(package_buffer.getvalue())} / {len(ours_buffer.getvalue())}")
    # Both files decode to the same examples with our reader.
    for source in (ours_buffer, package_buffer):
        path = Path(f"/tmp/bench_tfrecord_{id(source)}.tfrecord")
        path.write_bytes(source.getvalue())
        decoded = [ours.decode_example(r) for r in ours.read_records(path)]
        assert len(decoded) == n
        assert all(np.array_equal(ours.decode_image(d), ours.decode_image(e)) for d, e in zip(decoded, [ours.decode_example(ours.encode_example(f)) for f in features]))
        assert sum(1 for _ in tfrecord_iterator(str(path))) == n
        path.unlink()
    print("both files decode to the same images and counts (our reader and the package's iterator)")


if __name__ == "__main__":
    main()
