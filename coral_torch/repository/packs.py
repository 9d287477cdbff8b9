"""Pack files: how they are named and made durable.

A pack is an immutable HDF5 file in ``packs/``. Whoever writes one (a commit, gc rewriting a pack,
a pull) writes it under ``.tmp-<name>``, fsyncs it, renames it to ``<name>`` and fsyncs the
directory; only then may the catalog name it. Names are unique without coordination (time plus 48
random bits), so several writers, threads or processes, need no lock to write packs.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConcurrentChangeError

PACKS_DIR = "packs"
TMP_PREFIX = ".tmp-"
#: payload bytes between background fdatasyncs of a pack being written (see PackWriter)
SYNC_EVERY = 32 << 20


def new_pack_name() -> str:
    """A unique, sortable pack file name: creation time plus 48 random bits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.h5"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, final: Path) -> None:
    """Make a finished temporary file durable under its final name: fsync, rename, fsync the dir."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


@dataclass
class WrittenPack:
    """A finished pack: durable under its final name, not yet in the catalog. Plain data, so it can
    travel to the process that publishes it (DCP's coordinator)."""

    name: str
    size: int


class PackWriter:
    """Writes one new pack; any thread or process may use one without the repository lock.

    Call order: :meth:`write` (thread-safe) any number of times, then :meth:`finish` (fsync,
    rename to the final name) or :meth:`abort` (remove it). Used as a context manager, an
    exception aborts it. gc leaves unknown pack files alone until they are older than its grace
    period (a file being written keeps a fresh mtime), so a pack may wait to be published.
    The pack is fdatasync-ed in the background every :data:`SYNC_EVERY` payload bytes while it is
    written, so the disk flushes during the encode and :meth:`finish`'s fsync has only the tail.
    """

    def __init__(self, repo_path: Path, *, codec_level: int, direct_io: bool = False):
        from ..storage.hdf5_store import HDF5Store  # h5py: only pack writers and readers need it

        self.dir = Path(repo_path) / PACKS_DIR
        self.name = new_pack_name()
        self.tmp = self.dir / f"{TMP_PREFIX}{self.name}"
        try:
            self._store = HDF5Store(
                self.tmp, mode="x", compression_opts=codec_level, direct_io=direct_io, sync_every=SYNC_EVERY
            )
        except BaseException:  # e.g. a full disk while HDF5 creates the file: leave nothing behind
            self.tmp.unlink(missing_ok=True)
            raise

    @property
    def store(self):
        """The pack's :class:`~coral_torch.storage.HDF5Store` (its encoders prepare objects)."""
        return self._store

    def write(self, prepared) -> tuple[int, int] | None:
        """Write one prepared object; returns its ``(offset, length)`` in the file if contiguous."""
        self._store.write_prepared(prepared)
        return prepared.location

    def finish(self) -> WrittenPack:
        """Close, fsync and rename the pack to its final name."""
        self._store.close()
        final = self.dir / self.name
        publish_file(self.tmp, final)
        return WrittenPack(self.name, final.stat().st_size)

    def abort(self) -> None:
        """Remove the pack, written or not (it was never published)."""
        try:
            self._store.close()
        except Exception:  # noqa: BLE001 - closing a half-written file can fail again (ENOSPC)
            pass
        self.tmp.unlink(missing_ok=True)
        (self.dir / self.name).unlink(missing_ok=True)

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class PackGone(ConcurrentChangeError):
    """A pack was removed because gc rewrote or deleted it meanwhile (not damage): re-read the catalog."""
