"""`S3Store`: the weight store on AWS S3 or any S3-compatible server (MinIO, SeaweedFS, moto, ...).

This module keeps the names it always had; they live in :mod:`coral_torch.storage.s3`:

- :class:`S3Config` (:mod:`~coral_torch.storage.s3.config`, with the transfer knobs in
  :class:`~coral_torch.storage.s3.config.TransferConfig`);
- the transport, :class:`~coral_torch.storage.s3.client.S3Client` (verified uploads and downloads,
  documents, conditional writes, retries, error translation) and :class:`RemoteEntry`;
- the object layout (``weights/<key>``, ``deltas/<key>``, ``metadata/<key>[.delta].json``):
  :mod:`~coral_torch.storage.s3.objects`;
- :class:`S3Store` (:mod:`~coral_torch.storage.s3.store`) and the sync engine
  (:mod:`~coral_torch.storage.s3.sync`);
- the document encoding (:func:`encode_document`, :func:`decode_document`, :func:`document_md5`):
  :mod:`coral_torch.format.documents`.
"""

from __future__ import annotations

from ..format.documents import (
    DOC_CHECKSUM,
    FORMAT_NAME,
    FORMAT_VERSION,
    decode_document,
    document_md5,
    encode_document,
)
from ..format.objects import payload_checksum as _payload_hash
from .s3.client import RemoteEntry
from .s3.config import MiB, S3Config, TransferConfig
from .s3.store import S3Store

__all__ = [
    "S3Config",
    "S3Store",
    "RemoteEntry",
    "encode_document",
    "decode_document",
    "document_md5",
    "TransferConfig",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DOC_CHECKSUM",
    "MiB",
    "_payload_hash",
]
