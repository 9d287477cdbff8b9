"""Repository push/pull to an S3 remote: objects, then commits, then refs.

Remote layout under the S3 prefix (objects as in :mod:`coral_torch.storage.s3_store`)::

    weights/<hash>, deltas/<hash>, metadata/<hash>[.delta].json   content-addressed objects
    commits/<commit id>.json                                      a commit: manifest and metadata
    refs/<ref name>.json                                          {"kind": "ref", "name": <ref name>,
                                                                   "commit": id, "updated": time}

Every document carries its own checksum (``doc_xxh3``, see :func:`~coral_torch.storage.s3_store.
encode_document`); a commit document is also checked against its id (the xxh3-128 of its manifest)
and its object list against the manifest. Nothing damaged is ever stored: a pull refuses a damaged
or forged document before it writes anything, and an object whose bytes fail their checks is
never written.

Ordering makes readers safe: a commit document is written only after every object it needs is on
the remote and verified, and a ref only after its commit document, so no reader ever sees a ref
whose objects are missing. Objects and commits are content-addressed, so two machines pushing to one
prefix never overwrite each other's commits; for a ref both moved, the newer update wins, and the
other commit stays on the remote (``pull`` fetches every commit and keeps the ones no ref names under
``keep/``). An interrupted push or pull is finished by running it again; nothing already transferred
and intact is sent again.

What a push verifies: every upload (the server's ETag against the MD5 of what was sent, see
:mod:`~coral_torch.storage.s3_store`); the documents already on the remote, by comparing the listed
ETag with the MD5 of the document this repository would write (a document that differs is read and
checked: damaged ones are written again, intact ones of another machine are kept); and, for every
commit whose document or ref it is about to write, every object that commit needs (its metadata and
the payload's listed size and ETag), uploading damaged ones again. ``push(verify=True)`` checks every
object of every pushed commit. Damage done on the server after a commit was published is found by
``pull`` (which refuses it) and repaired by ``push(verify=True)``.

Names: every ref name (local ones before a push sends anything, remote ones before a pull stores
anything) and every run name goes through :mod:`coral_torch.refnames`; no key is built from a name
that could leave the prefix.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Protocol, Union

import xxhash

from ..errors import (
    CoralError,
    CorruptObjectError,
    IntegrityError,
    InvalidRefNameError,
    RemoteError,
    RemoteRepositoryNotFoundError,
    SyncIncompleteError,
)
from ..refnames import validate_component, validate_ref_name
from ..storage.hdf5_store import HDF5Store, PreparedObject
from .catalog import NewCommit, ObjectRow
from .packs import PACKS_DIR as PACKS, new_pack_name, publish_file

if TYPE_CHECKING:
    from ..storage.s3_store import RemoteEntry, S3Config, S3Store
    from .catalog import Catalog
    from .lock import RepositoryLock


class Repository(Protocol):
    """What push and pull use of a repository (the facade calls into this module, not back)."""

    path: Path
    catalog: "Catalog"
    lock: "RepositoryLock"

log = logging.getLogger(__name__)

RemoteLike = Union["S3Config", "S3Store"]
_CID_RE = re.compile(r"^[0-9a-f]{32}$")
_OPEN_PACKS = 16  # read-only pack handles a push keeps open at once


def _store(remote: RemoteLike) -> tuple["S3Store", bool]:
    from ..storage.s3_store import S3Config, S3Store

    if isinstance(remote, S3Store):
        return remote, False
    if isinstance(remote, S3Config):
        return S3Store(remote), True
    raise CoralError(f"a remote must be an S3Config or an S3Store, not {type(remote).__name__}")


class _RepositoryObjects:
    """What `S3Store.sync_from_local` needs from a local store, served from a repository's packs
    (only the objects that live commits need). Opens the packs read-only itself; :meth:`close`."""

    mode = "r"

    def __init__(self, repo: "Repository", hashes: set[str]):
        self.repo = repo
        self.filepath = repo.path
        rows = [r for r in repo.catalog.all_objects() if r.hash in hashes]
        self._rows = {r.hash: r for r in rows}
        self._packs: "OrderedDict[str, HDF5Store]" = OrderedDict()

    def list_weights(self) -> list[str]:
        return [h for h, r in self._rows.items() if r.kind == "full"]

    def list_deltas(self) -> list[str]:
        return [h for h, r in self._rows.items() if r.kind == "delta"]

    def _pack(self, name: str) -> HDF5Store:
        store = self._packs.get(name)
        if store is None:
            path = self.repo.path / PACKS / name
            if not path.exists():
                raise IntegrityError(f"pack {name} is missing from {path.parent}; run `coral-torch verify`")
            store = self._packs[name] = HDF5Store(path, mode="r")
            while len(self._packs) > _OPEN_PACKS:
                self._packs.popitem(last=False)[1].close()
        else:
            self._packs.move_to_end(name)
        return store

    def read_prepared(self, key: str, group: str = "weights") -> Optional[PreparedObject]:
        return self._pack(self._rows[key].pack).read_prepared(key, group)

    def load(self, key: str):
        return self._pack(self._rows[key].pack).load(key)

    def close(self) -> None:
        while self._packs:
            self._packs.popitem()[1].close()


class _PackWriter:
    """What `S3Store.sync_to_local` needs from a local store: it lists what the repository already
    holds (less ``replace``: objects in damaged packs, fetched again) and writes new objects into
    one new pack (``packs/.tmp-<name>`` until :func:`_publish_pack`)."""

    mode = "a"

    def __init__(self, repo: "Repository", replace: Iterable[str] = ()):
        self.repo = repo
        skip = set(replace)
        known = [r for r in repo.catalog.all_objects() if r.hash not in skip]
        self._full = {r.hash for r in known if r.kind == "full"}
        self._delta = {r.hash for r in known if r.kind == "delta"}
        self.name = new_pack_name()
        self.tmp = repo.path / PACKS / f".tmp-{self.name}"
        self.final = repo.path / PACKS / self.name
        self.filepath = self.tmp
        self.store: Optional[HDF5Store] = None
        self.published = False
        self.rows: list[ObjectRow] = []

    def list_weights(self) -> list[str]:
        return sorted(self._full | {r.hash for r in self.rows if r.kind == "full"})

    def list_deltas(self) -> list[str]:
        return sorted(self._delta | {r.hash for r in self.rows if r.kind == "delta"})

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

    def discard(self) -> None:
        """Remove what this writer wrote (the temporary or the published, uncatalogued pack)."""
        if self.store is not None:
            try:
                self.store.close()
            except Exception:  # noqa: BLE001 - it goes either way
                log.debug("closing %s failed", self.tmp, exc_info=True)
            self.store = None
        self.tmp.unlink(missing_ok=True)
        if self.published:
            self.final.unlink(missing_ok=True)
            self.published = False
        self.rows = []


def _publish_pack(writer: _PackWriter) -> Optional[str]:
    """Close, fsync and rename the writer's pack into ``packs/``; its name, or None if empty."""
    if writer.published:
        return writer.name
    if writer.store is None:
        return None
    writer.store.close()
    writer.store = None
    publish_file(writer.tmp, writer.final)
    writer.published = True
    return writer.name


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


def _local_refs(repo: "Repository") -> dict[str, tuple[str, float]]:
    """``{name: (commit id, updated)}`` of every local ref, every name checked (a bad one stops the
    push before anything is sent)."""
    refs = {name: (cid, updated) for name, cid, updated in repo.catalog.ref_rows()}
    bad = []
    for name in refs:
        try:
            validate_ref_name(name)
        except InvalidRefNameError as exc:
            bad.append(str(exc))
    if bad:
        raise InvalidRefNameError(
            f"push from {repo.path} refused before anything was sent: {len(bad)} local ref(s) cannot be "
            f"pushed ({bad[0]}{'; ...' if len(bad) > 1 else ''}). Delete or rename them, then push again"
        )
    return refs


def _ref_doc(name: str, cid: str, updated: float) -> dict[str, Any]:
    return {"kind": "ref", "name": name, "commit": cid, "updated": float(updated)}


def _commit_doc(repo: "Repository", cid: str) -> Optional[dict[str, Any]]:
    """The document a push writes for a local commit (None if it is gone: a concurrent gc)."""
    row = repo.catalog.get_commit(cid)
    if row is None:
        return None
    return {
        "kind": "commit", "id": row.id, "parent": row.parent, "run": row.run, "epoch": row.epoch,
        "step": row.step, "time": row.time, "message": row.message, "metrics": row.metrics,
        "manifest": row.manifest, "lossy": bool(row.lossy), "logical_bytes": row.logical_bytes,
        "new_bytes": row.new_bytes, "info": row.info,
        "objects": sorted([n, h, how] for n, h, how in repo.catalog.commit_objects(cid)),
    }


def _manifest_json(manifest: Any) -> str:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_commit_doc(doc: dict[str, Any], cid: str, where: str) -> str:
    """Check a commit document read from (or about to be sent to) the remote; returns the manifest
    JSON its id is the hash of.

    Raises:
        CorruptObjectError: it is damaged or forged (fields, id, object list).
        InvalidRefNameError: its run name is not valid.
    """

    def bad(why: str) -> CorruptObjectError:
        return CorruptObjectError(f"commit document {cid} at {where} is damaged or forged: {why}", hash_key=cid)

    if doc.get("kind") != "commit":
        raise bad("it is not a commit document")
    if doc.get("id") != cid or not _CID_RE.match(cid):
        raise bad(f"it names commit {doc.get('id')!r}")
    manifest = doc.get("manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list):
        raise bad("it has no manifest")
    try:
        manifest_json = _manifest_json(manifest)
    except (TypeError, ValueError) as exc:
        raise bad(f"its manifest is not plain JSON ({exc})") from None
    if xxhash.xxh3_128(manifest_json.encode()).hexdigest() != cid:
        raise bad("its manifest does not hash to its id")
    try:
        validate_component(doc.get("run"), "run")
    except InvalidRefNameError as exc:
        raise InvalidRefNameError(f"commit {cid} at {where} is refused: {exc}") from None
    parent = doc.get("parent")
    if parent is not None and not (isinstance(parent, str) and _CID_RE.match(parent)):
        raise bad(f"its parent {parent!r} is not a commit id")
    for f in ("epoch", "step"):
        if doc.get(f) is not None and not _is_int(doc.get(f)):
            raise bad(f"its {f} {doc.get(f)!r} is not an integer")
    t = doc.get("time")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise bad(f"its time {t!r} is not a number")
    for f in ("logical_bytes", "new_bytes"):
        if not _is_int(doc.get(f)) or doc[f] < 0:
            raise bad(f"its {f} {doc.get(f)!r} is not a size")
    if not isinstance(doc.get("message", ""), str) or not isinstance(doc.get("metrics", {}), dict) \
            or not isinstance(doc.get("info", {}), dict) or not isinstance(doc.get("lossy", False), (bool, int)):
        raise bad("its message, metrics, info or lossy field has the wrong type")
    objects = doc.get("objects")
    if not isinstance(objects, list) or not all(
        isinstance(o, list) and len(o) == 3 and all(isinstance(x, str) for x in o) and o[0] and o[1]
        for o in objects
    ):
        raise bad("its object list is malformed")
    try:
        tensors = {str(t[1]) for t in manifest["tensors"]}
    except (TypeError, IndexError, KeyError):
        raise bad("its manifest's tensor list is malformed") from None
    if {o[1] for o in objects} != tensors:
        raise bad("its object list does not match its manifest")
    return manifest_json


def _check_ref_doc(doc: dict[str, Any], name: str, where: str) -> tuple[str, float]:
    """(commit id, updated) of a ref document; CorruptObjectError if it is damaged."""
    cid, updated = doc.get("commit"), doc.get("updated")
    if doc.get("kind") != "ref" or doc.get("name") != name:
        raise CorruptObjectError(f"ref document {name} at {where} is damaged: it is not the document of that ref")
    if not isinstance(cid, str) or not _CID_RE.match(cid):
        raise CorruptObjectError(f"ref document {name} at {where} is damaged: {cid!r} is not a commit id")
    if not isinstance(updated, (int, float)) or isinstance(updated, bool) or not math.isfinite(updated):
        raise CorruptObjectError(f"ref document {name} at {where} is damaged: its time {updated!r} is not a number")
    return cid, float(updated)


def _json_names(entries: dict[str, "RemoteEntry"]) -> dict[str, "RemoteEntry"]:
    return {k[: -len(".json")]: e for k, e in entries.items() if k.endswith(".json")}


def _put_doc(store: "S3Store", key: str, doc: dict[str, Any]) -> int:
    """Write one document (verified); returns the bytes sent."""
    return store.put_document(key, doc)


def _what(key: str) -> str:
    """How messages name the document at ``key`` ("commit document <id>", "ref document <name>")."""
    for sub, what in (("commits/", "commit document"), ("refs/", "ref document")):
        if key.startswith(sub) and key.endswith(".json"):
            return f"{what} {key[len(sub):-len('.json')]}"
    return f"document {key}"


def _get_docs(store: "S3Store", keys: list[str]) -> dict[str, Union[dict[str, Any], None, CorruptObjectError]]:
    """``{key: document, None (missing) or the CorruptObjectError (damaged)}``, in parallel."""
    if not keys:
        return {}

    def one(key: str) -> Union[dict[str, Any], None, CorruptObjectError]:
        try:
            return store.get_document(key, _what(key))
        except CorruptObjectError as exc:
            return exc

    with ThreadPoolExecutor(store.config.max_concurrency, thread_name_prefix="coral-remote") as pool:
        return dict(zip(keys, pool.map(one, keys)))


# ===================================================================================== push
def push(repo: "Repository", remote: RemoteLike, progress: Optional[bool] = None, *,
         verify: bool = False) -> dict[str, Any]:
    """Send the commits that refs name, the objects they need, then the refs (see the module
    docstring for what is verified; ``verify=True`` also checks every object of every pushed commit
    already on the remote).

    Returns stats: ``objects_uploaded``, ``objects_skipped`` (already on the remote),
    ``objects_repaired`` (on the remote but damaged: sent again), ``object_bytes``,
    ``commits_uploaded`` (incl. ``commits_repaired``: damaged ones written again), ``refs_updated``,
    ``refs_kept_remote`` (the remote's value is newer), ``bytes_transferred``, ``seconds``.

    Raises:
        InvalidRefNameError: a local ref or run name cannot be pushed (before anything is sent).
        SyncIncompleteError: some objects were not uploaded; no commit or ref was sent for them.
        RemoteError and subclasses: the remote refused or failed.
    """
    store, owned = _store(remote)
    t0 = time.monotonic()
    objects: Optional[_RepositoryObjects] = None
    try:
        # One snapshot of the refs decides everything this push sends: a commit made while it runs
        # (training goes on) must not get a remote ref before its objects and document are there.
        local_refs = _local_refs(repo)
        live, needed = _live_closure(repo, {cid for cid, _ in local_refs.values()})
        docs: dict[str, dict[str, Any]] = {}
        for cid in sorted(live):
            doc = _commit_doc(repo, cid)
            if doc is None:  # removed by a concurrent gc: its refs are not sent either
                continue
            _check_commit_doc(doc, cid, str(repo.path))  # a bad run name stops here, before any upload
            docs[cid] = doc
        from ..storage.s3_store import document_md5

        # commit documents: missing, or listed with another ETag than ours (read and checked)
        remote_commits = _json_names(store.list_entries("commits/"))
        write_commits = [cid for cid in docs if cid not in remote_commits]
        differ = [cid for cid in docs if cid in remote_commits and remote_commits[cid].etag != document_md5(docs[cid])]
        repaired_commits = 0
        for key, got in _get_docs(store, [f"commits/{cid}.json" for cid in differ]).items():
            cid = key[len("commits/"):-len(".json")]
            problem = str(got) if isinstance(got, CorruptObjectError) else "it vanished" if got is None else None
            if problem is None:
                try:
                    _check_commit_doc(got, cid, store.url)  # another machine's intact document: kept
                except (CorruptObjectError, InvalidRefNameError) as exc:
                    problem = str(exc)
            if problem is not None:
                log.warning("commit document %s on %s is damaged (%s): writing it again", cid, store.url, problem)
                write_commits.append(cid)
                repaired_commits += 1
        # refs: the same, and the newer update wins
        remote_refs = _json_names(store.list_entries("refs/"))
        write_refs: dict[str, dict[str, Any]] = {}
        differ_refs: list[str] = []
        for name, (cid, updated) in local_refs.items():
            if cid not in docs:
                continue
            want = _ref_doc(name, cid, updated)
            entry = remote_refs.get(name)
            if entry is None:
                write_refs[name] = want
            elif entry.etag != document_md5(want):
                differ_refs.append(name)
        kept_remote = 0
        for key, got in _get_docs(store, [f"refs/{n}.json" for n in differ_refs]).items():
            name = key[len("refs/"):-len(".json")]
            cid, updated = local_refs[name]
            if isinstance(got, dict):
                try:
                    rcid, rupdated = _check_ref_doc(got, name, store.url)
                except CorruptObjectError as exc:
                    got = exc
                else:
                    if rcid == cid:
                        continue
                    if rupdated > updated:
                        kept_remote += 1  # someone pushed a newer value for this ref: keep theirs
                        continue
            if isinstance(got, CorruptObjectError):
                log.warning("ref %s on %s is damaged (%s): writing it again", name, store.url, got)
            write_refs[name] = _ref_doc(name, cid, updated)
        # objects: every object of every commit about to be published is checked on the remote
        publish = set(write_commits) | {d["commit"] for d in write_refs.values()}
        _, check = _live_closure(repo, publish)
        objects = _RepositoryObjects(repo, needed)
        obj_stats = store.sync_from_local(objects, progress=progress, verify=True if verify else check)
        meta_bytes = 0
        for cid in sorted(set(write_commits)):
            meta_bytes += _put_doc(store, f"commits/{cid}.json", docs[cid])
        for name, doc in write_refs.items():
            meta_bytes += _put_doc(store, f"refs/{name}.json", doc)
        stats = {
            "objects_uploaded": obj_stats["uploaded"] + obj_stats["deltas_uploaded"],
            "objects_skipped": obj_stats["skipped"],
            "objects_repaired": obj_stats.get("repaired", 0),
            "object_bytes": obj_stats["bytes_transferred"],
            "commits_uploaded": len(set(write_commits)),
            "commits_repaired": repaired_commits,
            "refs_updated": len(write_refs),
            "refs_kept_remote": kept_remote,
            "bytes_transferred": obj_stats["bytes_transferred"] + meta_bytes,
            "seconds": time.monotonic() - t0,
        }
        log.info("pushed %s to %s: %s", repo.path, store.url, stats)
        return stats
    finally:
        if objects is not None:
            objects.close()
        if owned:
            store.close()


# ===================================================================================== pull
def _listed_documents(store: "S3Store", sub: str,
                      skip: Callable[[str, "RemoteEntry"], bool]) -> dict[str, dict[str, Any]]:
    """``{name: document}`` for the ``<sub><name>.json`` documents listed (``skip(name, entry)``
    True: not read). A listed document that is then missing means the listing was damaged on the
    way or the remote changed: the listing is made again (``max_attempts`` times in all).

    Raises:
        CorruptObjectError: a document is damaged (after re-reads).
        RemoteError: the listing and the documents keep disagreeing.
    """
    got: dict[str, dict[str, Any]] = {}
    n = store.config.max_attempts
    vanished: list[str] = []
    for attempt in range(1, n + 1):
        listed = _json_names(store.list_entries(sub))
        todo = [k for k, e in listed.items() if k not in got and not skip(k, e)]
        for key, doc in _get_docs(store, [f"{sub}{k}.json" for k in todo]).items():
            if isinstance(doc, CorruptObjectError):
                raise _refused(store, doc) from None
            name = key[len(sub):-len(".json")]
            if doc is None:
                vanished.append(name)
            else:
                got[name] = doc
        for k in list(got):  # deleted on the remote since an earlier listing
            if k not in listed:
                del got[k]
        if not vanished:
            return got
        if attempt < n:
            log.warning("%d document(s) listed under %s%s were not there (first: %s); listing again",
                        len(vanished), store.url, sub, vanished[0])
            vanished = []
    raise RemoteError(
        f"the listing of {store.url}{sub} keeps naming documents that are not there (first: {vanished[0]}); "
        "nothing was pulled. Try again later (a push may be running, or the network is damaging answers)"
    )


def _refused(store: "S3Store", exc: CoralError) -> CoralError:
    """The error a pull raises for a document it refuses: the same kind, saying nothing was pulled."""
    msg = (f"pull from {store.url} refused: {exc}. Nothing was pulled. Run the pull again; if it persists, "
           "push again from a repository that holds it to rewrite it")
    if isinstance(exc, IntegrityError):
        return type(exc)(msg, hash_key=exc.hash_key) if type(exc) in (CorruptObjectError, IntegrityError) \
            else CorruptObjectError(msg, hash_key=exc.hash_key)
    if isinstance(exc, InvalidRefNameError):
        return InvalidRefNameError(msg)
    return RemoteError(msg)


def _damaged_local_objects(repo: "Repository") -> tuple[set[str], set[str]]:
    """(objects, packs): packs that are missing or changed size since they were written, and the
    objects in them. A pull fetches those objects again."""
    bad = set()
    for name, size in repo.catalog.packs().items():
        try:
            actual = (repo.path / PACKS / name).stat().st_size
        except FileNotFoundError:
            bad.add(name)
            continue
        if size is not None and actual != size:
            bad.add(name)
    if not bad:
        return set(), set()
    return {r.hash for r in repo.catalog.all_objects() if r.pack in bad}, bad


def pull(repo: "Repository", remote: RemoteLike, progress: Optional[bool] = None) -> dict[str, Any]:
    """Fetch every remote commit this repository lacks, the objects they need, and the refs.

    Every document is verified before anything is stored: ref documents (checksum, name), commit
    documents (checksum, id = hash of the manifest, object list, run name), object metadata and
    payloads (see :meth:`S3Store.sync_to_local`). Objects this repository holds in a pack that is
    missing or changed size are fetched again and replace the damaged copies.

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
    store, owned = _store(remote)
    t0 = time.monotonic()
    try:
        require_remote_repository(store)  # before the lock file or anything else is written
        with repo.lock:
            return _pull_locked(repo, store, progress, t0)
    finally:
        if owned:
            store.close()


def require_remote_repository(store: "S3Store") -> None:
    """Check, with one cheap listing (a few where it fails), that ``store``'s prefix holds a pushed
    repository, so that a pull of a mistyped or empty prefix fails before anything is created or
    written locally. A prefix whose first push has sent objects but no commit yet counts as one (a
    pull of it gets no commits, as a pull during any push gets only the complete ones).

    Raises:
        RemoteRepositoryNotFoundError: nothing under the prefix, or nothing a push writes.
        RemoteError and subclasses: the listing failed (missing bucket, credentials, network).
    """
    if store.has_any("commits/") or store.has_any("metadata/"):
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


def _pull_locked(repo: "Repository", store: "S3Store", progress: Optional[bool], t0: float) -> dict[str, Any]:
    from ..storage.s3_store import document_md5

    local_refs = {n: (c, u) for n, c, u in repo.catalog.ref_rows()}
    # refs first: a push writes a ref only after its commit document, so every commit a ref listed
    # now names is in the commit listing made after it
    listed_refs = _json_names(store.list_entries("refs/"))
    for name in listed_refs:
        try:
            validate_ref_name(name)
        except InvalidRefNameError as exc:
            raise InvalidRefNameError(
                f"pull from {store.url} refused: the remote holds a ref that cannot be pulled ({exc}). "
                f"Nothing was pulled; delete refs/{name}.json from the remote"
            ) from None

    def same_as_local(name: str, entry: "RemoteEntry") -> bool:
        mine = local_refs.get(name)
        return mine is not None and entry.etag == document_md5(_ref_doc(name, *mine))

    have = set(repo.catalog.commit_ids())
    docs = []
    try:
        remote_refs = {name: _check_ref_doc(doc, name, store.url)
                       for name, doc in _listed_documents(store, "refs/", same_as_local).items()}
        fetched = _listed_documents(store, "commits/", lambda cid, _e: cid in have)
        for cid, doc in fetched.items():
            if not _CID_RE.match(cid):
                raise CorruptObjectError(f"commits/{cid}.json is not named by a commit id", hash_key=cid)
            docs.append((doc, _check_commit_doc(doc, cid, store.url)))
    except (CorruptObjectError, InvalidRefNameError) as exc:
        if str(exc).startswith("pull from "):
            raise
        raise _refused(store, exc) from None
    known = have | set(fetched)
    orphans = {n: c for n, (c, _) in remote_refs.items() if c not in known}
    if orphans:
        name, cid = next(iter(orphans.items()))
        raise CorruptObjectError(
            f"pull from {store.url} refused: ref {name} names commit {cid}, which the remote does not have "
            f"({len(orphans)} such ref(s)); nothing was pulled. Push again from the repository that made it",
            hash_key=cid,
        )
    # Insert oldest first: the catalog's insertion order is what `log()` lists and what
    # `resolve("latest")` picks, so it must follow the commits' own times, not key order.
    docs.sort(key=lambda d: (float(d[0].get("time") or 0.0), d[0]["id"]))
    replace, bad_packs = _damaged_local_objects(repo)
    if replace:
        log.warning("%d object(s) of %s are in missing or damaged packs: fetching them again from %s",
                    len(replace), repo.path, store.url)
    writer = _PackWriter(repo, replace)
    try:
        try:
            obj_stats = store.sync_to_local(writer, progress=progress)
            missing = _missing_objects(repo, writer, docs, replace)
            if missing:  # a listing damaged on the way can hide objects: one more pass, listed again
                log.warning("%d object(s) the pulled commits need were not in the listing of %s (first: %s); "
                            "listing again", len(missing), store.url, next(iter(missing)))
                more = store.sync_to_local(writer, progress=progress)
                for k in ("downloaded", "deltas_downloaded", "bytes_transferred"):
                    obj_stats[k] += more[k]
        except SyncIncompleteError as exc:
            raise _pull_stopped(repo, store, writer, exc) from None
        pack_name = _publish_pack(writer)
        _commit_pull(repo, pack_name, writer.rows, docs, remote_refs, replace)
    except BaseException:
        _abandon(repo, writer)
        raise
    if bad_packs:
        _drop_emptied_packs(repo, bad_packs)
    left = replace - {r.hash for r in writer.rows}
    if left:
        log.warning("%d damaged object(s) of %s are not on %s either; `coral-torch verify` lists the commits "
                    "they break", len(left), repo.path, store.url)
    stats = {
        "objects_downloaded": obj_stats["downloaded"] + obj_stats["deltas_downloaded"],
        "objects_skipped": obj_stats["skipped"],
        "objects_replaced": len(replace) - len(left),
        "commits_downloaded": len(docs),
        "refs": len(listed_refs),
        "bytes_transferred": obj_stats["bytes_transferred"],
        "seconds": time.monotonic() - t0,
    }
    log.info("pulled %s into %s: %s", store.url, repo.path, stats)
    return stats


def _drop_emptied_packs(repo: "Repository", packs: set[str]) -> None:
    """Forget damaged packs whose objects were all replaced (and remove their files)."""
    empty = repo.catalog.drop_empty_packs(packs)
    for p in empty:
        (repo.path / PACKS / p).unlink(missing_ok=True)
    if empty:
        log.info("removed %d damaged pack(s) of %s whose objects were all fetched again", len(empty), repo.path)


def _missing_objects(repo: "Repository", writer: _PackWriter, docs: list[tuple[dict, str]],
                     replace: set[str]) -> set[str]:
    """Objects the pulled commits (or their delta bases) need that neither side has here."""
    rows = {r.hash: r for r in repo.catalog.all_objects() if r.hash not in replace}
    rows.update((r.hash, r) for r in writer.rows)
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


def _abandon(repo: "Repository", writer: _PackWriter) -> None:
    """A pull failed after its objects sync (or was interrupted): keep the verified objects it wrote
    in the catalog, so the next pull does not fetch them again; if that fails, remove the pack."""
    if not writer.rows and writer.store is None and not writer.published:
        return
    try:
        if _keep_downloaded(repo, writer):
            return
    except Exception:  # noqa: BLE001 - best effort: the pull fails either way
        log.warning("could not keep the objects the failed pull wrote; removing its pack", exc_info=True)
    writer.discard()


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
        writer.discard()
    first_key, first = next(iter(exc.failures.items()), ("?", exc))
    damaged = [k for k, e in exc.failures.items() if isinstance(e, IntegrityError)]
    if damaged and len(damaged) == len(exc.failures):
        msg = (f"pull from {store.url} into {repo.path} refused: {len(damaged)} object(s) arrived damaged, "
               f"every read of them (first: {first_key}: {first}). No commit or ref was pulled. Run the pull "
               "again; if they stay damaged, they are damaged on the remote: repair it from an intact copy "
               "(push again with verification from a repository that holds them, or delete the damaged "
               "objects' metadata/<hash>[.delta].json there and push again)")
    else:
        msg = (f"pull from {store.url} into {repo.path} stopped: {len(exc.failures)} object(s) not downloaded "
               f"(first: {first_key}: {first}). No commit or ref was pulled yet; run the pull again to "
               "finish it (objects already downloaded are not downloaded again)")
    if kept:
        msg += f". Kept {kept} verified object(s) that did arrive"
    return SyncIncompleteError(msg, stats=exc.stats, failures=exc.failures)


def _keep_downloaded(repo: "Repository", writer: _PackWriter) -> int:
    """Catalog the objects a stopped pull wrote (caller holds the lock); returns how many. A delta
    whose base is on neither side is left out (the next pull fetches it again). The writer is done
    with afterwards (its pack is published, or removed when nothing in it is kept)."""
    if not writer.rows:
        writer.discard()
        return 0
    name = _publish_pack(writer)
    packs = repo.path / PACKS
    cat = repo.catalog
    known = {r.hash: r for r in cat.all_objects()}
    new = {r.hash: r for r in writer.rows}

    def depth(h: str, seen: int = 0) -> Optional[int]:
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

    rows = [r for r in writer.rows if depth(r.hash) is not None]
    if not rows:
        writer.discard()
        return 0
    cat.add_objects((str(name), (packs / str(name)).stat().st_size, time.time()), rows)
    writer.rows = []  # catalogued: no longer the writer's to remove
    writer.published = False
    return len(rows)


def _commit_pull(repo: "Repository", pack_name: Optional[str], rows: list[ObjectRow],
                 docs: list[tuple[dict, str]], remote_refs: dict[str, tuple[str, float]],
                 replace: set[str]) -> None:
    cat = repo.catalog
    known = {r.hash: r for r in cat.all_objects() if r.hash not in replace}
    new = {r.hash: r for r in rows}

    # delta depths, bases first
    def depth(h: str, seen: int = 0) -> int:
        r = new.get(h) or known.get(h)
        if r is None:
            raise CorruptObjectError(
                f"object {h} is needed as a delta base but is neither here nor on the remote: the remote is "
                "incomplete; nothing was pulled. Push again from the repository that made it", hash_key=h,
            )
        if r.kind == "full":
            return 0
        if r.depth >= 0:
            return r.depth
        if seen > 10_000:
            raise CorruptObjectError(f"the delta chain of object {h} on the remote loops: it is damaged; "
                                     "nothing was pulled", hash_key=h)
        r.depth = depth(r.base or "", seen + 1) + 1
        return r.depth

    for r in rows:
        depth(r.hash)
    all_hashes = set(known) | set(new)
    for doc, _ in docs:
        missing = [h for _, h, _ in doc["objects"] if h not in all_hashes]
        if missing:
            raise CorruptObjectError(
                f"commit {doc['id'][:10]} needs {len(missing)} object(s) the remote does not have (first: "
                f"{missing[0]}): the remote is incomplete; nothing was pulled. Push again from its source",
                hash_key=missing[0],
            )
    now = time.time()
    commits = [(NewCommit(doc["id"], doc.get("parent"), doc["run"], doc.get("epoch"), doc.get("step"), doc["time"],
                          doc.get("message", ""), doc.get("metrics", {}), manifest_json, bool(doc.get("lossy", 0)),
                          doc["logical_bytes"], doc["new_bytes"], doc.get("info", {})),
                [(doc["id"], n, h, how) for n, h, how in doc["objects"]]) for doc, manifest_json in docs]
    pack = (pack_name, (repo.path / PACKS / pack_name).stat().st_size, now) if pack_name is not None else None
    cat.publish_pulled(pack=pack, objects=rows, replace=replace, commits=commits, refs=remote_refs, now=now)
