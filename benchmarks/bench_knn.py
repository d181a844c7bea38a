"""Benchmark of exact kNN (cytopretrain.evaluation.knn): float32 filter vs bf16 shortlist, same neighbours.

Leave-one-out k-NN of n feature vectors against themselves (the COOS-7 / CyCLOPS protocol
shape: 132,000 x 1280, k = 11, Euclidean). The features are synthetic but shaped like
CNN features: a few classes, a low-rank latent, a ReLU, then z-scoring, as the protocols do.
Prints the wall and CPU time of each precision, the passes each needed, whether the two agree
on every neighbour, and a float64 brute-force check of a sample of queries.

    python benchmarks/bench_knn.py [--n 132000] [--dims 1280] [--k 11] [--threads 2]
        [--precisions bf16,fp32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cytopretrain.evaluation.knn import knn_search, resolve_precision  # noqa: E402


def synthetic_features(n: int, dims: int, n_classes: int, seed: int) -> np.ndarray:
    """z-scored ReLU features of a 32-d latent with class structure, float32 (n, dims)."""
    rng = np.random.default_rng(seed)
    latent_dims = 32
    centres = rng.normal(size=(n_classes, latent_dims)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=n)
    weights = rng.normal(size=(latent_dims, dims)).astype(np.float32) / np.sqrt(latent_dims)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 8192):
        stop = min(start + 8192, n)
        latent = centres[labels[start:stop]] + rng.normal(size=(stop - start, latent_dims)).astype(np.float32)
        block = np.maximum(latent @ weights, 0.0)
        out[start:stop] = block + 0.1 * rng.normal(size=block.shape).astype(np.float32)
    out -= out.mean(0)
    out /= out.std(0)
    return out


def brute_force(features: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Leave-one-out neighbours of a few queries by direct float64 differences, ties by index."""
    result = []
    for q in queries:
        dist = np.empty(features.shape[0])
        for start in range(0, features.shape[0], 16384):
            diff = features[start : start + 16384].astype(np.float64) - features[q].astype(np.float64)
            dist[start : start + 16384] = np.einsum("ij,ij->i", diff, diff)
        dist[q] = np.inf
        order = np.lexsort((np.arange(dist.size), dist))
        result.append(order[:k])
    return np.array(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=132_000)
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample", type=int, default=40, help="queries checked by float64 brute force")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", default="bf16,fp32", help="comma-separated filter precisions to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    features = synthetic_features(args.n, args.dims, args.classes, args.seed)
    print(f"{args.n} x {args.dims} features, leave-one-out {args.k}-NN, euclidean, {args.threads} threads")
    print(f"load average before the run: {os.getloadavg()[0]:.1f} (shared machines slow every figure)")
    print(f"auto precision on this machine: {resolve_precision('auto')}")
    precisions = args.precisions.split(",")
    results = {}
    for name in precisions:
        start, cpu_start = time.perf_counter(), time.process_time()
        results[name] = knn_search(features, None, args.k, exclude_self=True, precision=name)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        flops = 2.0 * args.n * args.n * args.dims
        print(
            f"{name}: {seconds:7.1f} s wall, {cpu_seconds:7.1f} s CPU "
            f"({flops / seconds / 1e9:6.0f} GFLOP/s effective, counting the full n x n product); passes:"
        )
        for attempt in results[name].attempts:
            print(f"    {attempt}")
    first = results[precisions[0]]
    for name, result in list(results.items())[1:]:
        same = np.array_equal(first.indices, result.indices)
        print(f"{precisions[0]} and {name} neighbours identical for all {args.n} queries: {same}")
    sample = np.random.default_rng(args.seed + 1).choice(args.n, size=min(args.sample, args.n), replace=False)
    expected = brute_force(features, sample, args.k)
    for precision, result in results.items():
        agree = np.array_equal(result.indices[sample], expected)
        print(f"{precision} equals float64 brute force on {sample.size} sampled queries: {agree}")


if __name__ == "__main__":
    main()
