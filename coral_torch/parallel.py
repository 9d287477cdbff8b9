"""Parallel map on threads for encode/write and read/decode work.

The heavy work (hashing, zstd, byte-plane copies, pread/pwrite) releases the GIL, so threads use
every core. Each job does its own output (it writes its object, or returns a decoded buffer), so
nothing waits in a queue for a single consumer thread.

A :class:`HelpBoard` lets a thread that would otherwise just wait for a job (the training thread,
blocked on a background save at the end of training or at the next checkpoint) take items off that
job's queue and work alongside its threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Job(Generic[T, R]):
    """Items handed out one at a time, in a fixed order, to any thread that calls :meth:`drain`."""

    def __init__(self, fn: Callable[[T], R], items: Sequence[T], order: Sequence[int]) -> None:
        self.fn = fn
        self.items = items
        self.order = order
        self.results: list = [None] * len(items)
        self.errors: list[BaseException] = []
        self._next = 0
        self._active = 0
        self._cond = threading.Condition()

    def drain(self) -> int:
        """Work on items until none is left (or one failed); returns how many this thread did."""
        done = 0
        while True:
            with self._cond:
                if self.errors or self._next >= len(self.order):
                    return done
                i = self.order[self._next]
                self._next += 1
                self._active += 1
            try:
                self.results[i] = self.fn(self.items[i])
            except BaseException as exc:  # noqa: BLE001 - re-raised by the job's owner
                with self._cond:
                    self.errors.append(exc)
            finally:
                done += 1
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

    def wait_idle(self) -> None:
        """Block until no item is being worked on and none will be."""
        with self._cond:
            while self._active or not (self.errors or self._next >= len(self.order)):
                self._cond.wait()


class HelpBoard:
    """Where :func:`run_parallel` posts the job it is running so another thread can join in.

    ``board.help()`` works on the posted job's remaining items (at the helper's own CPU priority)
    and returns when none is left; it returns at once when nothing is posted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: list[_Job] = []
        self.items_helped = 0

    def help(self) -> int:
        n = 0
        while True:
            with self._lock:
                job = self._jobs[-1] if self._jobs else None
            if job is None:
                break
            done = job.drain()
            n += done
            if not done:
                break  # the posted job is out of items; its owner finishes and unposts it
        with self._lock:
            self.items_helped += n
        return n

    def _post(self, job: _Job) -> None:
        with self._lock:
            self._jobs.append(job)

    def _unpost(self, job: _Job) -> None:
        with self._lock:
            self._jobs.remove(job)


def run_parallel(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    cost: Callable[[T], int] | None = None,
    name: str = "coral",
    board: HelpBoard | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on ``workers`` threads (the caller's included), results in
    input order.

    Every item is queued at once (no look-ahead window): a slow first item (a 47 MB embedding)
    does not keep the other threads idle. Use it when ``fn`` does its own output (writes) and its
    results are small. With ``cost``, the most expensive items start first (longest-processing-time
    order), so the threads finish together. With ``board``, threads calling ``board.help()`` work on
    the items too. The first exception is raised after all work stopped; items not started by then
    are skipped.
    """
    items = list(items)
    if board is None and (workers <= 1 or len(items) <= 1):
        return [fn(it) for it in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))
    job: _Job = _Job(fn, items, order)
    if board is not None:
        board._post(job)
    try:
        extra = min(workers, len(items)) - 1
        if extra > 0:
            with ThreadPoolExecutor(extra, thread_name_prefix=name) as pool:
                for _ in range(extra):
                    pool.submit(job.drain)
                job.drain()
        else:
            job.drain()
        job.wait_idle()  # items a helper took may still be running
    finally:
        if board is not None:
            board._unpost(job)
    if job.errors:
        raise job.errors[0]
    return job.results
