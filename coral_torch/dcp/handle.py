"""The repository a DCP storage writer or reader works on."""

from __future__ import annotations

import os

from ..location import S3Location
from ..repository import Repository
from ..repository.handles import open_repository, repository_location

RepoArg = str | os.PathLike | Repository | S3Location | None


def repository_path(repo: RepoArg) -> str:
    """Where a repository argument points, as text: an absolute directory or ``s3://bucket/prefix``
    (a path, a :class:`Repository`, an S3 location or URL, or ``None``: ``$CORAL_REPO`` or ``./.coral``)."""
    return str(repository_location(repo))


class RepositoryHandle:
    """Holds where the repository is and opens it on first use (the process's cached handle). It
    pickles without the open repository, so ``dcp.async_save`` may send it to another process,
    which reopens it there."""

    #: readers never create a repository
    creates_repository = True

    def __init__(self, repo: RepoArg):
        self.location = repository_location(repo)
        self.repo_path = str(self.location)
        self._repo: Repository | None = repo if isinstance(repo, Repository) else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_repo"] = None
        return state

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = open_repository(self.location, create=self.creates_repository)
        return self._repo
