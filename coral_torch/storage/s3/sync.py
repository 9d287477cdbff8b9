"""The resumable bulk transfer engine: objects from an :class:`ObjectSource` into an
:class:`ObjectSink`, whatever either is (a local HDF5Store, a repository's packs, an S3 remote).

What moves is a :class:`~coral_torch.format.objects.PreparedObject`: an object's stored payload
and its description (:mod:`coral_torch.format.objects`), verified by whoever read it.

:func:`sync` lists both sides once, moves what the sink lacks (and, with ``verify``, what the sink
holds damaged), ``max_concurrency`` objects at a time with bounded memory, and is resumable: run
again after an interruption, it moves only what is still missing. A source reads on the calling
thread (``open``: h5py is not thread-safe) and its returned reader runs on a worker; a sink that is
``concurrent`` writes on the workers, any other on the calling thread. An object whose bytes fail
a check fails alone (the rest go on); any other error stops new work, lets running transfers finish
and is reported with the rest in one :class:`~coral_torch.errors.SyncIncompleteError`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from ...errors import CoralError, IntegrityError, RemoteAuthError, SyncIncompleteError
from ...format.objects import DELTAS, WEIGHTS, PreparedObject

log = logging.getLogger(__name__)

__all__ = [
    "ObjectSource",
    "ObjectSink",
    "Pending",
    "sync",
    "new_stats",
    "progress_bar",
    "human",
    "as_completed",
    "raise_incomplete",
]

#: what a reader gives back: the object and the bytes received for it (None: it is gone)
Fetched = tuple[PreparedObject, int] | None


@dataclass
class Pending:
    """One object a source opened: ``read`` (run on a worker) gives it; ``size`` payload bytes are
    held in memory while it waits (0 when it is read on the worker)."""

    size: int
    read: Callable[[], Fetched]


class ObjectSource(Protocol):
    """Where objects come from."""

    where: str  # for messages (a path or URL)

    def list_objects(self) -> Mapping[str, Collection[str]]:
        """``{"weights": keys, "deltas": keys}`` of every object it has."""

    def open(self, group: str, key: str) -> Pending | None:
        """Called on the calling thread; ``None`` if the object is gone. Raises a CoralError for an
        object that cannot be read (damaged: IntegrityError)."""


class ObjectSink(Protocol):
    """Where objects go."""

    where: str
    concurrent: bool  # whether ``write`` may run on worker threads

    def present(self) -> Mapping[str, Mapping[str, Any]]:
        """``{"weights": {key: entry}, "deltas": {key: entry}}`` of the objects it holds (``entry``
        is what :meth:`check` needs; any value)."""

    def accept(self, group: str, key: str) -> None:
        """Raise a CoralError if this sink cannot hold an object of that key."""

    def check(self, group: str, key: str, entry: Any) -> str | None:
        """What is wrong with an object it holds (``None``: intact)."""

    def write(self, obj: PreparedObject) -> int:
        """Store one object; returns the bytes sent."""

    def flush(self) -> None:
        """Make what was written durable enough to survive this process (called at the end too)."""


def new_stats() -> dict[str, Any]:
    return {
        "uploaded": 0,
        "deltas_uploaded": 0,
        "downloaded": 0,
        "deltas_downloaded": 0,
        "skipped": 0,
        "verified": 0,
        "repaired": 0,
        "failed": 0,
        "bytes_transferred": 0,
        "seconds": 0.0,
    }


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def progress_bar(total: int, desc: str, show: bool | None) -> Any:
    if show is None:
        show = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit="obj", disable=not show, leave=False, dynamic_ncols=True)


def as_completed(futures: Mapping[Future, Any]) -> Iterator[Future]:
    """Like concurrent.futures.as_completed, without its timeout bookkeeping; cancelled ones are skipped."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            if not f.cancelled():
                yield f


def sync(
    source: ObjectSource,
    sink: ObjectSink,
    *,
    verb: str,
    max_concurrency: int,
    verify: bool | Collection[str] = False,
    progress: bool | None = None,
    desc: str = "",
    read_ahead_bytes: int = 1 << 30,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Move every object of ``source`` that ``sink`` lacks or (``verify``: ``True`` for all, else the
    keys named) holds damaged. ``verb``: ``"uploaded"`` or ``"downloaded"`` (which stats count).

    Returns stats (:func:`new_stats`): ``<verb>`` (weights), ``deltas_<verb>``, ``skipped`` (already
    there), ``verified`` (present objects checked and intact), ``repaired`` (present but damaged:
    moved again), ``failed``, ``bytes_transferred`` (payload + metadata bytes sent and received).

    Raises:
        SyncIncompleteError: some objects were not moved (``.failures``, ``.stats``); run again to resume.
    """
    t0 = time.monotonic()
    stats = stats if stats is not None else new_stats()
    present = sink.present()
    listed = source.list_objects()
    todo: list[tuple[str, str]] = []
    there: list[tuple[str, str]] = []
    total = 0
    for group in (WEIGHTS, DELTAS):
        have = present.get(group, {})
        for k in listed.get(group, ()):
            total += 1
            (there if k in have else todo).append((group, k))
    wanted = set() if verify is False else None if verify is True else set(verify)
    check = [(g, k) for g, k in there if wanted is None or k in wanted]
    damaged = _check_present(sink, check, present, max_concurrency)
    stats["verified"] += len(check) - len(damaged)
    stats["repaired"] += len(damaged)
    todo += [(g, k) for g, k in check if k in damaged]
    stats["skipped"] += total - len(todo)
    log.info(
        "sync %s -> %s: %d objects to move (%d of them damaged there), %d already there (%d checked)",
        source.where,
        sink.where,
        len(todo),
        len(damaged),
        total - len(todo),
        len(check),
    )
    failures = _pipeline(source, sink, todo, stats, verb, max_concurrency, desc, progress, read_ahead_bytes)
    stats["seconds"] = time.monotonic() - t0
    raise_incomplete(stats, failures, f"sync from {source.where} to {sink.where}", verb, len(todo))
    return stats


def _check_present(
    sink: ObjectSink, check: list[tuple[str, str]], present: Mapping[str, Mapping[str, Any]], max_concurrency: int
) -> dict[str, str]:
    """{key: what is wrong} for the objects of ``check`` the sink holds damaged (parallel)."""
    if not check:
        return {}

    def one(item: tuple[str, str]) -> tuple[str, str | None]:
        group, key = item
        return key, sink.check(group, key, present[group].get(key))

    damaged: dict[str, str] = {}
    with ThreadPoolExecutor(max_concurrency, thread_name_prefix="coral-sync") as pool:
        for key, problem in pool.map(one, check):
            if problem is not None:
                damaged[key] = problem
                log.warning("%s at %s is damaged (%s): sending it again", key, sink.where, problem)
    return damaged


def _pipeline(
    source: ObjectSource,
    sink: ObjectSink,
    todo: list[tuple[str, str]],
    stats: dict[str, Any],
    verb: str,
    max_concurrency: int,
    desc: str,
    progress: bool | None,
    read_ahead_bytes: int,
) -> dict[str, BaseException]:
    """Open objects on the calling thread, move them on a pool, hand results back to the calling
    thread. Memory stays bounded: at most ``2 * max_concurrency`` objects (and ``read_ahead_bytes``
    of opened payload) wait at once."""
    failures: dict[str, BaseException] = {}
    window = 2 * max_concurrency
    pending: dict[Future, tuple[str, str, int]] = {}
    queued = [0]
    written = [0]
    stop: list[BaseException] = []

    def record(key: str, exc: BaseException) -> None:
        if not isinstance(exc, CoralError):
            stop.append(exc)  # a bug: re-raised below as is
            return
        failures[key] = exc
        stats["failed"] += 1
        if not isinstance(exc, IntegrityError):
            stop.append(exc)
        log.warning("%s: %s", key, exc)

    def move(job: Pending) -> tuple[PreparedObject | None, int, int]:
        got = job.read()
        if got is None:
            return None, 0, 0
        obj, received = got
        if sink.concurrent:
            return obj, received, sink.write(obj)
        return obj, received, -1  # written on the calling thread

    def finish(group: str, result: tuple[PreparedObject | None, int, int]) -> None:
        obj, received, sent = result
        if obj is None:  # gone since the listing
            stats["skipped"] += 1
            return
        if sent < 0:
            sent = sink.write(obj)
            written[0] += obj.stored_bytes
            if written[0] >= read_ahead_bytes:
                sink.flush()
                written[0] = 0
        stats[verb if group == WEIGHTS else f"deltas_{verb}"] += 1
        stats["bytes_transferred"] += received + sent

    def drain(bar: Any) -> None:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            group, key, size = pending.pop(fut)
            queued[0] -= size
            exc = fut.exception()
            if exc is not None:
                record(key, exc)
            else:
                try:
                    finish(group, fut.result())
                except Exception as e:  # the sink's write failed
                    record(key, e)
            bar.update(1)
            bar.set_postfix_str(human(stats["bytes_transferred"]), refresh=False)

    try:
        with (
            ThreadPoolExecutor(max_concurrency, thread_name_prefix="coral-sync") as pool,
            progress_bar(len(todo), desc, progress) as bar,
        ):
            try:
                for group, key in todo:
                    while pending and (len(pending) >= window or queued[0] >= read_ahead_bytes):
                        drain(bar)
                    if stop:
                        break
                    try:
                        sink.accept(group, key)
                        job = source.open(group, key)
                    except Exception as exc:  # damaged source object, invalid key: this one fails
                        record(key, exc)
                        bar.update(1)
                        if stop:
                            break
                        continue
                    if job is None:
                        bar.update(1)
                        continue
                    pending[pool.submit(move, job)] = (group, key, job.size)
                    queued[0] += job.size
                while pending:
                    drain(bar)
            finally:
                for fut in pending:
                    fut.cancel()
    finally:
        sink.flush()
    for err in stop:
        if not isinstance(err, CoralError):
            raise err
    return failures


def raise_incomplete(
    stats: dict[str, Any], failures: Mapping[str, BaseException], what: str, verb: str, planned: int
) -> None:
    """Log a finished sync, or raise SyncIncompleteError saying what failed and what to do."""
    moved = stats[verb] + stats[f"deltas_{verb}"]
    if not failures:
        log.info(
            "%s: %d objects %s, %d skipped, %s", what, moved, verb, stats["skipped"], human(stats["bytes_transferred"])
        )
        return
    keys = list(failures)
    first_key = keys[0]
    others = ", ".join(keys[1:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    shown = f"{first_key}: {failures[first_key]}" + (f" (also failed: {others})" if others else "")
    if all(isinstance(e, RemoteAuthError) for e in failures.values()):
        # the credentials, not the objects: say so, as the error a caller catches for them
        raise RemoteAuthError(f"{what} refused: {failures[first_key]}") from None
    if all(isinstance(e, IntegrityError) for e in failures.values()):
        hint = (
            "the damaged objects were not copied; every other object was. Repair them from a good "
            "copy (delete them, then sync again from a store that has them intact)"
        )
    else:
        hint = (
            f"{planned - moved} of {planned} objects were not transferred. Run the sync again to "
            "resume: objects already transferred are not sent again"
        )
    raise SyncIncompleteError(
        f"{what} incomplete: {moved} objects {verb}, {len(failures)} failed. {hint}. First failure: {shown}",
        stats=stats,
        failures=dict(failures),
    ) from None
