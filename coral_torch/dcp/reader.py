"""``CoralStorageReader``: torch.distributed.checkpoint loads from a coral-torch commit.

DCP calls ``reset``, ``read_metadata``, ``set_up_storage_reader``, ``prepare_local_plan``,
``prepare_global_plan`` and ``read_data`` (torch's ``storage.py``). The metadata is rebuilt from
the commit's JSON layout; DCP's load planner then asks each rank for the regions it needs, which
may come from chunks saved with another sharding (resharding: 2 ranks -> 1, or into a plain model).
Every object is verified against its hash as it is read. Pickled values (DCP ``BYTE_IO``) are
only handed to DCP, which unpickles them with ``weights_only=False``, after they passed torch's
restricted ``weights_only`` unpickler, unless ``trust_pickles=True``.
"""

from __future__ import annotations

import io
import os
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..checkpoint.sharded import load_value
from ..errors import CheckpointDamagedError, CoralError, RepositoryError
from ..format.manifest import Manifest
from ..format.weight_tensor import WeightMetadata, WeightTensor
from .handle import RepoArg, RepositoryHandle
from .layout import metadata_of

_BATCH_BYTES = 256 << 20  # objects decoded per batch: a rank's load holds at most this much extra


class CoralStorageReader(StorageReader, RepositoryHandle):
    """A DCP ``StorageReader`` over the commit ``ref`` names (``coral://`` prefix allowed) in ``repo``.

    ``dcp.load(state_dict, storage_reader=CoralStorageReader(repo, "coral://latest"))`` on every rank.
    ``repo`` ``None`` means ``$CORAL_REPO`` or ``./.coral``.
    """

    creates_repository = False

    def __init__(
        self,
        repo: RepoArg = None,
        ref: str = "latest",
        *,
        trust_pickles: bool = False,
    ):
        StorageReader.__init__(self)
        RepositoryHandle.__init__(self, repo)
        self.ref = _strip_scheme(ref)
        self.trust_pickles = trust_pickles
        self.commit_id: str | None = None
        self._manifest: Manifest | None = None
        self._storage: dict = {}
        #: why :meth:`read_metadata` failed (DCP >= 2.9 re-raises it as an AssertionError of its own:
        #: :func:`coral_torch.dcp.load` raises this instead)
        self.metadata_error: CoralError | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """A new load begins; a ``checkpoint_id`` given to ``dcp.load`` is taken as the ref to load."""
        if checkpoint_id is not None:
            self.ref = _strip_scheme(str(checkpoint_id))
        self.commit_id = self._manifest = self.metadata_error = None
        self._storage = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            self.commit_id = self.repo.resolve(self.ref)
            manifest = self.repo.manifest(self.commit_id)
            if not manifest.sharded:
                raise RepositoryError(
                    f"commit {self.commit_id[:12]} is not a sharded (DCP) checkpoint: load it with coral_torch.load"
                )
        except CoralError as exc:
            self.metadata_error = exc
            raise
        self._manifest = manifest
        return metadata_of(manifest)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._manifest is None:  # a rank that did not read the metadata itself
            self.read_metadata()
        self._storage = metadata.storage_data or {}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self._manifest is not None and self.commit_id is not None  # set by read_metadata
        entries = self._manifest.tensors
        by_entry: dict[int, list] = {}
        for req in plan.items:
            try:
                by_entry.setdefault(self._storage[req.storage_index], []).append(req)
            except KeyError:
                raise CheckpointDamagedError(
                    f"commit {self.commit_id[:12]} has no item {req.storage_index.fqn} at {req.storage_index.offset}",
                    commit=self.commit_id or "",
                    tensors=[req.storage_index.fqn],
                ) from None
        order = list(by_entry)
        # an S3 repository fetches them all at once (as few round trips as the delta chains allow)
        self.repo.prefetch([entries[e].hash for e in order], sum(entries[e].nbytes for e in order))
        batch: list[int] = []
        size = 0
        for i, e in enumerate(order):
            batch.append(e)
            size += entries[e].nbytes
            if size >= _BATCH_BYTES or i == len(order) - 1:
                self._read_batch(batch, by_entry, planner)
                batch, size = [], 0
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_batch(self, batch: list[int], by_entry: dict[int, list], planner: LoadPlanner) -> None:
        assert self._manifest is not None  # set by read_metadata
        entries = self._manifest.tensors
        raws = self.repo.materialize(
            [entries[e].hash for e in batch], commit=self.commit_id, names=[entries[e].name for e in batch]
        )
        for e in batch:
            ent = entries[e]
            t = WeightTensor.from_raw(
                raws[ent.hash], WeightMetadata(name=ent.name, shape=ent.shape, dtype=ent.dtype)
            ).to_torch()
            for req in by_entry[e]:
                if req.type == LoadItemType.BYTE_IO:
                    if not self.trust_pickles:
                        load_value(t, req.storage_index.fqn, weights_only=True)  # refuses code
                    planner.load_bytes(req, io.BytesIO(t.numpy().tobytes()))
                    continue
                src = t
                for dim, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                    src = src.narrow(dim, o, n)
                target = planner.resolve_tensor(req).detach()
                if target.size() != src.size():
                    raise CheckpointDamagedError(
                        f"{req.storage_index.fqn}: the planner wants {list(target.size())}, the commit holds "
                        f"{list(src.size())}",
                        commit=self.commit_id or "",
                        tensors=[req.storage_index.fqn],
                    )
                target.copy_(src)
                planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False


def _strip_scheme(ref: str) -> str:
    return ref[len("coral://") :] if ref.startswith("coral://") else ref
