"""The repository a DCP storage writer or reader works on."""

from __future__ import annotations

import os

from ..repository import Repository
from ..repository.handles import open_repository, repository_path as path_of

RepoArg = str | os.PathLike | Repository | None


def repository_path(repo: RepoArg) -> str:
    """The absolute repository directory of a path, a :class:`Repository` or ``None``
    (``$CORAL_REPO`` or ``./.coral``)."""
    return str(path_of(repo, needed_by="the coral-torch DCP storage writer and reader"))


class RepositoryHandle:
    """Holds the repository's path and opens it on first use (the process's cached handle). It
    pickles without the open repository, so ``dcp.async_save`` may send it to another process,
    which reopens it there."""

    #: readers never create a repository
    creates_repository = True

    def __init__(self, repo: RepoArg):
        self.repo_path = repository_path(repo)
        self._repo: Repository | None = repo if isinstance(repo, Repository) else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_repo"] = None
        return state

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = open_repository(self.repo_path, create=self.creates_repository)
        return self._repo
