"""How failures below the repository (SQLite, h5py, the OS) become named `CoralError` subclasses."""

from __future__ import annotations

import errno
import functools
import os
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import (
    CatalogDamagedError,
    CoralError,
    DiskFullError,
    ReadOnlyRepositoryError,
    ReadOnlyStoreError,
    RepositoryIOError,
    RepositoryLockedError,
)

CATALOG_NAME = "catalog.sqlite"
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def named_errors(fn):
    """Public repository methods raise only :class:`CoralError`: a damaged or read-only catalog,
    a full disk, an I/O error the OS reports or an unreadable pack is named, never an sqlite3/h5py/OS
    error."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except ReadOnlyStoreError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:  # a store opened mode='r' was written: not the disk
                raise
            raise read_only_error(self.path, exc) from exc
        except CoralError:
            raise
        except sqlite3.Error as exc:
            raise catalog_error(exc, self.path / CATALOG_NAME) from exc
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(
                    f"the disk holding {self.path} is full ({exc.strerror or exc}); free some space and retry",
                    path=str(self.path),
                ) from exc
            if exc.errno in _READ_ONLY_ERRNOS:
                raise read_only_error(self.path, exc) from exc
            if type(exc) is not OSError or exc.errno is None:
                # a path problem or a network error (subclasses, named by the callers above), or a
                # library's own OSError without an errno: not the operating system's I/O error
                raise
            where = exc.filename or self.path
            raise RepositoryIOError(
                f"I/O error on {where} ({exc.strerror or exc}); the operation did not complete and a save "
                "published nothing: check the disk (dmesg) and retry",
                errno_=exc.errno,
                filename=exc.filename,
            ) from exc

    return wrapper


def read_only_error(path: Any, exc: OSError) -> ReadOnlyRepositoryError:
    """One line for a write the OS refused (EROFS, EACCES, EPERM): the OS's own words for the errno,
    never the text of the library that met it (h5py's carries HDF5's flags)."""
    why = os.strerror(exc.errno) if exc.errno else "permission denied"
    name = str(exc.filename or "")
    if name and not name.startswith(str(path)):  # a file outside the repository: name it
        why += f": {name}"
    return ReadOnlyRepositoryError(
        f"the repository {path} is read-only ({why}): it can be loaded and listed, not changed; save to a "
        "writable repository, or make this one writable (remount it read-write, fix its permissions)"
    )


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or what caused it is ENOSPC (h5py and SQLite wrap it in their own errors)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space left" in text or "disk is full" in text or "disk quota" in text:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def catalog_error(exc: BaseException, path: Path) -> CoralError:
    """The :class:`CoralError` for an sqlite3 (or OS) failure on the catalog at ``path``."""
    msg = str(exc)
    if isinstance(exc, UnicodeDecodeError):  # sqlite3 decoding the file's own text (see _Connection)
        msg = f"text stored in it is not valid UTF-8: {exc.reason}"
    low = msg.lower()
    if (
        isinstance(exc, OSError)
        and exc.errno == errno.ENOSPC
        or "disk is full" in low
        or "database or disk is full" in low
    ):
        return DiskFullError(
            f"the disk holding {path.parent} is full (catalog update failed); free some space and save again",
            path=str(path),
        )
    if (
        "readonly" in low
        or "read-only" in low
        or (isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES))
    ):
        return ReadOnlyRepositoryError(
            f"{path.parent} is read-only (read-only mount or no write permission): it can be loaded, "
            "listed and verified, not changed"
        )
    if "locked" in low or "busy" in low:
        return RepositoryLockedError(f"the catalog {path} is locked by another process ({msg}); try again")
    if "unable to open" in low:
        return CatalogDamagedError(f"the catalog {path} cannot be opened ({msg})")
    return CatalogDamagedError(
        f"the catalog {path} is damaged ({msg}); restore it from a backup, or pull the repository "
        "again from its remote (coral-torch pull)"
    )
