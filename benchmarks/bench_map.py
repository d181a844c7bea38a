"""Mean average precision at profiling scale: evaluation.protocols.mean_ap against copairs.

Profiles: ``--n`` rows x ``--dims`` float32 features, ``--labels`` labels (MOA-like classes with
a weak signal), 4 compounds per label, ``map``'s default pair rules (positives: same label,
another compound; negatives: another label), copairs' significance test with ``--null-size``.

Each measurement runs in a fresh process, so its peak resident memory is its own:
- ours: evaluation.protocols.mean_ap.mean_average_precision (block similarities by matrix
  products, AP from ranks, copairs' p-values and BH correction) on ``--n`` rows;
- copairs: copairs.map.average_precision + mean_average_precision (every pair enumerated and
  gathered) on ``--copairs-n`` rows, with ours on the same rows and the largest difference of
  their per-query AP.

    python benchmarks/bench_map.py [--n 20000] [--dims 1000] [--labels 200] [--copairs-n 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import numpy as np
import pandas as pd


def profiles(n: int, dims: int, labels: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, labels, n)
    compound = label * 4 + rng.integers(0, 4, n)
    meta = pd.DataFrame(
        {"Metadata_label": [f"moa{k}" for k in label], "Metadata_compound": [f"c{k}" for k in compound]}
    )
    centres = rng.normal(size=(labels, dims)).astype(np.float32)
    values = 0.15 * centres[label] + rng.normal(size=(n, dims)).astype(np.float32)
    return meta, values.astype(np.float32)


def run_ours(n: int, dims: int, labels: int, null_size: int, queue) -> None:
    """The map protocol's two steps, timed apart: per-query AP (this module) and the per-label
    significance (copairs' null distributions and BH correction)."""
    from cytopretrain.evaluation.protocols.mean_ap import average_precision, significance

    meta, values = profiles(n, dims, labels)
    start = time.perf_counter()
    ap = average_precision(
        meta, values, pos_sameby=["Metadata_label"], pos_diffby=["Metadata_compound"], neg_diffby=["Metadata_label"]
    )
    middle = time.perf_counter()
    groups = significance(ap[ap["n_pos_pairs"] > 0], "Metadata_label", null_size=null_size, threshold=0.05, seed=0)
    queue.put(
        {
            "ap_seconds": middle - start,
            "seconds": time.perf_counter() - start,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "map": float(groups["mean_average_precision"].mean()),
            "retrieved": float(groups["below_corrected_p"].mean()),
            "ap": ap["average_precision"].tolist(),
        }
    )


def run_copairs(n: int, dims: int, labels: int, null_size: int, queue) -> None:
    from copairs.map import average_precision, mean_average_precision

    meta, values = profiles(n, dims, labels)
    start = time.perf_counter()
    ap = average_precision(
        meta,
        values,
        pos_sameby=["Metadata_label"],
        pos_diffby=["Metadata_compound"],
        neg_sameby=[],
        neg_diffby=["Metadata_label"],
        progress_bar=False,
    )
    groups = mean_average_precision(
        ap, ["Metadata_label"], null_size=null_size, threshold=0.05, seed=0, progress_bar=False
    )
    queue.put(
        {
            "seconds": time.perf_counter() - start,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "map": float(groups["mean_average_precision"].mean()),
            "retrieved": float(groups["below_corrected_p"].mean()),
            "ap": ap["average_precision"].tolist(),
        }
    )


def measure(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dims", type=int, default=1000)
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--null-size", type=int, default=10000)
    parser.add_argument("--copairs-n", type=int, default=2000)
    args = parser.parse_args()
    ours = measure(run_ours, args.n, args.dims, args.labels, args.null_size)
    print(
        f"ours     n={args.n} x {args.dims} features, {args.labels} labels: {ours['seconds']:.1f} s "
        f"(AP {ours['ap_seconds']:.1f} s, copairs significance {ours['seconds'] - ours['ap_seconds']:.1f} s), "
        f"peak RSS {ours['peak_gb']:.2f} GB, mAP {ours['map']:.3f}, retrieved {ours['retrieved']:.2f}"
    )
    labels = max(2, args.labels * args.copairs_n // args.n)
    small = measure(run_ours, args.copairs_n, args.dims, labels, args.null_size)
    reference = measure(run_copairs, args.copairs_n, args.dims, labels, args.null_size)
    a, b = np.array(small["ap"], dtype=float), np.array(reference["ap"], dtype=float)
    difference = np.nanmax(np.abs(a - b)) if np.isnan(a).tolist() == np.isnan(b).tolist() else float("inf")
    print(
        f"n={args.copairs_n} x {args.dims} features, {labels} labels: ours {small['seconds']:.1f} s "
        f"(peak {small['peak_gb']:.2f} GB), copairs {reference['seconds']:.1f} s (peak {reference['peak_gb']:.2f} GB); "
        f"mAP {small['map']:.4f} / {reference['map']:.4f}, largest per-query AP difference {difference:.1e}"
    )


if __name__ == "__main__":
    main()
