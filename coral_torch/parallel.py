"""Parallel map on threads for encode/write and read/decode work.

The heavy work (hashing, zstd, byte-plane copies, pread/pwrite) releases the GIL, so threads use
every core. Each job does its own output (it writes its object, or returns a decoded buffer), so
nothing waits in a queue for a single consumer thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_parallel(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, cost: Callable[[T], int] | None = None,
    name: str = "coral",
) -> list[R]:
    """``[fn(item) for item in items]`` on ``workers`` threads, results in input order.

    Every item is submitted at once (no look-ahead window): a slow first item (a 47 MB embedding)
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
