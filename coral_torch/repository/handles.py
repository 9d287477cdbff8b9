"""The process-wide cache of open repositories, shared by every entry point (``coral_torch.save``/
``load``, the Lightning callbacks and plugin, the DCP writer and reader, the CLI).

Imports no more than :class:`Repository` needs (no torch, Lightning or boto3): the CLI's read-only
commands open repositories through it. An ``s3://bucket/prefix`` argument opens an
:class:`~.s3_repository.S3Repository` (boto3 loads then).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import UnsupportedLocationError
from ..format.delta import DeltaConfig
from ..location import S3Location, parse_location
from .repository import Repository

if TYPE_CHECKING:
    from ..storage.s3.config import S3Config

#: a repository argument: a directory, ``s3://bucket/prefix``, an :class:`S3Config`, a repository, or
#: ``None`` for ``$CORAL_REPO`` or ``./.coral``
RepoLike: TypeAlias = "str | os.PathLike | Repository | S3Location | S3Config | None"

_S3_CONFIG_MODULE = "coral_torch.storage.s3.config"


def _s3_config(repo: Any) -> S3Config | None:
    """``repo`` if it is an :class:`S3Config` (whose module is loaded if one exists: no boto3 import here)."""
    mod = sys.modules.get(_S3_CONFIG_MODULE)
    return repo if mod is not None and isinstance(repo, mod.S3Config) else None


_open: dict[Path | S3Location, Repository] = {}
_open_lock = threading.Lock()


def repository_location(repo: RepoLike) -> Path | S3Location:
    """Where a repository argument points: a local directory (absolute) or an S3 location. ``None``
    means ``$CORAL_REPO`` or ``./.coral``; a URL other than ``s3://`` is refused."""
    if isinstance(repo, Repository):
        return repo.location
    if isinstance(repo, S3Location):
        return repo
    config = _s3_config(repo)
    if config is not None:
        return S3Location(config.bucket, config.prefix.strip("/"))
    if repo is not None and not isinstance(repo, (str, os.PathLike)):
        raise UnsupportedLocationError(
            f"a repository is a directory, s3://bucket/prefix or an S3Config, not {type(repo).__name__}"
        )
    return parse_location(repo)


def repository_path(repo: RepoLike, *, needed_by: str = "this") -> Path:
    """The absolute local directory of a repository argument (for entry points that need one);
    an S3 repository is refused with a one-line error naming ``needed_by``."""
    if isinstance(repo, Repository):
        return repo.path
    where = repository_location(repo)
    if isinstance(where, S3Location):
        raise UnsupportedLocationError(
            f"{needed_by} needs a repository in a local directory, not {where.url}: s3:// repositories work "
            "with coral_torch.save/load, CoralCheckpoint, CoralCheckpointIO and the CLI"
        )
    return where


def open_repository(
    repo: RepoLike = None, *, create: bool = True, delta_config: DeltaConfig | None = None
) -> Repository:
    """The process-wide :class:`Repository` for a location: a cache of open handles (catalog
    connections, pack descriptors), reopened if the directory was deleted or replaced. What a save
    stores never depends on it: delta bases are read back from the repository. ``None`` means
    ``$CORAL_REPO`` or ``./.coral``; ``s3://bucket/prefix`` opens an S3 repository. A
    ``delta_config`` given here applies to the shared instance from now on."""
    if isinstance(repo, Repository):
        return repo
    where = repository_location(repo)
    with _open_lock:
        r = _open.get(where)
        if r is not None and r.stale:  # the directory was removed or replaced meanwhile
            r.close()
            r = None
        if r is None:
            if isinstance(where, S3Location):
                from .s3_repository import S3Repository  # boto3: only for s3:// repositories

                r = S3Repository(where, config=_s3_config(repo), create=create, delta_config=delta_config)
            else:
                r = Repository(where, create=create, delta_config=delta_config)
            _open[where] = r
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


__all__ = ["RepoLike", "close_repositories", "open_repository", "repository_location", "repository_path"]
