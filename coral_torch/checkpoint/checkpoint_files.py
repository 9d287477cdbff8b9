"""Checkpoint files that name commits: saving one (commit with the file's ref, then write the
pointer) and forgetting one (remove the file, then drop its ref), for every entry point that does
it (``coral_torch.save``, ``CoralCheckpointIO``, ``CoralModelParallelStrategy``, ``coral-torch rm``).

The order keeps a crash harmless: the file's ``files/`` ref is published with the commit before
the file is written (until then the ref is younger than gc's grace period, so gc leaves it alone),
and a file is removed before its ref (a crash then leaves a dead ref, which gc drops).

No torch at import: the CLI uses it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..location import S3Location
from .pointers import pointer_ref_name, write_pointer

if TYPE_CHECKING:
    from ..repository import Repository
    from ..repository.options import CommitOptions


class _HasCommitId(Protocol):
    @property
    def commit_id(self) -> str: ...


#: what a commit callback returns: a commit id, or stats that name it (a :class:`CommitStats`)
R = TypeVar("R", bound="str | _HasCommitId")


def commit_with_pointer(
    path: str | os.PathLike,
    repo_path: str | os.PathLike,
    options: CommitOptions,
    commit: Callable[[CommitOptions], R],
    *,
    write_file: bool = True,
    location: str | os.PathLike | S3Location | None = None,
) -> R:
    """Call ``commit`` with ``options`` plus the ref of the pointer file at ``path`` (it must publish
    them: a :class:`CommitStats` or a commit id comes back), then write the pointer naming the
    commit in the repository at ``repo_path`` (unless ``write_file`` is false: another rank of a
    sharded save writes it). ``location``: what the pointer names as the repository, when not its
    directory (an S3 repository's URL). Returns what ``commit`` returned."""
    result = commit(with_pointer_ref(options, path, repo_path))
    if write_file:
        cid = result if isinstance(result, str) else result.commit_id
        write_pointer(path, cid, location if location is not None else repo_path)
    return result


def with_pointer_ref(options: CommitOptions, path: str | os.PathLike, repo_path: str | os.PathLike) -> CommitOptions:
    """``options`` plus the ref of the pointer file at ``path``: a commit that publishes it may then
    be named by writing the pointer (:func:`~coral_torch.checkpoint.pointers.write_pointer`) once
    it is published; an asynchronous save does that when it finishes (see :func:`commit_with_pointer`)."""
    return options.with_refs(pointer_ref_name(path, repo_path))


def forget_pointer(path: str | os.PathLike, repo: Repository) -> bool:
    """Remove the pointer file at ``path``, then drop its ref in ``repo``; the commit then goes
    unless something else keeps it. Returns whether there was such a ref."""
    ref = pointer_ref_name(path, repo.path)
    Path(path).unlink(missing_ok=True)
    return repo.delete_ref(ref)


__all__ = ["commit_with_pointer", "forget_pointer", "with_pointer_ref"]
