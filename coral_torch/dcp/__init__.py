"""Sharded checkpoints: a torch.distributed.checkpoint (DCP) storage backend.

``dcp.save(state_dict, storage_writer=CoralStorageWriter(repo))`` and
``dcp.load(state_dict, storage_reader=CoralStorageReader(repo, "coral://latest"))`` on every rank;
or the shortcuts :func:`save` and :func:`load` below. A sharded save is one commit like any other
(``log``, ``verify``, ``gc``, ``push``/``pull``, ``tag``); ``coral_torch.load`` of it returns the
consolidated, unsharded state dict.

Supported: torch >= 2.4 (the ``StorageWriter``/``StorageReader`` interface with ``storage_meta``
and keyword set-up arguments); older versions are refused with :class:`UnsupportedTorchError`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

import torch

from ..errors import UnsupportedTorchError

MIN_TORCH = (2, 4)


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # pragma: no cover - unusual version strings
        return (99, 0)


if _torch_version() < MIN_TORCH:
    raise UnsupportedTorchError(
        f"coral_torch.dcp needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its checkpoint storage API); "
        f"this is torch {torch.__version__}: upgrade torch, or save unsharded with coral_torch.save"
    )

import torch.distributed.checkpoint as _dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from ..errors import CoralError  # noqa: E402
from ..repository.options import CommitOptions  # noqa: E402
from .handle import RepoArg  # noqa: E402
from .reader import CoralStorageReader  # noqa: E402
from .writer import CoralStorageWriter  # noqa: E402

__all__ = [
    "CommitOptions",
    "CoralStorageReader",
    "CoralStorageWriter",
    "save",
    "load",
    "async_save",
    "failure_reason",
]


def save(
    state_dict: dict[str, Any],
    *,
    repo: RepoArg = None,
    options: CommitOptions | None = None,
    process_group: Any = None,
    planner: Any = None,
    **option_kwargs: Any,
) -> str:
    """``dcp.save`` into ``repo`` (``None``: ``$CORAL_REPO`` or ``./.coral``) on every rank; returns
    the new commit's id (on every rank). ``options`` (a :class:`CommitOptions`) or its fields as
    keyword arguments (``run``, ``tags``, ``metrics``, ``keep``, ...) say what the commit records,
    as for :class:`CoralStorageWriter`."""
    writer = CoralStorageWriter(repo, options=options, **option_kwargs)
    with _named_failures():
        _dcp.save(state_dict, storage_writer=writer, process_group=process_group, planner=planner)
    cid = writer.commit_id
    assert cid is not None, "dcp.save returned without a published commit"
    return cid


def async_save(
    state_dict: dict[str, Any],
    *,
    repo: RepoArg = None,
    options: CommitOptions | None = None,
    process_group: Any = None,
    **option_kwargs: Any,
) -> tuple[Any, CoralStorageWriter]:
    """``dcp.async_save`` into ``repo``: returns ``(future, writer)``; ``writer.commit_id`` once the
    future is done. Options as for :func:`save`."""
    writer = CoralStorageWriter(repo, options=options, **option_kwargs)
    fut = _dcp.async_save(state_dict, storage_writer=writer, process_group=process_group)
    return fut, writer


def load(
    state_dict: dict[str, Any],
    ref: str = "latest",
    *,
    repo: RepoArg = None,
    process_group: Any = None,
    planner: Any = None,
    trust_pickles: bool = False,
) -> str | None:
    """``dcp.load`` of the commit ``ref`` names into ``state_dict`` (in place, resharded to its
    current layout) on every rank; returns the commit id. ``repo`` ``None``: ``$CORAL_REPO`` or ``./.coral``."""
    reader = CoralStorageReader(repo, ref, trust_pickles=trust_pickles)
    try:
        with _named_failures():
            _dcp.load(state_dict, storage_reader=reader, process_group=process_group, planner=planner)
    except CheckpointException:
        if reader.metadata_error is not None:  # (DCP replaced it with an AssertionError of its own)
            raise reader.metadata_error from None
        raise
    return reader.commit_id


def failure_reason(exc: BaseException) -> str:
    """A failed DCP save or load in one line: the lowest failed rank's error (a ``CheckpointException``
    holds every failed rank's, with tracebacks); other exceptions as ``Type: first line``."""
    rank = None
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, failure = min(exc.failures.items())
        exc = failure[0] if isinstance(failure, tuple) else failure
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return f"rank {rank}: {text}" if rank is not None else text


class _named_failures:
    """DCP wraps every rank's exception in a ``CheckpointException`` (a BaseException); the
    shortcuts re-raise the first :class:`CoralError` among them, so callers get the named error."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if isinstance(exc, CheckpointException):
            for failure in exc.failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, CoralError):
                    raise inner from exc
        return False
