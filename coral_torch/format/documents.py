"""Documents: the canonical JSON encoding of every remote document, and its checksum. Pure, no I/O.

Every JSON object coral-torch writes to a remote (object metadata, commit and ref documents) is
written in one canonical form (:func:`encode_document`: sorted keys, no spaces) and carries
``doc_xxh3``, the xxh3-128 of that form without the ``doc_xxh3`` field. A document whose checksum is
missing or wrong is damaged and never used (:func:`decode_document`). The same document always gives
the same bytes, so their MD5 (:func:`document_md5`) tells whether a listed object's ETag is the
document expected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import xxhash

from ..errors import CorruptObjectError, StoreError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DOC_CHECKSUM",
    "canonical_json",
    "encode_document",
    "decode_document",
    "document_md5",
    "md5",
]

FORMAT_NAME = "coral-torch-s3"
FORMAT_VERSION = 1
DOC_CHECKSUM = "doc_xxh3"  # the field of every document that holds its checksum


def md5() -> hashlib._Hash:
    """A new MD5 (an integrity check against ETags, not security: FIPS builds allow it)."""
    return hashlib.md5(usedforsecurity=False)


def canonical_json(doc: Any) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no spaces."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """The exact bytes written for a JSON document: ``doc`` with ``format``, ``format_version`` and
    its checksum ``doc_xxh3`` (the xxh3-128 of the canonical JSON of the rest), in canonical JSON
    (sorted keys, no spaces). The same ``doc`` always gives the same bytes, so their MD5 tells
    whether a listed object's ETag is the document expected."""
    body: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    body.update((k, v) for k, v in doc.items() if k != DOC_CHECKSUM)
    body[DOC_CHECKSUM] = xxhash.xxh3_128(canonical_json(body)).hexdigest()
    return canonical_json(body)


def document_md5(doc: Mapping[str, Any]) -> str:
    """MD5 hex of :func:`encode_document` (``doc``): the ETag a server gives that document."""
    h = md5()
    h.update(encode_document(doc))
    return h.hexdigest()


def decode_document(data: bytes, what: str, where: str, key: str | None = None) -> dict[str, Any]:
    """Parse and verify a document :func:`encode_document` wrote.

    Args:
        data: the bytes read.
        what: what it is, for messages ("metadata of object <key>", "commit document <id>").
        where: where it was read (a URL), for messages.
        key: the object key the error names (``hash_key``).

    Raises:
        CorruptObjectError: not JSON, not a coral-torch document, no checksum or a wrong one.
        StoreError: written by a newer coral-torch (format version).
    """
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptObjectError(f"{what} at {where} is damaged ({exc}); it was not used", hash_key=key) from None
    if doc.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise CorruptObjectError(f"{what} at {where} is not a coral-torch document; it was not used", hash_key=key)
    try:
        version = int(doc.get("format_version", 1))
    except (TypeError, ValueError):
        version = -1
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{what} at {where} has format version {doc.get('format_version')}, newer than this coral-torch "
            f"understands ({FORMAT_VERSION}); upgrade coral-torch"
        )
    recorded = doc.pop(DOC_CHECKSUM, None)
    if recorded is None:
        raise CorruptObjectError(
            f"{what} at {where} has no checksum (damaged, or written by an older coral-torch); it was not "
            "used. Push it again from a repository that holds it to rewrite it",
            hash_key=key,
        )
    actual = xxhash.xxh3_128(canonical_json(doc)).hexdigest()
    if actual != recorded:
        raise CorruptObjectError(
            f"{what} at {where} is damaged (document checksum mismatch); it was not used", hash_key=key
        )
    return doc
