"""Push: the commits that refs name, the objects they need, then the refs (see
:mod:`coral_torch.repository.remote` for what is verified and in which order)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import CorruptObjectError, IntegrityError, InvalidRefNameError
from ...format.documents import document_md5
from ...format.objects import WEIGHTS
from ...format.refnames import validate_ref_name
from ...storage.hdf5_store import HDF5Store
from ...storage.s3 import sync as engine
from ...storage.s3.client import S3Client
from ...storage.s3.endpoints import LocalSource, S3ObjectSink
from ...storage.s3.objects import S3Objects
from ..packs import PACKS_DIR
from .protocol import (
    COMMITS,
    REFS,
    RemoteLike,
    check_commit_doc,
    check_ref_doc,
    get_docs,
    json_names,
    open_remote,
    ref_doc,
)

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..lock import RepositoryLock

log = logging.getLogger(__name__)

__all__ = [
    "Repository",
    "push",
    "upload_objects",
    "write_document",
    "live_closure",
    "object_closure",
    "commit_document",
    "RepositoryObjects",
]

_OPEN_PACKS = 16  # read-only pack handles a push keeps open at once


class Repository(Protocol):
    """What push and pull use of a repository (the facade calls into this package, not back)."""

    path: Path
    catalog: Catalog
    lock: RepositoryLock


class RepositoryObjects:
    """Some objects of a repository (those live commits need), read from its packs: what a
    :class:`~coral_torch.storage.s3.endpoints.LocalSource` reads. Opens the packs read-only itself
    (a few at a time); :meth:`close`."""

    def __init__(self, repo: Repository, hashes: Collection[str]):
        self.path = repo.path
        wanted = set(hashes)
        self._rows = {r.hash: r for r in repo.catalog.all_objects() if r.hash in wanted}
        self._packs: OrderedDict[str, HDF5Store] = OrderedDict()

    def list_weights(self) -> list[str]:
        return [h for h, r in self._rows.items() if r.kind == "full"]

    def list_deltas(self) -> list[str]:
        return [h for h, r in self._rows.items() if r.kind == "delta"]

    def _pack(self, name: str) -> HDF5Store:
        store = self._packs.get(name)
        if store is None:
            path = self.path / PACKS_DIR / name
            if not path.exists():
                raise IntegrityError(f"pack {name} is missing from {path.parent}; run `coral-torch verify`")
            store = self._packs[name] = HDF5Store(path, mode="r")
            while len(self._packs) > _OPEN_PACKS:
                self._packs.popitem(last=False)[1].close()
        else:
            self._packs.move_to_end(name)
        return store

    def read_prepared(self, key: str, group: str = WEIGHTS):
        return self._pack(self._rows[key].pack).read_prepared(key, group)

    def close(self) -> None:
        while self._packs:
            self._packs.popitem()[1].close()


def live_closure(repo: Repository, live: set[str] | None = None) -> tuple[set[str], set[str]]:
    """(live commit ids, object hashes they need incl. delta bases)."""
    if live is None:
        live = set(repo.catalog.refs().values())
    hashes = {h for cid in live for _, h, _ in repo.catalog.commit_objects(cid)}
    return live, object_closure(repo, hashes)


def object_closure(repo: Repository, hashes: Collection[str]) -> set[str]:
    """``hashes`` and the delta bases they are rebuilt from, as the repository's catalog records them."""
    rows = {r.hash: r for r in repo.catalog.all_objects()}
    needed: set[str] = set()
    h: str | None
    for h in hashes:
        while h is not None and h not in needed:
            needed.add(h)
            r = rows.get(h)
            h = r.base if r is not None and r.kind == "delta" else None
    return needed


def _local_refs(repo: Repository) -> dict[str, tuple[str, float]]:
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


def commit_document(repo: Repository, cid: str) -> dict[str, Any] | None:
    """The document a push writes for a local commit (None if it is gone: a concurrent gc)."""
    row = repo.catalog.get_commit(cid)
    if row is None:
        return None
    return {
        "kind": "commit",
        "id": row.id,
        "parent": row.parent,
        "run": row.run,
        "epoch": row.epoch,
        "step": row.step,
        "time": row.time,
        "message": row.message,
        "metrics": row.metrics,
        "manifest": row.manifest,
        "lossy": bool(row.lossy),
        "logical_bytes": row.logical_bytes,
        "new_bytes": row.new_bytes,
        "info": row.info,
        "objects": sorted([n, h, how] for n, h, how in repo.catalog.commit_objects(cid)),
    }


def write_document(client: S3Client, key: str, doc: Mapping[str, Any]) -> int:
    """Write one document (verified); returns the bytes sent."""
    return client.put_document(client.document_key(key), doc).size


def upload_objects(
    repo: Repository,
    objects: S3Objects,
    hashes: Collection[str],
    verify: bool | Collection[str],
    progress: bool | None,
) -> dict[str, Any]:
    """Upload the repository's objects ``hashes`` that the remote lacks or (``verify``) holds
    damaged; the sync engine's stats."""
    local = RepositoryObjects(repo, hashes)
    client = objects.client
    try:
        return engine.sync(
            LocalSource(local, where=str(repo.path)),
            S3ObjectSink(objects),
            verb="uploaded",
            verify=verify,
            max_concurrency=client.transfer.max_concurrency,
            progress=progress if progress is not None else client.config.progress,
            desc=f"push {client.url}",
            read_ahead_bytes=client.transfer.read_ahead_bytes,
        )
    finally:
        local.close()


def push(repo: Repository, remote: RemoteLike, progress: bool | None = None, *, verify: bool = False) -> dict[str, Any]:
    """Send the commits that refs name, the objects they need, then the refs (see the package
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
    client, objects, owned = open_remote(remote)
    t0 = time.monotonic()
    try:
        # One snapshot of the refs decides everything this push sends: a commit made while it runs
        # (training goes on) must not get a remote ref before its objects and document are there.
        local_refs = _local_refs(repo)
        live, needed = live_closure(repo, {cid for cid, _ in local_refs.values()})
        docs: dict[str, dict[str, Any]] = {}
        for cid in sorted(live):
            doc = commit_document(repo, cid)
            if doc is None:  # removed by a concurrent gc: its refs are not sent either
                continue
            check_commit_doc(doc, cid, str(repo.path))  # a bad run name stops here, before any upload
            docs[cid] = doc
        # commit documents: missing, or listed with another ETag than ours (read and checked)
        remote_commits = json_names(client.list_entries(COMMITS))
        write_commits = [cid for cid in docs if cid not in remote_commits]
        differ = [cid for cid in docs if cid in remote_commits and remote_commits[cid].etag != document_md5(docs[cid])]
        repaired_commits = 0
        for key, got in get_docs(client, [f"{COMMITS}{cid}.json" for cid in differ]).items():
            cid = key[len(COMMITS) : -len(".json")]
            problem = str(got) if isinstance(got, CorruptObjectError) else "it vanished" if got is None else None
            if problem is None:
                assert isinstance(got, dict)  # neither damaged nor gone
                try:
                    check_commit_doc(got, cid, client.url)  # another machine's intact document: kept
                except (CorruptObjectError, InvalidRefNameError) as exc:
                    problem = str(exc)
            if problem is not None:
                log.warning("commit document %s on %s is damaged (%s): writing it again", cid, client.url, problem)
                write_commits.append(cid)
                repaired_commits += 1
        # refs: the same, and the newer update wins
        remote_refs = json_names(client.list_entries(REFS))
        write_refs: dict[str, dict[str, Any]] = {}
        differ_refs: list[str] = []
        for name, (cid, updated) in local_refs.items():
            if cid not in docs:
                continue
            want = ref_doc(name, cid, updated)
            entry = remote_refs.get(name)
            if entry is None:
                write_refs[name] = want
            elif entry.etag != document_md5(want):
                differ_refs.append(name)
        kept_remote = 0
        for key, got in get_docs(client, [f"{REFS}{n}.json" for n in differ_refs]).items():
            name = key[len(REFS) : -len(".json")]
            cid, updated = local_refs[name]
            if isinstance(got, dict):
                try:
                    rcid, rupdated = check_ref_doc(got, name, client.url)
                except CorruptObjectError as exc:
                    got = exc
                else:
                    if rcid == cid:
                        continue
                    if rupdated > updated:
                        kept_remote += 1  # someone pushed a newer value for this ref: keep theirs
                        continue
            if isinstance(got, CorruptObjectError):
                log.warning("ref %s on %s is damaged (%s): writing it again", name, client.url, got)
            write_refs[name] = ref_doc(name, cid, updated)
        # objects: every object of every commit about to be published is checked on the remote
        publish = set(write_commits) | {d["commit"] for d in write_refs.values()}
        _, check = live_closure(repo, publish)
        obj_stats = upload_objects(repo, objects, needed, True if verify else check, progress)
        meta_bytes = 0
        for cid in sorted(set(write_commits)):
            meta_bytes += write_document(client, f"{COMMITS}{cid}.json", docs[cid])
        for name, doc in write_refs.items():
            meta_bytes += write_document(client, f"{REFS}{name}.json", doc)
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
        log.info("pushed %s to %s: %s", repo.path, client.url, stats)
        return stats
    finally:
        if owned:
            client.close()
