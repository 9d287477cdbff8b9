"""The repository's directory: creating one, telling a repository (or a place for one) from
anything else, whether it can be written, its identity, and the bytes it takes on disk."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NotARepositoryError, ReadOnlyRepositoryError
from .failures import CATALOG_NAME
from .packs import PACKS_DIR


def open_directory(path: Path, *, create: bool) -> bool:
    """Check that ``path`` holds a repository or, with ``create``, make it one (its ``packs/``
    directory; the catalog is created when it opens). Returns whether the repository can be
    written (False on a read-only mount or without write permission)."""
    catalog_path = path / CATALOG_NAME
    if not catalog_path.exists():
        if not create:
            raise NotARepositoryError(
                f"{path} is not a coral-torch repository (no {CATALOG_NAME}); "
                "pass the directory that holds one, e.g. repo='ckpts/.coral'"
            )
        if path.exists() and (not path.is_dir() or not _fresh_repository_dir(path)):
            raise NotARepositoryError(f"{path} exists and is not a coral-torch repository; refusing to write into it")
        try:
            (path / PACKS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReadOnlyRepositoryError(f"cannot create a repository at {path}: {exc.strerror}") from exc
    return (
        os.access(path, os.W_OK) and os.access(catalog_path, os.W_OK)
        if catalog_path.exists()
        else os.access(path, os.W_OK)
    )


def disk_bytes(path: Path) -> int:
    """Bytes the repository at ``path`` takes on disk: its packs, and its catalog (with the
    write-ahead log)."""
    disk = sum(p.stat().st_size for p in (path / PACKS_DIR).glob("*.h5"))
    return disk + sum(_file_size(p) for p in path.glob(CATALOG_NAME + "*"))


def file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path``, or None when there is none: a directory that
    was deleted or replaced has a catalog of another identity."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # the write-ahead log comes and goes
        return 0


def _fresh_repository_dir(path: Path) -> bool:
    """True for an empty directory, or one holding only what an interrupted or concurrent creation
    of a repository leaves (an empty ``packs/``, the lock file, a catalog being created)."""
    names = {p.name for p in path.iterdir()}
    if not names <= {PACKS_DIR, "lock"} | {CATALOG_NAME + x for x in ("", "-wal", "-shm", "-journal")}:
        return False
    packs = path / PACKS_DIR
    return PACKS_DIR not in names or (packs.is_dir() and not any(packs.iterdir()))
