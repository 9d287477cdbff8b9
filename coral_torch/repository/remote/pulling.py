"""Pull: every remote commit this repository lacks, the objects they need (into one new pack,
written by :class:`~coral_torch.repository.packs.PackWriter`), then the refs (see
:mod:`coral_torch.repository.remote` for what is verified)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from ...errors import (
    CheckpointDamagedError,
    CorruptObjectError,
    IntegrityError,
    InvalidRefNameError,
    RemoteRepositoryNotFoundError,
    SyncIncompleteError,
)
from ...format import codec
from ...format.documents import document_md5
from ...format.objects import DELTAS, WEIGHTS
from ...format.refnames import validate_ref_name
from ...storage.hdf5_store import PreparedObject
from ...storage.s3 import sync as engine
from ...storage.s3.client import RemoteEntry, S3Client
from ...storage.s3.endpoints import S3ObjectSource
from ...storage.s3.objects import S3Objects, check_key
from ..catalog import NewCommit, ObjectRow
from ..packs import PACKS_DIR, PackWriter, WrittenPack
from .protocol import (
    COMMITS,
    REFS,
    RemoteLike,
    check_commit_doc,
    check_ref_doc,
    is_commit_id,
    json_names,
    listed_documents,
    open_remote,
    ref_doc,
    refused,
)
from .pushing import Repository

log = logging.getLogger(__name__)

#: download passes a pull makes at most: each one fetches the delta bases the one before revealed
MAX_PASSES = 64

__all__ = ["pull", "require_remote_repository", "PackSink"]


class PackSink:
    """The sync engine's sink for a pull: what the repository already holds (less ``replace``:
    objects in damaged packs, fetched again), and one new pack the new objects go into (created on
    the first write, published by :meth:`publish`), with the catalog rows they need."""

    concurrent = False

    def __init__(self, repo: Repository, replace: Iterable[str] = ()):
        self.repo_path = repo.path
        self.where = str(repo.path / PACKS_DIR)
        skip = set(replace)
        known = [r for r in repo.catalog.all_objects() if r.hash not in skip]
        self._full = {r.hash for r in known if r.kind == "full"}
        self._delta = {r.hash for r in known if r.kind == "delta"}
        self.writer: PackWriter | None = None
        self.pack: WrittenPack | None = None
        self.rows: list[ObjectRow] = []

    def present(self) -> dict[str, dict[str, None]]:
        full = self._full | {r.hash for r in self.rows if r.kind == "full"}
        delta = self._delta | {r.hash for r in self.rows if r.kind == "delta"}
        return {WEIGHTS: dict.fromkeys(full), DELTAS: dict.fromkeys(delta)}

    def accept(self, group: str, key: str) -> None:
        check_key(key)

    def check(self, group: str, key: str, entry: Any) -> str | None:
        return None

    def write(self, obj: PreparedObject) -> int:
        if self.writer is None:
            self.writer = PackWriter(self.repo_path, codec_level=codec.DEFAULT_LEVEL)
        offset, length = self.writer.write(obj) or (None, None)
        a, name = obj.attrs, self.writer.name
        if obj.group == WEIGHTS:
            shape = tuple(int(x) for x in a["shape"])
            self.rows.append(
                ObjectRow(
                    obj.key,
                    name,
                    "full",
                    None,
                    0,
                    str(a["dtype"]),
                    shape,
                    obj.logical_bytes,
                    obj.stored_bytes,
                    obj.stored_bytes,
                    True,
                    offset,
                    length,
                )
            )
        else:
            shape = tuple(int(x) for x in a["original_shape"])
            self.rows.append(
                ObjectRow(
                    obj.key,
                    name,
                    "delta",
                    str(a["reference_hash"]),
                    -1,
                    str(a["original_dtype"]),
                    shape,
                    obj.logical_bytes,
                    obj.stored_bytes,
                    obj.logical_bytes,
                    bool(a.get("lossless", True)),
                    offset,
                    length,
                )
            )
        return 0

    def flush(self) -> None:
        if self.writer is not None and self.pack is None:
            self.writer.store.flush()

    @property
    def touched(self) -> bool:
        return self.writer is not None

    def publish(self) -> WrittenPack | None:
        """Close, fsync and rename the pack into ``packs/``; None if nothing was written."""
        if self.pack is None and self.writer is not None:
            self.pack = self.writer.finish()
        return self.pack

    def discard(self) -> None:
        """Remove what this sink wrote (the temporary or the published, uncatalogued pack)."""
        if self.writer is not None:
            self.writer.abort()
        self.writer = None
        self.pack = None
        self.rows = []


def require_remote_repository(store: Any) -> None:
    """Check, with one cheap listing (a few where it fails), that ``store``'s prefix (an
    :class:`~coral_torch.storage.s3.store.S3Store` or its client) holds a pushed repository, so that
    a pull of a mistyped or empty prefix fails before anything is created or written locally. A
    prefix whose first push has sent objects but no commit yet counts as one.

    Raises:
        RemoteRepositoryNotFoundError: nothing under the prefix, or nothing a push writes.
        RemoteError and subclasses: the listing failed (missing bucket, credentials, network).
    """
    if store.has_any(COMMITS) or store.has_any("metadata/"):
        return
    if not store.has_any(""):
        raise RemoteRepositoryNotFoundError(
            f"there is nothing at {store.url}: no coral-torch repository to pull there; check the bucket and "
            "prefix (`coral-torch push` to it creates one)"
        )
    raise RemoteRepositoryNotFoundError(
        f"{store.url} holds no coral-torch repository (no commits or objects that a push writes); check the "
        "prefix, or push to it from the repository that has the commits"
    )


def download_objects(
    objects: S3Objects,
    sink: PackSink,
    progress: bool | None,
    only: set[str] | None = None,
    *,
    listing: tuple[list[str], list[str]] | None = None,
    decode: bool = True,
) -> dict[str, Any]:
    """Download the remote's objects the sink lacks (``only``: among these keys; ``listing``: the
    remote's object keys, listed a moment ago; ``decode``: check weights' content hashes here,
    see :class:`S3ObjectSource`)."""
    client = objects.client
    return engine.sync(
        S3ObjectSource(objects, only, listing, decode=decode),
        sink,
        verb="downloaded",
        max_concurrency=client.transfer.max_concurrency,
        progress=progress if progress is not None else client.config.progress,
        desc=f"pull {client.url}",
        read_ahead_bytes=client.transfer.read_ahead_bytes,
    )


def pull(
    repo: Repository, remote: RemoteLike, progress: bool | None = None, *, with_objects: bool = True
) -> dict[str, Any]:
    """Fetch every remote commit this repository lacks, the objects they need, and the refs.

    ``with_objects=False`` fetches commits and refs only: for a cache that fetches objects when they are
    read (:func:`fetch_objects`); the repository then lists commits whose objects are elsewhere.

    Every document is verified before anything is stored: ref documents (checksum, name), commit
    documents (checksum, id = hash of the manifest, object list, run name), object metadata and
    payloads. Objects this repository holds in a pack that is missing or changed size are fetched
    again and replace the damaged copies.

    Returns stats: ``objects_downloaded``, ``objects_skipped``, ``objects_replaced`` (damaged local
    copies replaced), ``commits_downloaded``, ``refs``, ``bytes_transferred``, ``seconds``.

    Raises:
        RemoteRepositoryNotFoundError: the prefix holds no pushed repository (nothing was written).
        CorruptObjectError: a ref or commit document on the remote is damaged (nothing was pulled).
        InvalidRefNameError: the remote holds a ref or run name that is not valid (nothing was pulled).
        SyncIncompleteError: some objects were not downloaded (no commit or ref was pulled; the
            objects that did arrive, verified, are kept for the next try).
        RemoteError and subclasses: the remote refused or failed.
    """
    client, objects, owned = open_remote(remote)
    t0 = time.monotonic()
    try:
        require_remote_repository(client)  # before the lock file or anything else is written
        with repo.lock:
            return _pull_locked(repo, client, objects, progress, t0, with_objects)
    finally:
        if owned:
            client.close()


def _pull_locked(
    repo: Repository, client: S3Client, objects: S3Objects, progress: bool | None, t0: float, with_objects: bool
) -> dict[str, Any]:
    local_refs = {n: (c, u) for n, c, u in repo.catalog.ref_rows()}
    # refs first: a push writes a ref only after its commit document, so every commit a ref listed
    # now names is in the commit listing made after it
    listed_refs = json_names(client.list_entries(REFS))
    for name in listed_refs:
        try:
            validate_ref_name(name)
        except InvalidRefNameError as exc:
            raise InvalidRefNameError(
                f"pull from {client.url} refused: the remote holds a ref that cannot be pulled ({exc}). "
                f"Nothing was pulled; delete refs/{name}.json from the remote"
            ) from None

    def same_as_local(name: str, entry: RemoteEntry) -> bool:
        mine = local_refs.get(name)
        return mine is not None and entry.etag == document_md5(ref_doc(name, *mine))

    have = set(repo.catalog.commit_ids())
    docs = []
    try:
        remote_refs = {
            name: check_ref_doc(doc, name, client.url)
            for name, doc in listed_documents(client, REFS, same_as_local).items()
        }
        fetched = listed_documents(client, COMMITS, lambda cid, _e: cid in have)
        for cid, doc in fetched.items():
            if not is_commit_id(cid):
                raise CorruptObjectError(f"commits/{cid}.json is not named by a commit id", hash_key=cid)
            docs.append((doc, check_commit_doc(doc, cid, client.url)))
    except (CorruptObjectError, InvalidRefNameError) as exc:
        if str(exc).startswith("pull from "):
            raise
        raise refused(client.url, exc) from None
    known = have | set(fetched)
    orphans = {n: c for n, (c, _) in remote_refs.items() if c not in known}
    if orphans:
        name, cid = next(iter(orphans.items()))
        raise CorruptObjectError(
            f"pull from {client.url} refused: ref {name} names commit {cid}, which the remote does not have "
            f"({len(orphans)} such ref(s)); nothing was pulled. Push again from the repository that made it",
            hash_key=cid,
        )
    # Insert oldest first: the catalog's insertion order is what `log()` lists and what
    # `resolve("latest")` picks, so it must follow the commits' own times, not key order.
    docs.sort(key=lambda d: (float(d[0].get("time") or 0.0), d[0]["id"]))
    if not with_objects:
        _commit_pull(repo, None, [], docs, remote_refs, set(), require_objects=False)
        return {"commits_downloaded": len(docs), "refs": len(listed_refs), "seconds": time.monotonic() - t0}
    replace, bad_packs = _damaged_local_objects(repo)
    if replace:
        log.warning(
            "%d object(s) of %s are in missing or damaged packs: fetching them again from %s",
            len(replace),
            repo.path,
            client.url,
        )
    sink = PackSink(repo, replace)
    try:
        try:
            # only what the pulled commits need (and damaged local copies), not the whole remote;
            # a delta's base is known once its metadata arrived: each pass fetches the next level
            wanted = {h for doc, _ in docs for _, h, _ in doc["objects"]} | replace
            obj_stats = download_objects(objects, sink, progress, wanted)
            for _ in range(MAX_PASSES):
                missing = _missing_objects(repo, sink, docs, replace)
                if not missing:
                    break
                more = download_objects(objects, sink, progress, missing)
                for k in ("downloaded", "deltas_downloaded", "bytes_transferred", "skipped"):
                    obj_stats[k] += more[k]
                if not more["downloaded"] + more["deltas_downloaded"]:
                    log.warning(
                        "%d object(s) the pulled commits need are not in the listing of %s (first: %s)",
                        len(missing),
                        client.url,
                        next(iter(missing)),
                    )
                    break
        except SyncIncompleteError as exc:
            raise _pull_stopped(repo, client.url, sink, exc) from None
        pack = sink.publish()
        _commit_pull(repo, pack, sink.rows, docs, remote_refs, replace)
    except BaseException:
        _abandon(repo, sink)
        raise
    if bad_packs:
        _drop_emptied_packs(repo, bad_packs)
    left = replace - {r.hash for r in sink.rows}
    if left:
        log.warning(
            "%d damaged object(s) of %s are not on %s either; `coral-torch verify` lists the commits they break",
            len(left),
            repo.path,
            client.url,
        )
    stats = {
        "objects_downloaded": obj_stats["downloaded"] + obj_stats["deltas_downloaded"],
        "objects_skipped": obj_stats["skipped"],
        "objects_replaced": len(replace) - len(left),
        "commits_downloaded": len(docs),
        "refs": len(listed_refs),
        "bytes_transferred": obj_stats["bytes_transferred"],
        "seconds": time.monotonic() - t0,
    }
    log.info("pulled %s into %s: %s", client.url, repo.path, stats)
    return stats


def fetch_objects(repo: Repository, remote: RemoteLike, hashes: Iterable[str], progress: bool | None = None) -> int:
    """Download the objects ``hashes`` (and the delta bases they are rebuilt from) that the
    repository lacks, verified, into one new pack; returns how many arrived. For a repository that
    lists commits whose objects are on the remote (``pull(..., with_objects=False)``).

    Raises:
        CheckpointDamagedError: some of them are not on the remote either.
        SyncIncompleteError, RemoteError: the transfer failed (what arrived, verified, is kept).
    """
    client, objects, owned = open_remote(remote)
    try:
        with repo.lock:
            known = {r.hash: r for r in repo.catalog.all_objects()}
            sink = PackSink(repo)
            wanted = {h for h in hashes if h not in known}
            try:
                for _ in range(MAX_PASSES):  # each pass: the objects, then the delta bases they revealed
                    if not wanted:
                        break
                    download_objects(objects, sink, progress, wanted)
                    lacking = wanted - {r.hash for r in sink.rows}
                    if lacking:  # a listing damaged on the way can hide objects: list once more
                        download_objects(objects, sink, progress, lacking)
                        lacking -= {r.hash for r in sink.rows}
                    if lacking:
                        raise CheckpointDamagedError(
                            f"{len(lacking)} object(s) are on neither this cache nor {client.url} (first: "
                            f"{next(iter(lacking))}): the checkpoint cannot be restored from there",
                            commit="",
                            tensors=sorted(lacking)[:10],
                        )
                    got = {r.hash for r in sink.rows}
                    wanted = {r.base for r in sink.rows if r.kind == "delta" and r.base} - got - set(known)
            except BaseException:
                _abandon(repo, sink)
                raise
            return _keep_downloaded(repo, sink)
    finally:
        if owned:
            client.close()


def _damaged_local_objects(repo: Repository) -> tuple[set[str], set[str]]:
    """(objects, packs): packs that are missing or changed size since they were written, and the
    objects in them. A pull fetches those objects again."""
    bad = set()
    for name, size in repo.catalog.packs().items():
        try:
            actual = (repo.path / PACKS_DIR / name).stat().st_size
        except FileNotFoundError:
            bad.add(name)
            continue
        if size is not None and actual != size:
            bad.add(name)
    if not bad:
        return set(), set()
    return {r.hash for r in repo.catalog.all_objects() if r.pack in bad}, bad


def _drop_emptied_packs(repo: Repository, packs: set[str]) -> None:
    """Forget damaged packs whose objects were all replaced (and remove their files)."""
    empty = repo.catalog.drop_empty_packs(packs)
    for p in empty:
        (repo.path / PACKS_DIR / p).unlink(missing_ok=True)
    if empty:
        log.info("removed %d damaged pack(s) of %s whose objects were all fetched again", len(empty), repo.path)


def _missing_objects(repo: Repository, sink: PackSink, docs: list[tuple[dict, str]], replace: set[str]) -> set[str]:
    """Objects the pulled commits (or their delta bases) need that neither side has here."""
    rows = {r.hash: r for r in repo.catalog.all_objects() if r.hash not in replace}
    rows.update((r.hash, r) for r in sink.rows)
    missing: set[str] = set()
    seen: set[str] = set()
    for doc, _ in docs:
        for _, h, _ in doc["objects"]:
            while h is not None and h not in seen:
                seen.add(h)
                r = rows.get(h)
                if r is None:
                    missing.add(h)
                    break
                h = r.base if r.kind == "delta" else None
    return missing


def _abandon(repo: Repository, sink: PackSink) -> None:
    """A pull failed after its objects sync (or was interrupted): keep the verified objects it wrote
    in the catalog, so the next pull does not fetch them again; if that fails, remove the pack."""
    if not sink.rows and not sink.touched:
        return
    try:
        if _keep_downloaded(repo, sink):
            return
    except Exception:  # noqa: BLE001 - best effort: the pull fails either way
        log.warning("could not keep the objects the failed pull wrote; removing its pack", exc_info=True)
    sink.discard()


def _pull_stopped(repo: Repository, url: str, sink: PackSink, exc: SyncIncompleteError) -> SyncIncompleteError:
    """A pull's object sync stopped part-way (connection lost, or damaged objects on the remote).

    No commit or ref changes. The objects that did arrive (each verified) are kept in the catalog,
    not named by any commit yet, so that running the pull again does not download them again;
    returns the error to raise, saying so."""
    kept = 0
    try:
        kept = _keep_downloaded(repo, sink)
    except Exception:  # noqa: BLE001 - best effort: the pull fails either way
        log.warning("could not keep the objects of the interrupted pull", exc_info=True)
        sink.discard()
    first_key, first = next(iter(exc.failures.items()), ("?", exc))
    damaged = [k for k, e in exc.failures.items() if isinstance(e, IntegrityError)]
    if damaged and len(damaged) == len(exc.failures):
        msg = (
            f"pull from {url} into {repo.path} refused: {len(damaged)} object(s) arrived damaged, "
            f"every read of them (first: {first_key}: {first}). No commit or ref was pulled. Run the pull "
            "again; if they stay damaged, they are damaged on the remote: repair it from an intact copy "
            "(push again with verification from a repository that holds them, or delete the damaged "
            "objects' metadata/<hash>[.delta].json there and push again)"
        )
    else:
        msg = (
            f"pull from {url} into {repo.path} stopped: {len(exc.failures)} object(s) not downloaded "
            f"(first: {first_key}: {first}). No commit or ref was pulled yet; run the pull again to "
            "finish it (objects already downloaded are not downloaded again)"
        )
    if kept:
        msg += f". Kept {kept} verified object(s) that did arrive"
    return SyncIncompleteError(msg, stats=exc.stats, failures=exc.failures)


def _keep_downloaded(repo: Repository, sink: PackSink) -> int:
    """Catalog the objects a stopped pull wrote (caller holds the lock); returns how many. A delta
    whose base is on neither side is left out (the next pull fetches it again). The sink is done
    with afterwards (its pack is published, or removed when nothing in it is kept)."""
    if not sink.rows:
        sink.discard()
        return 0
    pack = sink.publish()
    assert pack is not None
    cat = repo.catalog
    known = {r.hash: r for r in cat.all_objects()}
    new = {r.hash: r for r in sink.rows}

    def depth(h: str, seen: int = 0) -> int | None:
        r = new.get(h)
        if r is None:
            k = known.get(h)
            if k is None:
                return None
            return k.depth if k.kind == "delta" else 0
        if r.kind == "full":
            return 0
        if r.depth >= 0:
            return r.depth
        if seen > 10_000:
            return None
        d = depth(r.base or "", seen + 1)
        if d is None:
            return None
        r.depth = d + 1
        return r.depth

    rows = [r for r in sink.rows if depth(r.hash) is not None]
    if not rows:
        sink.discard()
        return 0
    cat.add_objects((pack.name, pack.size, time.time()), rows)
    sink.rows = []  # catalogued: no longer the sink's to remove
    sink.writer = None
    sink.pack = None
    return len(rows)


def _commit_pull(
    repo: Repository,
    pack: WrittenPack | None,
    rows: list[ObjectRow],
    docs: list[tuple[dict, str]],
    remote_refs: dict[str, tuple[str, float]],
    replace: set[str],
    *,
    require_objects: bool = True,
) -> None:
    cat = repo.catalog
    known = {r.hash: r for r in cat.all_objects() if r.hash not in replace}
    new = {r.hash: r for r in rows}

    # delta depths, bases first
    def depth(h: str, seen: int = 0) -> int:
        r = new.get(h) or known.get(h)
        if r is None:
            raise CorruptObjectError(
                f"object {h} is needed as a delta base but is neither here nor on the remote: the remote is "
                "incomplete; nothing was pulled. Push again from the repository that made it",
                hash_key=h,
            )
        if r.kind == "full":
            return 0
        if r.depth >= 0:
            return r.depth
        if seen > 10_000:
            raise CorruptObjectError(
                f"the delta chain of object {h} on the remote loops: it is damaged; nothing was pulled", hash_key=h
            )
        r.depth = depth(r.base or "", seen + 1) + 1
        return r.depth

    for r in rows:
        depth(r.hash)
    all_hashes = set(known) | set(new)
    for doc, _ in docs:
        missing = [h for _, h, _ in doc["objects"] if h not in all_hashes] if require_objects else []
        if missing:
            raise CorruptObjectError(
                f"commit {doc['id'][:10]} needs {len(missing)} object(s) the remote does not have (first: "
                f"{missing[0]}): the remote is incomplete; nothing was pulled. Push again from its source",
                hash_key=missing[0],
            )
    now = time.time()
    commits = [
        (
            NewCommit(
                doc["id"],
                doc.get("parent"),
                doc["run"],
                doc.get("epoch"),
                doc.get("step"),
                doc["time"],
                doc.get("message", ""),
                doc.get("metrics", {}),
                manifest_json,
                bool(doc.get("lossy", 0)),
                doc["logical_bytes"],
                doc["new_bytes"],
                doc.get("info", {}),
            ),
            [(doc["id"], n, h, how) for n, h, how in doc["objects"]],
        )
        for doc, manifest_json in docs
    ]
    pack_row = (pack.name, pack.size, now) if pack is not None else None
    cat.publish_pulled(pack=pack_row, objects=rows, replace=replace, commits=commits, refs=remote_refs, now=now)
