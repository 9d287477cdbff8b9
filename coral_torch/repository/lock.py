"""Inter-process write lock for a repository: ``flock`` on ``<repo>/lock``, holder PID inside.

The kernel drops the lock when the holder dies (even by SIGKILL), so a crash never leaves the
repository locked. ``flock`` excludes processes only; a thread lock excludes the other threads of the
holding process (a background save and a ``gc`` on the main thread), and re-entry is per thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

from ..errors import ReadOnlyRepositoryError, RepositoryLockedError


class RepositoryLock:
    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        self._fd: int | None = None
        self._depth = 0
        self._thread_lock = threading.RLock()  # held by the thread that holds the flock
        self._owner: int | None = None

    def holder_pid(self) -> int | None:
        try:
            text = self.path.read_text().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def acquire(self, timeout: float | None = None) -> None:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=max(0.0, timeout)):
            raise RepositoryLockedError(
                f"repository {self.path.parent} is locked by another thread of this process "
                f"(PID {os.getpid()}) (waited {timeout:.0f} s); pass a longer lock_timeout",
                pid=os.getpid(),
            )
        if self._fd is not None:  # re-entry by the thread that holds the lock
            self._depth += 1
            return
        try:
            self._acquire_file(deadline, timeout)
        except BaseException:
            self._thread_lock.release()
            raise

    def _acquire_file(self, deadline: float, timeout: float) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise ReadOnlyRepositoryError(
                    f"{self.path.parent} is read-only ({exc.strerror}): it can be loaded, listed and "
                    "verified, not changed; copy or pull it somewhere writable"
                ) from None
            raise
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid = self.holder_pid()
                    raise RepositoryLockedError(
                        f"repository {self.path.parent} is locked by PID {pid if pid else '?'} "
                        f"(waited {timeout:.0f} s); wait for that process to finish its save, or pass "
                        "a longer lock_timeout",
                        pid=pid,
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        # The PID is only a hint for error messages: failing to write it (a full disk) must not
        # leave the flock held by a descriptor nobody will release.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        self._fd = fd
        self._depth = 1
        self._owner = threading.get_ident()

    def release(self) -> None:
        if self._fd is None or self._owner != threading.get_ident():
            return
        self._depth -= 1
        if self._depth > 0:
            self._thread_lock.release()
            return
        fd, self._fd, self._owner = self._fd, None, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._thread_lock.release()

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
