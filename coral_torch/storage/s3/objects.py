"""The object layout of an S3 remote, over :class:`~coral_torch.storage.s3.client.S3Client`.

Under the prefix (``<key>`` is the content hash, or the key given to ``S3Store.store``)::

    weights/<key>               the tensor, encoded with the byte-plane codec: exactly the blob that
                                HDF5Store's default "coral" encoding keeps (b"CZP1" ...)
    metadata/<key>.json         the tensor's description (:func:`~coral_torch.format.objects.
                                weight_document`); written AFTER the payload
    deltas/<key>                a delta's payload (``Delta.data`` as is)
    metadata/<key>.delta.json   the delta's description (:func:`~coral_torch.format.objects.
                                delta_document`); written AFTER the payload

Every metadata document also records ``key``, ``payload_md5`` and ``payload_etag`` (the ETag the
server gave the payload), and is encoded by :mod:`coral_torch.format.documents`.

Visibility: an object exists only when its metadata exists. The payload is uploaded (verified) first
and the metadata last, so an interrupted upload leaves at most an invisible payload, overwritten by
the next upload of that key. Deletion removes the metadata first. Every download is verified:
document checksum, payload size and ``payload_xxh3``, and a weight's content hash; bytes that fail a
check are fetched again (``max_attempts`` times in all) before the object is reported damaged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import CorruptObjectError, HashMismatchError, IntegrityError, StoreError
from ...format import codec, dtypes, objects as fmt
from ...format.delta import Delta
from ...format.documents import encode_document
from ...format.objects import PreparedObject
from ...format.weight_tensor import WeightTensor
from .client import RemoteEntry, S3Client, norm_etag

log = logging.getLogger(__name__)

__all__ = ["S3Objects", "check_key", "payload_key", "meta_key", "KINDS"]

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:=+-]{0,254}$")
KINDS = {fmt.WEIGHTS: "weight", fmt.DELTAS: "delta"}
_NOUN = {fmt.WEIGHTS: "object", fmt.DELTAS: "delta"}  # how messages name one
_SUFFIX = {fmt.WEIGHTS: ".json", fmt.DELTAS: ".delta.json"}


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or key.endswith(".delta"):
        raise StoreError(
            f"invalid object key {key!r} for S3Store: use up to 255 letters, digits and '_.:=+-', "
            "not starting with '.' or ending in '.delta' (content hashes always qualify)"
        )
    return key


def payload_key(group: str, key: str) -> str:
    return f"{group}/{key}"


def meta_key(group: str, key: str) -> str:
    return f"metadata/{key}{_SUFFIX[group]}"


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


class S3Objects:
    """Content-addressed weights and deltas under a client's prefix (see the module docstring)."""

    def __init__(self, client: S3Client, codec_level: int = codec.DEFAULT_LEVEL):
        self.client = client
        self.codec_level = int(codec_level)
        self.url = client.url

    # ------------------------------------------------------------------------------ writes
    def encode_weight(self, weight: WeightTensor) -> tuple[np.ndarray, dict[str, Any]]:
        """Hash and encode one tensor: the payload and its metadata document. No I/O."""
        digest = weight.compute_hash()
        meta = weight.metadata
        payload = codec.encode(weight.raw, dtypes.itemsize(meta.dtype), self.codec_level)
        doc = {
            "kind": "weight",
            **fmt.weight_attrs(meta, digest, weight.nbytes, fmt.ENCODING_CODEC, payload),
            "payload_bytes": int(payload.size),
        }
        return payload, doc

    def put_pair(self, group: str, key: str, payload: Any, doc: dict[str, Any]) -> int:
        """Upload the payload (verified), then its metadata, which makes the object visible. The
        metadata records the payload's MD5 and the ETag the server gave it. Returns bytes sent."""
        noun = _NOUN[group]
        put = self.client.put_bytes(payload_key(group, key), payload, f"{noun} {key}")
        body = encode_document({"key": key, **doc, "payload_md5": put.md5, "payload_etag": put.etag})
        self.client.put_bytes(meta_key(group, key), body, f"metadata of {noun} {key}", "application/json")
        log.debug("uploaded %s/%s (%d bytes)", group, key, put.size + len(body))
        return put.size + len(body)

    def store_weight(self, weight: WeightTensor, key: str, check: bool = True) -> int:
        """Store one tensor under ``key`` unless present; returns bytes sent."""
        if check and self.client.exists(meta_key(fmt.WEIGHTS, key)):
            return 0
        payload, doc = self.encode_weight(weight)
        return self.put_pair(fmt.WEIGHTS, key, payload, doc)

    def store_delta(self, delta: Delta, key: str) -> int:
        if self.client.exists(meta_key(fmt.DELTAS, key)):
            return 0
        data = delta.data if isinstance(delta.data, (bytes, bytearray, memoryview)) else bytes(delta.data)
        return self.put_pair(fmt.DELTAS, key, data, fmt.delta_document(delta, data))

    def put_prepared(self, obj: PreparedObject) -> int:
        """Upload an object read from a local store (payload checksum-verified there). A codec blob
        goes up as stored, after checking it decodes to its content hash; a values-encoded weight is
        verified and encoded here. Returns bytes sent."""
        key = check_key(obj.key)
        if obj.group == fmt.DELTAS:
            delta = fmt.delta_from_description(obj.attrs, b"", key, f" at {self.url}")
            return self.put_pair(fmt.DELTAS, key, obj.payload, fmt.delta_document(delta, obj.payload))
        if fmt.as_text(obj.attrs.get("encoding", fmt.ENCODING_VALUES)) == fmt.ENCODING_CODEC:
            doc = fmt.weight_document(obj.attrs, key, obj.payload, obj.logical_bytes)
            fmt.decode_weight(obj.payload, doc, key, f" at {self.url}")  # never publish bytes that do not decode
            return self.put_pair(fmt.WEIGHTS, key, obj.payload, doc)
        if fmt.as_text(obj.attrs.get("hash", key)) != key and not obj.attrs.get("custom_key"):
            raise HashMismatchError(
                f"object stored under {key} describes itself as {obj.attrs.get('hash')}: the store was "
                "tampered with or damaged; it was not sent",
                hash_key=key,
            )
        weight = fmt.decode_weight(obj.payload, obj.attrs, key, "", default_encoding=fmt.ENCODING_VALUES)
        payload, doc = self.encode_weight(weight)
        return self.put_pair(fmt.WEIGHTS, key, payload, doc)

    def delete_pair(self, group: str, key: str) -> bool:
        existed = self.client.exists(meta_key(group, key))
        self.client.delete(meta_key(group, key))
        self.client.delete(payload_key(group, key))
        return existed

    # ------------------------------------------------------------------------------- reads
    def exists(self, group: str, key: str) -> bool:
        return self.client.exists(meta_key(group, key))

    def read_meta(self, group: str, key: str, attempts: int | None = None) -> dict[str, Any] | None:
        return self.client.get_document(
            meta_key(group, key), f"metadata of {_NOUN[group]} {key}", key=key, attempts=attempts
        )

    def _check_doc_names(self, doc: dict[str, Any], key: str, kind: str) -> None:
        if doc.get("key", key) != key or doc.get("kind", kind) != kind:
            raise CorruptObjectError(
                f"metadata of {kind} {key} at {self.url} describes {doc.get('kind')} {doc.get('key')}; it was not used",
                hash_key=key,
            )

    def _payload(self, group: str, key: str, doc: dict[str, Any]) -> np.ndarray:
        """The object's payload, size- and checksum-verified against its metadata."""
        payload = self.client.get_bytes(
            payload_key(group, key), _opt_int(doc.get("payload_bytes")), what=_NOUN[group], key=key
        )
        expected = doc.get("payload_xxh3")
        if expected is None or fmt.payload_checksum(payload) != str(expected):
            raise CorruptObjectError(
                f"{_NOUN[group]} {key} at {self.url} is damaged (payload checksum mismatch); it was not returned",
                hash_key=key,
            )
        return payload

    def again_if_damaged(self, fn: Callable[[], Any]) -> Any:
        """Run a download that verifies what it got; bytes damaged on the way are fetched again
        (``max_attempts`` times in all) before the damage is reported."""
        n = self.client.max_attempts
        for attempt in range(1, n + 1):
            try:
                return fn()
            except IntegrityError as exc:
                if attempt == n:
                    raise
                log.warning("%s; downloading it again (attempt %d of %d)", exc, attempt + 1, n)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fetch_once(self, group: str, key: str) -> tuple[dict[str, Any], np.ndarray] | None:
        doc = self.read_meta(group, key, attempts=1)
        if doc is None:
            return None
        self._check_doc_names(doc, key, KINDS[group])
        return doc, self._payload(group, key, doc)

    def load_weight(self, key: str) -> WeightTensor | None:
        def once() -> WeightTensor | None:
            got = self._fetch_once(fmt.WEIGHTS, key)
            return None if got is None else fmt.decode_weight(got[1], got[0], key, f" at {self.url}")

        return self.again_if_damaged(once)

    def load_delta(self, key: str) -> Delta | None:
        def once() -> Delta | None:
            got = self._fetch_once(fmt.DELTAS, key)
            return None if got is None else fmt.delta_from_description(got[0], got[1].tobytes(), key, f" at {self.url}")

        return self.again_if_damaged(once)

    def fetch(self, group: str, key: str, *, decode: bool = True) -> tuple[PreparedObject, int] | None:
        """Download and verify one object into a PreparedObject for a local store, and the bytes
        received (None: no such object). Damaged bytes are fetched again before failing.

        The payload is always checked against its metadata's size and checksum. ``decode``: a weight
        is also decoded and checked against its content hash here; False leaves that to whoever
        reads it (a cache whose every read checks the content hash: the check is not done twice)."""
        check_key(key)
        return self.again_if_damaged(lambda: self._fetch_prepared(group, key, decode))

    def _fetch_prepared(self, group: str, key: str, decode: bool) -> tuple[PreparedObject, int] | None:
        got = self._fetch_once(group, key)
        if got is None:  # deleted since the listing
            return None
        doc, payload = got
        where = f" at {self.url}"
        if group == fmt.WEIGHTS:
            if decode:
                weight = fmt.decode_weight(payload, doc, key, where)
                meta = weight.metadata
                del weight
            else:
                meta = fmt.weight_metadata(doc, key, where)
                if meta.hash != key:
                    raise CorruptObjectError(
                        f"metadata of object {key}{where} names another object ({meta.hash})", hash_key=key
                    )
            attrs = fmt.weight_attrs(
                meta, meta.hash or key, meta.nbytes, str(doc.get("encoding", fmt.ENCODING_CODEC)), payload
            )
            if attrs["encoding"] != fmt.ENCODING_CODEC:
                raise CorruptObjectError(
                    f"object {key}{where} has encoding {attrs['encoding']!r}, which cannot be copied as is",
                    hash_key=key,
                )
            obj = PreparedObject(key, group, payload, attrs, meta.nbytes)
        else:
            delta = fmt.delta_from_description(doc, b"", key, where)
            try:
                check_key(delta.reference_hash)
            except StoreError:
                raise CorruptObjectError(
                    f"metadata of delta {key}{where} names an invalid base {delta.reference_hash!r}",
                    hash_key=key,
                ) from None
            logical = fmt.delta_logical_bytes(delta.original_shape, delta.original_dtype)
            obj = PreparedObject(key, group, payload, fmt.delta_attrs(delta, payload), logical)
        return obj, int(payload.nbytes) + len(encode_document(doc))

    def check_remote_object(self, group: str, key: str, payload: RemoteEntry | None = None) -> str | None:
        """Check one object without downloading its payload: its metadata (verified against its
        checksum) must describe it, and the payload's listed size and ETag (``payload``; listed here
        when not given) must be what the metadata recorded. ``None`` if intact, else what is wrong."""
        key = check_key(key)
        kind = KINDS[group]
        if payload is None:
            payload = self.client.list_entries(f"{group}/").get(key)
            if payload is None:
                return "its payload is missing"
        try:
            doc = self.read_meta(group, key)
        except CorruptObjectError as exc:
            return str(exc)
        if doc is None:
            return "its metadata is missing"
        if doc.get("key") != key or doc.get("kind", kind) != kind:
            return f"its metadata describes {doc.get('kind')} {doc.get('key')}"
        if _opt_int(doc.get("payload_bytes")) != payload.size:
            return f"its payload has {payload.size} bytes, its metadata says {doc.get('payload_bytes')}"
        recorded = {norm_etag(doc.get(f)) for f in ("payload_etag", "payload_md5") if doc.get(f)}
        if not recorded:
            return "its metadata records no payload checksum (written by an older coral-torch)"
        if payload.etag not in recorded:
            return f"its payload's ETag {payload.etag} is not the {'/'.join(sorted(recorded))} recorded"
        return None

    # ----------------------------------------------------------------------------- listing
    def list_metadata(self) -> tuple[list[str], list[str]]:
        """(weight keys, delta keys), from one listing of ``metadata/``."""
        weights: list[str] = []
        deltas: list[str] = []
        for rel, _ in self.client.iter_entries("metadata/"):
            name = rel[len("metadata/") :]
            if "/" in name:
                continue
            if name.endswith(".delta.json"):
                deltas.append(name[: -len(".delta.json")])
            elif name.endswith(".json"):
                weights.append(name[: -len(".json")])
        return weights, deltas

    def present(self) -> dict[str, dict[str, RemoteEntry | None]]:
        """``{group: {key: payload entry}}`` of the objects whose metadata and payload are both
        listed (consistency-checked listings)."""
        meta = self.client.list_entries("metadata/")
        out: dict[str, dict[str, RemoteEntry | None]] = {}
        for group in (fmt.WEIGHTS, fmt.DELTAS):
            payloads = self.client.list_entries(f"{group}/")
            suffix = _SUFFIX[group]
            out[group] = {k: e for k, e in payloads.items() if f"{k}{suffix}" in meta}
        return out
