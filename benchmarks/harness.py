"""What the benchmark scripts share: the real data folder and best-of-n timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TESTS = REPO / "tests"  # test-data generators (fake_metadata, cell_images) used by some benchmarks


def best(function: Callable[[], object], repeat: int) -> float:
    """The shortest of ``repeat`` wall-clock runs of ``function``, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)
