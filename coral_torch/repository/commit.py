"""The commit path: a checkpoint becomes a manifest, and a manifest with its written objects a commit.

:meth:`Committer.prepare` flattens and hashes a checkpoint and settles its options (the parent the
objects are planned against); objects are then planned and written without the write lock
(:meth:`Repository.write_objects`); :meth:`Committer.publish` makes them, the commit and its refs
visible in one catalog transaction under the lock, after checking that what the plan relied on is
still there, and applies the run's retention policy. :class:`CommitStats` is what a commit cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConcurrentChangeError, CoralError
from ..format import refnames
from ..format.manifest import Manifest, TensorEntry
from ..format.weight_tensor import WeightTensor
from ..lazy import LazyModule
from ..retention import Policy
from .catalog import Catalog, NewCommit, commit_object_rows
from .lock import RepositoryLock
from .maintenance import Maintenance
from .options import CommitOptions
from .packs import PACKS_DIR
from .read import ObjectReader
from .retain import RetentionReport
from .write import ObjectWriter, WrittenObjects

if TYPE_CHECKING:
    from ..checkpoint import adapters
else:
    adapters = LazyModule("coral_torch.checkpoint.adapters")  # imports torch: only commits need it

log = logging.getLogger(__name__)


@dataclass
class CommitStats:
    """What one commit cost. ``written_bytes`` are payload bytes of new objects."""

    commit_id: str
    logical_bytes: int = 0
    written_bytes: int = 0
    tensors: int = 0
    new_full: int = 0
    new_delta: int = 0
    deduplicated: int = 0
    seconds: float = 0.0
    existed: bool = False
    replaced: set = field(default_factory=set, repr=False)  #: commits the new refs moved away from
    retention: RetentionReport | None = field(default=None, repr=False)  #: when saved with a keep policy

    @property
    def ratio(self) -> float:
        return self.written_bytes / self.logical_bytes if self.logical_bytes else 0.0


class Committer:
    """Prepares and publishes the commits of the repository at ``path``. ``resolve`` turns a ref
    into a commit id; ``retain(run, policy, keep_optimizer=..., release_files=...)`` applies a
    run's retention policy (both the repository's own methods)."""

    def __init__(
        self,
        path: Path,
        catalog: Catalog,
        lock: RepositoryLock,
        reader: ObjectReader,
        writer: ObjectWriter,
        maintenance: Maintenance,
        resolve: Callable[[str], str],
        retain: Callable[..., RetentionReport],
    ):
        self.path = path
        self.catalog = catalog
        self.lock = lock
        self.reader = reader
        self.writer = writer
        self.maintenance = maintenance
        self.resolve = resolve
        self.retain = retain

    def prepare(
        self, obj: Any, options: CommitOptions | None, option_kwargs: dict[str, Any]
    ) -> tuple[list[tuple[str, WeightTensor]], Manifest, CommitOptions]:
        """``obj`` flattened: its named tensors, its manifest, and the commit's options (see
        :meth:`Repository.commit`), every one checked before anything is written; ``epoch`` and
        ``step`` default to ``obj``'s, the parent to the run's latest commit (None when the
        parent was removed meanwhile)."""
        flat = adapters.flatten(obj)
        slots = flat.slots
        opts = CommitOptions.build(options, **option_kwargs)  # every option is checked before anything is written
        if isinstance(obj, dict):
            if opts.epoch is None and isinstance(obj.get("epoch"), int):
                opts = opts.replace(epoch=obj["epoch"])
            if opts.step is None and isinstance(obj.get("global_step"), int):
                opts = opts.replace(step=obj["global_step"])
        hashes = [s.weight.compute_hash() for s in slots]
        manifest = Manifest(
            flat.skeleton,
            [
                TensorEntry(s.name, h, s.weight.dtype, tuple(s.weight.shape), s.device, s.kind)
                for s, h in zip(slots, hashes)
            ],
        )
        parent_id = (
            self.resolve(opts.parent)
            if opts.parent is not None
            else self.catalog.get_ref(refnames.latest_ref(opts.run))
        )
        if parent_id is not None and self.catalog.get_commit(parent_id) is None:
            parent_id = None  # removed meanwhile: no deltas against it, and no dangling parent
        opts = opts.replace(parent=parent_id)
        return [(s.name, s.weight) for s in slots], manifest, opts

    def publish(
        self,
        manifest: Manifest,
        written: Sequence[WrittenObjects],
        options: CommitOptions | None = None,
        *,
        save_token: str | None = None,
        **option_kwargs: Any,
    ) -> CommitStats:
        """See :meth:`Repository.publish`."""
        try:
            if options is None:
                option_kwargs.setdefault("head", False)
            opts = CommitOptions.build(options, **option_kwargs)
        except CoralError:
            self.writer.discard(written, unpublished=True)
            raise
        run, keep = opts.run, opts.keep
        ref_names = opts.ref_names()
        cid = manifest.commit_id()
        new_rows = [r for w in written for r in w.rows]
        hows = {h: how for w in written for h, how in w.hows.items()}
        packs = [p for w in written for p in w.packs]
        replace = {h for w in written for h in getattr(w, "replace", ())}
        healed_packs = {r.pack for h in replace if (r := self.catalog.get_object(h)) is not None}
        stats = CommitStats(
            cid,
            manifest.nbytes,
            sum(r.stored_bytes for r in new_rows),
            len(manifest.tensors),
            new_full=sum(1 for r in new_rows if r.kind == "full"),
            new_delta=sum(1 for r in new_rows if r.kind == "delta"),
            deduplicated=len(manifest.tensors) - len(new_rows),
        )
        if isinstance(keep, Policy):  # born held by its run's retention, which then decides
            ref_names.append(refnames.run_keep_ref(run, cid))
        elif keep:
            ref_names.append(refnames.keep_ref(cid))
        best = opts.best()
        object_rows = commit_object_rows(
            cid, [(e.name, e.hash) for e in manifest.tensors], lambda n, h: hows.get(h, "dedup")
        )
        published = False
        try:
            with self.lock:
                for p in packs:
                    path = self.path / PACKS_DIR / p.name
                    size = path.stat().st_size if path.exists() else None
                    if size != p.size:
                        raise ConcurrentChangeError(
                            f"pack {p.name} written for this commit is {'gone' if size is None else f'{size} bytes'}"
                            f", not {p.size} (removed by gc or overwritten?); save it again"
                        )
                commit = NewCommit(
                    cid,
                    opts.parent,
                    run,
                    opts.epoch,
                    opts.step,
                    time.time(),
                    opts.message,
                    opts.metrics,
                    manifest.to_json(),
                    any(not r.lossless for r in new_rows),
                    stats.logical_bytes,
                    stats.written_bytes,
                    opts.info,
                )
                stats.existed, stats.replaced = self.catalog.publish_commit(
                    packs=[(p.name, p.size) for p in packs],
                    objects=new_rows,
                    commit=commit,
                    commit_objects=object_rows,
                    refs=ref_names,
                    best=best,
                    replace=replace,
                    save_token=save_token,
                )
                published = True
                self.writer.trust_written(new_rows)
                if replace:
                    log.warning(
                        "stored %d damaged object(s) again; the commits sharing them are repaired", len(replace)
                    )
                    self.reader.drop(self.catalog.drop_empty_packs(healed_packs))
                self.maintenance.reclaim_released(stats.replaced)
        except BaseException:
            if not published:  # the transaction did not commit: the packs would only be orphans
                self.writer.discard(written, unpublished=True)
            raise
        if isinstance(keep, Policy):
            try:
                stats.retention = self.retain(
                    run, keep, keep_optimizer=opts.keep_optimizer, release_files=opts.release_files
                )
            except CoralError as exc:  # the commit is safe; what retention did not free, the next one will
                log.error("commit %s is saved, but applying retention to run %s failed: %s", cid[:10], run, exc)
        return stats
