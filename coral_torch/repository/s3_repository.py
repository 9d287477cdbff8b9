"""A repository at ``s3://bucket/prefix``, worked through a node-local cache repository.

The bucket holds the repository in the layout push and pull use (:mod:`.remote`), so an S3
repository and a local one are interchangeable (``pull`` from it, ``push`` to it). This node keeps a
cache: a plain local repository under :func:`~coral_torch.defaults.default_cache_dir` holding every
commit and ref of the bucket and the objects this node wrote or read, which is what a save
deduplicates and delta-encodes against (see :mod:`.s3_cache`).

A save (:meth:`S3Repository.commit`):

1. reads the run's ``latest`` ref on the bucket with its ETag, and fetches the commits and refs the
   cache lacks;
2. commits into the cache (dedup and deltas against that ``latest``, where the cache holds its
   objects: a node that did not write or read the parent stores its tensors whole, and uploads only
   what the bucket lacks);
3. uploads the objects the bucket lacks (verified, see :mod:`~coral_torch.storage.s3.client`);
4. writes the commit document with ``If-None-Match: *`` and moves the run's refs with
   ``If-Match`` on the ETags read in 1 (:mod:`.remote.publish`).

Two writers racing on one run: exactly one moves ``latest``; the other gets
:class:`~coral_torch.errors.RefConflictError`, and its commit stays on the bucket under
``keep/<id>`` (nothing is lost). Servers that ignore conditional writes are detected and the
narrower guarantee is logged (:func:`~.remote.publish.conditional_writes`).

Reads: :meth:`S3Repository.fetch` brings the cache's commits and refs up to date with the bucket
(verified by pull), never objects. Objects arrive on demand: a read (``load``, a DCP load) goes
through :meth:`S3Repository.materialize`, which fetches from the bucket, verified, the objects it
needs that the cache lacks (and their delta bases), nothing else. :meth:`S3Repository.verify` counts
an object the cache lacks as missing only when the bucket lacks it too.

Sharded saves (:class:`~coral_torch.dcp.CoralStorageWriter`): every rank writes its shards into its
own cache (deduplicated, delta-encoded against the chunks it wrote for the parent commit, whose
tensor list it reads from the bucket) and uploads what the bucket lacks (:meth:`write_shard`); the
coordinator publishes once every object is on the bucket (:meth:`publish_shards`), and the other
ranks read the commit id from ``saves/<token>.json``. Ranks may open the repository while the first
save into an empty prefix uploads: a prefix holding only the keys of the layout is a repository
being created, not something else.

The cache keeps to a byte budget (``cache_bytes``; default ``$CORAL_CACHE_BYTES``, else 20 GiB) by
evicting its least recently used packs: :class:`~.s3_cache.CacheKeeper`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    CheckpointDamagedError,
    RefConflictError,
    RefNotFoundError,
    RemoteRepositoryNotFoundError,
    SyncIncompleteError,
)
from ..format import refnames
from ..format.manifest import Manifest
from ..format.objects import DELTAS, WEIGHTS
from ..format.weight_tensor import WeightTensor
from ..location import S3Location
from ..storage.s3.config import S3Config
from ..storage.s3.store import S3Store
from .catalog import CommitRow
from .commit import CommitStats
from .options import CommitOptions
from .remote import collect_garbage, pull, require_remote_repository
from .remote.protocol import COMMITS, REFS, check_commit_doc, check_ref_doc, get_docs, json_names
from .remote.publish import PROBE_PREFIX, RemoteRef, move_ref, publish_commit, read_ref
from .remote.pulling import PackSink
from .remote.pushing import commit_document, live_closure, object_closure, upload_objects
from .repository import Repository, WrittenObjects
from .rows import commit_object_rows
from .s3_cache import CacheKeeper, cache_budget, cache_path
from .verify import VerifyReport

log = logging.getLogger(__name__)

__all__ = ["S3Repository", "cache_budget"]

#: where a sharded save tells the other ranks its commit id (``saves/<token>.json``)
SAVES = "saves/"
#: a read fetches from the bucket unless the cache was brought up to date this recently (seconds)
FRESH_S = 1.0
#: refs that belong to this node only (pointer files, running processes): never published
_LOCAL_ONLY = (refnames.FILES, refnames.LEASES)
#: the top-level folders of a repository's keys: a prefix holding nothing else is one (perhaps being
#: created: a first save uploads payloads before their metadata, commit and refs)
LAYOUT = (f"{WEIGHTS}/", f"{DELTAS}/", "metadata/", COMMITS, REFS, SAVES, PROBE_PREFIX)


class S3Repository(Repository):
    """A :class:`Repository` whose truth is an S3 prefix (see the module docstring).

    Args:
        location: where it is (from :func:`~.location.parse_location`).
        config: the :class:`S3Config` to reach it (endpoint, credentials, transfer knobs); by default
            one for ``location`` with the standard AWS environment (``AWS_ENDPOINT_URL``, the
            credential chain).
        cache_dir: this node's cache directory (default under ``$CORAL_CACHE_DIR``).
        create: start a new repository if the prefix is empty.
        cache_bytes: the cache's byte budget (see :func:`cache_budget`; default ``$CORAL_CACHE_BYTES``,
            else 20 GiB) and :meth:`evict`.

    Processes that share a cache directory (the ranks of a node do unless each has its own
    ``$CORAL_CACHE_DIR``) share its budget safely (publishes hold the repository lock too, see
    :mod:`.s3_cache`); every operation records what it uses before it reads or uploads it, so the
    others' evictions take it last. Should one still take it meanwhile (a budget below the working
    set of the processes), nothing wrong is read or published: a read fetches the objects again
    (once), a save that relied on them plans again (:class:`~coral_torch.errors.ConcurrentChangeError`),
    and an upload that finds its pack gone fails the save, which a next save makes good.
    """

    def __init__(
        self,
        location: S3Location,
        *,
        config: S3Config | None = None,
        cache_dir: str | os.PathLike | None = None,
        create: bool = True,
        cache_bytes: int | str | None = None,
        **kwargs: Any,
    ):
        budget = cache_budget(cache_bytes)  # refused before anything is written
        self.location_s3 = location
        self.remote_config = config or S3Config(bucket=location.bucket, prefix=location.prefix)
        # before anything is written locally: the bucket answers, and the prefix is empty or a repository
        self.store = S3Store(self.remote_config)
        try:
            self._has_repository = _remote_state(self.store, location)
            if not self._has_repository and not create:
                raise RemoteRepositoryNotFoundError(
                    f"there is no coral-torch repository at {location.url}: check the bucket and prefix "
                    "(a save to it creates one)"
                )
            endpoint = self.store.client.endpoint
            path = Path(cache_dir) if cache_dir is not None else cache_path(location, endpoint)
            super().__init__(path, create=True, **kwargs)
        except BaseException:
            self.store.close()
            raise
        self._sync_lock = threading.Lock()
        self._fetched_at = -1.0
        self._local = threading.local()  # .committing: reads inside a commit use the cache as fetched
        self.last_publish: dict[str, Any] = {}
        self._heads: dict[str, RemoteRef] = {}  # run -> its latest ref as read when a sharded save was planned
        #: the cache's budget, its record of use, and the objects it fetches from the bucket
        self.cache = CacheKeeper(
            self.path,
            self.catalog,
            self.reader,
            self.lock,
            self.store,
            budget,
            sink=lambda: PackSink(self),
            writable=self.writable,
        )
        self.cache.recover()  # an eviction was interrupted: remove the files it left

    @property
    def location(self) -> S3Location:
        return self.location_s3

    def __repr__(self) -> str:
        return f"S3Repository({self.location_s3.url!r}, cache={str(self.path)!r})"

    # ------------------------------------------------------------------------------ reads
    def fetch(self) -> dict[str, Any]:
        """Bring the cache's commits and refs up to date with the bucket (verified), then keep it to
        its budget (:meth:`evict`). No object is fetched here: a read fetches those it needs that
        the cache lacks (:meth:`materialize`)."""
        with self._sync_lock:
            if not self._has_repository:
                self._has_repository = _remote_state(self.store, self.location_s3)
                if not self._has_repository:
                    return {}
            stats = pull(self, self.store, progress=False, with_objects=False)
            self._align_refs()
            self._fetched_at = time.monotonic()
        self._keep_budget()
        return stats

    def _align_refs(self) -> None:
        """The cache's shared refs become the bucket's: the bucket is the truth (a pull alone keeps
        whichever value of a ref is newer, which after a lost race can be this node's own commit)."""
        client = self.store.client
        names = list(json_names(client.list_entries(REFS)))
        remote: dict[str, str] = {}
        for key, got in get_docs(client, [f"{REFS}{n}.json" for n in names]).items():
            name = key[len(REFS) : -len(".json")]
            if isinstance(got, dict):
                remote[name] = check_ref_doc(got, name, client.url)[0]
        local = {n: c for n, c in Repository.refs(self).items() if not n.startswith(_LOCAL_ONLY)}
        add = [(n, c) for n, c in remote.items() if local.get(n) != c]
        drop = [n for n in local if n not in remote]
        if add or drop:
            self.catalog.update_refs(add=add, drop=drop, now=time.time())

    def _fresh(self) -> None:
        """Fetch unless this thread is committing or fetched within the last :data:`FRESH_S` seconds."""
        if not getattr(self._local, "committing", False) and time.monotonic() - self._fetched_at > FRESH_S:
            self.fetch()

    def resolve(self, ref: str) -> str:
        self._fresh()
        try:
            return super().resolve(ref)
        except RefNotFoundError:
            if getattr(self._local, "committing", False):
                raise
            self.fetch()  # published by another node since the cache was brought up to date
            return super().resolve(ref)

    def load(self, ref: str, *, map_location: Any = None, weights_only: bool = True) -> Any:
        self.fetch()
        return super().load(ref, map_location=map_location, weights_only=weights_only)

    def log(self, run: str | None = None) -> list[CommitRow]:
        self.fetch()
        return super().log(run)

    def refs(self, prefix: str = "") -> dict[str, str]:
        self.fetch()
        return super().refs(prefix)

    def get_commit(self, ref: str) -> CommitRow:
        self.fetch()
        return super().get_commit(ref)

    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Verify the cache (see :meth:`Repository.verify`) after a fetch (which verifies every
        document it fetches). Objects the cache lacks (never read here, or evicted) must be on the
        bucket, where loads fetch them from: only those that are not count as missing."""
        self.fetch()
        report = super().verify(progress=progress)
        away = self.cache.only_on_bucket(report)
        if away:
            log.info("%d commit(s) have objects only on %s (not in the cache)", away, self.store.client.url)
        return report

    def prefetch(self, hashes: Sequence[str], nbytes: int) -> None:
        """Fetch the objects a load will read in one download (one listing, one pass for the objects
        and one per level of their delta bases) rather than one per batch of reads, unless they would
        take more than half the cache's budget (the reads then fetch batch by batch)."""
        if nbytes <= self.cache.budget // 2:
            self.cache.restore(list(hashes))

    def materialize(
        self, hashes: Sequence[str], *, commit: str | None = None, names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`Repository.materialize`, after fetching from the bucket (verified) the objects the
        cache lacks (never fetched, or evicted: see :meth:`evict`) and their delta bases, nothing
        else; what it reads is recorded as used, and kept."""
        hashes = list(hashes)
        for attempt in range(2):
            self.cache.restore(hashes)
            self.cache.use(commits=[commit] if commit is not None else (), packs=self.cache.packs_of(hashes))
            self._keep_budget(hashes)
            try:
                return super().materialize(hashes, commit=commit, names=names)
            except CheckpointDamagedError:
                if attempt or not self.cache.lacking(hashes):
                    raise
                log.warning(
                    "objects being read were evicted from %s by another process: fetching them again", self.path
                )
        raise AssertionError("unreachable")

    def gc(
        self, *, dry_run: bool = False, repack_threshold: float = 0.3, orphan_grace_s: float = 3600.0
    ) -> dict[str, Any]:
        """Delete from the bucket the commits no ref names and the objects only they need, older than
        ``orphan_grace_s`` (saves in flight upload objects before their commit and ref; see
        :func:`~.remote.collect.collect_garbage`). Run it while no save writes to the bucket."""
        stats = collect_garbage(self.store.client, dry_run=dry_run, grace_s=orphan_grace_s)
        stats["bucket"] = self.location_s3.url
        return stats

    # ------------------------------------------------------------------------------ writes
    def commit(
        self,
        obj: Any,
        options: CommitOptions | None = None,
        *,
        no_delta_prefixes: Sequence[str] = (),
        workers: int | None = None,
        help_board: Any = None,
        direct_io: bool = False,
        **option_kwargs: Any,
    ) -> CommitStats:
        """Commit into the cache, then publish on the bucket (see the module docstring)."""
        opts = CommitOptions.build(options, **option_kwargs)
        client = self.store.client
        latest = refnames.latest_ref(opts.run)
        expected = read_ref(client, latest, damaged_ok=True)
        self.fetch()
        if opts.parent is None and expected.commit is not None and opts.head:
            opts = opts.replace(parent=expected.commit)
        before = self._published_refs()
        self._local.committing = True
        try:
            stats = super().commit(
                obj,
                opts,
                no_delta_prefixes=no_delta_prefixes,
                workers=workers,
                help_board=help_board,
                direct_io=direct_io,
            )
            self.cache.use(commits=[stats.commit_id])
            self._publish(stats.commit_id, latest if opts.head else None, expected, before)
        finally:
            self._local.committing = False
        self._keep_budget([h for _, h, _ in self.catalog.commit_objects(stats.commit_id)])
        return stats

    def _forget_unpublished(self, cid: str) -> None:
        """A save whose commit never reached the bucket: drop it from the cache too (the bucket is
        the truth), so that this node's ``latest`` and ``log`` do not show a commit no other node
        has; the refs come back to the bucket's with the next :meth:`fetch`."""
        try:
            for name, target in Repository.refs(self).items():
                if target == cid:
                    Repository.delete_ref(self, name)  # (the commit goes with its last ref)
        except Exception:  # noqa: BLE001 - best effort: the caller needs the original error
            log.warning("could not drop the unpublished commit %s from %s", cid[:10], self.path, exc_info=True)
            return
        try:
            self._align_refs()
        except Exception as exc:  # noqa: BLE001 - the bucket may be what failed; the next fetch aligns
            log.debug("refs of %s not aligned with the bucket after a failed save: %s", self.path, exc)

    def _published_refs(self) -> dict[str, str]:
        """What the bucket's refs should be, from the cache's: node-local refs (pointer files,
        leases) become ``keep/<id>`` so the bucket keeps those commits."""
        out: dict[str, str] = {}
        for name, cid in Repository.refs(self).items():
            if name.startswith(_LOCAL_ONLY):
                out[refnames.keep_ref(cid)] = cid
            else:
                out[name] = cid
        return out

    def _publish(self, cid: str, latest: str | None, expected: RemoteRef, before: dict[str, str]) -> None:
        client = self.store.client
        try:
            _, needed = live_closure(self, {cid})
            obj_stats = upload_objects(self, self.store.objects, needed, True, progress=None)
            doc = commit_document(self, cid)
            if doc is not None:  # None: released at once by the run's own retention, only refs change
                publish_commit(client, cid, doc)
        except BaseException:
            self._forget_unpublished(cid)
            raise
        after = self._published_refs()
        moved = 0
        if doc is not None and latest is not None and after.get(latest) == cid:
            try:
                move_ref(client, latest, cid, expected=expected, updated=time.time())
                moved += 1
            except RefConflictError:
                keep = refnames.keep_ref(cid)
                move_ref(client, keep, cid, expected=read_ref(client, keep, damaged_ok=True), updated=time.time())
                log.warning("commit %s of %s is kept on %s as %s", cid[:10], latest, client.url, keep)
                raise
        for name, target in sorted(after.items()):
            if name == latest or before.get(name) == target:
                continue
            try:  # best, tags, keep refs: another writer moving one first keeps theirs
                move_ref(client, name, target, expected=read_ref(client, name, damaged_ok=True), updated=time.time())
                moved += 1
            except RefConflictError as exc:
                log.warning("%s", exc)
        for name in sorted(set(before) - set(after)):
            client.delete(client.document_key(f"{REFS}{name}.json"))
        self.last_publish = {
            "commit": cid,
            "objects_uploaded": obj_stats["uploaded"] + obj_stats["deltas_uploaded"],
            "objects_skipped": obj_stats["skipped"],
            "bytes_uploaded": obj_stats["bytes_transferred"],
            "refs_moved": moved,
        }
        log.info("published %s on %s: %s", cid[:10], client.url, self.last_publish)

    # ------------------------------------------------------------------------------ sharded saves
    def run_head(self, run: str) -> str | None:
        """The bucket's ``runs/<run>/latest`` (remembered, with its ETag, for :meth:`publish_shards`)."""
        ref = read_ref(self.store.client, refnames.latest_ref(run), damaged_ok=True)
        self._heads[run] = ref
        return ref.commit

    def tensor_index(self, cid: str) -> dict[str, tuple[str, str, tuple]]:
        """A commit's tensors, from the cache, else from its document on the bucket (a rank's cache
        holds the chunks it wrote, not the commits the coordinator published)."""
        if self.catalog.get_commit(cid) is not None:
            return super().tensor_index(cid)
        doc = self.store.client.get_document(self.store.client.document_key(f"{COMMITS}{cid}.json"))
        if doc is None:
            return {}
        manifest = Manifest.parse(check_commit_doc(doc, cid, self.store.client.url), cid)
        return {e.name: (e.hash, e.dtype, tuple(e.shape)) for e in manifest.tensors}

    def write_shard(self, tensors: Sequence[tuple[str, WeightTensor]], *, parent: str | None) -> WrittenObjects:
        """Write this rank's new objects into its cache (recorded there: the next save deduplicates
        and delta-encodes against them) and upload every object of its shards the bucket lacks."""
        written = self.write_objects(tensors, parent=parent)
        for pack in written.packs:
            rows = [r for r in written.rows if r.pack == pack.name]
            self.catalog.add_objects((pack.name, pack.size, time.time()), rows)
        hashes = {w.compute_hash() for _, w in tensors}
        needed = object_closure(self, hashes)
        self.cache.use(packs=self.cache.packs_of(needed))
        stats = upload_objects(self, self.store.objects, needed, False, progress=None)
        self.last_publish = {
            "objects_uploaded": stats["uploaded"] + stats["deltas_uploaded"],
            "objects_skipped": stats["skipped"],
            "bytes_uploaded": stats["bytes_transferred"],
        }
        self._keep_budget(needed)
        return written

    def publish_shards(
        self, manifest: Manifest, written: Sequence[WrittenObjects], options: CommitOptions, *, save_token: str
    ) -> CommitStats:
        """Publish a sharded save on the bucket once every object it needs is there: the commit
        document (``If-None-Match``), the run's ``latest`` (``If-Match`` on the ETag read when the
        save was planned), its ``keep``/tag refs, and ``saves/<token>.json`` for the other ranks."""
        client = self.store.client
        cid = manifest.commit_id()
        present = self.store.objects.present()
        there = set(present.get(WEIGHTS, {})) | set(present.get(DELTAS, {}))
        lacking = sorted({e.hash for e in manifest.tensors} - there)
        if lacking:
            raise SyncIncompleteError(
                f"sharded save to {client.url} not published: {len(lacking)} object(s) of its shards are not "
                f"on the bucket (first: {lacking[:1]}); a rank's upload failed, save again",
                failures={h: "missing on the bucket" for h in lacking[:20]},
                stats={},
            )
        rows = [r for w in written for r in w.rows]
        hows = {h: how for w in written for h, how in w.hows.items()}
        pairs = [(e.name, e.hash) for e in manifest.tensors]
        objects = sorted(
            [n, h, how] for _, n, h, how in commit_object_rows(cid, pairs, lambda n, h: hows.get(h, "dedup"))
        )
        new_bytes = sum(r.stored_bytes for r in rows)
        doc = {
            "kind": "commit",
            "id": cid,
            "parent": options.parent,
            "run": options.run,
            "epoch": options.epoch,
            "step": options.step,
            "time": time.time(),
            "message": options.message,
            "metrics": dict(options.metrics),
            "manifest": json.loads(manifest.to_json()),
            "lossy": False,
            "logical_bytes": manifest.nbytes,
            "new_bytes": new_bytes,
            "info": dict(options.info),
            "objects": objects,
        }
        publish_commit(client, cid, doc)
        refs = [refnames.keep_ref(cid)] if options.keep is True else []
        for name in options.ref_names():  # a pointer file's ref stays on its node: the bucket keeps the commit
            refs.append(refnames.keep_ref(cid) if name.startswith(_LOCAL_ONLY) else name)
        for name in dict.fromkeys(n for n in refs if n != refnames.latest_ref(options.run)):
            move_ref(client, name, cid, expected=read_ref(client, name, damaged_ok=True), updated=time.time())
        if options.head:
            latest = refnames.latest_ref(options.run)
            # compare-and-swap against the head the save was planned on (:meth:`run_head`)
            expected = self._heads.pop(options.run, None) or read_ref(client, latest, damaged_ok=True)
            try:
                move_ref(client, latest, cid, expected=expected, updated=time.time())
            except RefConflictError:
                keep = refnames.keep_ref(cid)
                move_ref(client, keep, cid, expected=read_ref(client, keep, damaged_ok=True), updated=time.time())
                log.warning("sharded commit %s is kept on %s as %s", cid[:10], client.url, keep)
                raise
        client.put_document(client.document_key(f"{SAVES}{save_token}.json"), {"kind": "save", "commit": cid})
        return CommitStats(
            cid,
            manifest.nbytes,
            new_bytes,
            len(manifest.tensors),
            new_full=sum(1 for r in rows if r.kind == "full"),
            new_delta=sum(1 for r in rows if r.kind == "delta"),
            deduplicated=len(manifest.tensors) - len(rows),
        )

    def save_result(self, token: str) -> str | None:
        doc = self.store.client.get_document(self.store.client.document_key(f"{SAVES}{token}.json"))
        commit = doc.get("commit") if isinstance(doc, dict) else None
        return commit if isinstance(commit, str) else None

    # ------------------------------------------------------------------------------ the cache's budget
    @property
    def cache_bytes(self) -> int:
        """The cache's byte budget (see :meth:`evict`); may be set."""
        return self.cache.budget

    @cache_bytes.setter
    def cache_bytes(self, value: int | str | None) -> None:
        self.cache.budget = cache_budget(value)

    def cache_usage(self) -> int:
        """Bytes the cache's ``packs/`` directory takes (every file in it): what the budget counts."""
        return self.cache.usage()

    def evict(self, keep: Collection[str] = ()) -> dict[str, Any] | None:
        """If the cache takes more than its budget (:attr:`cache_bytes`, see :meth:`cache_usage`),
        evict the least recently used packs until it takes at most
        :data:`~.s3_cache.EVICT_TO` of it; returns what was evicted (None: nothing). Never evicted:
        the packs holding ``keep`` (object hashes) and their delta bases, the run heads this node
        used while they fit, objects the bucket lacks (see :meth:`.s3_cache.CacheKeeper.evict`).
        Commits and refs stay: a read fetches their objects again (:meth:`materialize`)."""
        return _logged(self.cache.evict(keep), self.path)

    def _keep_budget(self, keep: Collection[str] = ()) -> None:
        """:meth:`evict` after an operation, which has succeeded whatever the eviction meets."""
        _logged(self.cache.keep_budget(keep), self.path)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.store.close()


def _remote_state(store: S3Store, location: S3Location) -> bool:
    """Whether ``location`` holds a repository (False: empty, or only keys of the layout: a first save
    is uploading into it). Anything else there is an error."""
    try:
        require_remote_repository(store)
        return True
    except RemoteRepositoryNotFoundError:
        # the listing stops at the first key outside the layout
        foreign = next((k for k, _ in store.client.iter_entries("") if not k.startswith(LAYOUT)), None)
        if foreign is None:
            return False
        raise RemoteRepositoryNotFoundError(
            f"{location.url} holds something other than a coral-torch repository ({foreign!r}): use an empty "
            "prefix or one a coral-torch save or push wrote"
        ) from None


def _logged(stats: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    """``stats`` of an eviction from the cache at ``path``, logged (None: there was none)."""
    if stats is not None:
        mb = [stats[k] / 1e6 for k in ("bytes_before", "bytes_after", "budget")]
        msg = "evicted %d pack(s), %d object(s), from the cache %s: %.1f MB -> %.1f MB (budget %.1f MB)"
        log.info(msg, stats["packs"], stats["objects"], path, *mb)
    return stats
