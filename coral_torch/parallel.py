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


def run_parallel(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, cost: Callable[[T], int] | None = None,
    name: str = "coral",
) -> list[R]:
    """``[fn(item) for item in items]`` on ``workers`` threads, results in input order.

    Unlike :func:`map_ordered` there is no look-ahead window: a slow first item (a 47 MB embedding)
    does not keep the other threads idle. Use it when ``fn`` does its own output (writes) and its
    results are small. With ``cost``, the most expensive items start first (longest-processing-time
    order), so the threads finish together. The first exception is raised after all work stopped.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else range(len(items))
    results: list = [None] * len(items)
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix=name) as pool:
        futures = {pool.submit(fn, items[i]): i for i in order}
        errors = []
        for fut, i in futures.items():
            try:
                results[i] = fut.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the pool drained
                errors.append(exc)
                for other in futures:
                    other.cancel()
    if errors:
        raise errors[0]
    return results
