"""Work spread over a few threads, results handed back in input order.

Threads rather than processes: the work done here (file reads, image decoders, numpy and
torch kernels) releases the GIL, and results need no pickling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    threads: int,
    *,
    name: str = "worker",
    initializer: Callable[..., object] | None = None,
    initargs: tuple = (),
) -> Iterator[tuple[Item, Result]]:
    """(item, function(item)) in input order. ``threads`` <= 1 runs inline; otherwise at most
    2 x threads items are in flight, so memory stays bounded by a few results. ``initializer``
    runs once in each pool thread (e.g. to give torch one intra-op thread there). The first
    error raised by ``function`` is raised here, and the items not yet started are dropped."""
    if threads <= 1:
        for item in items:
            yield item, function(item)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=initializer, initargs=initargs) as pool:
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
            for _, future in pending:
                future.cancel()
