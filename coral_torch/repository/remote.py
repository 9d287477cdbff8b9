"""Repository push/pull to an S3 remote: objects, then commits, then refs.

Remote layout under the S3 prefix (objects as in :mod:`coral_torch.storage.s3_store`)::

    weights/<hash>, deltas/<hash>, metadata/<hash>[.delta].json   content-addressed objects
    commits/<commit id>.json                                      a commit: manifest and metadata
    refs/<ref name>.json                                          {"commit": id, "updated": time}

Ordering makes readers safe: a commit document is written only after every object it needs is on
the remote, and a ref only after its commit document, so no reader ever sees a ref whose objects
are missing. Objects and commits are content-addressed, so two machines pushing to one prefix never
overwrite each other's commits; for a ref both moved, the newer update wins, and the other commit
stays on the remote (``pull`` fetches every commit and keeps the ones no ref names under ``keep/``).
An interrupted push or pull is finished by running it again; nothing already transferred is sent
again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import CoralError, CorruptObjectError, IntegrityError, SyncIncompleteError
from ..storage.hdf5_store import HDF5Store, PreparedObject
from .catalog import ObjectRow

if TYPE_CHECKING:
    from ..storage.s3_store import S3Config, S3Store
    from .repository import Repository

log = logging.getLogger(__name__)

RemoteLike = Union["S3Config", "S3Store"]


def _store(remote: RemoteLike) -> tuple["S3Store", bool]:
    from ..storage.s3_store import S3Config, S3Store

    if isinstance(remote, S3Store):
        return remote, False
    if isinstance(remote, S3Config):
        return S3Store(remote), True
    raise CoralError(f"a remote must be an S3Config or an S3Store, not {type(remote).__name__}")


class _RepositoryObjects:
    """What `S3Store.sync_from_local` needs from a local store, served from a repository's packs
    (only the objects that live commits need)."""

    mode = "r"

    def __init__(self, repo: "Repository", hashes: set[str]):
        self.repo = repo
        self.filepath = repo.path
        rows = [r for r in repo.catalog.all_objects() if r.hash in hashes]
        self._rows = {r.hash: r for r in rows}

    def list_weights(self) -> list[str]:
        return [h for h, r in self._rows.items() if r.kind == "full"]

    def list_deltas(self) -> list[str]:
        return [h for h, r in self._rows.items() if r.kind == "delta"]

    def read_prepared(self, key: str, group: str = "weights") -> Optional[PreparedObject]:
        return self.repo._pack(self._rows[key].pack).read_prepared(key, group)

    def load(self, key: str):
        return self.repo._pack(self._rows[key].pack).load(key)


class _PackWriter:
    """What `S3Store.sync_to_local` needs from a local store: it lists what the repository already
    holds and writes new objects into one new pack."""

    mode = "a"

    def __init__(self, repo: "Repository"):
        self.repo = repo
        known = repo.catalog.all_objects()
        self._full = [r.hash for r in known if r.kind == "full"]
        self._delta = [r.hash for r in known if r.kind == "delta"]
        self.name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.h5"
        self.tmp = repo.path / "packs" / f".tmp-{self.name}"
        self.filepath = self.tmp
        self.store: Optional[HDF5Store] = None
        self.rows: list[ObjectRow] = []

    def list_weights(self) -> list[str]:
        return self._full

    def list_deltas(self) -> list[str]:
        return self._delta

    def write_prepared(self, obj: PreparedObject) -> bool:
        if self.store is None:
            self.store = HDF5Store(self.tmp, mode="x")
        if not self.store.write_prepared(obj):
            return False
        a = obj.attrs
        offset, length = obj.location if obj.location is not None else (None, None)
        if obj.group == "weights":
            shape = tuple(int(x) for x in a["shape"])
            self.rows.append(ObjectRow(obj.key, self.name, "full", None, 0, str(a["dtype"]), shape,
                                       obj.logical_bytes, obj.stored_bytes, obj.stored_bytes, True, offset, length))
        else:
            shape = tuple(int(x) for x in a["original_shape"])
            self.rows.append(ObjectRow(obj.key, self.name, "delta", str(a["reference_hash"]), -1,
                                       str(a["original_dtype"]), shape, obj.logical_bytes, obj.stored_bytes,
                                       obj.logical_bytes, bool(a.get("lossless", True)), offset, length))
        return True

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()


def _live_closure(repo: "Repository", live: Optional[set[str]] = None) -> tuple[set[str], set[str]]:
    """(live commit ids, object hashes they need incl. delta bases)."""
    if live is None:
        live = set(repo.catalog.refs().values())
    rows = {r.hash: r for r in repo.catalog.all_objects()}
    needed: set[str] = set()
    for cid in live:
        for _, h, _ in repo.catalog.commit_objects(cid):
            while h is not None and h not in needed:
                needed.add(h)
                r = rows.get(h)
                h = r.base if r is not None and r.kind == "delta" else None
    return live, needed


def _remote_json_keys(store: "S3Store", sub: str) -> list[str]:
    start = len(store.config.prefix) + len(sub)
    return [o["Key"][start:-len(".json")] for o in store._list(sub) if o["Key"].endswith(".json")]


def _get_doc(store: "S3Store", key: str) -> Optional[dict[str, Any]]:
    return store._get_json(store.config.prefix + key, key, "document")


def _put_doc(store: "S3Store", key: str, doc: dict[str, Any]) -> int:
    return store._put_json(store.config.prefix + key, doc)


def push(repo: "Repository", remote: RemoteLike, progress: Optional[bool] = None) -> dict[str, Any]:
    """Send the commits that refs name, the objects they need, then the refs."""
    store, owned = _store(remote)
    t0 = time.monotonic()
    try:
        # One snapshot of the refs decides everything this push sends: a commit made while it runs
        # (training goes on) must not get a remote ref before its objects and document are there.
        local_refs = {name: (cid, float(updated)) for name, cid, updated in
                      repo.catalog.conn.execute("SELECT name, commit_id, updated FROM refs")}
        live, needed = _live_closure(repo, {cid for cid, _ in local_refs.values()})
        obj_stats = store.sync_from_local(_RepositoryObjects(repo, needed), progress=progress)
        remote_commits = set(_remote_json_keys(store, "commits/"))
        sent_commits = 0
        meta_bytes = 0
        on_remote = live & remote_commits
        for cid in sorted(live - remote_commits):
            row = repo.catalog.get_commit(cid)
            if row is None:  # removed by a concurrent gc: its refs are not sent either
                continue
            doc = {
                "kind": "commit", "id": row.id, "parent": row.parent, "run": row.run, "epoch": row.epoch,
                "step": row.step, "time": row.time, "message": row.message, "metrics": row.metrics,
                "manifest": row.manifest, "lossy": row.lossy, "logical_bytes": row.logical_bytes,
                "new_bytes": row.new_bytes, "info": row.info,
                "objects": [[n, h, how] for n, h, how in repo.catalog.commit_objects(cid)],
            }
            meta_bytes += _put_doc(store, f"commits/{cid}.json", doc)
            on_remote.add(cid)
            sent_commits += 1
        updated_refs, kept_remote = 0, 0
        for name, (cid, updated) in local_refs.items():
            if cid not in on_remote:
                continue
            current = _get_doc(store, f"refs/{name}.json")
            if current is not None and current.get("commit") == cid:
                continue
            if current is not None and float(current.get("updated", 0)) > float(updated):
                kept_remote += 1  # someone pushed a newer value for this ref: keep theirs
                continue
            meta_bytes += _put_doc(store, f"refs/{name}.json", {"kind": "ref", "commit": cid, "updated": float(updated)})
            updated_refs += 1
        stats = {
            "objects_uploaded": obj_stats["uploaded"] + obj_stats["deltas_uploaded"],
            "objects_skipped": obj_stats["skipped"],
            "object_bytes": obj_stats["bytes_transferred"],
            "commits_uploaded": sent_commits,
            "refs_updated": updated_refs,
            "refs_kept_remote": kept_remote,
            "bytes_transferred": obj_stats["bytes_transferred"] + meta_bytes,
            "seconds": time.monotonic() - t0,
        }
        log.info("pushed %s to %s: %s", repo.path, store.url, stats)
        return stats
    finally:
        if owned:
            store.close()


def pull(repo: "Repository", remote: RemoteLike, progress: Optional[bool] = None) -> dict[str, Any]:
    """Fetch every remote commit this repository lacks, the objects they need, and the refs."""
    store, owned = _store(remote)
    t0 = time.monotonic()
    writer = _PackWriter(repo)
    try:
        with repo.lock:
            remote_ids = _remote_json_keys(store, "commits/")
            have = {r[0] for r in repo.catalog.conn.execute("SELECT id FROM commits")}
            docs = []
            for cid in remote_ids:
                if cid in have:
                    continue
                doc = _get_doc(store, f"commits/{cid}.json")
                if doc is None or doc.get("id") != cid:
                    raise CorruptObjectError(f"commit document {cid} at {store.url} is missing or damaged", hash_key=cid)
                manifest_json = json.dumps(doc["manifest"], sort_keys=True, separators=(",", ":"), allow_nan=False)
                import xxhash

                if xxhash.xxh3_128(manifest_json.encode()).hexdigest() != cid:
                    raise CorruptObjectError(
                        f"commit document {cid} at {store.url} does not hash to its id: damaged or forged; "
                        "nothing was pulled", hash_key=cid,
                    )
                docs.append((doc, manifest_json))
            # Insert oldest first: the catalog's insertion order is what `log()` lists and what
            # `resolve("latest")` picks, so it must follow the commits' own times, not key order.
            docs.sort(key=lambda d: (float(d[0].get("time") or 0.0), d[0]["id"]))
            try:
                obj_stats = store.sync_to_local(writer, progress=progress)
            except SyncIncompleteError as exc:
                raise _pull_stopped(repo, store, writer, exc) from None
            pack_name = None
            if writer.store is not None:
                writer.store.close()
                from .repository import _fsync

                _fsync(writer.tmp)
                os.replace(writer.tmp, repo.path / "packs" / writer.name)
                _fsync(repo.path / "packs")
                pack_name = writer.name
            remote_refs = {}
            for name in _remote_json_keys(store, "refs/"):
                d = _get_doc(store, f"refs/{name}.json")
                if d is not None:
                    remote_refs[name] = (str(d["commit"]), float(d.get("updated", 0)))
            _commit_pull(repo, pack_name, writer.rows, docs, remote_refs)
        stats = {
            "objects_downloaded": obj_stats["downloaded"] + obj_stats["deltas_downloaded"],
            "objects_skipped": obj_stats["skipped"],
            "commits_downloaded": len(docs),
            "refs": len(remote_refs),
            "bytes_transferred": obj_stats["bytes_transferred"],
            "seconds": time.monotonic() - t0,
        }
        log.info("pulled %s into %s: %s", store.url, repo.path, stats)
        return stats
    except BaseException:
        if writer.store is not None:
            writer.store.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    finally:
        if owned:
            store.close()


def _pull_stopped(repo: "Repository", store: "S3Store", writer: _PackWriter,
                  exc: SyncIncompleteError) -> SyncIncompleteError:
    """A pull's object sync stopped part-way (connection lost, or damaged objects on the remote).

    No commit or ref changes. The objects that did arrive (each verified) are kept in the catalog,
    not named by any commit yet, so that running the pull again does not download them again;
    returns the error to raise, saying so."""
    kept = 0
    try:
        kept = _keep_downloaded(repo, writer)
    except Exception:  # noqa: BLE001 - best effort: the pull fails either way
        log.warning("could not keep the objects of the interrupted pull", exc_info=True)
    first_key, first = next(iter(exc.failures.items()), ("?", exc))
    damaged = [k for k, e in exc.failures.items() if isinstance(e, IntegrityError)]
    if damaged and len(damaged) == len(exc.failures):
        msg = (f"pull from {store.url} into {repo.path} refused: {len(damaged)} object(s) on the remote are "
               f"damaged (first: {first_key}: {first}). No commit or ref was pulled. Repair the remote from "
               "an intact copy: delete the damaged objects' metadata/<hash>[.delta].json there and push again "
               "from a repository that holds them")
    else:
        msg = (f"pull from {store.url} into {repo.path} stopped: {len(exc.failures)} object(s) not downloaded "
               f"(first: {first_key}: {first}). No commit or ref was pulled yet; run the pull again to "
               "finish it (objects already downloaded are not downloaded again)")
    if kept:
        msg += f". Kept {kept} verified object(s) that did arrive"
    return SyncIncompleteError(msg, stats=exc.stats, failures=exc.failures)


def _keep_downloaded(repo: "Repository", writer: _PackWriter) -> int:
    """Catalog the objects a stopped pull wrote (caller holds the lock); returns how many. A delta
    whose base is on neither side is left out (the next pull fetches it again)."""
    if writer.store is None or not writer.rows:
        return 0
    from .repository import _fsync

    writer.store.close()
    writer.store = None
    packs = repo.path / "packs"
    _fsync(writer.tmp)
    os.replace(writer.tmp, packs / writer.name)
    _fsync(packs)
    cat = repo.catalog
    known = {r.hash: r for r in cat.all_objects()}
    new = {r.hash: r for r in writer.rows}

    def depth(h: str, seen: int = 0) -> Optional[int]:
        if h in known:
            return known[h].depth if known[h].kind == "delta" else 0
        r = new.get(h)
        if r is None or seen > 10_000:
            return None
        if r.kind == "full":
            return 0
        if r.depth >= 0:
            return r.depth
        d = depth(r.base or "", seen + 1)
        if d is None:
            return None
        r.depth = d + 1
        return r.depth

    rows = [r for r in writer.rows if r.hash not in known and depth(r.hash) is not None]
    with cat.transaction() as c:
        c.execute("INSERT INTO packs(name, size, created) VALUES (?,?,?)",
                  (writer.name, (packs / writer.name).stat().st_size, time.time()))
        c.executemany(
            "INSERT OR IGNORE INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [r.values() for r in rows],
        )
    return len(rows)


def _commit_pull(repo: "Repository", pack_name: Optional[str], rows: list[ObjectRow],
                 docs: list[tuple[dict, str]], remote_refs: dict[str, tuple[str, float]]) -> None:
    cat = repo.catalog
    known = {r.hash: r for r in cat.all_objects()}
    new = {r.hash: r for r in rows}
    # delta depths, bases first
    def depth(h: str, seen: int = 0) -> int:
        r = new.get(h) or known.get(h)
        if r is None:
            raise CorruptObjectError(f"object {h} is needed as a delta base but is on neither side", hash_key=h)
        if r.kind == "full":
            return 0
        if r.depth >= 0 and h in known:
            return r.depth
        if seen > 10_000:
            raise CorruptObjectError(f"delta chain of {h} loops", hash_key=h)
        r.depth = depth(r.base, seen + 1) + 1
        return r.depth

    for r in rows:
        depth(r.hash)
    all_hashes = set(known) | set(new)
    for doc, _ in docs:
        missing = [h for _, h, _ in doc["objects"] if h not in all_hashes]
        if missing:
            raise CorruptObjectError(
                f"commit {doc['id'][:10]} needs {len(missing)} object(s) the remote does not have; "
                "the remote is incomplete (a push was interrupted?): push again from its source",
                hash_key=missing[0],
            )
    now = time.time()
    with cat.transaction() as c:
        if pack_name is not None:
            c.execute("INSERT INTO packs(name, size, created) VALUES (?,?,?)",
                      (pack_name, (repo.path / "packs" / pack_name).stat().st_size, now))
            c.executemany(
                "INSERT OR IGNORE INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [r.values() for r in rows],
            )
        for doc, manifest_json in docs:
            c.execute(
                "INSERT OR IGNORE INTO commits(id, parent, run, epoch, step, time, message, metrics, manifest,"
                " lossy, logical_bytes, new_bytes, info) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (doc["id"], doc.get("parent"), doc["run"], doc.get("epoch"), doc.get("step"), doc["time"],
                 doc.get("message", ""), json.dumps(doc.get("metrics", {})), manifest_json, int(doc.get("lossy", 0)),
                 doc["logical_bytes"], doc["new_bytes"], json.dumps(doc.get("info", {}))),
            )
            c.executemany("INSERT OR IGNORE INTO commit_objects VALUES (?,?,?,?)",
                          [(doc["id"], n, h, how) for n, h, how in doc["objects"]])
        for name, (cid, updated) in remote_refs.items():
            if c.execute("SELECT 1 FROM commits WHERE id=?", (cid,)).fetchone() is None:
                continue
            cur = c.execute("SELECT updated FROM refs WHERE name=?", (name,)).fetchone()
            if cur is None or cur[0] < updated:
                c.execute("INSERT OR REPLACE INTO refs(name, commit_id, updated) VALUES (?,?,?)", (name, cid, updated))
        for doc, _ in docs:  # a pulled commit no ref names is kept, never silently dropped
            if c.execute("SELECT 1 FROM refs WHERE commit_id=?", (doc["id"],)).fetchone() is None:
                c.execute("INSERT OR REPLACE INTO refs(name, commit_id, updated) VALUES (?,?,?)",
                          (f"keep/{doc['id']}", doc["id"], now))
