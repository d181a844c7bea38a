"""Exact k-nearest-neighbour search in blocks with torch matrix products.

Definition of "exact". The distance of query ``a`` and reference ``b`` is evaluated in float64
from the input rows by direct differences (torch.cdist without its matmul shortcut): Euclidean
``|a - b|``; cosine ``|â - b̂|²/2``, which equals ``1 - cos(a, b)``, with ``â = a / |a|`` and
distance 1 when a row is zero (as in scikit-learn). The k neighbours of a query are the k
eligible references that come first when sorted by (that distance, reference index): equal
distances go to the smaller index. The result does not depend on the precision used below, on
block sizes or on the number of threads.

How it is fast and still exact. A (query block x reference block) tile of ranking keys comes
from one matrix product in bfloat16 or float32, with float32 accumulation. Euclidean: rows are
centred on the reference mean and the product of ``[a', 1, 1]`` with ``[-2b', h_b, l_b]`` gives
``x = |b|² - 2 a·b`` (``a'`` the row rounded to the filter precision, ``h_b + l_b`` its squared
norm split in two rounded parts), so that ``d = |a|² + x``. Cosine: rows are scaled to unit
norm and the product of ``a'`` with ``-b'`` gives ``x = -â·b̂``, ``d = 1 + x``. The computed key
``x̃`` differs from the float64 value by at most (``s`` = 2 for Euclidean, 1 for cosine,
``r_a = a - a'``, Cauchy-Schwarz for the rounding of the rows):
``s·(|a'||r_b| + |r_a||b'| + |r_a||r_b|)`` (rounded rows) + ``|h_b + l_b - |b|²|`` (norm split)
+ ``γ_K·(s|a'||b'| + 1.01|b|²)`` (float32 accumulation over K terms)
+ ``u/(1-u)·|x̃|`` (rounding of the product's output, u = 2⁻⁹ for bf16)
+ ``2⁻¹⁸·(|a|² + |b|²)`` (float64 rounding of the exact distance and of this bound).
Hence a lower bound ``L = base_a + f(x̃) - E`` of each exact distance (squared for Euclidean),
with ``f(x) = x - u/(1-u)·|x|`` increasing and ``E`` the other terms taken at their maximum
over the reference block (references are sorted by norm so that blocks are homogeneous). As
``f`` is increasing, the smallest keys of a tile are its smallest bounds. Each query keeps the
S references with the smallest bounds (the shortlist) and the (S+1)-th smallest bound τ. The
shortlist is re-ranked with exact float64 distances, computed only for the candidates that
can reach the k nearest: the same error terms on the other side of the key give an upper end
U of each exact distance, and a candidate whose bound exceeds the k-th smallest U has k
candidates strictly nearer (about 15 of 27 candidates remain in the benchmark below); if the
k-th exact distance t satisfies t < τ, no reference outside the shortlist can be nearer or
tie (its distance is >= its bound >= τ > t), so the k neighbours are exact. Queries that fail
the test are searched again with a 4x wider shortlist, then in float32, and the last few that
still fail (large clusters of exact ties) are brute forced in float64. The bound assumes
float32 accumulation (true of torch's CPU kernels, including oneDNN's bf16 kernels; subnormal
flushing aside, below 1e-36); a probe checks the bound on random data at run time before
either precision is used.

Memory: the reference is held once in the filter precision (n_ref x D, 2 bytes per value in
bf16); everything else is bounded by the block sizes (a 1024 x 32768 tile of keys, 64 MB in
bf16) and the re-ranking chunk (2²³ gathered values per side, 32 MB in float32, and their float64
copies).

Speed: ``python benchmarks/bench_knn.py`` (leave-one-out 11-NN of 132,000 x 1280 features);
the figures per machine, and what was tried and not kept (a symmetric key for a set searched
against itself cost as much in selection as it saved in products), are in benchmarks/README.md.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cytopretrain.core.errors import KnnError

Metric = Literal["euclidean", "cosine"]
Precision = Literal["auto", "fp32", "bf16"]

_FILTER_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Unit roundoff of the matmul output (bf16 output is rounded to 8 significant bits).
_OUTPUT_ROUNDOFF = {"bf16": 2.0**-9, "fp32": 2.0**-24}
# Slack for float64 rounding of exact distances and of the bound itself,
# relative to |a|² + |b|² (those errors are below 1e-12 of it).
_NORM_SLACK = 2.0**-18
_RERANK_ELEMENTS = 1 << 23  # values gathered per side at once while re-ranking (32 MB in float32)
_WIDEN_FACTOR = 4
_MIN_BF16_SPEEDUP = 1.3
_SELECTION_STRIPES = 32  # see _smallest_per_row


@dataclass
class KnnResult:
    """Neighbours and how they were found.

    distances: (n_queries, k) float64, ascending per row; inf where fewer than k references
        are eligible. indices: (n_queries, k) int64 reference rows, -1 where missing.
    precision: filter precision of the first pass ("bf16" or "fp32").
    attempts: one entry per pass: precision, shortlist size, queries searched, queries that
        failed the exactness test and went on to the next pass; a last entry with precision
        "brute" if any query needed the float64 brute force.
    """

    distances: np.ndarray
    indices: np.ndarray
    precision: str
    attempts: list[dict] = field(default_factory=list)


@dataclass
class _Prepared:
    """Rows as they enter the filter product, with the terms of the error bound (float64).

    product: (n, K) in the filter precision: queries ``[a', 1, 1, 0...]`` / references
        ``[-2b', h, l, 0...]`` (Euclidean), or ``a'`` / ``-b'`` (cosine); K padded to 16.
    sq: |x|² of the centred (Euclidean) or unit (cosine) float64 rows.
    low_norm: |x'|; resid_norm: |x - x'|; split_error: |h + l - |x|²| (zeros for queries
        and for cosine).
    """

    product: torch.Tensor
    sq: torch.Tensor
    low_norm: torch.Tensor
    resid_norm: torch.Tensor
    split_error: torch.Tensor


def knn(
    queries: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor | None = None,
    k: int = 1,
    *,
    metric: Metric = "euclidean",
    exclude_self: bool = False,
    query_groups: np.ndarray | None = None,
    reference_groups: np.ndarray | None = None,
    block_size: int = 1024,
    reference_block_size: int = 32768,
    precision: Precision = "auto",
    shortlist_margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest references of every query; returns (distances, indices), each (n, k).

    See ``knn_search`` for the arguments; this returns only its distances and indices.
    """
    result = knn_search(
        queries,
        reference,
        k,
        metric=metric,
        exclude_self=exclude_self,
        query_groups=query_groups,
        reference_groups=reference_groups,
        block_size=block_size,
        reference_block_size=reference_block_size,
        precision=precision,
        shortlist_margin=shortlist_margin,
    )
    return result.distances, result.indices


def knn_search(
    queries: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor | None = None,
    k: int = 1,
    *,
    metric: Metric = "euclidean",
    exclude_self: bool = False,
    query_groups: np.ndarray | None = None,
    reference_groups: np.ndarray | None = None,
    block_size: int = 1024,
    reference_block_size: int = 32768,
    precision: Precision = "auto",
    shortlist_margin: int | None = None,
) -> KnnResult:
    """Exact k nearest references of every query (module docstring: definition, guarantee).

    queries: (n, D) and reference: (m, D) real arrays; reference=None searches the queries
        themselves (leave-one-out with exclude_self=True).
    metric: "euclidean" (distance returned as the square root) or "cosine" (1 - cosine).
    exclude_self: query i never gets reference i (requires n == m: the same items); an exact
        duplicate at another index stays eligible.
    query_groups / reference_groups: integer group codes, (n,) or (n, g) and (m,) or (m, h);
        query i and reference j are excluded when their code sets intersect (codes < 0 are
        padding). One column per criterion, e.g. compound code; a treatment seen in several
        batches lists all its batch codes. Codes must come from one shared coding.
        reference_groups defaults to query_groups when reference is None.
    block_size / reference_block_size: rows per query / reference tile (memory bound).
    precision: "auto" uses bfloat16 where a probe finds it faster than float32 and within the
        error model, else float32; "bf16" forces it (error if the probe finds the model
        violated); "fp32" forces float32.
    shortlist_margin: shortlist size S = k + margin (default max(16, k)); exactness does not
        depend on it, speed does.
    """
    query_rows = _as_rows(queries, "queries")
    reference_rows = query_rows if reference is None else _as_rows(reference, "reference")
    if reference is None and reference_groups is None:
        reference_groups = query_groups
    n_queries, n_reference = query_rows.shape[0], reference_rows.shape[0]
    _check_arguments(query_rows, reference_rows, k, metric, exclude_self, block_size, reference_block_size)
    groups = _check_groups(query_groups, reference_groups, n_queries, n_reference)
    margin = max(16, k) if shortlist_margin is None else shortlist_margin
    if margin < 0:
        raise KnnError(f"shortlist_margin must be >= 0, got {margin}")
    filter_precision = resolve_precision(precision)

    search = _Search(query_rows, reference_rows, k, metric, exclude_self, groups, block_size, reference_block_size)
    distances = np.full((n_queries, k), np.inf)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    pending = torch.arange(n_queries)
    attempts: list[dict] = []
    for pass_precision, shortlist in _schedule(filter_precision, k + margin, n_reference):
        if pending.numel() == 0:
            break
        found_d, found_i, passed = search.shortlist_pass(pending, pass_precision, shortlist)
        done = pending[passed].numpy()
        distances[done], indices[done] = found_d[passed].numpy(), found_i[passed].numpy()
        attempts.append(
            {
                "precision": pass_precision,
                "shortlist": shortlist,
                "queries": int(pending.numel()),
                "failed": int((~passed).sum()),
            }
        )
        pending = pending[~passed]
    if pending.numel():
        found_d, found_i = search.brute_force(pending)
        distances[pending.numpy()], indices[pending.numpy()] = found_d.numpy(), found_i.numpy()
        attempts.append({"precision": "brute", "shortlist": n_reference, "queries": int(pending.numel()), "failed": 0})
    if metric == "euclidean":
        distances = np.sqrt(np.maximum(distances, 0.0))
    return KnnResult(distances, indices, filter_precision, attempts)


def resolve_precision(precision: Precision = "auto") -> str:
    """The filter precision a search would use: "bf16" or "fp32" (see ``knn_search``)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise KnnError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    probe = _probe(torch.get_num_threads(), torch.get_float32_matmul_precision())
    if not probe["valid"]["fp32"]:
        raise KnnError(
            "float32 matmul breaks the error model (float32 accumulation); "
            "call torch.set_float32_matmul_precision('highest')"
        )
    if precision == "fp32":
        return "fp32"
    if precision == "bf16":
        if not probe["valid"]["bf16"]:
            raise KnnError(
                "bf16 matmul on this machine breaks the error model (no float32 accumulation); use precision='fp32'"
            )
        return "bf16"
    return "bf16" if probe["valid"]["bf16"] and probe["speedup"] >= _MIN_BF16_SPEEDUP else "fp32"


def _schedule(first: str, shortlist: int, n_reference: int) -> list[tuple[str, int]]:
    """Passes for queries that fail the exactness test: widen, then float32, then widen."""
    passes = [(first, shortlist), (first, shortlist * _WIDEN_FACTOR)]
    if first == "bf16":
        passes.append(("fp32", shortlist * _WIDEN_FACTOR))
    passes.append(("fp32", shortlist * _WIDEN_FACTOR**2))
    # A shortlist as large as the reference set cannot fail; no point going beyond it.
    return [(p, min(s, n_reference)) for p, s in passes]


def _as_rows(values: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # Read-only arrays (e.g. pandas copy-on-write views) are fine: inputs are never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        rows = torch.as_tensor(values).detach()
    if rows.ndim != 2:
        raise KnnError(f"{name} must be 2-D (rows x features), got shape {tuple(rows.shape)}")
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.to(torch.float64)
    if not bool(torch.isfinite(rows).all()):
        raise KnnError(f"{name} contains NaN or infinite values")
    return rows.contiguous()  # row gathers on column-major input (e.g. from pandas) are slow


def _check_arguments(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    exclude_self: bool,
    block_size: int,
    reference_block_size: int,
) -> None:
    if metric not in ("euclidean", "cosine"):
        raise KnnError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if queries.shape[1] != reference.shape[1]:
        raise KnnError(f"queries have {queries.shape[1]} features, reference {reference.shape[1]}")
    if reference.shape[0] == 0:
        raise KnnError("reference is empty")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise KnnError(f"k must be a positive integer, got {k!r}")
    if exclude_self and queries.shape[0] != reference.shape[0]:
        raise KnnError(f"exclude_self needs as many queries as references ({queries.shape[0]} != {reference.shape[0]})")
    if block_size < 1 or reference_block_size < 1:
        raise KnnError("block sizes must be positive")


def _check_groups(
    query_groups, reference_groups, n_queries: int, n_reference: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if query_groups is None and reference_groups is None:
        return None
    if query_groups is None or reference_groups is None:
        raise KnnError("query_groups and reference_groups must be given together")
    coded = []
    for name, codes, n in (
        ("query_groups", query_groups, n_queries),
        ("reference_groups", reference_groups, n_reference),
    ):
        array = np.asarray(codes)
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2 or array.shape[0] != n:
            raise KnnError(f"{name} must have shape ({n},) or ({n}, g), got {np.shape(codes)}")
        if not np.issubdtype(array.dtype, np.integer):
            raise KnnError(f"{name} must hold integer codes, got dtype {array.dtype}")
        coded.append(torch.from_numpy(array.astype(np.int64)))
    return coded[0], coded[1]


# --- error model ---------------------------------------------------------------------------


def _prepare(rows64: torch.Tensor, precision: str, metric: str, side: str) -> _Prepared:
    """Round centred / unit float64 rows to the filter precision and lay out the product."""
    dtype = _FILTER_DTYPES[precision]
    low = rows64.to(dtype)
    low64 = low.to(torch.float64)
    sq = torch.linalg.vector_norm(rows64, dim=1) ** 2
    if not bool(torch.isfinite(sq.to(dtype)).all()):
        raise KnnError(f"feature values too large for {precision} (squared norms overflow); rescale them")
    low_norm = torch.linalg.vector_norm(low64, dim=1)
    resid_norm = torch.linalg.vector_norm(low64.sub_(rows64), dim=1)
    split_error = torch.zeros_like(sq)
    if metric == "euclidean" and side == "query":
        extra = torch.ones((rows64.shape[0], 2), dtype=dtype)
    elif metric == "euclidean":
        low = low.mul_(-2)  # exact: scaling by a power of two
        high = sq.to(dtype)
        rest = (sq - high.to(torch.float64)).to(dtype)
        split_error = (sq - high.to(torch.float64) - rest.to(torch.float64)).abs()
        extra = torch.stack([high, rest], dim=1)
    else:
        extra = torch.zeros((rows64.shape[0], 0), dtype=dtype)
        low = low if side == "query" else low.neg_()
    width = low.shape[1] + extra.shape[1]
    padding = torch.zeros((rows64.shape[0], -width % 16), dtype=dtype)
    return _Prepared(
        product=torch.cat([low, extra, padding], dim=1),
        sq=sq,
        low_norm=low_norm,
        resid_norm=resid_norm,
        split_error=split_error,
    )


def _key_error(
    query: _Prepared, low_norm_b, resid_norm_b, split_error_b, sq_b, metric: str, width: int
) -> torch.Tensor:
    """Bound E on |key - float64 key| without the output-rounding term, (queries x refs).

    Reference terms may be per reference (broadcast row vectors) or block maxima (scalars).
    """
    scale = 2.0 if metric == "euclidean" else 1.0
    norm_weight = 1.01 if metric == "euclidean" else 0.0
    gamma = width * 2.0**-24 / (1 - width * 2.0**-24)
    pa, ra, sq_a = query.low_norm[:, None], query.resid_norm[:, None], query.sq[:, None]
    rounding = scale * (pa * resid_norm_b + ra * low_norm_b + ra * resid_norm_b)
    accumulation = gamma * (scale * pa * low_norm_b + norm_weight * sq_b)
    return rounding + split_error_b + accumulation + _NORM_SLACK * (sq_a + sq_b)


def _output_floor(keys: torch.Tensor, precision: str) -> torch.Tensor:
    """f(x) = x - u/(1-u)|x|: lower end of what the unrounded output can be (inf stays inf)."""
    u = _OUTPUT_ROUNDOFF[precision]
    floor = keys - (u / (1 - u)) * keys.abs()
    return torch.where(torch.isinf(keys), keys, floor)


@functools.cache
def _probe(num_threads: int, float32_matmul_precision: str) -> dict:
    """Time bf16 against float32 products and check the error bound of both; cached."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 1024, generator=generator, dtype=torch.float64)
    b = torch.randn(2048, 1024, generator=generator, dtype=torch.float64)
    seconds = {}
    for name, dtype in _FILTER_DTYPES.items():
        low_a, low_b = a.to(dtype), b.to(dtype)
        torch.mm(low_a, low_b.T)  # warm-up: kernel selection, page faults
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(low_a, low_b.T)
            best = min(best, time.perf_counter() - start)
        seconds[name] = best
    # Features of very different scales and an offset, as raw CNN features have.
    scales = torch.rand(1024, generator=generator, dtype=torch.float64) * 4
    a, b = a[:128] * scales + 3.0, b[:1024] * scales + 3.0
    valid = {
        name: all(_bound_holds(a, b, name, metric) for metric in ("euclidean", "cosine")) for name in _FILTER_DTYPES
    }
    return {"speedup": seconds["fp32"] / seconds["bf16"], "valid": valid}


def _bound_holds(a: torch.Tensor, b: torch.Tensor, precision: str, metric: str) -> bool:
    """Check |key - float64 key| <= bound for every pair of two random sets."""
    if metric == "euclidean":
        center = b.mean(0)
        a, b = a - center, b - center
    else:
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    query, reference = _prepare(a, precision, metric, "query"), _prepare(b, precision, metric, "reference")
    keys = torch.mm(query.product, reference.product.T).to(torch.float64)
    exact = (b * b).sum(1)[None, :] - 2 * a @ b.T if metric == "euclidean" else -(a @ b.T)
    error = _key_error(
        query,
        reference.low_norm[None],
        reference.resid_norm[None],
        reference.split_error[None],
        reference.sq[None],
        metric,
        query.product.shape[1],
    )
    return bool((_output_floor(keys, precision) - error <= exact).all())


# --- search --------------------------------------------------------------------------------


@dataclass
class _ReferenceSide:
    """Reference rows prepared for one precision, sorted by squared norm (stable)."""

    rows: _Prepared
    order: torch.Tensor  # sorted position -> original reference index
    block_max: dict[str, torch.Tensor]  # per reference block: max of each error term


class _Search:
    """State of one search: prepared references per precision, exclusions, exact rerank."""

    def __init__(
        self,
        queries: torch.Tensor,
        reference: torch.Tensor,
        k: int,
        metric: str,
        exclude_self: bool,
        groups,
        block_size: int,
        reference_block_size: int,
    ) -> None:
        self.queries, self.reference, self.k, self.metric = queries, reference, k, metric
        self.exclude_self, self.groups = exclude_self, groups
        self.block_size, self.reference_block_size = block_size, reference_block_size
        self.n_reference, self.dims = reference.shape
        # Centring on the reference mean keeps |a|·|b| (which scales the error bound) close to
        # the distances themselves; the distances do not change.
        self.center = sum(chunk.to(torch.float64).sum(0) for chunk in self._chunks(reference)) / self.n_reference
        self.reference_norms = (
            torch.cat([chunk.to(torch.float64).norm(dim=1) for chunk in self._chunks(reference)])
            if metric == "cosine"
            else None
        )
        self.order = self._norm_order()
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(self.n_reference)
        self.sorted_groups = None if groups is None else (groups[0], groups[1][self.order])
        self._sides: dict[str, _ReferenceSide] = {}
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _chunks(self, rows: torch.Tensor):
        for start in range(0, rows.shape[0], self.reference_block_size):
            yield rows[start : start + self.reference_block_size]

    def _norm_order(self) -> torch.Tensor:
        """References by centred norm, so each block has homogeneous error terms."""
        if self.metric == "cosine":
            return torch.arange(self.n_reference)
        sq = torch.cat([torch.linalg.vector_norm(self._rows64(chunk), dim=1) for chunk in self._chunks(self.reference)])
        return torch.argsort(sq, stable=True)

    def _rows64(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in float64 as the filter sees them: centred (Euclidean) or unit (cosine)."""
        rows64 = rows.to(torch.float64, copy=True)
        if self.metric == "euclidean":
            return rows64.sub_(self.center)
        norms = torch.linalg.vector_norm(rows64, dim=1, keepdim=True)
        return rows64.div_(torch.where(norms > 0, norms, 1.0))

    def reference_side(self, precision: str) -> _ReferenceSide:
        if precision not in self._sides:
            parts = [
                _prepare(self._rows64(self.reference[positions]), precision, self.metric, "reference")
                for positions in self._chunks(self.order)
            ]
            rows = _Prepared(
                *(
                    torch.cat([getattr(p, name) for p in parts])
                    for name in ("product", "sq", "low_norm", "resid_norm", "split_error")
                )
            )
            block_max = {
                name: torch.stack([getattr(p, name).max() for p in parts])
                for name in ("sq", "low_norm", "resid_norm", "split_error")
            }
            self._sides[precision] = _ReferenceSide(rows, self.order, block_max)
        return self._sides[precision]

    def shortlist_pass(
        self, pending: torch.Tensor, precision: str, shortlist: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shortlist + exact rerank for the pending queries; (dist², indices, passed)."""
        side = self.reference_side(precision)
        out_d, out_i, out_ok = [], [], []
        for start in range(0, pending.numel(), self.block_size):
            rows = pending[start : start + self.block_size]
            query = _prepare(self._rows64(self.queries[rows]), precision, self.metric, "query")
            bounds, upper, candidates, tau = self._shortlist(rows, query, side, precision, shortlist)
            exact = self._exact_distances(rows, candidates, self._may_be_nearest(bounds, upper))
            dist, idx = _first_k(exact, candidates, self.k)
            out_d.append(dist)
            out_i.append(idx)
            # t < τ proves exactness; τ = inf means every eligible reference was shortlisted.
            out_ok.append((dist[:, -1] < tau) | torch.isinf(tau))
        return torch.cat(out_d), torch.cat(out_i), torch.cat(out_ok)

    def _may_be_nearest(self, bounds: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Shortlisted candidates that can be among the k nearest, (queries x S) bool.

        Each candidate's exact distance lies in [bound, upper]. The k candidates with the
        smallest upper ends are all at most the k-th smallest of them, U_k; a candidate whose
        bound exceeds U_k has k candidates strictly nearer, so its exact distance is not needed.
        """
        valid = torch.isfinite(bounds)
        if bounds.shape[1] < self.k:
            return valid
        kth_upper = torch.where(valid, upper, torch.inf).topk(self.k, dim=1, largest=False).values[:, -1:]
        return valid & (bounds <= kth_upper)

    def _shortlist(
        self, rows: torch.Tensor, query: _Prepared, side: _ReferenceSide, precision: str, shortlist: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """S references with the smallest lower bounds: their bounds, upper bounds (the same
        error terms on the other side of the key), original indices, and τ.

        Each tile contributes its S+1 smallest keys; bounds and the final selection are
        computed once over all tiles (few large operations rather than many small ones).
        """
        keep = shortlist + 1
        tile_keys, tile_positions, tile_errors = [], [], []
        block_error = _key_error(
            query,
            *(side.block_max[name][None, :] for name in ("low_norm", "resid_norm", "split_error", "sq")),
            self.metric,
            query.product.shape[1],
        )
        for block, start in enumerate(range(0, self.n_reference, self.reference_block_size)):
            stop = min(start + self.reference_block_size, self.n_reference)
            keys = torch.mm(query.product, side.rows.product[start:stop].T)
            self._mask(keys, rows, start, stop)
            values, positions = _smallest_per_row(keys, keep)
            tile_keys.append(values)
            tile_positions.append(positions + start)
            tile_errors.append(block_error[:, block : block + 1].expand(-1, values.shape[1]))
        base = query.sq if self.metric == "euclidean" else torch.ones_like(query.sq)
        keys = torch.cat(tile_keys, 1).to(torch.float64)
        errors = torch.cat(tile_errors, 1)
        floor = _output_floor(keys, precision)
        bounds = base[:, None] + floor - errors
        positions = torch.cat(tile_positions, 1)
        if bounds.shape[1] < keep:  # fewer references than S + 1: pad, τ = inf
            padding = keep - bounds.shape[1]
            bounds = torch.cat([bounds, torch.full((bounds.shape[0], padding), torch.inf, dtype=bounds.dtype)], 1)
            positions = torch.cat([positions, torch.zeros((positions.shape[0], padding), dtype=positions.dtype)], 1)
        ranked, order = torch.topk(bounds, keep, dim=1, largest=False, sorted=True)
        best_bounds, order, tau = ranked[:, :shortlist], order[:, :shortlist], ranked[:, shortlist]
        # Upper end: the output rounding (key - floor) and the error terms on the other side.
        picked = order.clamp_max(keys.shape[1] - 1)
        width = 2 * (torch.gather(keys, 1, picked) - torch.gather(floor, 1, picked) + torch.gather(errors, 1, picked))
        upper = torch.where(torch.isfinite(best_bounds), best_bounds + width, torch.inf)
        best_idx = side.order[torch.gather(positions, 1, order)]
        return best_bounds, upper, best_idx, tau

    def _mask(self, keys: torch.Tensor, rows: torch.Tensor, start: int, stop: int) -> None:
        """Set excluded pairs of a tile of sorted references [start, stop) to +inf."""
        if self.exclude_self:
            position = self.position[rows]
            inside = (position >= start) & (position < stop)
            keys[torch.nonzero(inside).squeeze(1), position[inside] - start] = torch.inf
        if self.sorted_groups is not None:
            query_codes, reference_codes = self.sorted_groups[0][rows], self.sorted_groups[1][start:stop]
            for i in range(query_codes.shape[1]):
                codes = query_codes[:, i : i + 1]
                for j in range(reference_codes.shape[1]):
                    keys.masked_fill_((codes == reference_codes[None, :, j]) & (codes >= 0), torch.inf)

    def _exact_distances(self, rows: torch.Tensor, candidates: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
        """Exact distances (squared for Euclidean) of each query to its needed candidates,
        (queries x S); +inf where not needed. Float64 pairs, in chunks of bounded memory."""
        out = torch.full(candidates.shape, torch.inf, dtype=torch.float64)
        pair_query, pair_slot = torch.nonzero(needed, as_tuple=True)
        chunk = max(1, _RERANK_ELEMENTS // self.dims)
        for start in range(0, pair_query.numel(), chunk):
            part_query, part_slot = pair_query[start : start + chunk], pair_slot[start : start + chunk]
            references = candidates[part_query, part_slot]
            out[part_query, part_slot] = self._pair_distances(
                self._gather("pair_queries", self.queries, rows[part_query]),
                self._gather("pair_references", self.reference, references),
                references,
            )
        return out

    def _gather(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """source[index] in a buffer reused across calls (fresh large buffers page-fault)."""
        return torch.index_select(
            source, 0, index, out=self._buffer(name, (index.numel(), source.shape[1]), source.dtype)
        )

    def _buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        size = shape[0] * shape[1]
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=dtype)
            self._buffers[(name, dtype)] = buffer
        return buffer[:size].view(shape)

    def _pair_distances(
        self, query: torch.Tensor, reference: torch.Tensor, reference_index: torch.Tensor
    ) -> torch.Tensor:
        """Exact float64 distance of pairs of rows, (P, D) and (P, D) -> (P,).

        Euclidean: squared direct-difference distance; cosine: |â - b̂|²/2 (= 1 - cos â·b̂),
        1 where a row is zero. Every exact distance goes through this one function (torch.cdist
        without the matmul shortcut, one pair per batch entry), so equal rows give
        bit-identical distances: exact ties stay ties and are broken by index.
        """
        query64 = self._buffer("query64", tuple(query.shape), torch.float64).copy_(query)[:, None, :]
        reference64 = self._buffer("reference64", tuple(reference.shape), torch.float64).copy_(reference)[:, None, :]
        if self.metric == "euclidean":
            return _direct_distance(query64, reference64)[:, 0] ** 2
        query_norm = torch.linalg.vector_norm(query64, dim=-1, keepdim=True)
        reference_norm = self.reference_norms[reference_index][:, None, None]
        query64.div_(torch.where(query_norm > 0, query_norm, 1.0))
        reference64.div_(torch.where(reference_norm > 0, reference_norm, 1.0))
        half_square = _direct_distance(query64, reference64)[:, 0] ** 2 / 2
        zero = (query_norm[:, 0, 0] == 0) | (reference_norm[:, 0, 0] == 0)
        return torch.where(zero, 1.0, half_square)

    def brute_force(self, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 distances to every reference for a few queries; (dist², indices)."""
        out_d, out_i = [], []
        chunk = max(1, _RERANK_ELEMENTS // self.dims)
        for query_row in pending:
            row = query_row.reshape(1)
            best_d = torch.full((1, self.k), torch.inf, dtype=torch.float64)
            best_i = torch.full((1, self.k), -1, dtype=torch.int64)
            for start in range(0, self.n_reference, chunk):
                cand = self.order[start : start + chunk]
                query = self.queries[row].expand(cand.numel(), -1)
                dist = self._pair_distances(query, self.reference.index_select(0, cand), cand)[None, :]
                self._mask(dist, row, start, start + cand.numel())
                best_d, best_i = _first_k(torch.cat([best_d, dist], 1), torch.cat([best_i, cand[None]], 1), self.k)
            out_d.append(best_d)
            out_i.append(best_i)
        return torch.cat(out_d), torch.cat(out_i)


def _smallest_per_row(
    keys: torch.Tensor, keep: int, stripes: int = _SELECTION_STRIPES
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` smallest values of each row and their columns, in no order (as torch.topk).

    torch.topk over a wide tile costs as much as the matrix product that made it, so the
    search is narrowed first: the row is cut into ``stripes`` consecutive stripes of W columns
    and an element-wise minimum across stripes (vectorized, one read of the tile) gives, for
    each offset j < W, the minimum of the group {j, j + W, j + 2W, ...}. The keep smallest
    values of the row lie in the keep groups with the smallest minima: if one of them lies in
    another group, each of the keep chosen groups holds a value no larger than it, which
    already accounts for every rank up to its own. So only those keep x stripes values (and
    the few tail columns past stripes x W) are searched, and the values returned are exactly
    those of torch.topk; among equal values the columns may differ.
    """
    rows, width = keys.shape
    group_width = width // stripes
    if group_width < 2 * keep:
        return torch.topk(keys, min(keep, width), dim=1, largest=False, sorted=False)
    body = stripes * group_width
    group_min = keys[:, :body].view(rows, stripes, group_width).amin(1)
    _, groups = torch.topk(group_min, keep, dim=1, largest=False, sorted=False)
    columns = (groups[:, :, None] + group_width * torch.arange(stripes)).reshape(rows, -1)
    if body < width:
        columns = torch.cat([columns, torch.arange(body, width).expand(rows, -1)], 1)
    values, picked = torch.topk(torch.gather(keys, 1, columns), keep, dim=1, largest=False, sorted=False)
    return values, torch.gather(columns, 1, picked)


def _direct_distance(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Euclidean distances by direct differences: (q, 1, D) to (q, S, D) -> (q, S)."""
    return torch.cdist(query, reference, compute_mode="donot_use_mm_for_euclid_dist")[:, 0, :]


def _first_k(distances: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest by (distance, index); inf distances get index -1. Rows padded to k."""
    if distances.shape[1] < k:
        pad = k - distances.shape[1]
        distances = torch.cat([distances, torch.full((distances.shape[0], pad), torch.inf, dtype=distances.dtype)], 1)
        indices = torch.cat([indices, torch.full((indices.shape[0], pad), -1, dtype=indices.dtype)], 1)
    # Invalid entries sort last among equal (inf) distances; then a stable sort by
    # distance keeps index order inside ties.
    sortable = torch.where(torch.isinf(distances) | (indices < 0), torch.iinfo(torch.int64).max, indices)
    by_index = torch.argsort(sortable, dim=1, stable=True)
    distances, indices = torch.gather(distances, 1, by_index), torch.gather(indices, 1, by_index)
    by_distance = torch.argsort(distances, dim=1, stable=True)[:, :k]
    distances, indices = torch.gather(distances, 1, by_distance), torch.gather(indices, 1, by_distance)
    return distances, torch.where(torch.isinf(distances), -1, indices)
