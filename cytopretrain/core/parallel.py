"""Work spread over a few threads, results handed back in input order.

Threads rather than processes: the work done here (file reads, image decoders, numpy and
torch kernels) releases the GIL, and results need no pickling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result], items: Iterable[Item], threads: int, *, name: str = "worker"
) -> Iterator[tuple[Item, Result]]:
    """(item, function(item)) in input order. ``threads`` <= 1 runs inline; otherwise at most
    2 x threads items are in flight, so memory stays bounded by a few results. Each pool thread
    runs torch on one intra-op thread, so the pool's threads do not oversubscribe the cores."""
    if threads <= 1:
        for item in items:
            yield item, function(item)
        return
    torch_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(function, item)))
            if len(pending) >= 2 * threads:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # set_num_threads in a pool thread also sets the count that later threads start with
        torch.set_num_threads(torch_threads)
