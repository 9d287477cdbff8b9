"""Payload writes that bypass the page cache (``O_DIRECT``) where the file system allows it.

Why: a buffered write copies every byte into freshly allocated page-cache pages. That copy is CPU
time taken from training (a background save competes with the training threads), and the new pages
crowd the page cache with data nobody reads back soon; ``O_DIRECT`` through a reused staging
buffer costs a small fraction of that CPU time (docs/guarantees.md, "Measured design choices", for the figures).

How: the payload (a list of byte segments) is copied into a page-aligned staging buffer, a few MiB at
a time, and each full buffer is written with ``O_DIRECT`` at a page-aligned file offset; the last
partial page goes through the ordinary buffered descriptor. Direct I/O only ever covers whole pages
that belong to the payload alone, so it never races HDF5's own buffered metadata writes. When the
file system refuses ``O_DIRECT`` (tmpfs, some network file systems, non-Linux), everything is
written buffered. Durability is unchanged: the caller still fsyncs the file before publishing it.

:class:`BackgroundSync` makes that final fsync short: a flush of a virtual disk's cache costs time
in proportion to the bytes written since the last one, so a thread ``fdatasync``-s the file while
later payloads are still being encoded, and the final fsync flushes only the tail.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ..format.codec import FileSegment

log = logging.getLogger(__name__)

PAGE = 4096
STAGE_BYTES = 4 << 20  # per O_DIRECT write: large enough for full device throughput
MIN_DIRECT_BYTES = 256 << 10  # smaller payloads go buffered (and are not page-aligned in the file)
_IOV_MAX = 512
_POOL_MAX = 16

_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


@contextmanager
def _staging_buffer() -> Iterator[np.ndarray]:
    """A page-aligned staging buffer from a process-wide pool. Reusing buffers matters: fresh
    anonymous memory costs a page fault per 4 KiB on first touch, which is what this avoids."""
    with _pool_lock:
        buf = _pool.pop() if _pool else None
    if buf is None:
        buf = mmap.mmap(-1, STAGE_BYTES)
    try:
        yield np.frombuffer(buf, dtype=np.uint8)
    finally:
        with _pool_lock:
            if len(_pool) < _POOL_MAX:
                _pool.append(buf)
            else:  # pragma: no cover - more concurrent writers than the pool keeps
                buf.close()


def pwritev_all(fd: int, segments: Sequence[memoryview], offset: int) -> None:
    """Write all segments back to back at ``offset`` (``pwritev`` may write less than asked)."""
    segs = [s for s in segments if len(s)]
    while segs:
        done = os.pwritev(fd, segs[:_IOV_MAX], offset)
        if done <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {done} bytes at offset {offset}")
        offset += done
        while segs and done >= len(segs[0]):
            done -= len(segs[0])
            segs.pop(0)
        if segs and done:
            segs[0] = segs[0][done:]


def _copy_from_file(seg: FileSegment, fd: int, offset: int) -> None:
    """Copy a spilled segment to ``offset`` of ``fd``: in the kernel (``copy_file_range``, no user
    buffer) where it can, else through a staging buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < seg.length:
                got = os.copy_file_range(seg.fd, fd, seg.length - done, seg.offset + done, offset + done)
                if got <= 0:
                    break
                done += got
        except OSError as exc:  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: copy through user space
            log.debug("copy_file_range refused (%s); copying through a buffer", exc)
    if done < seg.length:
        with _staging_buffer() as stage:
            while done < seg.length:
                n = min(STAGE_BYTES, seg.length - done)
                view = memoryview(stage)[:n]  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
                seg[done : done + n].read_into(view)
                pwritev_all(fd, [view], offset + done)
                done += n


def write_segments(fd: int, segments: Sequence[memoryview | FileSegment], offset: int) -> None:
    """Write segments back to back at ``offset``: runs of memory with ``pwritev``, spilled
    :class:`~coral_torch.codec.FileSegment` parts by :func:`_copy_from_file`."""
    run: list[memoryview] = []
    for seg in segments:
        if isinstance(seg, FileSegment):
            if run:
                pwritev_all(fd, run, offset)
                offset += sum(len(x) for x in run)
                run = []
            _copy_from_file(seg, fd, offset)
            offset += len(seg)
        else:
            run.append(seg)
    if run:
        pwritev_all(fd, run, offset)


def _chunks(segments: Sequence[memoryview | FileSegment], start: int, stop: int) -> Iterator[memoryview | FileSegment]:
    """The bytes ``[start, stop)`` of the segments laid end to end, as slices of the segments."""
    pos = 0
    for seg in segments:
        end = pos + len(seg)
        if end > start and pos < stop:
            yield seg[max(start - pos, 0) : min(stop, end) - pos]
        pos = end
        if pos >= stop:
            break


class BackgroundSync:
    """``fdatasync`` a file on a thread of its own each time ``every`` bytes were written since the
    previous sync began, so the disk flushes while the writer keeps encoding.

    Call order: :meth:`wrote` after each write (thread-safe, never waits for the disk), then
    :meth:`close`, which waits for the sync in flight, syncs what was written after it began, and
    raises the first error a sync met. (An ``EIO`` is reported to the descriptors open when it
    happened, not to one opened later: the owner's final fsync on a fresh descriptor could miss it.)
    """

    def __init__(self, fd: int, every: int) -> None:
        self.fd = fd
        self.every = max(1, int(every))
        self._pending = 0
        self._closed = False
        self._error: OSError | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="coral-sync", daemon=True)
        self._thread.start()

    def wrote(self, nbytes: int) -> None:
        with self._cond:
            self._pending += nbytes
            if self._pending >= self.every:
                self._cond.notify()

    def _sync(self) -> bool:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            with self._cond:
                self._error = self._error or exc
            return False
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._pending < self.every:
                    self._cond.wait()
                if self._closed:
                    return
                self._pending = 0
            if not self._sync():
                return

    def close(self) -> None:
        """Wait for the sync in flight, sync the rest; raise the first error a sync met."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error is None and self._pending:
            self._pending = 0
            self._sync()
        if self._error is not None:
            raise self._error


class PayloadWriter:
    """Writes payloads into one file at offsets its owner allocated (HDF5 dataset space).

    ``direct=True`` tries ``O_DIRECT`` for payloads of at least :data:`MIN_DIRECT_BYTES` that start
    on a page boundary; it falls back to buffered writes for good at the first refusal.
    ``direct_bytes`` / ``buffered_bytes`` count what went which way. ``sync_every`` starts a
    :class:`BackgroundSync` of the file every that many payload bytes. Thread-safe (positional I/O).
    """

    def __init__(self, path: os.PathLike[str] | str, *, direct: bool = True, sync_every: int | None = None) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._sync = BackgroundSync(self._fd, sync_every) if sync_every else None
        self._direct_fd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            except OSError as exc:  # EINVAL: this file system does not do direct I/O
                log.debug("O_DIRECT unavailable for %s (%s); writing through the page cache", self.path, exc)
        self._direct_ok = self._direct_fd is not None
        self.direct_bytes = 0
        self.buffered_bytes = 0
        self._count_lock = threading.Lock()

    @property
    def direct(self) -> bool:
        """Whether payloads can still go around the page cache."""
        return self._direct_ok

    def write(self, segments: Sequence[memoryview | FileSegment], offset: int) -> None:
        """Write the segments (memory, or spilled parts of a blob) back to back at ``offset``."""
        segments = [s for s in segments if len(s)]
        total = sum(len(s) for s in segments)
        direct_len = total // PAGE * PAGE if (total >= MIN_DIRECT_BYTES and offset % PAGE == 0) else 0
        fd = self._direct_fd
        if fd is not None and self._direct_ok and direct_len:
            try:
                self._write_direct(fd, segments, offset, direct_len)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # refused after all (alignment rules stricter than a page, say): stop trying and
                # write the whole payload buffered, over whatever part went out directly
                log.debug("O_DIRECT write refused for %s (%s); writing through the page cache", self.path, exc)
                self._direct_ok = False  # the descriptor stays open until close(): other threads may use it
                direct_len = 0
        else:
            direct_len = 0
        write_segments(self._fd, list(_chunks(segments, direct_len, total)), offset + direct_len)
        with self._count_lock:
            self.direct_bytes += direct_len
            self.buffered_bytes += total - direct_len
        if self._sync is not None:
            self._sync.wrote(total)

    def _write_direct(self, fd: int, segments: Sequence[memoryview | FileSegment], offset: int, length: int) -> None:
        with _staging_buffer() as stage:
            done = 0
            while done < length:
                n = min(STAGE_BYTES, length - done)
                pos = 0
                for piece in _chunks(segments, done, done + n):
                    if isinstance(piece, FileSegment):
                        piece.read_into(memoryview(stage)[pos : pos + len(piece)])  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
                    else:
                        stage[pos : pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                    pos += len(piece)
                pwritev_all(fd, [memoryview(stage)[:n]], offset + done)  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
                done += n

    def close(self) -> None:
        """Close the descriptors (after every write has returned); raises what a background sync met."""
        sync, self._sync = self._sync, None
        try:
            if sync is not None:
                sync.close()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        self._direct_ok = False
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]
