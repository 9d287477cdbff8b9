"""Compare-and-swap publishing on an S3 remote, for several writers sharing one prefix.

S3 conditional writes make it exact: a commit document is created with ``If-None-Match: *`` (never
overwritten: ids are content hashes) and a ref is moved with ``If-Match: <the ETag the writer saw>``
(``If-None-Match: *`` to create it), so of two writers moving a ref from the same value exactly one
succeeds and the other gets :class:`~coral_torch.errors.RefConflictError`.

Not every server enforces these conditions (AWS S3 and moto do; ``rclone serve s3`` ignores them).
:func:`conditional_writes` finds out once per server and prefix; where they are ignored a ref is
moved by read, write, read back: a writer that moved the ref before this one read it is detected,
two writing within the same moment are not (the last writer wins inside that window).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import (
    CoralError,
    CorruptObjectError,
    InvalidRefNameError,
    RefConflictError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
)
from ...format.refnames import validate_ref_name
from ...storage.s3.client import S3Client
from ...storage.s3.errors import PreconditionFailedError
from .protocol import COMMITS, REFS, check_commit_doc, check_ref_doc, is_commit_id, ref_doc

log = logging.getLogger(__name__)

__all__ = ["RemoteRef", "read_ref", "conditional_writes", "publish_commit", "move_ref", "PROBE_PREFIX"]

PROBE_PREFIX = ".coral-probe/"  # under the remote's prefix: where conditional_writes writes its probe
_UNREACHABLE = (RemoteConnectionError, RemoteAuthError)  # failures that say nothing about the server
_lock = threading.Lock()  # guards the two dicts below
_probed: dict[tuple[str, str], bool] = {}  # (endpoint, url) -> conditions enforced
_probing: dict[tuple[str, str], threading.Lock] = {}  # one probe at a time per (endpoint, url)


@dataclass(frozen=True)
class RemoteRef:
    """A remote ref as read: the commit it names and its document's ETag (both ``None``: it does not
    exist; only ``commit`` ``None``: its document is damaged, see :func:`read_ref`)."""

    name: str
    commit: str | None
    etag: str | None


def _ref_key(name: str) -> str:
    return f"{REFS}{validate_ref_name(name)}.json"


def read_ref(client: S3Client, name: str, *, damaged_ok: bool = False) -> RemoteRef:
    """The ref ``name`` on the remote, with its document's ETag (the ``expected`` of :func:`move_ref`).

    Raises:
        CorruptObjectError: its document is damaged (unless ``damaged_ok``: then it comes back as
            ``RemoteRef(name, None, <its ETag>)``, which :func:`move_ref` replaces).
        InvalidRefNameError: ``name`` is not a valid ref name.
    """
    rel = _ref_key(name)
    try:
        doc, etag = client.get_document(rel, f"ref document {name}", with_etag=True)
        if doc is None:
            return RemoteRef(name, None, None)
        return RemoteRef(name, check_ref_doc(doc, name, client.url)[0], etag)
    except CorruptObjectError:
        if not damaged_ok:
            raise
        entry = client.list_entries(rel).get("")  # a body failing its checksum came without an ETag
        return RemoteRef(name, None, entry.etag if entry is not None else None)


# ------------------------------------------------------------------------------- the probe
def _probe(client: S3Client) -> str | None:
    """None if the server refuses both conditional writes that must fail, else what it did."""
    rel = f"{PROBE_PREFIX}{uuid.uuid4().hex}.json"
    doc = {"kind": "probe", "writer": uuid.uuid4().hex}
    what = "conditional-write probe"
    try:
        try:
            client.put_document(rel, doc, what, if_none_match=True)
        except PreconditionFailedError:
            return "it refused If-None-Match: * on a new key"
        except _UNREACHABLE:
            raise
        except RemoteError as exc:
            client.put_document(rel, doc, what)  # refused the header itself? (else this fails too)
            return f"it refuses conditional headers ({exc})"
        for header, wrong_etag in (("If-None-Match: *", None), ("If-Match", "0" * 32)):
            try:
                client.put_document(rel, doc, what, if_none_match=wrong_etag is None, if_match=wrong_etag)
            except PreconditionFailedError:
                continue
            except _UNREACHABLE:
                raise
            except RemoteError as exc:
                return f"it answered a PUT with {header} with an error, not 412 ({exc})"
            return f"it accepted a PUT with {header} that had to be refused"
        return None
    finally:
        try:
            client.delete(rel)
        except CoralError:  # best effort: a leftover probe is harmless
            log.debug("could not delete the probe %s", client.where(rel), exc_info=True)


def conditional_writes(client: S3Client) -> bool:
    """Whether ``client``'s server enforces conditional PUTs (``If-None-Match: *`` and ``If-Match``):
    probed once per endpoint and ``client.url`` (a document under :data:`PROBE_PREFIX`, deleted
    afterwards), logging one warning where it does not.

    Raises:
        RemoteError and subclasses: the probe could not be written (unreachable, denied); nothing
            is remembered then.
    """
    key = (str(client.endpoint), client.url)
    with _lock:
        if key in _probed:
            return _probed[key]
        probing = _probing.setdefault(key, threading.Lock())
    with probing:
        with _lock:
            if key in _probed:  # another thread probed meanwhile
                return _probed[key]
        why = _probe(client)
        with _lock:
            _probed[key] = why is None
        if why is not None:
            log.warning(
                "S3 at %s does not enforce conditional writes for %s (%s): refs are moved by read, write "
                "and read back, which detects a writer that moved a ref earlier but not one writing in the "
                "same moment (the last writer wins); commits stay safe (content-addressed)",
                client.endpoint,
                client.url,
                why,
            )
    return why is None


# -------------------------------------------------------------------------------- commits
def _existing_commit(client: S3Client, rel: str, cid: str) -> tuple[bool, str | None, str | None]:
    """(whether a document is at ``rel``, its ETag, what is wrong with it: ``None`` if intact)."""
    try:
        got, etag = client.get_document(rel, f"commit document {cid}", with_etag=True)
    except CorruptObjectError as exc:
        entry = client.list_entries(rel).get("")
        return entry is not None, entry.etag if entry is not None else None, str(exc)
    if got is None:
        return False, None, None
    try:
        check_commit_doc(got, cid, client.url)
    except (CorruptObjectError, InvalidRefNameError) as exc:
        return True, etag, str(exc)
    return True, etag, None


def publish_commit(client: S3Client, cid: str, doc: Mapping[str, Any]) -> bool:
    """Write the commit document ``doc`` of ``cid`` unless an intact one is already there (ids are
    content hashes: it is the same commit); a damaged one is replaced (``If-Match`` its ETag).
    Returns whether this call wrote it (a write whose answer was lost and was retried reads as an
    existing document: ``False``).

    Raises:
        CorruptObjectError, InvalidRefNameError: ``doc`` is not a valid document of ``cid``.
        RemoteError and subclasses: the remote refused or failed, or the document kept changing.
    """
    check_commit_doc(dict(doc), cid, "the document to publish")
    rel, what = f"{COMMITS}{cid}.json", f"commit document {cid}"
    enforced = conditional_writes(client)
    n = client.max_attempts
    for _ in range(n):
        if enforced:
            try:
                client.put_document(rel, doc, what, if_none_match=True)
                return True
            except PreconditionFailedError:
                pass
        present, etag, problem = _existing_commit(client, rel, cid)
        if present and problem is None:
            return False
        if present:
            log.warning("commit document %s on %s is damaged (%s): writing it again", cid, client.url, problem)
        if not enforced:
            client.put_document(rel, doc, what)
            return True
        if not present:
            continue  # deleted meanwhile: create it again
        try:
            client.put_document(rel, doc, what, if_match=etag)
            return True
        except PreconditionFailedError:
            continue  # changed meanwhile: look again
    raise RemoteError(
        f"could not publish commit document {cid} to {client.url}: it kept changing while this writer "
        f"wrote it ({n} attempts); try again"
    )


# ----------------------------------------------------------------------------------- refs
def _conflict(client: S3Client, name: str, cid: str, expected: RemoteRef, current: RemoteRef) -> RefConflictError:
    was = expected.commit or ("a damaged document" if expected.etag else "absent")
    now = current.commit or ("a damaged document" if current.etag else "deleted")
    if current.commit and current.commit == expected.commit:
        now += " (rewritten)"
    if current.commit:
        todo = f"it names the other writer's commit {current.commit}; pull, then save again to build on it"
    else:
        todo = "read it again and save again"
    return RefConflictError(
        f"ref {name} on {client.url} was moved by another writer (from {was} to {now}) while this one was "
        f"moving it to {cid}; {todo}",
        ref=name,
        expected=expected.commit,
        current=current.commit,
    )


def move_ref(client: S3Client, name: str, cid: str, *, expected: RemoteRef, updated: float) -> RemoteRef:
    """Move the remote ref ``name`` to ``cid`` if it still is ``expected`` (compare-and-swap:
    ``If-None-Match: *`` where ``expected`` is absent, else ``If-Match`` its ETag); returns the
    ref as written. A ref that already names ``cid`` is left as it is (the move is done).

    On a server that does not enforce conditional writes (:func:`conditional_writes`) the ref is
    read first (a change since ``expected`` is a conflict), written, and read back (another
    writer's value there is a conflict). That narrows the race but does not close it: two writers
    within the same moment both succeed, and the last one's value stays.

    Raises:
        RefConflictError: another writer moved the ref first; ``current`` says where to.
        CorruptObjectError: the ref's document became damaged meanwhile; InvalidRefNameError.
        RemoteError and subclasses: the remote refused or failed.
    """
    if not is_commit_id(cid) or expected.name != name:
        raise CoralError(f"move_ref({name!r}, {cid!r}): not a commit id, or expected is of ref {expected.name!r}")
    rel, doc, what = _ref_key(name), ref_doc(name, cid, updated), f"ref document {name}"
    if not conditional_writes(client):
        current = read_ref(client, name, damaged_ok=True)
        if current.etag != expected.etag:
            if current.commit == cid:
                return current
            raise _conflict(client, name, cid, expected, current)
        client.put_document(rel, doc, what)
        back = read_ref(client, name, damaged_ok=True)
        if back.commit != cid:
            raise _conflict(client, name, cid, expected, back)
        return back
    for _ in range(client.max_attempts):
        try:
            if expected.etag is None:
                put = client.put_document(rel, doc, what, if_none_match=True)
            else:
                put = client.put_document(rel, doc, what, if_match=expected.etag)
            return RemoteRef(name, cid, put.etag)
        except PreconditionFailedError:
            pass
        except RemoteError as exc:  # If-Match on a deleted key: 404, not 412
            if expected.etag is None or isinstance(exc, _UNREACHABLE):
                raise
            if read_ref(client, name, damaged_ok=True).etag is not None:
                raise
            raise _conflict(client, name, cid, expected, RemoteRef(name, None, None)) from None
        current = read_ref(client, name, damaged_ok=True)
        if current.commit == cid:  # another writer's move to the same commit, or ours whose answer was lost
            return current
        if current.etag != expected.etag:
            raise _conflict(client, name, cid, expected, current)
        # refused, yet unchanged: a concurrent conditional write that failed (409); try again
    raise RemoteError(f"S3 at {client.endpoint} kept refusing to move ref {name} on {client.url}; try again")
