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
import sqlite3
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import defaults
from ..errors import (
    ConcurrentChangeError,
    RefNotFoundError,
    RepositoryError,
)
from ..format import refnames
from ..format.delta import DeltaConfig, DeltaEncoder
from ..format.manifest import Manifest
from ..format.refnames import validate_ref_name
from ..format.weight_tensor import WeightTensor
from ..location import S3Location
from ..parallel import HelpBoard
from ..retention import Policy
from .catalog import Catalog, CommitRow, catalog_error
from .commit import CommitStats, Committer
from .failures import CATALOG_NAME, named_errors
from .layout import disk_bytes, file_identity, open_directory
from .load import rebuild_checkpoint
from .lock import RepositoryLock
from .maintenance import Maintenance, lease_holder
from .options import CommitOptions
from .planner import DeltaPlanner
from .read import ObjectReader
from .refs import resolve_ref
from .retain import RetentionReport, apply_retention
from .verify import Verifier, VerifyReport
from .write import ObjectWriter, WrittenObjects

log = logging.getLogger(__name__)

#: a sharded save's token -> commit record lets every rank find the commit id (saving unchanged
#: state again gives the same commit, so the commit itself cannot carry the token). It keeps no
#: data alive; records are dropped after a day.
SAVE_RECORD_TTL_S = 86400.0


class LossyCheckpointWarning(UserWarning):
    """A loaded checkpoint holds lossy deltas: some tensors are not bit-exact."""


class Repository:
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
        path: str | os.PathLike = defaults.REPOSITORY_DIR,
        *,
        create: bool = True,
        delta_config: DeltaConfig | None = None,
        workers: int | None = None,
        lock_timeout: float = 60.0,
        codec_level: int | None = None,
    ):
        self.path = Path(path).absolute()
        catalog_path = self.path / CATALOG_NAME
        writable = open_directory(self.path, create=create)
        try:
            self.catalog = Catalog(catalog_path, create=True, writable=writable)
        except sqlite3.Error as exc:
            raise catalog_error(exc, catalog_path) from exc
        self.writable = writable
        self._identity = file_identity(catalog_path)
        self.lock = RepositoryLock(self.path / "lock", lock_timeout)
        self.reader = ObjectReader(self.path, self.catalog, lambda: self.encoder)  #: verified object bytes
        self.writer = ObjectWriter(self.path, self.catalog, self.reader)  #: plan -> encode -> pack
        self.maintenance = Maintenance(
            self.path, self.catalog, self.lock, self.reader, self.resolve, lambda: self.delta_config.codec_level
        )  #: gc, reclaim, strip
        self.committer = Committer(
            self.path, self.catalog, self.lock, self.reader, self.writer, self.maintenance, self.resolve, self.retain
        )  #: prepare -> publish
        config = delta_config or DeltaConfig()
        if codec_level is not None and codec_level != config.codec_level:
            config = dataclasses.replace(config, codec_level=codec_level)
        self.delta_config = config  # builds the encoder and the planner (see the property)
        self.workers = workers or defaults.default_workers()
        self.last_loaded: str | None = None  # commit id of the latest load (resume parent)

    @property
    def delta_config(self) -> DeltaConfig:
        """The delta policy; setting it rebuilds the encoder and the planner that follow it."""
        return self._delta_config

    @delta_config.setter
    def delta_config(self, config: DeltaConfig) -> None:
        self._delta_config = config
        self.encoder = DeltaEncoder(config)
        self.planner = DeltaPlanner(self.catalog, config, self.tensor_index, self.writer.intact_objects)
        self.writer.configure(config, self.encoder, self.planner)

    @property
    def location(self) -> Path | S3Location:
        """Where the repository is, as pointer files name it: its directory (an S3 repository: its URL)."""
        return self.path

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r})"

    # ============================================================================== commit
    @named_errors
    def commit(
        self,
        obj: Any,
        options: CommitOptions | None = None,
        *,
        no_delta_prefixes: Sequence[str] = (),
        workers: int | None = None,
        help_board: HelpBoard | None = None,
        direct_io: bool = False,
        **option_kwargs: Any,
    ) -> CommitStats:
        """Store ``obj`` as a commit and return its :class:`CommitStats` (``.commit_id``).

        What the commit records and which refs it moves are :class:`CommitOptions` (``options``,
        or its fields as keyword arguments: ``run``, ``parent``, ``message``, ``metrics``,
        ``epoch``, ``step``, ``tags``, ``refs``, ``keep``, ``keep_optimizer``, ``release_files``,
        ``monitor``, ``mode``, ``info``, ``head``; keyword arguments given with ``options``
        override its fields). ``parent`` defaults to the run's latest commit; deltas are taken
        against it. ``keep=True`` (the default) adds a ``keep/<id>`` ref so :meth:`gc` never removes
        the commit; a retention policy (:mod:`coral_torch.retention`) instead keeps what it selects
        among the run's commits, this one included, and ``keep_optimizer`` / ``release_files`` go
        with it (see :meth:`retain`); ``tags`` and ``refs`` add more refs. With ``monitor``,
        ``runs/<run>/best`` follows the best value of that metric. ``epoch`` and ``step`` default
        to ``obj["epoch"]`` / ``obj["global_step"]``. ``head=False`` leaves ``runs/<run>/latest`` alone.

        Tensors are read while this call runs and never kept: delta bases are read back from the
        parent's packs, one tensor at a time. Tensors whose names start with one of
        ``no_delta_prefixes`` are never delta-encoded (so older versions of them can be
        garbage-collected independently). ``workers`` overrides the repository's encoder thread
        count for this commit (a background save on a CPU-bound trainer uses one, so it takes one
        core at most). ``help_board`` posts the encode-and-write work there, so a thread waiting
        for this commit can join in. ``direct_io`` writes the pack's large payloads around the page
        cache (see :class:`~coral_torch.storage.HDF5Store`): for background saves, where CPU time is what counts.
        """
        t0 = time.perf_counter()
        tensors, manifest, opts = self.committer.prepare(obj, options, option_kwargs)
        # plan and write without the lock (packs are private until published); publishing checks
        # that what the plan relied on is still there, and a lost race re-plans
        for attempt in range(3):
            written = self.write_objects(
                tensors,
                parent=opts.parent,
                no_delta_prefixes=no_delta_prefixes,
                workers=workers,
                help_board=help_board,
                direct_io=direct_io,
            )
            try:
                stats = self.publish(manifest, [written], opts)
                break
            except ConcurrentChangeError as exc:
                if attempt == 2:
                    raise
                log.warning("commit of run %s raced a concurrent change (%s); planning it again", opts.run, exc)
        stats.seconds = time.perf_counter() - t0
        log.info(
            "commit %s run=%s: %d tensors, %.1f MB logical, %.1f MB written (%d full, %d delta, %d dedup) in %.2fs",
            stats.commit_id[:10],
            opts.run,
            stats.tensors,
            stats.logical_bytes / 1e6,
            stats.written_bytes / 1e6,
            stats.new_full,
            stats.new_delta,
            stats.deduplicated,
            stats.seconds,
        )
        return stats

    @named_errors
    def write_objects(
        self,
        tensors: Sequence[tuple[str, WeightTensor]],
        *,
        parent: str | None = None,
        no_delta_prefixes: Sequence[str] = (),
        workers: int | None = None,
        help_board: HelpBoard | None = None,
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
        return self.writer.write_pack(todo, workers or self.workers, help_board, direct_io)

    # -- a sharded save (DCP): every rank writes its shards, the coordinator publishes ---------
    def run_head(self, run: str) -> str | None:
        """The commit ``runs/<run>/latest`` names (None: the run has none yet): a sharded save's parent."""
        return self.catalog.get_ref(refnames.latest_ref(run))

    def write_shard(self, tensors: Sequence[tuple[str, WeightTensor]], *, parent: str | None) -> WrittenObjects:
        """One rank's part of a sharded save (:meth:`write_objects`), for :meth:`publish_shards`."""
        return self.write_objects(tensors, parent=parent)

    def publish_shards(
        self, manifest: Manifest, written: Sequence[WrittenObjects], options: CommitOptions, *, save_token: str
    ) -> CommitStats:
        """The coordinator publishes a sharded save (:meth:`publish`); ``save_token`` lets the other
        ranks find the commit id (:meth:`save_result`)."""
        self.catalog.forget_saves(time.time() - SAVE_RECORD_TTL_S)
        return self.publish(manifest, written, options, save_token=save_token)

    def save_result(self, token: str) -> str | None:
        """The commit a sharded save with ``token`` published (None: not yet, or it failed)."""
        return self.catalog.save_result(token)

    def discard(self, written: Sequence[WrittenObjects], *, unpublished: bool = False) -> None:
        """Remove packs written by :meth:`write_objects` that will not be published (see
        :meth:`ObjectWriter.discard`)."""
        self.writer.discard(written, unpublished=unpublished)

    def intact_objects(self, hashes: set[str]) -> set[str]:
        """Those of ``hashes`` a new commit may rely on (see :meth:`ObjectWriter.intact_objects`)."""
        return self.writer.intact_objects(hashes)

    @named_errors
    def publish(
        self,
        manifest: Manifest,
        written: Sequence[WrittenObjects],
        options: CommitOptions | None = None,
        *,
        save_token: str | None = None,
        **option_kwargs: Any,
    ) -> CommitStats:
        """Make ``manifest`` a commit, with the objects ``written`` by :meth:`write_objects` (by
        this process or others), in one short transaction under the write lock; the refs of
        ``options`` (:meth:`CommitOptions.ref_names`) then name it. Every pack must be where its
        writer left it, at its size, and every object the manifest lists must be in the
        repository, else :class:`ConcurrentChangeError` and nothing changes (the new packs are
        removed). Commits the moved refs released are reclaimed. Objects stored again because the
        repository's copy was damaged replace it (healing every commit that shares them).
        ``save_token`` records the id for the other ranks of a sharded save.

        Without ``options``, its fields may be given as keyword arguments (``run``, ``parent``,
        ``message``, ``metrics``, ``epoch``, ``step``, ``refs``, ``keep``, ...); ``refs`` are then
        every ref to move (``head`` defaults to False: ``runs/<run>/latest`` only if listed)."""
        return self.committer.publish(manifest, written, options, save_token=save_token, **option_kwargs)

    def _commit_row(self, cid: str) -> CommitRow | None:
        """The catalog row of commit ``cid``, verified (see :meth:`_manifest`)."""
        got = self.reader.manifest(cid)
        return got[0] if got is not None else None

    def tensor_index(self, cid: str) -> dict[str, tuple[str, str, tuple]]:
        """name -> (hash, dtype, shape) of a commit's tensors."""
        got = self.reader.manifest(cid)
        if got is None:
            return {}
        return {e.name: (e.hash, e.dtype, e.shape) for e in got[1].tensors}

    # ================================================================================ load
    @named_errors
    def load(self, ref: str, *, map_location: Any = None, weights_only: bool = True) -> Any:
        """The checkpoint ``ref`` names, rebuilt exactly as saved (tensors verified by hash)."""
        cid = self.resolve(ref)
        got = self.reader.manifest(cid)
        if got is None:  # removed by a concurrent gc
            raise RefNotFoundError(f"commit {cid} no longer exists in {self.path}")
        row, manifest = got
        if row.lossy:
            warnings.warn(
                f"checkpoint {cid[:10]} was saved with lossy deltas (DeltaConfig(allow_lossy=True)): "
                "some tensors are approximations of what was saved",
                LossyCheckpointWarning,
                stacklevel=3,
            )
        obj = rebuild_checkpoint(
            cid, manifest, self.materialize, map_location=map_location, weights_only=weights_only, where=self.path
        )
        self.last_loaded = cid
        return obj

    @named_errors
    def manifest(self, ref: str) -> Manifest:
        """The verified :class:`~coral_torch.manifest.Manifest` of the commit ``ref`` names."""
        cid = self.resolve(ref)
        got = self.reader.manifest(cid)
        if got is None:
            raise RefNotFoundError(f"commit {cid} no longer exists in {self.path}")
        return got[1]

    @named_errors
    def materialize(
        self, hashes: Sequence[str], *, commit: str | None = None, names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Raw bytes of objects (deltas rebuilt, every step verified). Damage raises
        :class:`CheckpointDamagedError` naming every affected tensor."""
        return self.reader.materialize(hashes, workers=self.workers, commit=commit, names=names)

    def prefetch(self, hashes: Sequence[str], nbytes: int) -> None:
        """Make the objects ``hashes`` (``nbytes`` decoded) local ahead of the reads that need them,
        in as few round trips as possible. A repository on disk has them: nothing to do."""

    # ======================================================================== maintenance
    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Re-read and re-hash every object; report damaged objects and the commits they break
        (see :class:`~.verify.Verifier`)."""
        return Verifier(self.path, self.catalog, self.reader).verify(progress=progress)

    def gc(
        self, *, dry_run: bool = False, repack_threshold: float = 0.3, orphan_grace_s: float = 3600.0
    ) -> dict[str, Any]:
        """Remove commits no ref keeps and reclaim their disk space (see :meth:`Maintenance.gc`)."""
        return self.maintenance.gc(dry_run=dry_run, repack_threshold=repack_threshold, orphan_grace_s=orphan_grace_s)

    def strip_commit(self, ref: str, empty: Sequence[Sequence[str]] = (("optimizer_states", "*", "state"),)) -> str:
        """Replace a commit by one without the containers at ``empty`` (see :meth:`Maintenance.strip_commit`)."""
        return self.maintenance.strip_commit(ref, empty)

    def release_commits(
        self, candidates: Iterable[str], *, dry_run: bool = False, dropping: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """Remove those of ``candidates`` no ref keeps (see :meth:`Maintenance.release_commits`)."""
        return self.maintenance.release_commits(candidates, dry_run=dry_run, dropping=dropping)

    @property
    def stale(self) -> bool:
        """True if the directory was deleted or replaced since this object opened it (its
        catalog file is gone or another file): the object must not be used any more."""
        return file_identity(self.path / CATALOG_NAME) != self._identity

    def close(self) -> None:
        self.reader.close()
        self.catalog.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================================ refs
    @named_errors
    def resolve(self, ref: str) -> str:
        """Full commit id for a hash prefix (>= 4 chars), tag, ``latest``, ``best``, ``<run>``,
        ``<run>/latest``, ``<run>/best`` or a full ref name. Accepts a ``coral://`` prefix. As in
        git, ``<ref>~N`` names the N-th parent of ``<ref>`` and ``<ref>^`` its parent."""
        return resolve_ref(self.catalog, ref, where=self.path)

    @named_errors
    def tag(self, name: str, ref: str) -> str:
        tag = refnames.tag_ref(name)  # checked before the ref is resolved
        cid = self.resolve(ref)
        self.set_ref(tag, cid)
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
                self.maintenance.reclaim_released([before])

    @named_errors
    def delete_ref(self, name: str) -> bool:
        """Remove ref ``name``. If no other ref keeps its commit, the commit is removed too, with
        every object no remaining commit needs, and its disk space is reclaimed: dropping the last
        ref of a checkpoint is like deleting a file. Returns False if there was no such ref."""
        with self.lock:
            before = self.catalog.delete_ref(name)
            if before is not None:
                self.maintenance.reclaim_released([before])
            return before is not None

    @named_errors
    def refs(self, prefix: str = "") -> dict[str, str]:
        return self.catalog.refs(prefix)

    @named_errors
    def retain(
        self,
        run: str,
        keep: Policy,
        *,
        keep_optimizer: Policy | None = None,
        release_files: bool = False,
        dry_run: bool = False,
    ) -> RetentionReport:
        """Keep the commits of ``run`` that the policy ``keep`` selects (decided from the catalog,
        so every process decides the same) and release the others, unless another ref (``latest``,
        ``best``, a tag, a pointer file, a lease) holds them; commits that survive but that
        ``keep_optimizer`` does not select lose their per-parameter optimizer state.
        ``release_files``: also release the pointer files of dropped commits (deleting the files).
        ``dry_run``: change nothing, say what would go. See :mod:`coral_torch.repository.retain`."""
        return apply_retention(
            self, run, keep, keep_optimizer=keep_optimizer, release_files=release_files, dry_run=dry_run
        )

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
    def log(self, run: str | None = None) -> list[CommitRow]:
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
        disk = disk_bytes(self.path)
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
    def push(self, remote: Any, progress: bool | None = None, *, verify: bool = False) -> dict[str, Any]:
        """Send commits that refs name, the objects they need, then the refs, to an S3 remote
        (:class:`~coral_torch.S3Config` or :class:`~coral_torch.S3Store`). Re-run to resume.
        ``verify=True`` also checks every object of every pushed commit on the remote and sends
        damaged ones again (damage done on the server after an earlier push)."""
        from .remote import push

        return push(self, remote, progress=progress, verify=verify)

    @named_errors
    def pull(self, remote: Any, progress: bool | None = None) -> dict[str, Any]:
        """Fetch every commit the remote has and this repository lacks, with its objects and refs."""
        from .remote import pull

        return pull(self, remote, progress=progress)
