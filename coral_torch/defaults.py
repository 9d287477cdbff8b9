"""Defaults every entry point shares: one place for each.

Standard library only (the CLI's read-only commands import it without torch).
"""

from __future__ import annotations

import os

#: zstd level of the codec, for whole objects and deltas alike
CODEC_LEVEL = 1
#: most encoder/decoder threads a repository uses by default
MAX_WORKERS = 8
#: the repository directory when none is given and ``$CORAL_REPO`` is unset
REPOSITORY_DIR = ".coral"
#: environment variable naming the default repository
REPOSITORY_ENV = "CORAL_REPO"


def default_workers() -> int:
    """Threads for hashing, encoding and decoding: all cores, up to :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def default_repository() -> str:
    """The repository a ``None`` repository argument means: ``$CORAL_REPO`` or ``./.coral``."""
    return os.environ.get(REPOSITORY_ENV, REPOSITORY_DIR)


#: environment variable naming this node's cache directory (S3 repositories keep their cache there)
CACHE_ENV = "CORAL_CACHE_DIR"


def default_cache_dir() -> str:
    """``$CORAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/coral-torch``, else ``~/.cache/coral-torch``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "coral-torch")


#: environment variable giving the byte budget of an S3 repository's cache: bytes, or with a K, M, G
#: or T suffix (powers of 1024), e.g. ``500M``, ``20G``
CACHE_BYTES_ENV = "CORAL_CACHE_BYTES"
#: the cache's byte budget when ``$CORAL_CACHE_BYTES`` is unset: 20 GiB
DEFAULT_CACHE_BYTES = 20 << 30
