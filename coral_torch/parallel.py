"""Ordered parallel map on threads, with a bounded number of results in flight.

The heavy work (hashing, zstd, numpy copies, pread) releases the GIL, so threads use every core
while the caller consumes results in input order (for writes that must stay on one thread).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int, *, name: str = "coral") -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computing up to ``2 * workers`` ahead."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: deque = deque()
        for it in items:
            pending.append(pool.submit(fn, it))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
