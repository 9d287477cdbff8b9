"""Objects: the one description of a stored object and its forms. Pure, no I/O.

A stored object is a payload (bytes) and its description. A weight's payload is a codec blob
(``encoding="czp1"``, see :mod:`coral_torch.codec`) or its raw values (``"values"``); a delta's is
``Delta.data`` as stored. The description has two forms, which carry the same fields:

- *attributes*: what :class:`~coral_torch.storage.HDF5Store` keeps beside a dataset
  (:func:`weight_attrs`, :func:`delta_attrs`; a delta's ``extra`` entries as ``extra_<name>``);
- *metadata documents*: what an S3 remote keeps in ``metadata/<key>[.delta].json``
  (:func:`weight_document`, :func:`delta_document`; ``kind``, ``payload_bytes``, ``extra`` as one
  object), encoded by :mod:`coral_torch.format.documents`.

Both record ``payload_xxh3`` (:func:`payload_checksum`, the xxh3-64 of the payload bytes). The
mappings back (:func:`weight_metadata`, :func:`delta_from_description`,
:func:`delta_attrs_from_document`) raise :class:`~coral_torch.errors.CorruptObjectError` on a damaged
description.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ..errors import CoralError, CorruptObjectError, HashMismatchError
from . import codec, dtypes
from .delta import Delta, DeltaType
from .weight_tensor import WeightMetadata, WeightTensor, content_hash

__all__ = [
    "ENCODING_CODEC",
    "ENCODING_VALUES",
    "WEIGHTS",
    "DELTAS",
    "EXTRA_PREFIX",
    "byte_view",
    "payload_checksum",
    "payload_size",
    "weight_attrs",
    "delta_attrs",
    "delta_logical_bytes",
    "weight_document",
    "delta_document",
    "weight_metadata",
    "delta_metadata",
    "delta_from_description",
    "delta_attrs_from_document",
    "decode_weight",
    "as_text",
    "jsonable",
    "PreparedObject",
]

ENCODING_CODEC = "czp1"  # the payload is a codec blob
ENCODING_VALUES = "values"  # the payload holds the values (HDF5 filter, if any)
WEIGHTS, DELTAS = "weights", "deltas"  # the two groups of objects
EXTRA_PREFIX = "extra_"  # a delta's extra entries, as attributes

Payload = np.ndarray | codec.Blob | bytes | bytearray | memoryview


@dataclass
class PreparedObject:
    """An object's stored payload and its description (attributes), ready to be written by
    :meth:`~coral_torch.storage.HDF5Store.write_prepared` or sent to a remote; no h5py inside."""

    key: str
    group: str  # WEIGHTS or DELTAS
    payload: np.ndarray | codec.Blob  # a Blob only from the internal segmented encoders
    attrs: dict[str, Any]
    logical_bytes: int
    location: tuple[int, int] | None = None  # (file offset, length) once written, if contiguous

    @property
    def stored_bytes(self) -> int:
        return int(self.payload.nbytes)


def as_text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def jsonable(v: Any) -> Any:
    """``v`` as plain JSON values (numpy scalars and arrays, bytes)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())  # elements as plain values (object arrays, bytes) too
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def byte_view(buf: Any) -> memoryview:
    """A flat byte view of a payload (ndarray or buffer), without copying it."""
    if isinstance(buf, np.ndarray):
        return memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
    return memoryview(buf).cast("B")


def payload_checksum(payload: Payload) -> str:
    """``payload_xxh3``: the xxh3-64 hex of a payload's bytes (hashed in place)."""
    if isinstance(payload, codec.Blob):
        return payload.xxh3_64()
    return xxhash.xxh3_64(byte_view(payload)).hexdigest()


def payload_size(payload: Payload) -> int:
    if isinstance(payload, (np.ndarray, codec.Blob)):
        return int(payload.nbytes)
    return len(byte_view(payload))


def delta_logical_bytes(shape: Any, dtype: str) -> int:
    """Bytes of the tensor a delta rebuilds."""
    return int(np.prod(tuple(int(x) for x in shape), dtype=np.int64)) * dtypes.itemsize(dtype)


# ------------------------------------------------------------------------------- attributes
def weight_attrs(meta: WeightMetadata, digest: str, nbytes: int, encoding: str, payload: Payload) -> dict[str, Any]:
    """The description every store keeps beside a weight's payload (HDF5 attribute, S3 document)."""
    return {
        "name": meta.name or "",
        "shape": [int(x) for x in meta.shape],
        "dtype": meta.dtype,
        "layer_type": meta.layer_type or "",
        "model_name": meta.model_name or "",
        "hash": digest,
        "nbytes": int(nbytes),
        "encoding": encoding,
        "payload_xxh3": payload_checksum(payload),
    }


def delta_attrs(delta: Delta, payload: Payload) -> dict[str, Any]:
    """A delta's description as attributes (``delta.data`` is not read; ``payload`` is what is stored)."""
    attrs: dict[str, Any] = {
        "delta_type": delta.delta_type.value,
        "reference_hash": delta.reference_hash,
        "original_shape": [int(x) for x in delta.original_shape],
        "original_dtype": delta.original_dtype,
        "compression_ratio": float(delta.compression_ratio),
        "lossless": bool(delta.lossless),
        "payload_xxh3": payload_checksum(payload),
    }
    for k, v in delta.extra.items():
        attrs[f"{EXTRA_PREFIX}{k}"] = v
    return attrs


# ------------------------------------------------------------------------ metadata documents
def weight_document(attrs: Mapping[str, Any], key: str, payload: Payload, logical_bytes: int) -> dict[str, Any]:
    """The metadata document of a codec-encoded weight from its attributes (``custom_key`` and other
    local-only attributes are not part of it); ``payload_xxh3`` is computed from ``payload``."""
    return {
        "kind": "weight",
        "name": as_text(attrs.get("name", "")),
        "shape": [int(x) for x in np.asarray(attrs["shape"]).reshape(-1)],
        "dtype": as_text(attrs["dtype"]),
        "layer_type": as_text(attrs.get("layer_type", "")),
        "model_name": as_text(attrs.get("model_name", "")),
        "hash": as_text(attrs.get("hash", key)),
        "nbytes": int(attrs.get("nbytes", logical_bytes)),
        "encoding": ENCODING_CODEC,
        "payload_xxh3": payload_checksum(payload),
        "payload_bytes": payload_size(payload),
    }


def delta_document(delta: Delta, payload: Payload) -> dict[str, Any]:
    """The metadata document of a delta whose stored payload is ``payload``."""
    return {
        "kind": "delta",
        "delta_type": delta.delta_type.value,
        "reference_hash": delta.reference_hash,
        "original_shape": list(delta.original_shape),
        "original_dtype": delta.original_dtype,
        "compression_ratio": float(delta.compression_ratio),
        "lossless": bool(delta.lossless),
        "extra": {k: jsonable(v) for k, v in delta.extra.items()},
        "payload_xxh3": payload_checksum(payload),
        "payload_bytes": payload_size(payload),
    }


# ------------------------------------------------------------------------------ back again
def weight_metadata(
    desc: Mapping[str, Any], key: str, where: str = "", *, default_encoding: str = ENCODING_CODEC
) -> WeightMetadata:
    """The :class:`WeightMetadata` a weight's description (either form) records."""
    try:
        return WeightMetadata(
            name=as_text(desc.get("name", "")),
            shape=tuple(int(x) for x in desc["shape"]),
            dtype=as_text(desc["dtype"]),
            layer_type=as_text(desc.get("layer_type", "")) or None,
            model_name=as_text(desc.get("model_name", "")) or None,
            hash=as_text(desc.get("hash", key)),
            compression_info={"encoding": as_text(desc.get("encoding", default_encoding))},
        )
    except (KeyError, ValueError, TypeError, CoralError) as exc:
        raise CorruptObjectError(f"metadata of object {key}{where} is damaged: {exc}", hash_key=key) from None


def delta_metadata(desc: Mapping[str, Any], key: str, where: str = "") -> WeightMetadata:
    """The :class:`WeightMetadata` of the tensor a delta's description rebuilds."""
    try:
        return WeightMetadata(
            name="",
            shape=tuple(int(x) for x in desc["original_shape"]),
            dtype=as_text(desc["original_dtype"]),
            hash=key,
            compression_info={"delta_type": as_text(desc["delta_type"])},
        )
    except (KeyError, ValueError, TypeError, CoralError) as exc:
        raise CorruptObjectError(f"metadata of delta {key}{where} is damaged: {exc}", hash_key=key) from None


def delta_extra(desc: Mapping[str, Any]) -> dict[str, Any]:
    """A delta's ``extra`` from its description: the ``extra`` object of a document, or the
    ``extra_<name>`` attributes."""
    if "extra" in desc and not any(k.startswith(EXTRA_PREFIX) for k in desc):
        return dict(desc.get("extra") or {})
    return {k[len(EXTRA_PREFIX) :]: jsonable(v) for k, v in desc.items() if k.startswith(EXTRA_PREFIX)}


def delta_from_description(desc: Mapping[str, Any], data: Any, key: str, where: str = "") -> Delta:
    """The :class:`Delta` a description (either form) records, with ``data`` as its payload."""
    try:
        return Delta(
            delta_type=DeltaType(as_text(desc["delta_type"])),
            data=data,
            original_shape=tuple(int(x) for x in desc["original_shape"]),
            original_dtype=as_text(desc["original_dtype"]),
            reference_hash=as_text(desc["reference_hash"]),
            compression_ratio=float(desc.get("compression_ratio", 1.0)),
            extra=delta_extra(desc),
        )
    except (KeyError, ValueError, TypeError, CoralError) as exc:
        raise CorruptObjectError(f"metadata of delta {key}{where} is damaged: {exc}", hash_key=key) from None


def delta_attrs_from_document(doc: Mapping[str, Any], key: str, payload: Payload, where: str = "") -> dict[str, Any]:
    """A delta's attributes from its metadata document (``payload_xxh3`` computed from ``payload``)."""
    return delta_attrs(delta_from_description(doc, b"", key, where), payload)


def decode_weight(
    payload: Any,
    desc: Mapping[str, Any],
    key: str,
    where: str = "",
    default_encoding: str = ENCODING_CODEC,
    *,
    copy: bool = True,
) -> WeightTensor:
    """Decode a (checksum-verified) payload with its description and check it against the content
    hash; the tensor, never bytes that do not hash to it. ``copy=False``: a ``"values"`` payload
    that is an ndarray the caller owns is wrapped, not copied.

    Raises:
        CorruptObjectError: unknown encoding, wrong size, damaged description or blob.
        HashMismatchError: the bytes do not hash to the recorded content hash.
    """
    meta = weight_metadata(desc, key, where, default_encoding=default_encoding)
    encoding = as_text(desc.get("encoding", default_encoding))
    if encoding == ENCODING_CODEC:
        raw = codec.decode(np.asarray(payload) if not isinstance(payload, np.ndarray) else payload, hash_key=key)
    elif encoding == ENCODING_VALUES:
        if not copy and isinstance(payload, np.ndarray):
            raw = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
        else:
            raw = np.array(byte_view(payload), dtype=np.uint8, copy=True)
    else:
        raise CorruptObjectError(f"object {key}{where} has unknown encoding {encoding!r}", hash_key=key)
    if raw.size != meta.nbytes:
        raise CorruptObjectError(
            f"object {key}{where} decodes to {raw.size} bytes, expected {meta.nbytes}; it was not returned",
            hash_key=key,
        )
    expected = meta.hash or key
    actual = content_hash(raw, meta.dtype, meta.shape)
    if actual != expected:
        raise HashMismatchError(
            f"object {key}{where} is corrupt: its bytes hash to {actual}, not {expected}; it was not returned",
            hash_key=key,
        )
    return WeightTensor.from_raw(raw, meta, known_hash=actual)  # verified above: no second pass
