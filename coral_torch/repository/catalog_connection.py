"""Opening the catalog file: which file a connection opens, in which mode, and the connection type.

A writable catalog opens in place. A read-only one (read-only mount, no write permission) opens
``immutable`` (no -shm to create, no lock to take), unless a write-ahead log was left behind: SQLite
cannot replay it in place without writing, so the file and its log are copied to a private
directory (:func:`wal_snapshot`) and the copy is opened read-only, so committed data in the log is
not missed. The statements, the session's settings included, run in :mod:`.catalog`.
"""

from __future__ import annotations

import functools
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .failures import catalog_error

_R = TypeVar("_R")


def _naming_damaged_text(method: Callable[..., _R]) -> Callable[..., _R]:
    """sqlite3's statement method ``method``, raising :class:`CatalogDamagedError` where sqlite3
    raises ``UnicodeDecodeError`` (see :class:`CatalogConnection`)."""

    @functools.wraps(method)
    def run(self: CatalogConnection, *args: Any) -> _R:
        try:
            return method(self, *args)
        except UnicodeDecodeError as exc:
            raise catalog_error(exc, self.catalog_path) from exc

    return run


class CatalogConnection(sqlite3.Connection):
    """The catalog's connections. Where the file's own text is not valid UTF-8 (a damaged schema
    or name that SQLite quotes in an error message, or a column name), sqlite3 raises
    ``UnicodeDecodeError`` from the statement instead of its own error: every statement here
    raises :class:`CatalogDamagedError` for it. (A damaged text *value* is sqlite3's
    ``OperationalError`` already, which the repository names.)"""

    catalog_path: Path = Path("catalog.sqlite")

    execute = _naming_damaged_text(sqlite3.Connection.execute)
    executemany = _naming_damaged_text(sqlite3.Connection.executemany)
    executescript = _naming_damaged_text(sqlite3.Connection.executescript)


def wal_snapshot(path: Path) -> Path | None:
    """For a catalog opened read-only: a private directory holding copies of ``path`` and of the
    write-ahead log left beside it, or None when there is no such log (or it is empty). The caller
    removes the directory when done (:func:`drop_snapshot`)."""
    wal = Path(str(path) + "-wal")
    if not (wal.exists() and wal.stat().st_size > 0):
        return None
    tmp = Path(tempfile.mkdtemp(prefix="coral-catalog-"))
    shutil.copyfile(path, tmp / path.name)
    shutil.copyfile(wal, tmp / wal.name)
    return tmp


def drop_snapshot(snapshot: Path) -> None:
    """Remove a directory made by :func:`wal_snapshot`."""
    shutil.rmtree(snapshot, ignore_errors=True)


def connect(path: Path, *, writable: bool, snapshot: Path | None = None) -> CatalogConnection:
    """A new connection to the catalog at ``path``: in place when ``writable``, else read-only
    through ``snapshot`` (see :func:`wal_snapshot`) or, without one, ``immutable``."""
    target: str | Path = path
    if not writable and snapshot is not None:
        target = f"file:{snapshot / path.name}?mode=ro"
    elif not writable:
        # immutable: no -shm to create, no lock to take; there is no WAL to miss
        target = f"file:{path}?mode=ro&immutable=1"
    c = sqlite3.connect(
        target, uri=not writable, timeout=60.0, isolation_level=None, check_same_thread=False, factory=CatalogConnection
    )
    c.catalog_path = path
    return c
