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
from pathlib import Path

PACKS_DIR = "packs"
TMP_PREFIX = ".tmp-"


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
