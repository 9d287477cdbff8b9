"""Asynchronous sharded saves: every rank stages its shards, a background thread saves them with DCP.

The training thread of every rank copies its shards into reusable host buffers (torch's DCP stager:
one buffer per source storage, kept and refilled by every later save; pinned when the source is on
CUDA) and goes on training. A background thread then runs ``dcp.save`` with
:class:`~coral_torch.dcp.CoralStorageWriter`: each rank writes (or uploads) its own objects, the
coordinator publishes one commit. Its collectives run over a gloo process group of their own,
created once on first use (every rank submits at the same point, so every rank creates it), so they
never interleave with the training's collectives on the default group.

At most one save is in flight: :meth:`BackgroundShardedSaves.submit` first waits for the previous
one (its staged buffers are about to be refilled, and its commit is the next one's parent). DCP
shares a failure of any rank with every rank, so every rank's save fails together; the caller
surfaces it at its next collective point (:meth:`check`, :meth:`wait`). An interrupted process
publishes nothing half: the commit becomes visible in one step at the very end (the coordinator's
``finish``), or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CoralCheckpointError
from ..repository.options import CommitOptions
from .snapshot import BackgroundCommitter

log = logging.getLogger(__name__)

#: what the coordinator calls, on the background thread, once the commit is published
Published = Callable[[str], None]


class BackgroundShardedSaves:
    """One rank's asynchronous sharded saves (see the module docstring). Every method that takes
    part in a save (:meth:`submit`) must be called on every rank at the same point of training."""

    def __init__(self, *, nice: int | str = 15) -> None:
        self._nice = nice
        self._committer: BackgroundCommitter | None = None
        self._stager: Any = None
        self._group: Any = None
        self.last_seconds: float = 0.0  #: how long the last finished save ran in the background
        self.staged_bytes: int = 0

    # ------------------------------------------------------------------------------ state
    @property
    def pending(self) -> bool:
        """A save was submitted whose outcome was not collected yet (running, or finished)."""
        return self._committer is not None and self._committer.pending

    @property
    def running(self) -> bool:
        return self._committer is not None and self._committer.busy

    # ------------------------------------------------------------------------------ saving
    def submit(
        self,
        state: dict[str, Any],
        *,
        repo: Any,
        options: CommitOptions,
        then: Published | None = None,
    ) -> None:
        """Stage ``state`` (a DCP state dict: DTensors, tensors, values) and save it in the
        background into ``repo`` as one commit recording ``options``; ``then(commit_id)`` runs on
        the background thread once it is published. Waits for (and re-raises the failure of) the
        previous save first."""
        from .. import dcp as coral_dcp

        self.wait()
        group = self._save_group()
        staged = self._stage(state)
        del state

        def save() -> str:
            cid = coral_dcp.save(staged, repo=repo, options=options, process_group=group)
            if then is not None:
                then(cid)
            return cid

        if self._committer is None:
            self._committer = BackgroundCommitter(nice=self._nice)
        self._committer.submit(save)

    def check(self) -> str | None:
        """The finished save's commit id (once), or its failure (once) as :class:`CoralCheckpointError`;
        None while it runs."""
        if self._committer is None or self.running:
            return None
        return self._collect(self._committer.check)

    def wait(self) -> str | None:
        """Wait for the save in flight; its commit id (None if there was none), or its failure as
        :class:`CoralCheckpointError` (once: the save is then collected)."""
        if self._committer is None or not self._committer.pending:
            return None
        return self._collect(self._committer.wait)

    def failed(self) -> bool:
        """Whether the save in flight finished with an error (not collected: :meth:`wait` raises it)."""
        committer = self._committer
        return committer is not None and committer.failed

    def close(self) -> None:
        """Wait for the save in flight (logging its failure: this is a teardown) and let go of the
        staging buffers and the background thread."""
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001 - already tearing down: report, don't mask
            log.error("the in-flight sharded checkpoint save failed: %s; nothing of it was published", exc)
        finally:
            if self._committer is not None:
                self._committer.shutdown()
                self._committer = None
            if self._stager is not None:
                close = getattr(self._stager, "close", None)  # (torch < 2.9's stager has none)
                if close is not None:
                    close()
                self._stager = None

    # ------------------------------------------------------------------------------ internals
    def _collect(self, outcome: Callable[[], str | None]) -> str | None:
        from ..dcp import failure_reason

        try:
            cid = outcome()
        except (KeyboardInterrupt, SystemExit, CoralCheckpointError):
            raise
        except BaseException as exc:  # (DCP's CheckpointException is a BaseException)
            raise CoralCheckpointError(
                f"background sharded checkpoint save failed ({failure_reason(exc)}); "
                "the commits before it are intact: fix the cause and save again"
            ) from exc
        if cid is not None:
            assert self._committer is not None
            self.last_seconds = self._committer.last_seconds
        return cid

    def _save_group(self) -> Any:
        """The process group of the background saves (created on first use, collectively)."""
        import torch.distributed as dist

        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state`` in this object's reusable host buffers."""
        if self._stager is None:
            self._stager = _reusing_stager()
        staged = self._stager.stage(state)
        self.staged_bytes = _tensor_bytes(staged)
        return staged


def _reusing_stager() -> Any:
    """torch's stager that keeps one host buffer per source storage and refills it on every save."""
    cuda = torch.cuda.is_available()
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:  # torch < 2.9
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        return BlockingAsyncStager(cache_staged_state_dict=True)
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,  # staged before submit returns: training may then change the sources
            use_non_blocking_copy=cuda,  # one synchronize at the end of staging
        )
    )


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        t = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor: its shard on this rank
        return t.numel() * t.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


__all__ = ["BackgroundShardedSaves", "Published"]
