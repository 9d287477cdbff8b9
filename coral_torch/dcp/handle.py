"""The repository a DCP storage writer or reader works on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..api import open_repository
from ..repository import Repository


def repository_path(repo: Union[str, os.PathLike, Repository]) -> str:
    """The absolute repository directory of a path or a :class:`Repository`."""
    return str(repo.path if isinstance(repo, Repository) else Path(repo).absolute())


class RepositoryHandle:
    """Holds the repository's path and opens it on first use (the process's cached handle). It
    pickles without the open repository, so ``dcp.async_save`` may send it to another process,
    which reopens it there."""

    #: readers never create a repository
    creates_repository = True

    def __init__(self, repo: Union[str, os.PathLike, Repository]):
        self.repo_path = repository_path(repo)
        self._repo: Optional[Repository] = repo if isinstance(repo, Repository) else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_repo"] = None
        return state

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = open_repository(self.repo_path, create=self.creates_repository)
        return self._repo
