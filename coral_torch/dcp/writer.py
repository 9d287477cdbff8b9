"""``CoralStorageWriter``: torch.distributed.checkpoint saves into a coral-torch repository.

DCP calls, in this order (torch's ``storage.py``): ``reset`` and ``set_up_storage_writer`` (all
ranks), ``prepare_local_plan`` (all), ``prepare_global_plan`` (coordinator), ``write_data`` (all),
``finish`` (coordinator). Here:

- the coordinator's global plan hands every rank the same save token and parent commit;
- each rank writes its own items (tensor chunks, pickled values) into its own pack with
  :meth:`Repository.write_objects`, in parallel and without the repository lock: deduplicated by
  content hash against everything the repository holds, XOR deltas against the same chunk of the
  parent commit, every object hashed;
- the coordinator's ``finish`` builds one manifest (DCP's metadata as JSON plus every rank's
  entries) and publishes it, with all ranks' packs, in one transaction (:meth:`Repository.publish`).
  If any rank failed, DCP never calls ``finish``: nothing becomes visible, and the packs the other
  ranks wrote are orphans gc removes after its grace period.

The writer keeps no state a new process could not rebuild (the repository path and the
:class:`CommitOptions`), so ``dcp.async_save`` may pickle it into another process.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..checkpoint.sharded import chunk_name
from ..errors import RepositoryError
from ..format.manifest import Manifest, TensorEntry
from ..format.weight_tensor import WeightMetadata, WeightTensor
from ..repository import WrittenObjects
from ..repository.options import CommitOptions
from .handle import RepoArg, RepositoryHandle
from .layout import layout_of


@dataclass
class _Stored:
    """What one rank tells the coordinator about one item (travels in ``WriteResult.storage_data``)."""

    name: str
    hash: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    written: WrittenObjects | None = None  # the rank's new packs, on its first result only


class CoralStorageWriter(StorageWriter, RepositoryHandle):
    """A DCP ``StorageWriter`` that stores a save as one commit of the repository at ``repo``.

    Use the same arguments on every rank: ``dcp.save(state_dict, storage_writer=CoralStorageWriter(repo))``.
    After ``dcp.save`` returns, :attr:`commit_id` is the new commit's id on every rank.

    Args:
        repo: the repository: a directory (created if missing; every rank must see it: one host or
            a shared file system), ``s3://bucket/prefix`` (every rank uploads its own shards; no shared
            file system), or a :class:`Repository`; ``None``: ``$CORAL_REPO`` or ``./.coral``.
        options: a :class:`~coral_torch.repository.CommitOptions`, or its fields as keyword arguments
            (which override those of ``options``):
            run: the run this commit continues: its parent is ``runs/<run>/latest`` (unless
            ``parent`` is given), which then names it (unless ``head=False``).
            tags, refs: more refs to point at the commit (``tags/<tag>``; full ref names).
            message, metrics, epoch, step, info: stored with the commit (as :meth:`Repository.commit`).
            monitor, mode: ``runs/<run>/best`` follows the best value of ``metrics[monitor]``.
            keep: ``True`` (default) adds ``keep/<id>`` so gc never removes the commit; a retention
            policy (:mod:`coral_torch.retention`, e.g. ``LatestN(3)``) keeps what it selects among
            the run's commits instead, applied by the coordinator once the commit is published.
    """

    def __init__(
        self,
        repo: RepoArg = None,
        options: CommitOptions | None = None,
        **option_kwargs: Any,
    ):
        StorageWriter.__init__(self)
        RepositoryHandle.__init__(self, repo)
        self.options = CommitOptions.build(options, **option_kwargs)
        if self.options.keep_optimizer is not None:
            raise RepositoryError(
                "keep_optimizer is not supported for sharded commits: their optimizer shards cannot be stripped"
            )
        self.is_coordinator = False
        self._token: str | None = None
        self._parent: str | None = None
        self._commit_id: str | None = None

    @property
    def run(self) -> str:
        """The run this writer's commits continue."""
        return self.options.run

    @property
    def commit_id(self) -> str | None:
        """The id of the commit the last save made (None before it finished)."""
        if self._commit_id is None and self._token is not None:
            self._commit_id = self.repo.save_result(self._token)
        return self._commit_id

    # -- the StorageWriter interface, in call order ---------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """A new save begins. ``checkpoint_id`` is not used (the repository is given to the writer)."""
        self._token = self._parent = self._commit_id = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if is_coordinator:
            self.repo  # noqa: B018 - create the repository before any rank writes into it

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        token = uuid.uuid4().hex
        repo = self.repo
        opts = self.options
        # The run's head is read on every save, also one given its parent: an S3 repository remembers
        # it (with its ETag) for the compare-and-swap of ``latest`` in publish_shards, and must not
        # use one remembered by an earlier save of this process that failed before publishing.
        head = repo.run_head(opts.run)
        parent = repo.resolve(opts.parent) if opts.parent is not None else head
        shared = {"token": token, "parent": parent}
        return [dataclasses.replace(p, storage_data=shared) for p in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        shared = plan.storage_data or {}
        self._token, self._parent = shared.get("token"), shared.get("parent")
        named: list[tuple[str, WeightTensor]] = []
        stored: list[tuple[Any, _Stored, int]] = []
        for item in plan.items:
            data: Any = planner.resolve_data(item)  # a tensor, or a readable binary stream
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data.read())
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                name, kind = chunk_name(item.index.fqn, None), "bytes"
            else:
                t = data.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                name, kind = chunk_name(item.index.fqn, item.index.offset), "tensor"
            w = WeightTensor(t, WeightMetadata(name=name, shape=tuple(t.shape), dtype=t.dtype))
            named.append((name, w))
            stored.append((item.index, _Stored(name, w.compute_hash(), w.dtype, tuple(w.shape), kind), w.nbytes))
        written = self.repo.write_shard(named, parent=self._parent) if named else None
        results = [WriteResult(index=idx, size_in_bytes=n, storage_data=st) for idx, st, n in stored]
        if results:
            results[0].storage_data.written = written
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Publish the save as one commit (coordinator only)."""
        stored = sorted((r.storage_data for rank in results for r in rank), key=lambda s: s.name)
        names = [s.name for s in stored]
        if len(set(names)) != len(names):
            raise RepositoryError("two ranks wrote the same checkpoint item: the save plan is inconsistent")
        entry_of = {s.name: i for i, s in enumerate(stored)}
        manifest = Manifest(
            None,
            [TensorEntry(s.name, s.hash, s.dtype, s.shape, "cpu", s.kind) for s in stored],
            layout_of(metadata, entry_of),
        )
        written = [s.written for s in stored if s.written is not None]
        options = self.options.replace(parent=self._parent, info=dict(self.options.info, world_size=len(results)))
        assert self._token is not None  # set by write_data
        stats = self.repo.publish_shards(manifest, written, options, save_token=self._token)
        self._commit_id = stats.commit_id

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # never chosen automatically from a checkpoint_id: pass the writer

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.repo_path, save_id=self._token)
