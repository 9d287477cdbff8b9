"""The process-wide cache of open repositories, shared by every entry point (``coral_torch.save``/
``load``, the Lightning callbacks and plugin, the DCP writer and reader, the CLI).

Imports no more than :class:`Repository` needs (no torch, Lightning or boto3): the CLI's read-only
commands open repositories through it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..defaults import default_repository
from ..format.delta import DeltaConfig
from .repository import Repository

RepoLike = str | os.PathLike | Repository | None

_open: dict[Path, Repository] = {}
_open_lock = threading.Lock()


def repository_path(repo: RepoLike) -> Path:
    """The absolute directory of a repository argument: a path, a :class:`Repository`, or ``None``
    for ``$CORAL_REPO`` or ``./.coral``."""
    if isinstance(repo, Repository):
        return repo.path
    return Path(repo if repo is not None else default_repository()).absolute()


def open_repository(
    repo: RepoLike = None, *, create: bool = True, delta_config: DeltaConfig | None = None
) -> Repository:
    """The process-wide :class:`Repository` for a path: a cache of open handles (catalog
    connections, pack descriptors), reopened if the directory was deleted or replaced. What a save
    stores never depends on it: delta bases are read back from the repository. ``None`` means
    ``$CORAL_REPO`` or ``./.coral``. A ``delta_config`` given here applies to the shared instance
    from now on."""
    if isinstance(repo, Repository):
        return repo
    path = repository_path(repo)
    with _open_lock:
        r = _open.get(path)
        if r is not None and r.stale:  # the directory was removed or replaced meanwhile
            r.close()
            r = None
        if r is None:
            r = Repository(path, create=create, delta_config=delta_config)
            _open[path] = r
        elif delta_config is not None:
            r.delta_config = delta_config
        return r


def close_repositories() -> None:
    """Close every repository :func:`open_repository` keeps open in this process (file handles,
    caches); the next use reopens them. For long-lived processes and tests."""
    with _open_lock:
        repos = list(_open.values())
        _open.clear()
    for r in repos:
        r.close()


__all__ = ["RepoLike", "close_repositories", "open_repository", "repository_path"]
