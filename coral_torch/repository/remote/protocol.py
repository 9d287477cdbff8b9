"""What a repository looks like on a remote, and how its documents are checked.

Remote layout under the S3 prefix (objects as in :mod:`coral_torch.storage.s3.objects`)::

    weights/<hash>, deltas/<hash>, metadata/<hash>[.delta].json   content-addressed objects
    commits/<commit id>.json                                      a commit: manifest and metadata
    refs/<ref name>.json                                          {"kind": "ref", "name": <ref name>,
                                                                   "commit": id, "updated": time}

Documents are encoded and checksummed by :mod:`coral_torch.format.documents`; a commit document
is also checked against its id (the rule of :mod:`coral_torch.manifest`) and its object list
against the manifest.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeGuard

from ...errors import (
    CatalogDamagedError,
    CoralError,
    CorruptObjectError,
    IntegrityError,
    InvalidRefNameError,
    RemoteError,
    UnsupportedFormatError,
)
from ...format.manifest import Manifest, manifest_id
from ...format.refnames import validate_component
from ...storage.s3.client import RemoteEntry, S3Client
from ...storage.s3.config import S3Config
from ...storage.s3.objects import S3Objects
from ...storage.s3.store import S3Store

log = logging.getLogger(__name__)

__all__ = [
    "RemoteLike",
    "COMMITS",
    "REFS",
    "open_remote",
    "ref_doc",
    "check_commit_doc",
    "check_ref_doc",
    "json_names",
    "get_docs",
    "listed_documents",
    "refused",
    "is_commit_id",
]

RemoteLike = S3Config | S3Store
COMMITS, REFS = "commits/", "refs/"
_CID_RE = re.compile(r"^[0-9a-f]{32}$")


def is_commit_id(v: Any) -> TypeGuard[str]:
    return isinstance(v, str) and bool(_CID_RE.match(v))


def open_remote(remote: RemoteLike) -> tuple[S3Client, S3Objects, bool]:
    """(client, object layer, whether the caller owns the client and must close it)."""
    if isinstance(remote, S3Store):
        return remote.client, remote.objects, False
    if isinstance(remote, S3Config):
        client = S3Client(remote)
        try:
            if remote.check_bucket:
                client.check_bucket()
        except BaseException:
            client.close()
            raise
        return client, S3Objects(client, remote.codec_level), True
    raise CoralError(f"a remote must be an S3Config or an S3Store, not {type(remote).__name__}")


def ref_doc(name: str, cid: str, updated: float) -> dict[str, Any]:
    return {"kind": "ref", "name": name, "commit": cid, "updated": float(updated)}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_commit_doc(doc: dict[str, Any], cid: str, where: str) -> str:
    """Check a commit document read from (or about to be sent to) the remote; returns the manifest
    JSON its id is the hash of (:meth:`Manifest.to_json`, :func:`manifest_id`).

    Raises:
        CorruptObjectError: it is damaged or forged (fields, id, object list).
        InvalidRefNameError: its run name is not valid.
        UnsupportedFormatError: its manifest is of a newer format than this coral-torch reads.
    """

    def bad(why: str) -> CorruptObjectError:
        return CorruptObjectError(f"commit document {cid} at {where} is damaged or forged: {why}", hash_key=cid)

    if doc.get("kind") != "commit":
        raise bad("it is not a commit document")
    if doc.get("id") != cid or not is_commit_id(cid):
        raise bad(f"it names commit {doc.get('id')!r}")
    manifest = doc.get("manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list):
        raise bad("it has no manifest")
    try:
        manifest_json = Manifest.from_doc(manifest, where=f"commit {cid} at {where}").to_json()
    except UnsupportedFormatError:
        raise
    except (CatalogDamagedError, TypeError, ValueError) as exc:
        raise bad(f"its manifest is malformed ({exc})") from None
    if manifest_id(manifest_json) != cid:
        raise bad("its manifest does not hash to its id")
    try:
        validate_component(doc.get("run"), "run")
    except InvalidRefNameError as exc:
        raise InvalidRefNameError(f"commit {cid} at {where} is refused: {exc}") from None
    parent = doc.get("parent")
    if parent is not None and not is_commit_id(parent):
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
    if (
        not isinstance(doc.get("message", ""), str)
        or not isinstance(doc.get("metrics", {}), dict)
        or not isinstance(doc.get("info", {}), dict)
        or not isinstance(doc.get("lossy", False), (bool, int))
    ):
        raise bad("its message, metrics, info or lossy field has the wrong type")
    objects = doc.get("objects")
    if not isinstance(objects, list) or not all(
        isinstance(o, list) and len(o) == 3 and all(isinstance(x, str) for x in o) and o[0] and o[1] for o in objects
    ):
        raise bad("its object list is malformed")
    try:
        tensors = {str(t[1]) for t in manifest["tensors"]}
    except (TypeError, IndexError, KeyError):
        raise bad("its manifest's tensor list is malformed") from None
    if {o[1] for o in objects} != tensors:
        raise bad("its object list does not match its manifest")
    return manifest_json


def check_ref_doc(doc: dict[str, Any], name: str, where: str) -> tuple[str, float]:
    """(commit id, updated) of a ref document; CorruptObjectError if it is damaged."""
    cid, updated = doc.get("commit"), doc.get("updated")
    if doc.get("kind") != "ref" or doc.get("name") != name:
        raise CorruptObjectError(f"ref document {name} at {where} is damaged: it is not the document of that ref")
    if not is_commit_id(cid):
        raise CorruptObjectError(f"ref document {name} at {where} is damaged: {cid!r} is not a commit id")
    if not isinstance(updated, (int, float)) or isinstance(updated, bool) or not math.isfinite(updated):
        raise CorruptObjectError(f"ref document {name} at {where} is damaged: its time {updated!r} is not a number")
    return cid, float(updated)


def json_names(entries: dict[str, RemoteEntry]) -> dict[str, RemoteEntry]:
    return {k[: -len(".json")]: e for k, e in entries.items() if k.endswith(".json")}


def _what(key: str) -> str:
    """How messages name the document at ``key`` ("commit document <id>", "ref document <name>")."""
    for sub, what in ((COMMITS, "commit document"), (REFS, "ref document")):
        if key.startswith(sub) and key.endswith(".json"):
            return f"{what} {key[len(sub) : -len('.json')]}"
    return f"document {key}"


def get_docs(client: S3Client, keys: list[str]) -> dict[str, dict[str, Any] | None | CorruptObjectError]:
    """``{key: document, None (missing) or the CorruptObjectError (damaged)}``, in parallel."""
    if not keys:
        return {}

    def one(key: str) -> dict[str, Any] | None | CorruptObjectError:
        try:
            return client.get_document(client.document_key(key), _what(key))
        except CorruptObjectError as exc:
            return exc

    with ThreadPoolExecutor(client.transfer.max_concurrency, thread_name_prefix="coral-remote") as pool:
        return dict(zip(keys, pool.map(one, keys)))


def listed_documents(client: S3Client, sub: str, skip: Callable[[str, RemoteEntry], bool]) -> dict[str, dict[str, Any]]:
    """``{name: document}`` for the ``<sub><name>.json`` documents listed (``skip(name, entry)``
    True: not read). A listed document that is then missing means the listing was damaged on the
    way or the remote changed: the listing is made again (``max_attempts`` times in all).

    Raises:
        CorruptObjectError: a document is damaged (after re-reads).
        RemoteError: the listing and the documents keep disagreeing.
    """
    got: dict[str, dict[str, Any]] = {}
    n = client.max_attempts
    vanished: list[str] = []
    for attempt in range(1, n + 1):
        listed = json_names(client.list_entries(sub))
        todo = [k for k, e in listed.items() if k not in got and not skip(k, e)]
        for key, doc in get_docs(client, [f"{sub}{k}.json" for k in todo]).items():
            if isinstance(doc, CorruptObjectError):
                raise refused(client.url, doc) from None
            name = key[len(sub) : -len(".json")]
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
            log.warning(
                "%d document(s) listed under %s%s were not there (first: %s); listing again",
                len(vanished),
                client.url,
                sub,
                vanished[0],
            )
            vanished = []
    raise RemoteError(
        f"the listing of {client.url}{sub} keeps naming documents that are not there (first: {vanished[0]}); "
        "nothing was pulled. Try again later (a push may be running, or the network is damaging answers)"
    )


def refused(url: str, exc: CoralError) -> CoralError:
    """The error a pull raises for a document it refuses: the same kind, saying nothing was pulled."""
    msg = (
        f"pull from {url} refused: {exc}. Nothing was pulled. Run the pull again; if it persists, "
        "push again from a repository that holds it to rewrite it"
    )
    if isinstance(exc, IntegrityError):
        return (
            type(exc)(msg, hash_key=exc.hash_key)
            if type(exc) in (CorruptObjectError, IntegrityError)
            else CorruptObjectError(msg, hash_key=exc.hash_key)
        )
    if isinstance(exc, InvalidRefNameError):
        return InvalidRefNameError(msg)
    return RemoteError(msg)
