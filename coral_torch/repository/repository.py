"""`Repository`: checkpoints as commits over immutable HDF5 packs and an atomic SQLite catalog.

On disk (default ``.coral/``)::

    catalog.sqlite      objects -> pack, commits (manifest, parent, run, metrics), refs
    packs/<name>.h5     immutable HDF5Store files; written as .tmp-*, fsynced, then renamed
    lock                write lock (flock), holder PID inside

A save flattens the checkpoint (:mod:`coral_torch.adapters`), hashes every tensor, skips what the
repository already holds (dedup across tensors, epochs and runs), XOR-deltas the rest against the
same tensor of the parent commit when that is smaller (chains bounded by
``DeltaConfig.max_chain_length``), encodes on all cores, writes one new pack and then commits
objects, commit and refs in one SQLite transaction. A reader sees a commit entirely or not at all.

A commit's id is the hash of its manifest (skeleton + tensor hashes), so the same checkpoint always
gets the same id. Refs name commits: ``runs/<run>/latest``, ``runs/<run>/best``, ``tags/<tag>``,
``files/<pointer file>``, ``keep/<id>``. Commits no ref points to are removed by :meth:`gc`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sqlite3
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from .. import codec, dtypes
from ..parallel import HelpBoard, run_parallel
from ..delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from ..errors import (
    AmbiguousRefError,
    CatalogDamagedError,
    CheckpointDamagedError,
    ConcurrentChangeError,
    CoralError,
    CorruptObjectError,
    DiskFullError,
    HashMismatchError,
    IntegrityError,
    NotARepositoryError,
    ReadOnlyRepositoryError,
    RefNotFoundError,
    RepositoryError,
)
from ..lazy import LazyModule
from ..weight_tensor import WeightMetadata, WeightTensor, content_hash
from ..manifest import Manifest, TensorEntry
from .. import refnames
from ..refnames import validate_component, validate_ref_name
from ..retention import Policy
from .catalog import Catalog, CommitRow, NewCommit, ObjectRow, catalog_error, commit_object_rows
from .failures import CATALOG_NAME, is_disk_full, named_errors
from .planner import DeltaPlanner, PlannedObject
from .maintenance import Maintenance, lease_holder
from .retain import RetentionReport, apply_retention
from .packs import PACKS_DIR, PackGone, PackWriter, WrittenPack
from . import streams
from .lock import RepositoryLock

if TYPE_CHECKING:
    from .. import adapters, sharded
    from ..storage import hdf5_store
    from ..storage.hdf5_store import HDF5Store, PreparedObject
else:

    # adapters and sharded import torch, seconds that catalog-only readers (coral-torch log) must not pay
    adapters = LazyModule("coral_torch.adapters")
    sharded = LazyModule("coral_torch.sharded")
    hdf5_store = LazyModule("coral_torch.storage.hdf5_store")  # h5py: only packs need it

log = logging.getLogger(__name__)

_MIN_PREFIX = 4
_COMMIT_ID_LENGTH = 32
_HEX = set("0123456789abcdef")


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
    retention: Optional[RetentionReport] = field(default=None, repr=False)  #: when saved with a keep policy

    @property
    def ratio(self) -> float:
        return self.written_bytes / self.logical_bytes if self.logical_bytes else 0.0


class LossyCheckpointWarning(UserWarning):
    """A loaded checkpoint holds lossy deltas: some tensors are not bit-exact."""


@dataclass
class WrittenObjects:
    """What :meth:`Repository.write_objects` stored and :meth:`Repository.publish` makes visible:
    the new packs, their objects' catalog rows and how each was stored (plain data: it can be
    pickled to the process that publishes)."""

    packs: list[WrittenPack]
    rows: list[ObjectRow]
    hows: dict[str, str]
    #: hashes the catalog already listed whose stored objects were damaged: these rows replace theirs
    replace: list[str] = field(default_factory=list)


def _max_tensor_bytes() -> int:
    """The largest tensor a load will allocate: this machine's physical memory. A catalog row or
    pack that claims more is refused before any allocation."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 1 << 40


class Repository(Maintenance):
    """A checkpoint repository.

    Args:
        path: repository directory (created if missing and ``create`` is True).
        create: create a new repository when none exists at ``path``.
        delta_config: delta policy (lossless XOR; a keyframe at least every 3 checkpoints by default).
        workers: threads for hashing/encoding (default: all cores).
        lock_timeout: seconds a writer waits for another writer before
            :class:`~coral_torch.errors.RepositoryLockedError`.
        codec_level: zstd level of the codec, for whole objects and deltas alike (default:
            ``delta_config.codec_level``).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike] = ".coral",
        *,
        create: bool = True,
        delta_config: Optional[DeltaConfig] = None,
        workers: Optional[int] = None,
        lock_timeout: float = 60.0,
        codec_level: Optional[int] = None,
    ):
        self.path = Path(path).absolute()
        catalog_path = self.path / CATALOG_NAME
        if not catalog_path.exists():
            if not create:
                raise NotARepositoryError(
                    f"{self.path} is not a coral-torch repository (no {CATALOG_NAME}); "
                    "pass the directory that holds one, e.g. repo='ckpts/.coral'"
                )
            if self.path.exists() and (not self.path.is_dir() or not _fresh_repository_dir(self.path)):
                raise NotARepositoryError(
                    f"{self.path} exists and is not a coral-torch repository; refusing to write into it"
                )
            try:
                (self.path / PACKS_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ReadOnlyRepositoryError(
                    f"cannot create a repository at {self.path}: {exc.strerror}"
                ) from exc
        writable = os.access(self.path, os.W_OK) and os.access(catalog_path, os.W_OK) if catalog_path.exists() \
            else os.access(self.path, os.W_OK)
        try:
            self.catalog = Catalog(catalog_path, create=True, writable=writable)
        except sqlite3.Error as exc:
            raise catalog_error(exc, catalog_path) from exc
        self.writable = writable
        self._identity = _file_identity(catalog_path)
        self.lock = RepositoryLock(self.path / "lock", lock_timeout)
        config = delta_config or DeltaConfig()
        if codec_level is not None and codec_level != config.codec_level:
            config = dataclasses.replace(config, codec_level=codec_level)
        self.delta_config = config  # builds the encoder and the planner (see the property)
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._packs: "OrderedDict[str, HDF5Store]" = OrderedDict()
        self.last_loaded: Optional[str] = None  # commit id of the latest load (resume parent)
        self._fds: dict[str, int] = {}  # pack -> read-only descriptor for pread
        # object hash -> (inode, size, mtime) of the packs of its chain when this process last
        # verified or wrote it: a save relies on it again without re-reading while they match
        self._trusted: dict[str, tuple] = {}

    @property
    def delta_config(self) -> DeltaConfig:
        """The delta policy; setting it rebuilds the encoder and the planner that follow it."""
        return self._delta_config

    @delta_config.setter
    def delta_config(self, config: DeltaConfig) -> None:
        self._delta_config = config
        self.encoder = DeltaEncoder(config)
        self.planner = DeltaPlanner(self.catalog, config, self._tensor_index, self.intact_objects)

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r})"

    # ============================================================================== commit
    @named_errors
    def commit(
        self,
        obj: Any,
        *,
        run: str = "default",
        parent: Optional[str] = None,
        message: str = "",
        metrics: Optional[dict[str, Any]] = None,
        epoch: Optional[int] = None,
        step: Optional[int] = None,
        tags: Sequence[str] = (),
        refs: Sequence[str] = (),
        keep: Union[bool, Policy] = True,
        keep_optimizer: Optional[Policy] = None,
        release_files: bool = False,
        monitor: Optional[str] = None,
        mode: str = "min",
        info: Optional[dict[str, Any]] = None,
        head: bool = True,
        no_delta_prefixes: Sequence[str] = (),
        workers: Optional[int] = None,
        help_board: Optional[HelpBoard] = None,
        direct_io: bool = False,
    ) -> CommitStats:
        """Store ``obj`` as a commit and return its :class:`CommitStats` (``.commit_id``).

        ``parent`` defaults to the run's latest commit; deltas are taken against it. ``keep=True``
        adds a ``keep/<id>`` ref so :meth:`gc` never removes the commit; a retention policy
        (:mod:`coral_torch.retention`) instead keeps what it selects among the run's commits, this
        one included, and ``keep_optimizer`` / ``release_files`` go with it (see :meth:`retain`);
        ``tags`` and ``refs`` add more refs. With ``monitor``, ``runs/<run>/best`` follows the best value of that metric.
        Tensors are read while this call runs and never kept: delta bases are read back from the
        parent's packs, one tensor at a time. ``head=False`` leaves
        ``runs/<run>/latest`` alone. Tensors whose names start with one of ``no_delta_prefixes`` are
        never delta-encoded (so older versions of them can be garbage-collected independently).
        ``workers`` overrides the repository's encoder thread count for this commit (a background
        save on a CPU-bound trainer uses one, so it takes one core at most). ``help_board`` posts
        the encode-and-write work there, so a thread waiting for this commit can join in.
        ``direct_io`` writes the pack's large payloads around the page cache (see
        :class:`~coral_torch.storage.HDF5Store`): for background saves, where CPU time is what counts.
        """
        t0 = time.perf_counter()
        flat = adapters.flatten(obj)
        slots = flat.slots
        metrics = {k: _jsonable_metric(v) for k, v in (metrics or {}).items()}
        if epoch is None and isinstance(obj, dict) and isinstance(obj.get("epoch"), int):
            epoch = obj["epoch"]
        if step is None and isinstance(obj, dict) and isinstance(obj.get("global_step"), int):
            step = obj["global_step"]
        validate_component(run, "run")
        if mode not in ("min", "max"):
            raise RepositoryError(f"mode must be 'min' or 'max', not {mode!r}")
        _check_keep(keep, keep_optimizer)
        # every ref name is checked before anything is written
        ref_names = ([f"runs/{run}/latest"] if head else []) + [f"tags/{validate_component(t, 'tag')}" for t in tags]
        ref_names += [validate_ref_name(r) for r in refs]
        hashes = [s.weight.compute_hash() for s in slots]
        manifest = Manifest(flat.skeleton, [
            TensorEntry(s.name, h, s.weight.dtype, tuple(s.weight.shape), s.device, s.kind)
            for s, h in zip(slots, hashes)
        ])
        parent_id = self.resolve(parent) if parent is not None else self.catalog.get_ref(f"runs/{run}/latest")
        if parent_id is not None and self.catalog.get_commit(parent_id) is None:
            parent_id = None  # removed meanwhile: no deltas against it, and no dangling parent
        # plan and write without the lock (packs are private until published); publishing checks
        # that what the plan relied on is still there, and a lost race re-plans
        for attempt in range(3):
            written = self.write_objects(
                [(s.name, s.weight) for s in slots], parent=parent_id, no_delta_prefixes=no_delta_prefixes,
                workers=workers, help_board=help_board, direct_io=direct_io,
            )
            try:
                stats = self.publish(manifest, [written], run=run, parent=parent_id, message=message,
                                     metrics=metrics, epoch=epoch, step=step, refs=ref_names, keep=keep,
                                     keep_optimizer=keep_optimizer, release_files=release_files,
                                     monitor=monitor, mode=mode, info=info)
                break
            except ConcurrentChangeError as exc:
                if attempt == 2:
                    raise
                log.warning("commit of run %s raced a concurrent change (%s); planning it again", run, exc)
        stats.seconds = time.perf_counter() - t0
        log.info(
            "commit %s run=%s: %d tensors, %.1f MB logical, %.1f MB written (%d full, %d delta, %d dedup) in %.2fs",
            stats.commit_id[:10], run, stats.tensors, stats.logical_bytes / 1e6, stats.written_bytes / 1e6,
            stats.new_full, stats.new_delta, stats.deduplicated, stats.seconds,
        )
        return stats

    @named_errors
    def write_objects(
        self,
        tensors: Sequence[tuple[str, WeightTensor]],
        *,
        parent: Optional[str] = None,
        no_delta_prefixes: Sequence[str] = (),
        workers: Optional[int] = None,
        help_board: Optional[HelpBoard] = None,
        direct_io: bool = False,
    ) -> WrittenObjects:
        """Plan and write the objects of named tensors that the repository lacks, into one new
        pack, without the write lock; nothing becomes visible until :meth:`publish`.

        The plan: a tensor whose hash the catalog holds is deduplicated; otherwise, when commit
        ``parent`` has a tensor of the same name, dtype and shape, it is XOR-delta-encoded against
        it if that pays (the base is read back from the parent's packs, so the result never depends
        on what this process holds in memory), else stored whole. Several processes may call this
        for one commit (each for its own tensors) and hand the results to one :meth:`publish`."""
        todo = self.planner.plan(tensors, parent, no_delta_prefixes)
        return self._write_pack(todo, workers or self.workers, help_board, direct_io)

    @named_errors
    def publish(
        self,
        manifest: Manifest,
        written: Sequence[WrittenObjects],
        *,
        run: str = "default",
        parent: Optional[str] = None,
        message: str = "",
        metrics: Optional[dict[str, Any]] = None,
        epoch: Optional[int] = None,
        step: Optional[int] = None,
        refs: Sequence[str] = (),
        keep: Union[bool, Policy] = True,
        keep_optimizer: Optional[Policy] = None,
        release_files: bool = False,
        monitor: Optional[str] = None,
        mode: str = "min",
        info: Optional[dict[str, Any]] = None,
        save_token: Optional[str] = None,
    ) -> CommitStats:
        """Make ``manifest`` a commit, with the objects ``written`` by :meth:`write_objects` (by
        this process or others), in one short transaction under the write lock; ``refs`` then name
        it. Every pack must be where its writer left it, at its size, and every object the manifest
        lists must be in the repository, else :class:`ConcurrentChangeError` and nothing changes
        (the new packs are removed). Commits the moved refs released are reclaimed. Objects
        stored again because the repository's copy was damaged replace it (healing every commit
        that shares them). ``save_token`` records the id for the other ranks of a sharded save."""
        try:
            metrics = {k: _jsonable_metric(v) for k, v in (metrics or {}).items()}
            validate_component(run, "run")
            ref_names = [validate_ref_name(r) for r in refs]
            _check_keep(keep, keep_optimizer)
        except CoralError:
            self.discard(written, unpublished=True)
            raise
        cid = manifest.commit_id()
        new_rows = [r for w in written for r in w.rows]
        hows = {h: how for w in written for h, how in w.hows.items()}
        packs = [p for w in written for p in w.packs]
        replace = {h for w in written for h in getattr(w, "replace", ())}
        healed_packs = {r.pack for h in replace if (r := self.catalog.get_object(h)) is not None}
        stats = CommitStats(
            cid, manifest.nbytes, sum(r.stored_bytes for r in new_rows), len(manifest.tensors),
            new_full=sum(1 for r in new_rows if r.kind == "full"),
            new_delta=sum(1 for r in new_rows if r.kind == "delta"),
            deduplicated=len(manifest.tensors) - len(new_rows),
        )
        if isinstance(keep, Policy):  # born held by its run's retention, which then decides
            ref_names.append(refnames.run_keep_ref(run, cid))
        elif keep:
            ref_names.append(refnames.keep_ref(cid))
        best = None
        if monitor is not None and metrics.get(monitor) is not None:
            best = (f"runs/{run}/best", monitor, metrics[monitor], mode)
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
                commit = NewCommit(cid, parent, run, epoch, step, time.time(), message, metrics,
                                   manifest.to_json(), any(not r.lossless for r in new_rows), stats.logical_bytes,
                                   stats.written_bytes, info or {})
                stats.existed, stats.replaced = self.catalog.publish_commit(
                    packs=[(p.name, p.size) for p in packs], objects=new_rows, commit=commit,
                    commit_objects=object_rows, refs=ref_names, best=best, replace=replace,
                    save_token=save_token,
                )
                published = True
                self._trust_written(new_rows)
                if replace:
                    log.warning("stored %d damaged object(s) again; the commits sharing them are repaired",
                                len(replace))
                    self._drop_packs(self.catalog.drop_empty_packs(healed_packs))
                self._reclaim_released(stats.replaced)
        except BaseException:
            if not published:  # the transaction did not commit: the packs would only be orphans
                self.discard(written, unpublished=True)
            raise
        if isinstance(keep, Policy):
            try:
                stats.retention = self.retain(run, keep, keep_optimizer=keep_optimizer, release_files=release_files)
            except CoralError as exc:  # the commit is safe; what retention did not free, the next one will
                log.error("commit %s is saved, but applying retention to run %s failed: %s", cid[:10], run, exc)
        return stats

    def discard(self, written: Sequence[WrittenObjects], *, unpublished: bool = False) -> None:
        """Remove packs written by :meth:`write_objects` that will not be published. A pack the
        catalog already names (published after all) is left alone, unless the caller knows its
        publish never committed (``unpublished``: the catalog may be unreadable then, e.g. a full disk)."""
        known = set() if unpublished else self.catalog.packs()
        for w in written:
            for p in w.packs:
                if p.name not in known:
                    (self.path / PACKS_DIR / p.name).unlink(missing_ok=True)

    def intact_objects(self, hashes: set[str]) -> set[str]:
        """Those of ``hashes`` (objects the catalog lists) that a new commit may rely on: every pack
        along the object's delta chain is present at its recorded size, and the object was verified
        (decoded, every step hash-checked) by this process since those packs last changed, or is
        verified now. What fails is stored again by the save (see :meth:`publish`)."""
        recorded = self.catalog.packs()
        sigs: dict[str, Optional[tuple]] = {}
        ok: set[str] = set()
        for h in hashes:
            try:
                chain = self._chain(h)
            except IntegrityError:
                continue
            key = []
            for r in chain:
                if r.pack not in sigs:
                    sigs[r.pack] = _pack_signature(self.path / PACKS_DIR / r.pack)
                sig = sigs[r.pack]
                if sig is None or sig[1] != recorded.get(r.pack):
                    break
                key.append(sig)
            else:
                if self._trusted.get(h) != tuple(key):
                    try:
                        self._verify_chain(chain)
                    except (CoralError, OSError, KeyError, ValueError, RuntimeError, PackGone) as exc:
                        log.warning("object %s is damaged (%s): this save stores it again", h[:12], exc)
                        continue
                    self._trusted[h] = tuple(key)
                ok.add(h)
                continue
            log.warning("object %s is in a pack that is missing or resized: this save stores it again", h[:12])
        return ok

    def _verify_chain(self, chain: list[ObjectRow]) -> None:
        """Decode an object's chain and check every level's content hash, a chunk at a time where
        the chain allows it (a save's memory must not grow with the tensors it deduplicates)."""
        for r in chain:
            self._check_row(r)
        stream = streams.stream_base(chain, self._pack_fd)
        if stream is None:  # lossy or unlocated levels: through the whole-object decoder
            self._build(chain)
            return
        try:
            step = 8 << 20
            for start in range(0, len(stream), step):
                stream[start : start + step]
            if not stream.verified:
                raise IntegrityError(f"object {chain[-1].hash} could not be verified", hash_key=chain[-1].hash)
        finally:
            stream.release()

    def _trust_written(self, rows: Sequence[ObjectRow]) -> None:
        """Objects this process just wrote and published need no re-read while their packs stay as they are."""
        sigs: dict[str, Optional[tuple]] = {}
        for row in rows:
            try:
                chain = self._chain(row.hash)
            except IntegrityError:
                continue
            key = []
            for r in chain:
                if r.pack not in sigs:
                    sigs[r.pack] = _pack_signature(self.path / PACKS_DIR / r.pack)
                key.append(sigs[r.pack])
            if all(k is not None for k in key):
                self._trusted[row.hash] = tuple(key)

    def _drop_packs(self, names: Sequence[str]) -> None:
        """Close and delete pack files the catalog no longer lists."""
        for p in names:
            s = self._packs.pop(p, None)
            if s is not None:
                s.close()
            fd = self._fds.pop(p, None)
            if fd is not None:
                os.close(fd)
            (self.path / PACKS_DIR / p).unlink(missing_ok=True)

    def _commit_row(self, cid: str) -> Optional[CommitRow]:
        """The catalog row of commit ``cid``, verified (see :meth:`_manifest`)."""
        got = self._manifest(cid)
        return got[0] if got is not None else None

    def _manifest(self, cid: str) -> Optional[tuple[CommitRow, Manifest]]:
        """Commit ``cid``'s catalog row and its manifest, verified: the manifest must hash to the id
        (the catalog is not content-addressed on disk, so an edited or damaged row must not load),
        be of a format this version reads, and be well-formed."""
        row = self.catalog.get_commit(cid)
        if row is None:
            return None
        return row, Manifest.parse(row.manifest_json, cid, where=f"commit {cid[:12]} in {self.path / CATALOG_NAME}")

    def _tensor_index(self, cid: str) -> dict[str, tuple[str, str, tuple]]:
        """name -> (hash, dtype, shape) of a commit's tensors."""
        got = self._manifest(cid)
        if got is None:
            return {}
        return {e.name: (e.hash, e.dtype, e.shape) for e in got[1].tensors}

    def _encode_one(self, store: HDF5Store, planned: PlannedObject) -> tuple[PreparedObject, ObjectRow, str]:
        """Encode one tensor as a delta against its planned base (when that pays) or whole; returns
        the prepared object, its catalog row and how the commit stored it (``commit_objects.how``).
        The payload is a segmented blob over this call's buffers: the caller writes it right away."""
        slot, base_row = planned.tensor, planned.base
        w = slot.weight
        h = w.compute_hash()
        cfg = self.delta_config
        lossless = cfg.delta_type.lossless
        # a lossless delta reads its base a chunk at a time (streams.BaseStream), hash-checked as read
        base_raw = self._read_base(base_row, streamed=lossless) if base_row is not None else None
        full: Optional[PreparedObject] = None
        lost = False
        blob: Optional[codec.Blob] = None
        try:
            if base_raw is not None and lossless and not self.planner.delta_may_pay(w, base_raw):
                base_raw, lost = None, True
            if base_raw is not None and lossless:
                blob = codec.encode_blob(w.raw, dtypes.itemsize(w.dtype), cfg.codec_level, base=base_raw,
                                         spill_dir=store.spill_dir)
        except (CoralError, OSError) as exc:  # the streamed base turned out unreadable or damaged
            log.warning("delta base %s is unreadable (%s); storing the tensor whole", base_row.hash[:12], exc)
            base_raw = None
        if base_raw is not None and not lossless:  # DeltaConfig(allow_lossy=True) only
            ref = WeightTensor.from_raw(base_raw, WeightMetadata(name=slot.name, shape=w.shape, dtype=w.dtype))
            delta = self.encoder.encode(w, ref)
            prep = store.prepare_delta(delta, h)
            prep.attrs["name"] = slot.name
            row = ObjectRow(h, "", "delta", base_row.hash, base_row.depth + 1, w.dtype, w.shape, w.nbytes,
                            prep.stored_bytes, base_row.full_estimate, delta.lossless)
            return prep, row, "delta"
        base_raw = None  # a streamed base's buffers go before a full encode
        if blob is not None:
            if blob.nbytes > cfg.min_saving * base_row.full_estimate:
                full = store.prepare(_renamed(w, slot.name), segmented=True)
            if full is None or blob.nbytes < full.stored_bytes:
                estimate = full.stored_bytes if full is not None else base_row.full_estimate
                delta = Delta(DeltaType.XOR, b"", w.shape, w.dtype, base_row.hash,
                              compression_ratio=blob.nbytes / max(w.nbytes, 1))
                prep = hdf5_store.delta_object(delta, h, blob)
                prep.attrs["name"] = slot.name
                row = ObjectRow(h, "", "delta", base_row.hash, base_row.depth + 1, w.dtype, w.shape,
                                w.nbytes, prep.stored_bytes, estimate, True)
                return prep, row, "delta"
            lost = True
        blob = None
        if full is None:
            full = store.prepare(_renamed(w, slot.name), segmented=True)
        row = ObjectRow(h, "", "full", None, 0, w.dtype, w.shape, w.nbytes, full.stored_bytes, full.stored_bytes, True)
        return full, row, self.planner.how_stored_whole(lost, planned.skip_left)

    def _read_base(self, row: ObjectRow, streamed: bool = False) -> Union[np.ndarray, streams.BaseStream, None]:
        """The bytes of a delta base, read back from its pack(s) and verified; None (store the
        tensor whole) if they cannot be read. One tensor at a time: no copy of a checkpoint is kept.
        ``streamed``: a :class:`~.streams.BaseStream` where the chain allows (decoded a chunk at a
        time as the encoder reads it, each level hash-checked by the read that completes it)."""
        try:
            chain = self._chain(row.hash)
            if streamed:
                for r in chain:
                    self._check_row(r)
                stream = streams.stream_base(chain, self._pack_fd)
                if stream is not None:
                    return stream
            return self._build(chain)
        except (CoralError, OSError) as exc:
            log.warning("delta base %s is unreadable (%s); storing the tensor whole", row.hash[:12], exc)
            return None

    def _write_pack(
        self, todo: dict[str, PlannedObject], workers: int,
        board: Optional[HelpBoard] = None, direct_io: bool = False,
    ) -> WrittenObjects:
        if not todo:
            return WrittenObjects([], [], {})
        hows: dict[str, str] = {}
        writer: Optional[PackWriter] = None

        def encode_and_write(item: PlannedObject) -> ObjectRow:
            prep, row, how = self._encode_one(writer.store, item)
            location = writer.write(prep)
            row.pack = writer.name
            if location is not None:
                row.offset, row.length = location
            hows[row.hash] = how
            return row

        # Each worker encodes and writes its own tensors, largest first (see run_parallel), so the
        # threads finish together. A lone low-priority worker that a waiting thread may join later
        # goes smallest first instead: the many small objects are mostly Python and HDF5 calls under
        # the GIL, one thread's work anyway; the large ones (zstd, pwrite, GIL released) are what
        # two threads can share once the helper arrives.
        smallest_first = workers <= 1 and board is not None
        try:
            writer = PackWriter(self.path, codec_level=self.delta_config.codec_level, direct_io=direct_io)
            rows = run_parallel(encode_and_write, list(todo.values()), workers, name="coral-encode", board=board,
                                cost=lambda it: -it.tensor.weight.nbytes if smallest_first else it.tensor.weight.nbytes)
            pack = writer.finish()
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            if is_disk_full(exc):
                packs = self.path / PACKS_DIR
                needed = sum(item.tensor.weight.nbytes for item in todo.values())
                free = shutil.disk_usage(packs).free
                raise DiskFullError(
                    f"no space left on the disk holding {packs}: this save needs up to {needed / 1e6:.1f} MB "
                    f"({free / 1e6:.1f} MB free); nothing was saved and earlier checkpoints are intact. "
                    "Free space (e.g. coral-torch gc --yes) and save again",
                    path=str(packs), needed=needed,
                ) from exc
            raise
        # finished and renamed: gc's grace period for young orphans protects it until publish
        return WrittenObjects([pack], rows, hows, [h for h, item in todo.items() if item.replaces])

    # ================================================================================ load
    @named_errors
    def load(self, ref: str, *, map_location: Any = None, weights_only: bool = True) -> Any:
        """The checkpoint ``ref`` names, rebuilt exactly as saved (tensors verified by hash)."""
        cid = self.resolve(ref)
        got = self._manifest(cid)
        if got is None:  # removed by a concurrent gc
            raise RefNotFoundError(f"commit {cid} no longer exists in {self.path}")
        row, manifest = got
        if row.lossy:
            warnings.warn(f"checkpoint {cid[:10]} was saved with lossy deltas (DeltaConfig(allow_lossy=True)): "
                          "some tensors are approximations of what was saved", LossyCheckpointWarning, stacklevel=3)
        entries = manifest.tensors
        raws = self.materialize([e.hash for e in entries], commit=cid, names=[e.name for e in entries])
        tensors = []
        handed_out: set[str] = set()
        for e in entries:
            # Equal content in different slots (e.g. every param's `step` counter) must come back
            # as separate tensors: only slots that were the same tensor (tied) share memory.
            raw = raws[e.hash].copy() if e.hash in handed_out else raws[e.hash]
            handed_out.add(e.hash)
            try:
                w = WeightTensor.from_raw(raw, WeightMetadata(name=e.name, shape=e.shape, dtype=e.dtype))
            except CoralError as exc:  # the manifest entry disagrees with the object it names
                raise CheckpointDamagedError(
                    f"checkpoint {cid[:10]} in {self.path} is damaged: tensor {e.name} ({exc})",
                    commit=cid, tensors=[e.name],
                ) from exc
            tensors.append(adapters.apply_map_location(w.to_torch(), e.device, map_location))
        del raws
        try:
            if manifest.sharded:  # a DCP commit: its chunks consolidated into one full state dict
                obj = sharded.consolidate(manifest, tensors, weights_only=weights_only)
            else:
                obj = adapters.unflatten(manifest.skeleton, tensors, weights_only=weights_only)
        except CoralError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise CatalogDamagedError(
                f"checkpoint {cid[:10]} in {self.path} has a malformed skeleton ({type(exc).__name__}: {exc})"
            ) from exc
        self.last_loaded = cid
        return obj

    @named_errors
    def manifest(self, ref: str) -> Manifest:
        """The verified :class:`~coral_torch.manifest.Manifest` of the commit ``ref`` names."""
        cid = self.resolve(ref)
        got = self._manifest(cid)
        if got is None:
            raise RefNotFoundError(f"commit {cid} no longer exists in {self.path}")
        return got[1]

    @named_errors
    def materialize(
        self, hashes: Sequence[str], *, commit: Optional[str] = None, names: Optional[Sequence[str]] = None
    ) -> dict[str, np.ndarray]:
        """Raw bytes of objects (deltas rebuilt, every step verified). Damage raises
        :class:`CheckpointDamagedError` naming every affected tensor."""
        errors: dict[str, str] = {}
        unique = list(dict.fromkeys(hashes))
        # Catalog lookups happen here, on the calling thread; the workers only read and decode.
        chains: dict[str, list[ObjectRow]] = {}
        for h in unique:
            try:
                chains[h] = self._chain(h)
            except IntegrityError as exc:
                errors[h] = str(exc)
        todo = [h for h in unique if h in chains]

        def one(h: str) -> Optional[np.ndarray]:
            try:
                try:
                    return self._build(chains[h])
                except PackGone:
                    # a concurrent gc moved the object to a new pack after we read its rows
                    return self._build(self._chain(h))
            except (CoralError, OSError, KeyError, ValueError, RuntimeError, TypeError, MemoryError) as exc:
                # whatever a damaged object makes the readers raise, it is damage to report
                errors[h] = str(exc) if isinstance(exc, CoralError) else f"{type(exc).__name__}: {exc}"
                return None

        built = run_parallel(one, todo, self.workers, cost=lambda h: sum(r.nbytes for r in chains[h]),
                             name="coral-load")
        if errors:
            names = list(names) if names is not None else list(hashes)
            bad = [n for n, h in zip(names, hashes) if h in errors]
            first = next(iter(errors.values()))
            where = f"checkpoint {commit[:10]}" if commit else "the objects"
            raise CheckpointDamagedError(
                f"{where} in {self.path} is damaged: {len(bad)} tensor(s) cannot be restored: "
                f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''} (first error: {first}). "
                "Other checkpoints are unaffected unless `coral-torch verify` lists them.",
                commit=commit or "", tensors=bad,
            )
        return dict(zip(todo, built))

    def _chain(self, h: str) -> list[ObjectRow]:
        """The rows that rebuild ``h``: a full object first, then each delta on top of it."""
        chain: list[ObjectRow] = []
        cur: Optional[str] = h
        while cur is not None:
            row = self.catalog.get_object(cur)
            if row is None:
                raise IntegrityError(f"object {cur} is missing from the catalog", hash_key=cur)
            chain.append(row)
            cur = row.base if row.kind == "delta" else None
            if len(chain) > 10_000:
                raise IntegrityError(f"delta chain of {h} loops", hash_key=h)
        chain.reverse()
        return chain

    def _build(self, chain: list[ObjectRow], raw: Optional[np.ndarray] = None) -> np.ndarray:
        """Decode the chain's full object, then XOR each delta into the same buffer, checking the
        content hash after every step (a damaged step is named, not just the end result).
        ``raw``: the bytes of the first row's base when the chain starts with a delta (modified)."""
        for row in chain:
            if row.offset is not None and row.length is not None and (row.kind == "full" or row.lossless):
                raw = self._read_object(row, raw)
                continue
            store = self._pack(row.pack)  # objects without a recorded location: through HDF5
            if row.kind == "full":
                w = store.load(row.hash)
                if w is None:
                    raise IntegrityError(f"object {row.hash} is missing from pack {row.pack}", hash_key=row.hash)
                raw = w.raw
            else:
                delta = store.load_delta(row.hash)
                if delta is None:
                    raise IntegrityError(f"delta {row.hash} is missing from pack {row.pack}", hash_key=row.hash)
                ref = WeightTensor.from_raw(raw, WeightMetadata(name="", shape=row.shape, dtype=row.dtype))
                w = self.encoder.reconstruct(delta, ref)
                actual = w.compute_hash()
                if row.lossless and actual != row.hash:  # a lossy delta is an approximation by design
                    raise IntegrityError(
                        f"object {row.hash} rebuilt from its delta hashes to {actual}: the delta or its "
                        "base is damaged", hash_key=row.hash,
                    )
                raw = w.raw
        assert raw is not None
        return raw

    def _read_object(self, row: ObjectRow, base: Optional[np.ndarray]) -> np.ndarray:
        """Read one object straight from its pack with ``pread`` (no HDF5 call, no GIL held while
        reading) into this thread's reusable buffer, decode it (a delta: XORed into ``base`` in
        place), and check the content hash."""
        self._check_row(row)
        # a chunked blob is read a frame at a time into this thread's buffer, decoded into place
        reader = streams.open_stored(self._pack_fd(row.pack), row, where=row.pack)
        if row.kind == "delta":
            if base is None or base.size != row.nbytes:
                raise IntegrityError(f"delta {row.hash} does not fit its base {row.base}", hash_key=row.hash)
            raw = reader.decode_into(base, xor=True)
        else:
            raw = reader.decode_into(np.empty(row.nbytes, dtype=np.uint8))
        actual = content_hash(raw, row.dtype, row.shape)
        if actual != row.hash:
            raise HashMismatchError(
                f"object {row.hash} in pack {row.pack} is corrupt: its bytes hash to {actual}"
                + (" (the delta or its base is damaged)" if row.kind == "delta" else ""),
                hash_key=row.hash,
            )
        return raw

    def _check_row(self, row: ObjectRow) -> None:
        """Refuse an object row whose claims cannot be true before anything is allocated for it."""
        try:
            itemsize = dtypes.itemsize(row.dtype)
        except CoralError as exc:
            raise CorruptObjectError(f"object {row.hash}: {exc}", hash_key=row.hash) from exc
        if not all(type(d) is int and d >= 0 for d in row.shape):
            raise CorruptObjectError(f"object {row.hash} has a malformed shape {row.shape}", hash_key=row.hash)
        n = 1
        for d in row.shape:
            n *= d
        if row.nbytes != n * itemsize:
            raise CorruptObjectError(
                f"object {row.hash}: catalog says {row.nbytes} bytes for {row.dtype}{list(row.shape)} "
                f"({n * itemsize}): the catalog is damaged", hash_key=row.hash,
            )
        if row.nbytes > _max_tensor_bytes():
            raise CorruptObjectError(
                f"object {row.hash} claims {row.nbytes / 2**30:.1f} GiB, more than this machine's memory: "
                "refused before allocating (a damaged or crafted catalog?)", hash_key=row.hash,
            )
        if row.kind not in ("full", "delta") or (row.kind == "delta") != bool(row.base):
            raise CorruptObjectError(f"object {row.hash} has a malformed kind/base ({row.kind}, {row.base})",
                                     hash_key=row.hash)

    def _pack_fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = self.path / PACKS_DIR / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if name not in self.catalog.packs():
                    raise PackGone(f"pack {name} was removed by gc") from None
                raise IntegrityError(f"pack {name} is missing from {self.path / PACKS_DIR}") from None
            kept = self._fds.setdefault(name, fd)  # another thread may have opened it meanwhile
            if kept != fd:
                os.close(fd)
            fd = kept
        return fd

    def _pack(self, name: str) -> HDF5Store:
        store = self._packs.get(name)
        if store is None:
            path = self.path / PACKS_DIR / name
            if not path.exists():
                if name not in self.catalog.packs():
                    raise PackGone(f"pack {name} was removed by gc")
                raise IntegrityError(f"pack {name} is missing from {self.path / PACKS_DIR}")
            try:
                store = hdf5_store.HDF5Store(path, mode="r")
            except CoralError:
                raise
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                raise CorruptObjectError(f"pack {name} cannot be opened as HDF5 ({exc}): it is damaged") from exc
            self._packs[name] = store
            while len(self._packs) > 64:
                _, old = self._packs.popitem(last=False)
                old.close()
        else:
            self._packs.move_to_end(name)
        return store

    @property
    def stale(self) -> bool:
        """True if the directory was deleted or replaced since this object opened it (its
        catalog file is gone or another file): the object must not be used any more."""
        return _file_identity(self.path / CATALOG_NAME) != self._identity

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for s in self._packs.values():
            s.close()
        self._packs.clear()
        self.catalog.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================================ refs
    @named_errors
    def resolve(self, ref: str) -> str:
        """Full commit id for a hash prefix (>= 4 chars), tag, ``latest``, ``best``, ``<run>``,
        ``<run>/latest``, ``<run>/best`` or a full ref name. Accepts a ``coral://`` prefix. As in
        git, ``<ref>~N`` names the N-th parent of ``<ref>`` and ``<ref>^`` its parent."""
        if not isinstance(ref, str) or not ref:
            raise RefNotFoundError(f"a ref must be a non-empty string, not {ref!r}")
        ref = ref.removeprefix("coral://").strip()
        base, ups = _split_ancestry(ref)
        if ups:
            cid = self.resolve(base)
            for i in range(ups):
                row = self.catalog.get_commit(cid)
                if row is None or row.parent is None or self.catalog.get_commit(row.parent) is None:
                    raise RefNotFoundError(
                        f"{ref!r}: {base} has only {i} ancestor(s) in {self.path}"
                        + (" (older commits were removed)" if row is not None and row.parent else "")
                    )
                cid = row.parent
            return cid
        ref = base
        cat = self.catalog
        if ref in ("latest", "HEAD"):
            # the newest checkpoint by when it was saved: a commit that retention rewrote later
            # (e.g. keep_optimizer="last" stripping an older epoch) keeps its original's time
            newest = cat.newest_commit()
            if newest is None:
                raise RefNotFoundError(f"repository {self.path} has no commits yet")
            return newest[0]
        if ref == "best":
            newest = cat.newest_commit()
            cid = cat.get_ref("best") or (cat.get_ref(f"runs/{newest[1]}/best") if newest else None)
            if cid is None:
                raise RefNotFoundError(
                    f"no 'best' commit in {self.path}: save with a monitored metric (monitor=...) first"
                )
            return cid
        for candidate in (ref, f"tags/{ref}", f"runs/{ref}/latest", f"runs/{ref}"):
            cid = cat.get_ref(candidate)
            if cid is not None:
                return cid
        low = ref.lower()
        if len(low) >= _MIN_PREFIX and set(low) <= _HEX:
            matches = cat.commit_ids_with_prefix(low)
            if len(matches) == 1:
                return matches[0]
            if not matches and len(low) == _COMMIT_ID_LENGTH:
                # a commit that retention rewrote (keep_optimizer) is still found by its old id, as a
                # pointer file or a log line written before the rewrite names it
                for _ in range(8):
                    newer = cat.rewrite_of(low)
                    if newer is None:
                        break
                    if cat.get_commit(newer) is not None:
                        return newer
                    low = newer
            if len(matches) > 1:
                raise AmbiguousRefError(
                    f"hash prefix {ref!r} is ambiguous in {self.path}: it matches "
                    + ", ".join(m[:12] for m in matches[:10])
                    + ("..." if len(matches) > 10 else "")
                    + "; give more characters",
                    matches,
                )
        hints = sorted({n.split("/")[1] for n in cat.refs("runs/")} | {n[5:] for n in cat.refs("tags/")})
        raise RefNotFoundError(
            f"no commit matches {ref!r} in {self.path}"
            + (f"; known runs and tags: {', '.join(hints[:20])}" if hints else "")
            + ". Use a hash prefix of at least 4 characters, a tag, a run name, 'latest' or 'best'."
        )

    @named_errors
    def tag(self, name: str, ref: str) -> str:
        validate_component(name, "tag")
        cid = self.resolve(ref)
        self.set_ref(f"tags/{name}", cid)
        return cid

    @named_errors
    def set_ref(self, name: str, commit_id: str) -> None:
        """Point ref ``name`` at ``commit_id``. A commit the ref named before and that no other
        ref keeps is removed at once, with what only it used (see :meth:`delete_ref`)."""
        validate_ref_name(name)
        with self.lock:
            try:
                before = self.catalog.set_ref(name, commit_id, time.time())
            except KeyError:
                raise RefNotFoundError(f"commit {commit_id} does not exist in {self.path}") from None
            if before is not None and before != commit_id:
                self._reclaim_released([before])

    @named_errors
    def delete_ref(self, name: str) -> bool:
        """Remove ref ``name``. If no other ref keeps its commit, the commit is removed too, with
        every object no remaining commit needs, and its disk space is reclaimed: dropping the last
        ref of a checkpoint is like deleting a file. Returns False if there was no such ref."""
        with self.lock:
            before = self.catalog.delete_ref(name)
            if before is not None:
                self._reclaim_released([before])
            return before is not None

    @named_errors
    def refs(self, prefix: str = "") -> dict[str, str]:
        return self.catalog.refs(prefix)

    @named_errors
    def retain(self, run: str, keep: Policy, *, keep_optimizer: Optional[Policy] = None,
               release_files: bool = False, dry_run: bool = False) -> RetentionReport:
        """Keep the commits of ``run`` that the policy ``keep`` selects (decided from the catalog,
        so every process decides the same) and release the others, unless another ref (``latest``,
        ``best``, a tag, a pointer file, a lease) holds them; commits that survive but that
        ``keep_optimizer`` does not select lose their per-parameter optimizer state.
        ``release_files``: also release the pointer files of dropped commits (deleting the files).
        ``dry_run``: change nothing, say what would go. See :mod:`coral_torch.repository.retain`."""
        return apply_retention(self, run, keep, keep_optimizer=keep_optimizer, release_files=release_files,
                               dry_run=dry_run)

    @named_errors
    def lease(self, ref: str) -> str:
        """Hold the commit ``ref`` names for as long as this process runs (a resumed training run
        holds the commit it came from, whatever retention or gc decide meanwhile); returns the
        lease's ref name for :meth:`end_lease`. gc drops leases of processes that ended."""
        cid = self.resolve(ref)
        name = refnames.lease_ref(lease_holder(uuid.uuid4().hex[:12]))
        self.set_ref(name, cid)
        return name

    @named_errors
    def end_lease(self, name: str) -> None:
        """Drop a lease taken with :meth:`lease`; its commit goes if nothing else keeps it."""
        if not name.startswith(refnames.LEASES):
            raise RepositoryError(f"{name!r} is not a lease")
        self.delete_ref(name)

    # ================================================================================ info
    @named_errors
    def log(self, run: Optional[str] = None) -> list[CommitRow]:
        """Commits, newest first (of one run, or of all runs)."""
        return self.catalog.commits(run)

    @named_errors
    def commits_with_tensor(self, run: str, pattern: str) -> list[str]:
        """Ids of ``run``'s commits that hold a tensor whose flattened name matches the glob
        ``pattern`` (``*`` any characters, ``?`` one), answered from the catalog alone."""
        return self.catalog.commits_with_tensor(run, pattern)

    @named_errors
    def get_commit(self, ref: str) -> CommitRow:
        """The verified catalog row of the commit ``ref`` names."""
        cid = self.resolve(ref)
        row = self._commit_row(cid)
        if row is None:
            raise RefNotFoundError(f"commit {cid} no longer exists in {self.path}")
        return row

    @named_errors
    def stats(self) -> dict[str, Any]:
        t = self.catalog.totals()
        disk = sum(p.stat().st_size for p in (self.path / PACKS_DIR).glob("*.h5"))
        # the catalog (and its write-ahead log) is on disk too
        disk += sum(_file_size(p) for p in self.path.glob(CATALOG_NAME + "*"))
        return {
            "path": str(self.path),
            "commits": t["commits"],
            "logical_bytes": t["logical_bytes"],
            "objects": t["objects"],
            "delta_objects": t["delta_objects"],
            "stored_bytes": t["stored_bytes"],
            "disk_bytes": disk,
            "ratio": (disk / t["logical_bytes"]) if t["logical_bytes"] else 0.0,
        }

    # ============================================================================= remote
    @named_errors
    def push(self, remote: Any, progress: Optional[bool] = None, *, verify: bool = False) -> dict[str, Any]:
        """Send commits that refs name, the objects they need, then the refs, to an S3 remote
        (:class:`~coral_torch.S3Config` or :class:`~coral_torch.S3Store`). Re-run to resume.
        ``verify=True`` also checks every object of every pushed commit on the remote and sends
        damaged ones again (damage done on the server after an earlier push)."""
        from .remote import push

        return push(self, remote, progress=progress, verify=verify)

    @named_errors
    def pull(self, remote: Any, progress: Optional[bool] = None) -> dict[str, Any]:
        """Fetch every commit the remote has and this repository lacks, with its objects and refs."""
        from .remote import pull

        return pull(self, remote, progress=progress)

def _renamed(w: WeightTensor, name: str) -> WeightTensor:
    """The same bytes under a display name (metadata only, no copy)."""
    out = WeightTensor.from_raw(w.raw, WeightMetadata(name=name, shape=w.shape, dtype=w.dtype))
    out._hash = w._hash
    return out


def _check_keep(keep: Any, keep_optimizer: Any) -> None:
    if not isinstance(keep, (bool, Policy)):
        raise RepositoryError(f"keep must be True, False or a retention policy (e.g. LatestN(3)), not {keep!r}")
    if keep_optimizer is not None and not isinstance(keep_optimizer, Policy):
        raise RepositoryError(f"keep_optimizer must be a retention policy, not {keep_optimizer!r}")
    if keep_optimizer is not None and not isinstance(keep, Policy):
        raise RepositoryError("keep_optimizer applies with keep=<retention policy>: give both")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # the write-ahead log comes and goes
        return 0


def _pack_signature(path: Path) -> Optional[tuple[int, int, int]]:
    """``(inode, size, mtime_ns)`` of a pack file, None if it is gone: any rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _fresh_repository_dir(path: Path) -> bool:
    """True for an empty directory, or one holding only what an interrupted or concurrent creation
    of a repository leaves (an empty ``packs/``, the lock file, a catalog being created)."""
    names = {p.name for p in path.iterdir()}
    if not names <= {PACKS_DIR, "lock"} | {CATALOG_NAME + x for x in ("", "-wal", "-shm", "-journal")}:
        return False
    packs = path / PACKS_DIR
    return PACKS_DIR not in names or (packs.is_dir() and not any(packs.iterdir()))


def _file_identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _split_ancestry(ref: str) -> tuple[str, int]:
    """``"latest~2^"`` -> ``("latest", 3)``: the ref and how many parents up from it."""
    ups = 0
    while True:
        if ref.endswith("^") and len(ref) > 1:
            ref, ups = ref[:-1], ups + 1
            continue
        head, sep, num = ref.rpartition("~")
        if sep and head and (num == "" or num.isdigit()):
            ref, ups = head, ups + (int(num) if num else 1)
            continue
        return ref, ups


def _jsonable_metric(v: Any) -> Any:
    import torch  # already loaded by a commit (adapters); not at module level: catalog readers skip it

    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v
