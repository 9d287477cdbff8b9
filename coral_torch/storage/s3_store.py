"""`S3Store`: the weight store on AWS S3 or any S3-compatible server (MinIO, SeaweedFS, moto, ...).

Object layout under ``s3://<bucket>/<prefix>`` (``<key>`` is the content hash, or the key given to
:meth:`S3Store.store`)::

    weights/<key>               the tensor, encoded with the byte-plane codec: exactly the blob that
                                HDF5Store's default "coral" encoding keeps (b"CZP1" ..., see
                                :mod:`coral_torch.codec`)
    metadata/<key>.json         the tensor's description (JSON, below); written AFTER the payload
    deltas/<key>                a delta's payload (``Delta.data`` as is)
    metadata/<key>.delta.json   the delta's description; written AFTER the payload

Weight metadata (``metadata/<key>.json``)::

    {"format": "coral-torch-s3", "format_version": 1, "kind": "weight", "key": <key>,
     "name": str, "shape": [int, ...], "dtype": <canonical dtype>, "layer_type": str,
     "model_name": str, "hash": <content hash>, "nbytes": <logical bytes>, "encoding": "czp1",
     "payload_xxh3": <xxh3-64 hex of the payload object>, "payload_bytes": <payload size>,
     "payload_md5": <MD5 hex of the payload>, "payload_etag": <the ETag the server gave it>,
     "doc_xxh3": <checksum of this document>}

Delta metadata (``metadata/<key>.delta.json``)::

    {"format": "coral-torch-s3", "format_version": 1, "kind": "delta", "key": <key>,
     "delta_type": str, "reference_hash": str, "original_shape": [int, ...],
     "original_dtype": str, "compression_ratio": float, "lossless": bool, "extra": {...},
     "payload_xxh3": str, "payload_bytes": int, "payload_md5": str, "payload_etag": str,
     "doc_xxh3": str}

These are the same attributes :class:`~coral_torch.storage.hdf5_store.HDF5Store` keeps on its
datasets, so objects move between the two without re-encoding (:meth:`S3Store.sync_from_local`,
:meth:`S3Store.sync_to_local`).

Documents: every JSON object this module writes (the metadata above, and the documents
:mod:`coral_torch.repository.remote` stores with :meth:`S3Store.put_document`) is written in one
canonical form (:func:`encode_document`: sorted keys, no spaces) and carries ``doc_xxh3``, the
xxh3-128 of that form without the ``doc_xxh3`` field. A document whose checksum is missing or
wrong is damaged and never used (:func:`decode_document`).

Visibility: an object exists only when its metadata object exists. The payload is uploaded first and
the metadata last, so an interrupted upload leaves at most a payload without metadata: invisible
(``exists`` is False, ``list_weights`` omits it, ``load`` returns None), reported by
``get_storage_info()["orphaned_payloads"]`` and overwritten by the next upload of that key.
``delete`` removes the metadata first.

Verification, uploads: every single-part upload sends ``Content-MD5`` (servers that check it
refuse a body damaged on the way with ``BadDigest``), and botocore adds its flexible checksum
(CRC32) where ``request_checksum_calculation="when_supported"``. The ETag the server answers is
compared with the MD5 of what was sent (for a multipart upload: the whole object's MD5 or the MD5
of the parts' MD5s, ``<hex>-<parts>``); on a mismatch the object is read back, and sent again if
the server holds other bytes (up to ``max_attempts`` times). A server whose ETags turn out not to
be MD5s (SSE-KMS, some S3-compatible servers) is recognised by that read-back; from then on
uploads up to 1 MiB (documents, small payloads) are read back after each upload and larger
payloads rely on the server's own ``Content-MD5`` and checksum checks, unless
``upload_verification="read-back"`` asks for every upload to be read back. The metadata of an
object is written only after its payload was verified. :meth:`S3Store.sync_from_local` (``verify=``) also checks objects already on the remote (their
metadata's checksum, the payload's size and ETag in the listing against what the metadata
recorded) and uploads damaged ones again.

Verification, downloads: every document is checked against its ``doc_xxh3``, every payload
against ``payload_bytes`` and ``payload_xxh3``; a weight is also decoded and its bytes hashed
against its content hash. A download that fails a check is fetched again (up to
``max_attempts`` times: bytes damaged on the way), then reported as damaged:
:class:`~coral_torch.errors.CorruptObjectError` / :class:`~coral_torch.errors.HashMismatchError`
naming the key; bad bytes are never returned. botocore's own response checksum validation is off
by default (``response_checksum_validation="when_required"``): these checks cover every byte, and
some servers (``rclone serve s3``) send the whole object's checksum with a ranged GET, which
botocore would reject. Uploads from a local store are verified the same way before they are sent.

Transfers use boto3's managed transfers (one shared ``TransferManager`` per store, configured by
:class:`S3Config`): objects above ``multipart_threshold`` go up and down in ``multipart_chunksize``
parts; batch operations and syncs run ``max_concurrency`` objects at a time; every request is retried
with backoff (botocore "standard" retry mode, ``max_attempts`` attempts in all). Errors come back as
coral-torch errors with a plain message: :class:`~coral_torch.errors.RemoteAuthError` (credentials
rejected or access denied), :class:`~coral_torch.errors.BucketNotFoundError`,
:class:`~coral_torch.errors.RemoteConnectionError` (endpoint unreachable, connection dropped and
retries exhausted), :class:`~coral_torch.errors.RemoteError` for anything else the server refuses.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import boto3
import numpy as np
import xxhash
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    SSLError,
)
from botocore.parsers import ResponseParserError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster
from tqdm.auto import tqdm

from .. import codec, dtypes
from ..delta import Delta, DeltaType
from ..errors import (
    BucketNotFoundError,
    CoralError,
    CorruptObjectError,
    HashMismatchError,
    IntegrityError,
    ReadOnlyStoreError,
    RemoteAuthError,
    RemoteConfigError,
    RemoteConnectionError,
    RemoteError,
    StoreError,
    SyncIncompleteError,
)
from ..refnames import validate_ref_name
from ..weight_tensor import WeightMetadata, WeightTensor, content_hash
from .hdf5_store import (
    ENCODING_CODEC,
    ENCODING_VALUES,
    HDF5Store,
    PreparedObject,
    delta_object,
    weight_attrs,
)
from .weight_store import WeightStore

log = logging.getLogger(__name__)

__all__ = ["S3Config", "S3Store", "RemoteEntry", "encode_document", "decode_document", "document_md5"]

MiB = 1 << 20
FORMAT_NAME = "coral-torch-s3"
FORMAT_VERSION = 1
_MIN_PART = 5 * MiB  # S3's smallest multipart part (all but the last)
_MAX_PART = 5 * 1024 * MiB
_INFLIGHT_BYTES = 1 << 30  # sync_from_local: payload bytes read ahead of the uploads, at most
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:=+-]{0,254}$")
_ADDRESSING = ("auto", "path", "virtual")
_CHECKSUM_WHEN = ("when_supported", "when_required")
_UPLOAD_VERIFICATION = ("auto", "read-back")
DOC_CHECKSUM = "doc_xxh3"  # the field of every document that holds its checksum
_DIGEST_CODES = frozenset(  # the server says the body it got does not match the checksum sent with it
    {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum", "BadChecksum", "IncompleteBody"}
)
_ANY_EXC = (ClientError, BotoCoreError, RetriesExceededError, ResponseParserError, OSError)
_READ_BACK_MAX = 1 * MiB  # uploads up to this size are read back where ETags are not MD5s

_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "AuthFailure",
        "MissingSecurityHeader",
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CONNECTION_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    RetriesExceededError,
    OSError,  # socket errors surfacing from a body read
)


# ------------------------------------------------------------------------------------ config
@dataclass
class S3Config:
    """Where and how to reach an S3 (or S3-compatible) bucket.

    Args:
        bucket: bucket name (3-255 characters: letters, digits, ``.``, ``_``, ``-``).
        region: region name; ``None`` uses boto's default (``AWS_DEFAULT_REGION``, ~/.aws/config,
            else us-east-1).
        prefix: key prefix inside the bucket; normalised to end in ``/`` when non-empty.
        endpoint_url: for S3-compatible servers (``http://localhost:9000``); ``None`` is AWS.
        access_key, secret_key, session_token: explicit credentials. ``None`` uses the default
            credential chain (environment, shared config/credentials files, instance role).
        profile: a named profile of the shared config files (instead of explicit keys).
        max_concurrency: objects transferred at once by batch operations and syncs, and parts of
            one object transferred at once.
        multipart_threshold: objects at least this large go up/down in parts.
        multipart_chunksize: part size (5 MiB .. 5 GiB).
        max_attempts: attempts per request in all (1 = no retry), with exponential backoff.
        addressing_style: ``"auto"``, ``"path"`` or ``"virtual"``.
        verify_ssl: ``False`` to skip TLS verification, or a CA bundle path.
        connect_timeout, read_timeout: seconds, per attempt.
        codec_level: zstd level of the codec used for uploads that are not already encoded.
        check_bucket: check on opening that the bucket exists and the credentials work.
        progress: default for progress bars: ``None`` shows them when stderr is a terminal.
        request_checksum_calculation: botocore's setting of that name: ``"when_supported"`` (the
            default) sends a CRC32 checksum with every upload for servers that check it, besides
            the ``Content-MD5`` coral-torch always sends; ``"when_required"`` only where an
            operation needs one.
        response_checksum_validation: botocore's setting of that name. ``"when_required"`` (the
            default) leaves download checks to coral-torch, which verifies every byte itself
            (documents, payload checksums, content hashes); ``"when_supported"`` also has botocore
            check the checksums servers send. Keep the default for ``rclone serve s3``, which sends
            the whole object's checksum with a ranged GET (every multipart download would fail).
        upload_verification: ``"auto"``: an upload is verified by comparing the server's ETag with
            the MD5 of what was sent, and read back where they differ (on servers whose ETags are not
            MD5s: uploads up to 1 MiB read back, larger ones left to the server's own checks);
            ``"read-back"``: every upload is read back and compared byte for byte (twice the
            traffic; for servers that neither check ``Content-MD5`` nor answer MD5 ETags).
    """

    bucket: str
    region: Optional[str] = None
    prefix: str = ""
    endpoint_url: Optional[str] = None
    access_key: Optional[str] = None
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    profile: Optional[str] = None
    max_concurrency: int = 8
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_attempts: int = 5
    addressing_style: str = "auto"
    verify_ssl: Union[bool, str] = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    codec_level: int = codec.DEFAULT_LEVEL
    check_bucket: bool = True
    progress: Optional[bool] = None
    request_checksum_calculation: str = "when_supported"
    response_checksum_validation: str = "when_required"
    upload_verification: str = "auto"

    def __post_init__(self) -> None:
        b = self.bucket
        if not isinstance(b, str) or not 3 <= len(b) <= 255 or not _BUCKET_RE.match(b) or ".." in b:
            raise RemoteConfigError(
                f"invalid bucket name {b!r}: use 3-255 characters (S3 itself allows 3-63), letters, "
                "digits, '.', '_' and '-', starting and ending with a letter or digit, without 's3://' "
                "or a path (put the path in prefix=)"
            )
        prefix = (self.prefix or "").lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if "//" in prefix or any(ord(c) < 32 or ord(c) == 127 for c in prefix) or "\\" in prefix \
                or any(seg in (".", "..") for seg in prefix.split("/")):
            raise RemoteConfigError(
                f"invalid prefix {self.prefix!r}: no empty, '.' or '..' path segments, backslashes or control characters"
            )
        self.prefix = prefix
        if self.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise RemoteConfigError(
                f"invalid endpoint_url {self.endpoint_url!r}: give a URL such as 'http://localhost:9000'"
            )
        if (self.access_key is None) != (self.secret_key is None):
            raise RemoteConfigError(
                "give both access_key and secret_key, or neither (to use the default credential chain)"
            )
        if self.session_token is not None and self.access_key is None:
            raise RemoteConfigError("session_token needs access_key and secret_key")
        if self.profile is not None and self.access_key is not None:
            raise RemoteConfigError("give either profile or access_key/secret_key, not both")
        if not isinstance(self.max_concurrency, int) or not 1 <= self.max_concurrency <= 256:
            raise RemoteConfigError(f"max_concurrency must be an int in 1..256, not {self.max_concurrency!r}")
        if not isinstance(self.multipart_threshold, int) or self.multipart_threshold < 1:
            raise RemoteConfigError(f"multipart_threshold must be a positive int, not {self.multipart_threshold!r}")
        if not isinstance(self.multipart_chunksize, int) or not _MIN_PART <= self.multipart_chunksize <= _MAX_PART:
            raise RemoteConfigError(
                f"multipart_chunksize must be between 5 MiB and 5 GiB (S3's part limits), "
                f"not {self.multipart_chunksize!r}"
            )
        if not isinstance(self.max_attempts, int) or not 1 <= self.max_attempts <= 50:
            raise RemoteConfigError(f"max_attempts must be an int in 1..50, not {self.max_attempts!r}")
        if self.addressing_style not in _ADDRESSING:
            raise RemoteConfigError(f"addressing_style must be one of {_ADDRESSING}, not {self.addressing_style!r}")
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise RemoteConfigError("connect_timeout and read_timeout must be positive")
        if not -7 <= int(self.codec_level) <= 22:
            raise RemoteConfigError(f"codec_level must be a zstd level in -7..22, not {self.codec_level!r}")
        for name in ("request_checksum_calculation", "response_checksum_validation"):
            if getattr(self, name) not in _CHECKSUM_WHEN:
                raise RemoteConfigError(f"{name} must be one of {_CHECKSUM_WHEN}, not {getattr(self, name)!r}")
        if self.upload_verification not in _UPLOAD_VERIFICATION:
            raise RemoteConfigError(
                f"upload_verification must be one of {_UPLOAD_VERIFICATION}, not {self.upload_verification!r}"
            )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


# ---------------------------------------------------------------------------- small helpers
def _payload_hash(buf: Any) -> str:
    """xxh3-64 of a payload's bytes (the same checksum HDF5Store records as ``payload_xxh3``)."""
    if isinstance(buf, np.ndarray):
        view = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    else:
        view = memoryview(buf).cast("B")
    return xxhash.xxh3_64(view).hexdigest()


def _byte_view(buf: Any) -> memoryview:
    """A flat byte view of a payload (ndarray or buffer), without copying it."""
    if isinstance(buf, np.ndarray):
        return memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    return memoryview(buf).cast("B")


def _md5() -> "hashlib._Hash":
    return hashlib.md5(usedforsecurity=False)  # an integrity check, not security (FIPS builds allow it)


def _norm_etag(etag: Any) -> str:
    """An ETag as compared here: without quotes or a weak-validator prefix, lower case."""
    e = str(etag or "").strip()
    if e.startswith("W/"):
        e = e[2:]
    return e.strip('"').lower()


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """The exact bytes :class:`S3Store` writes for a JSON document: ``doc`` with ``format``,
    ``format_version`` and its checksum ``doc_xxh3`` (the xxh3-128 of the canonical JSON of the
    rest), in canonical JSON (sorted keys, no spaces). The same ``doc`` always gives the same bytes,
    so their MD5 tells whether a listed object's ETag is the document expected."""
    body: Dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    body.update((k, v) for k, v in doc.items() if k != DOC_CHECKSUM)
    body[DOC_CHECKSUM] = xxhash.xxh3_128(_canonical(body)).hexdigest()
    return _canonical(body)


def document_md5(doc: Mapping[str, Any]) -> str:
    """MD5 hex of :func:`encode_document` (``doc``): the ETag a server gives that document."""
    h = _md5()
    h.update(encode_document(doc))
    return h.hexdigest()


def decode_document(data: bytes, what: str, where: str, key: Optional[str] = None) -> Dict[str, Any]:
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
            "used. Push it again from a repository that holds it to rewrite it", hash_key=key,
        )
    actual = xxhash.xxh3_128(_canonical(doc)).hexdigest()
    if actual != recorded:
        raise CorruptObjectError(
            f"{what} at {where} is damaged (document checksum mismatch); it was not used", hash_key=key
        )
    return doc


class RemoteEntry(NamedTuple):
    """One listed object: its size and ETag (normalised: no quotes, lower case)."""

    size: int
    etag: str


class _Rejected(Exception):
    """An upload the server refused as damaged (BadDigest ...) or stored other bytes for."""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


class _BufferReader(io.RawIOBase):
    """A seekable, read-only file over a buffer, without copying it (for uploads)."""

    def __init__(self, buf: Any):
        if isinstance(buf, np.ndarray):
            buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        self._mv = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._mv)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._mv) - self._pos))
        b[:n] = self._mv[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self._mv) if size is None or size < 0 else min(len(self._mv), self._pos + size)
        data = self._mv[self._pos : end].tobytes() if end > self._pos else b""
        self._pos = max(self._pos, end)
        return data


class _ProvideSize(BaseSubscriber):
    """Tells the transfer manager an object's size up front (no HEAD request, no seek to the end)."""

    def __init__(self, size: int):
        self._size = int(size)

    def on_queued(self, future, **kwargs):  # noqa: D401 - s3transfer callback
        future.meta.provide_transfer_size(self._size)


@dataclass
class _Job:
    """One object of a sync: the work to run on a worker thread, and what it is."""

    group: str  # "weights" or "deltas"
    key: str
    size: int  # payload bytes held in memory while queued (0 if unknown)
    run: Callable[[], Any]


# ------------------------------------------------------------------------------------- store
class S3Store(WeightStore):
    """A content-addressed weight store in an S3 bucket (see the module docstring for the layout).

    Implements the :class:`WeightStore` contract plus deltas, :meth:`sync_from_local` and
    :meth:`sync_to_local`. Thread-safe: any method may be called from several threads.
    """

    def __init__(self, config: S3Config):
        if not isinstance(config, S3Config):
            raise RemoteConfigError(f"S3Store needs an S3Config, not {type(config).__name__}")
        self.config = config
        self._closed = False
        # whether this server's ETags are the MD5s of what it stores: None until an upload tells
        self._etag_md5: Optional[bool] = None
        self._etag_lock = threading.Lock()
        c = config
        try:
            session = boto3.session.Session(
                aws_access_key_id=c.access_key,
                aws_secret_access_key=c.secret_key,
                aws_session_token=c.session_token,
                region_name=c.region,
                profile_name=c.profile,
            )
        except ProfileNotFound as exc:
            raise RemoteConfigError(f"AWS profile {c.profile!r} is not in the shared config files: {exc}") from None
        boto_config = BotoConfig(
            region_name=c.region,
            retries={"max_attempts": c.max_attempts, "mode": "standard"},
            s3={"addressing_style": c.addressing_style},
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            # worker threads (metadata requests) + the transfer manager's threads (payloads)
            max_pool_connections=2 * c.max_concurrency + 4,
            user_agent_extra="coral-torch",
            request_checksum_calculation=c.request_checksum_calculation,
            response_checksum_validation=c.response_checksum_validation,
        )
        try:
            self._client = session.client(
                "s3", endpoint_url=c.endpoint_url, verify=c.verify_ssl, config=boto_config
            )
        except (BotoCoreError, ValueError) as exc:
            raise RemoteConfigError(f"cannot set up an S3 client for {c.url}: {exc}") from None
        self.endpoint = c.endpoint_url or self._client.meta.endpoint_url
        self._transfer_config = TransferConfig(
            multipart_threshold=c.multipart_threshold,
            multipart_chunksize=c.multipart_chunksize,
            max_concurrency=c.max_concurrency,
            num_download_attempts=c.max_attempts,
            preferred_transfer_client="classic",
        )
        self._transfer = create_transfer_manager(self._client, self._transfer_config)
        if c.check_bucket:
            try:
                self._check_bucket()
            except BaseException:
                self.close()
                raise
        log.debug("opened %r", self)

    # ------------------------------------------------------------------------------- naming
    @property
    def url(self) -> str:
        return self.config.url

    def _obj(self, group: str, key: str) -> str:
        p = self.config.prefix
        if group == "weights":
            return f"{p}weights/{key}"
        if group == "deltas":
            return f"{p}deltas/{key}"
        if group == "wmeta":
            return f"{p}metadata/{key}.json"
        if group == "dmeta":
            return f"{p}metadata/{key}.delta.json"
        raise ValueError(group)  # pragma: no cover

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key) or key.endswith(".delta"):
            raise StoreError(
                f"invalid object key {key!r} for S3Store: use up to 255 letters, digits and '_.:=+-', "
                "not starting with '.' or ending in '.delta' (content hashes always qualify)"
            )
        return key

    def _live(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")

    # ------------------------------------------------------------------------- error mapping
    def _translate(self, exc: BaseException, doing: str, key: Optional[str] = None) -> CoralError:
        """A coral-torch error with a plain message for a boto/botocore/s3transfer exception."""
        if isinstance(exc, CoralError):
            return exc
        where = f"s3://{self.config.bucket}/{key}" if key else self.url
        bucket = self.config.bucket
        log.debug("S3 error while %s %s", doing, where, exc_info=exc)
        if isinstance(exc, RetriesExceededError) and getattr(exc, "last_exception", None) is not None:
            inner = exc.last_exception
            msg = f"{type(inner).__name__}: {inner}"
        else:
            msg = f"{type(exc).__name__}: {exc}"
        msg = " ".join(msg.split())[:600]  # messages stay on one line
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            text = " ".join(str(err.get("Message") or "").split())
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return BucketNotFoundError(
                    f"bucket {bucket!r} does not exist at {self.endpoint}; create it first "
                    f"(e.g. `aws s3 mb s3://{bucket}`) or fix bucket/endpoint_url/region in S3Config",
                    bucket=bucket,
                    endpoint=self.endpoint,
                )
            if code in _AUTH_CODES:
                return RemoteAuthError(
                    f"S3 at {self.endpoint} rejected the credentials ({code}: {text}) while {doing} "
                    f"{where}. Check access_key/secret_key/session_token in S3Config, or the "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN environment variables "
                    "and ~/.aws/credentials"
                )
            if code in _DENIED_CODES or status == 403:
                detail = f"{code}: {text}" if text and text != "Forbidden" else "HTTP 403"
                return RemoteAuthError(
                    f"S3 at {self.endpoint} denied access ({detail}) while {doing} {where}: the credentials "
                    f"are wrong or lack permission (s3:ListBucket, GetObject, PutObject, DeleteObject on "
                    f"bucket {bucket!r} and prefix {self.config.prefix!r})"
                )
            if status is not None and status >= 500:
                return RemoteError(
                    f"S3 at {self.endpoint} failed while {doing} {where} (HTTP {status} {code}: {text}) "
                    f"after {self.config.max_attempts} attempts; try again later"
                )
            return RemoteError(f"S3 at {self.endpoint} refused {doing} {where}: {code}: {text}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return RemoteAuthError(
                f"no usable AWS credentials for {self.url} ({exc}): give access_key/secret_key in "
                "S3Config, set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or configure a profile"
            )
        if isinstance(exc, SSLError):
            return RemoteConnectionError(
                f"TLS to {self.endpoint} failed while {doing} {where} ({exc}); check the certificate, "
                "or set verify_ssl to a CA bundle (or False for a test server)"
            )
        if isinstance(exc, _CONNECTION_ERRORS):
            return RemoteConnectionError(
                f"lost or could not open the connection to S3 at {self.endpoint} while {doing} {where} "
                f"({msg}); gave up after {self.config.max_attempts} attempts. Check endpoint_url, the "
                "network and that the server is up"
            )
        if isinstance(exc, BotoCoreError):
            return RemoteError(f"S3 request to {self.endpoint} failed while {doing} {where}: {msg}")
        if isinstance(exc, ResponseParserError):
            return RemoteError(
                f"S3 at {self.endpoint} sent a garbled answer while {doing} {where} ({msg.splitlines()[0]}); "
                "try again (a proxy or the network may be damaging responses)"
            )
        return RemoteError(f"unexpected error while {doing} {where}: {msg}")

    def _call(self, doing: str, key: Optional[str], fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except _ANY_EXC as exc:
            err = self._translate(exc, doing, key)
        raise err

    @staticmethod
    def _is_missing(exc: ClientError) -> bool:
        err = exc.response.get("Error", {}) or {}
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(err.get("Code", "")) in _MISSING_KEY_CODES or status == 404 and err.get("Code") != "NoSuchBucket"

    def _check_bucket(self) -> None:
        bucket = self.config.bucket
        try:
            self._client.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 403:
                err = self._translate(exc, "checking bucket")
            else:
                err = None
        except (BotoCoreError, ResponseParserError, OSError) as exc:
            err = self._translate(exc, "checking bucket")
        if err is not None:
            raise err
        # HEAD answers 403 without saying why: ask with a request whose error has a code.
        self._call(
            "listing", None, self._client.list_objects_v2, Bucket=bucket, Prefix=self.config.prefix, MaxKeys=1
        )

    # --------------------------------------------------------------------------- primitives
    def _head(self, obj: str, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.config.bucket, Key=obj)
            return True
        except ClientError as exc:
            if self._is_missing(exc):
                return False
            err = self._translate(exc, "checking", obj)
        except (BotoCoreError, ResponseParserError, OSError) as exc:
            err = self._translate(exc, "checking", obj)
        raise err

    def _read_doc(self, obj: str, what: str, key: Optional[str] = None,
                  attempts: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """GET and verify one document (:func:`decode_document`); ``None`` if there is none.

        A body that arrives damaged is read again, ``attempts`` (default ``max_attempts``) reads in
        all, before the damage is reported; one cut part-way is read again ``max_attempts`` times."""
        n_damaged = attempts or self.config.max_attempts
        n_cut = self.config.max_attempts
        where = f"s3://{self.config.bucket}/{obj}"
        damaged = cut = 0
        while True:
            try:
                resp = self._client.get_object(Bucket=self.config.bucket, Key=obj)
                body = resp["Body"].read()
            except ClientError as exc:
                if self._is_missing(exc) and (exc.response.get("Error", {}) or {}).get("Code") != "NoSuchBucket":
                    return None
                raise self._translate(exc, "reading", obj) from None
            except _ANY_EXC as exc:
                cut += 1
                if cut < n_cut and isinstance(exc, _CONNECTION_ERRORS):
                    log.warning("reading %s was cut (%s); reading it again (attempt %d of %d)", where,
                                type(exc).__name__, cut + 1, n_cut)
                    continue
                raise self._translate(exc, "reading", obj) from None
            try:
                return decode_document(body, what, where, key)
            except CorruptObjectError as exc:
                damaged += 1
                if damaged >= n_damaged:
                    raise
                log.warning("%s; reading it again (attempt %d of %d)", exc, damaged + 1, n_damaged)

    def _rel(self, rel_key: str) -> str:
        """``<prefix><rel_key>`` for a document key, after checking it cannot leave the prefix."""
        try:
            validate_ref_name(rel_key)
        except CoralError as exc:
            raise StoreError(f"invalid document key for {self.url}: {exc}") from None
        return self.config.prefix + rel_key

    def get_document(self, rel_key: str, what: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """Read the JSON document at ``<prefix><rel_key>`` (written by :meth:`put_document`), verified
        against its checksum; ``None`` if there is none. ``what`` names it in messages.

        Raises:
            CorruptObjectError: damaged (still damaged after ``max_attempts`` reads).
            StoreError: ``rel_key`` could leave the prefix (``..``, control characters), or the
                document is of a newer format.
            RemoteError and subclasses: the server cannot be reached or refuses.
        """
        self._live()
        return self._read_doc(self._rel(rel_key), what or f"document {rel_key}", rel_key)

    def put_document(self, rel_key: str, doc: Mapping[str, Any]) -> int:
        """Write ``doc`` as the JSON document at ``<prefix><rel_key>`` (:func:`encode_document`: adds
        the format fields and the checksum) and verify what the server stored (see the module
        docstring). Returns the bytes sent.

        Raises:
            StoreError: ``rel_key`` could leave the prefix.
            RemoteError and subclasses: refused, unreachable, or the server kept storing damaged bytes.
        """
        self._live()
        obj = self._rel(rel_key)
        body = encode_document(doc)
        self._put_verified(obj, body, f"document {rel_key}", "application/json")
        return len(body)

    def has_any(self, sub: str = "") -> bool:
        """Whether anything is stored under ``<prefix><sub>``: one listing request of one key.

        Raises:
            RemoteError and subclasses: a missing bucket, refused credentials, an unreachable endpoint.
        """
        self._live()
        page = self._call("listing", None, self._client.list_objects_v2,
                          Bucket=self.config.bucket, Prefix=self.config.prefix + sub, MaxKeys=1)
        return bool(page.get("Contents"))

    def list_entries(self, sub: str = "") -> Dict[str, RemoteEntry]:
        """Every object under ``<prefix><sub>``: ``{key relative to <prefix><sub>: RemoteEntry}`` from one
        paginated listing. A listing that contradicts itself (a key twice, a key outside the prefix,
        an answer that does not parse: damaged on the way) is made again, ``max_attempts`` times in all.

        Raises:
            RemoteError and subclasses: the listing failed or stayed inconsistent.
        """
        self._live()
        base = self.config.prefix + sub
        n = self.config.max_attempts
        bad = ""
        for attempt in range(1, n + 1):
            out: Dict[str, RemoteEntry] = {}
            bad = ""
            try:
                for o in self._list_raw(sub):
                    k = str(o.get("Key", ""))
                    rel = k[len(base):]
                    if not k.startswith(base) or rel in out:
                        bad = f"key {k!r} " + ("listed twice" if rel in out else f"is not under {base!r}")
                        break
                    out[rel] = RemoteEntry(int(o.get("Size", 0) or 0), _norm_etag(o.get("ETag")))
            except ResponseParserError as exc:
                bad = f"the answer does not parse: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            except _ANY_EXC as exc:
                raise self._translate(exc, "listing", None) from None
            if not bad:
                return out
            if attempt < n:
                log.warning("listing s3://%s/%s was damaged on the way (%s); listing again (attempt %d of %d)",
                            self.config.bucket, base, bad, attempt + 1, n)
        raise RemoteError(
            f"listing s3://{self.config.bucket}/{base} at {self.endpoint} kept coming back damaged ({bad}) after "
            f"{n} attempts; try again (a proxy or the network may be damaging responses)"
        )

    # ------------------------------------------------------------------------ verified uploads
    def _md5s(self, view: memoryview, multipart: bool) -> Tuple[str, Optional[str]]:
        """(MD5 hex of the bytes, the ETag S3 gives a multipart upload of them in our part size)."""
        whole = _md5()
        if not multipart:
            whole.update(view)
            return whole.hexdigest(), None
        chunk = ChunksizeAdjuster().adjust_chunksize(self.config.multipart_chunksize, len(view))
        parts = []
        for i in range(0, len(view), chunk):
            part = view[i : i + chunk]
            whole.update(part)
            parts.append(_md5())
            parts[-1].update(part)
        both = _md5()
        for p in parts:
            both.update(p.digest())
        return whole.hexdigest(), f"{both.hexdigest()}-{len(parts)}"

    def _send(self, obj: str, view: memoryview, md5: str, multipart: bool, content_type: str) -> str:
        """One upload (Content-MD5 on single-part uploads); returns the server's ETag (normalised).
        Raises _Rejected when the server refuses the body as damaged or holds another size."""
        b = self.config.bucket
        try:
            if not multipart:
                resp = self._client.put_object(
                    Bucket=b, Key=obj, Body=_BufferReader(view), ContentLength=len(view),
                    ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(), ContentType=content_type,
                )
                return _norm_etag(resp.get("ETag"))
            fut = self._transfer.upload(
                _BufferReader(view), b, obj, extra_args={"ContentType": content_type},
                subscribers=[_ProvideSize(len(view))],
            )
            fut.result()
            head = self._client.head_object(Bucket=b, Key=obj)
        except ClientError as exc:
            code = str((exc.response.get("Error", {}) or {}).get("Code", ""))
            if code in _DIGEST_CODES:
                raise _Rejected(f"the server refused the body it received as damaged ({code})") from None
            raise self._translate(exc, "uploading", obj) from None
        except _ANY_EXC as exc:
            raise self._translate(exc, "uploading", obj) from None
        stored = int(head.get("ContentLength", -1))
        if stored != len(view):
            raise _Rejected(f"the server holds {stored} bytes, {len(view)} were sent")
        return _norm_etag(head.get("ETag"))

    def _read_back(self, obj: str, view: memoryview) -> Optional[str]:
        """None if the server holds exactly ``view`` at ``obj``, else what is wrong."""
        try:
            got = self._download(obj, obj, len(view), "uploaded object")
        except IntegrityError as exc:
            return f"reading it back failed: {exc}"
        if xxhash.xxh3_64(_byte_view(got)).hexdigest() != xxhash.xxh3_64(view).hexdigest():
            return "the server holds other bytes than were sent"
        return None

    def _note_etags(self, md5: bool) -> None:
        with self._etag_lock:
            if self._etag_md5 is not None:
                return
            self._etag_md5 = md5
        if not md5:
            log.info(
                "S3 at %s answers ETags that are not the MD5 of the data (encryption, or its own scheme): "
                "documents are read back after each upload, payloads rely on the server's Content-MD5 and "
                "checksum checks (upload_verification='read-back' reads them back too)", self.endpoint,
            )

    def _put_verified(self, obj: str, payload: Any, what: str, content_type: str) -> Tuple[str, str]:
        """Upload ``payload`` to ``obj`` and make sure the server holds exactly those bytes (see the
        module docstring); sent again when it does not. Returns (ETag, MD5 hex).

        Raises:
            RemoteError: the server kept refusing or damaging the bytes (``max_attempts`` uploads).
            RemoteError subclasses: refused, unreachable (as translated).
        """
        view = _byte_view(payload)
        size = len(view)
        multipart = size >= self.config.multipart_threshold
        md5, composite = self._md5s(view, multipart)
        accepted = {md5} if composite is None else {md5, composite}
        read_back_all = self.config.upload_verification == "read-back"
        n = self.config.max_attempts
        problem = ""
        for attempt in range(1, n + 1):
            try:
                etag = self._send(obj, view, md5, multipart, content_type)
            except _Rejected as exc:
                problem = str(exc)
            else:
                if etag in accepted and not read_back_all:
                    self._note_etags(True)
                    return etag, md5
                if not read_back_all and self._etag_md5 is False and size > _READ_BACK_MAX:
                    return etag, md5  # not an MD5 ETag server: its own Content-MD5/checksum checks stand
                problem = self._read_back(obj, view) or ""
                if not problem:
                    if etag not in accepted:
                        self._note_etags(False)
                    return etag, md5
                problem += f" (ETag {etag or '-'}, MD5 of the data {md5})"
            if attempt < n:
                log.warning("upload of %s to %s arrived damaged: %s; sending it again (attempt %d of %d)",
                            what, self.url, problem, attempt + 1, n)
        raise RemoteError(
            f"could not upload {what} to s3://{self.config.bucket}/{obj} intact after {n} attempts: {problem}. "
            f"Something between here and {self.endpoint} damages data (a proxy, the network, the server); "
            "fix it and run the push again"
        )

    def _download(self, obj: str, key: str, size: Optional[int], kind: str) -> np.ndarray:
        """The payload's bytes as a uint8 array; size-checked (content checks are the caller's)."""
        sink = io.BytesIO()
        try:
            fut = self._transfer.download(
                self.config.bucket, obj, sink,
                subscribers=[_ProvideSize(size)] if size is not None else None,
            )
            fut.result()
        except ClientError as exc:
            code = str((exc.response.get("Error", {}) or {}).get("Code", ""))
            if code == "InvalidRange":
                raise CorruptObjectError(
                    f"{kind} {key} at {self.url} is damaged: its payload is shorter than recorded; "
                    "it was not returned", hash_key=key,
                ) from None
            if self._is_missing(exc):
                raise CorruptObjectError(
                    f"{kind} {key} at {self.url} is damaged: its metadata exists but its payload {obj} is "
                    "missing; it was not returned", hash_key=key,
                ) from None
            err = self._translate(exc, "downloading", obj)
            raise err from None
        except (BotoCoreError, RetriesExceededError, ResponseParserError, OSError) as exc:
            err = self._translate(exc, "downloading", obj)
            raise err from None
        payload = np.frombuffer(sink.getbuffer(), dtype=np.uint8)
        if size is not None and payload.size != size:
            raise CorruptObjectError(
                f"{kind} {key} at {self.url} is damaged: its payload has {payload.size} bytes, "
                f"not {size}; it was not returned", hash_key=key,
            )
        return payload

    def _check_payload(self, payload: np.ndarray, doc: Dict[str, Any], key: str, kind: str) -> None:
        expected = doc.get("payload_xxh3")
        if expected is None or _payload_hash(payload) != str(expected):
            raise CorruptObjectError(
                f"{kind} {key} at {self.url} is damaged (payload checksum mismatch); it was not returned",
                hash_key=key,
            )

    # ------------------------------------------------------------------------- weight codec
    def _encode_weight(self, weight: WeightTensor) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Hash and encode one tensor: the payload and its metadata document. No I/O."""
        digest = weight.compute_hash()
        meta = weight.metadata
        payload = codec.encode(weight.raw, dtypes.itemsize(meta.dtype), int(self.config.codec_level))
        doc = {"kind": "weight", **weight_attrs(meta, digest, weight.nbytes, ENCODING_CODEC, payload),
               "payload_bytes": int(payload.size)}
        return payload, doc

    def _metadata_from_doc(self, doc: Dict[str, Any], key: str) -> WeightMetadata:
        try:
            return WeightMetadata(
                name=str(doc.get("name", "")),
                shape=tuple(int(x) for x in doc["shape"]),
                dtype=str(doc["dtype"]),
                layer_type=str(doc.get("layer_type", "")) or None,
                model_name=str(doc.get("model_name", "")) or None,
                hash=str(doc.get("hash", key)),
                compression_info={"encoding": str(doc.get("encoding", ENCODING_CODEC))},
            )
        except (KeyError, ValueError, TypeError, CoralError) as exc:
            raise CorruptObjectError(
                f"metadata of object {key} at {self.url} is damaged: {exc}", hash_key=key
            ) from None

    def _decode_verified(self, payload: np.ndarray, doc: Dict[str, Any], key: str) -> WeightTensor:
        """Decode a checksum-verified payload and check it against the content hash."""
        meta = self._metadata_from_doc(doc, key)
        encoding = str(doc.get("encoding", ENCODING_CODEC))
        if encoding == ENCODING_CODEC:
            raw = codec.decode(payload, hash_key=key)
        elif encoding == ENCODING_VALUES:
            raw = np.array(payload, dtype=np.uint8, copy=True)
        else:
            raise CorruptObjectError(f"object {key} at {self.url} has unknown encoding {encoding!r}", hash_key=key)
        if raw.size != meta.nbytes:
            raise CorruptObjectError(
                f"object {key} at {self.url} decodes to {raw.size} bytes, expected {meta.nbytes}; "
                "it was not returned", hash_key=key,
            )
        expected = meta.hash or key
        actual = content_hash(raw, meta.dtype, meta.shape)
        if actual != expected:
            raise HashMismatchError(
                f"object {key} at {self.url} is corrupt: its bytes hash to {actual}, not {expected}; "
                "it was not returned", hash_key=key,
            )
        weight = WeightTensor.from_raw(raw, meta)
        weight._hash = actual
        return weight

    # ------------------------------------------------------------------------------- writes
    def _store_one(self, weight: WeightTensor, key: Optional[str] = None, check: bool = True) -> Tuple[str, int]:
        """Store one tensor unless present; returns (key, bytes sent)."""
        key = self._check_key(key or weight.compute_hash())
        if check and self._head(self._obj("wmeta", key), key):
            return key, 0
        payload, doc = self._encode_weight(weight)
        return key, self._put_object_pair("weights", key, payload, doc)

    def _put_object_pair(self, group: str, key: str, payload: Any, doc: Dict[str, Any]) -> int:
        """Upload the payload (verified), then its metadata, which makes the object visible. The
        metadata records the payload's MD5 and the ETag the server gave it. Returns bytes sent."""
        kind = "object" if group == "weights" else "delta"
        etag, md5 = self._put_verified(self._obj(group, key), payload, f"{kind} {key}", "application/octet-stream")
        body = encode_document({"key": key, **doc, "payload_md5": md5, "payload_etag": etag})
        self._put_verified(self._obj("wmeta" if group == "weights" else "dmeta", key), body,
                           f"metadata of {kind} {key}", "application/json")
        sent = len(_byte_view(payload)) + len(body)
        log.debug("uploaded %s/%s (%d bytes)", group, key, sent)
        return sent

    def store(self, weight: WeightTensor, hash_key: Optional[str] = None) -> str:
        """Store one tensor (idempotent: nothing is sent if the key is present) and return its key."""
        self._live()
        return self._store_one(weight, hash_key)[0]

    def store_batch(self, weights: Dict[str, WeightTensor], progress: Optional[bool] = None) -> Dict[str, str]:
        """Store many tensors, ``max_concurrency`` at a time; returns ``{input key: hash}``."""
        self._live()
        items = list(weights.items())
        if not items:
            return {}
        with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="coral-s3") as pool:
            hashes = list(pool.map(lambda kv: kv[1].compute_hash(), items))
            result = {name: h for (name, _), h in zip(items, hashes)}
            unique: Dict[str, WeightTensor] = {}
            for (_, w), h in zip(items, hashes):
                unique.setdefault(h, w)
            self._run_all(
                pool, [(h, lambda w=w, h=h: self._store_one(w, h)) for h, w in unique.items()],
                desc="upload", progress=progress,
            )
        return result

    def _run_all(self, pool: ThreadPoolExecutor, tasks: List[Tuple[str, Callable[[], Any]]],
                 desc: str, progress: Optional[bool]) -> Dict[str, Any]:
        """Run tasks on ``pool`` with a progress bar; on the first error cancel the rest and raise it."""
        out: Dict[str, Any] = {}
        futures = {pool.submit(fn): key for key, fn in tasks}
        first: Optional[BaseException] = None
        with self._bar(len(tasks), desc, progress) as bar:
            try:
                for fut in _as_completed(futures):
                    key = futures[fut]
                    exc = fut.exception()
                    if exc is not None:
                        first = first or exc
                        for f in futures:
                            f.cancel()
                        continue
                    out[key] = fut.result()
                    bar.update(1)
            finally:
                for f in futures:
                    f.cancel()
        if first is not None:
            raise first
        return out

    def delete(self, hash_key: str) -> bool:
        """Delete a tensor; ``True`` if it existed. Metadata goes first, so it vanishes at once."""
        self._live()
        key = self._check_key(hash_key)
        return self._delete_pair("wmeta", "weights", key)

    def _delete_pair(self, meta_group: str, group: str, key: str) -> bool:
        meta_obj, obj = self._obj(meta_group, key), self._obj(group, key)
        existed = self._head(meta_obj, key)
        b = self.config.bucket
        self._call("deleting", meta_obj, self._client.delete_object, Bucket=b, Key=meta_obj)
        self._call("deleting", obj, self._client.delete_object, Bucket=b, Key=obj)
        return existed

    # -------------------------------------------------------------------------------- reads
    def exists(self, hash_key: str) -> bool:
        self._live()
        key = self._check_key(hash_key)
        return self._head(self._obj("wmeta", key), key)

    def load(self, hash_key: str) -> Optional[WeightTensor]:
        """Download, verify and return one tensor; ``None`` if the key is unknown.

        Raises:
            CorruptObjectError / HashMismatchError: the stored bytes are damaged (nothing is returned).
            RemoteError and subclasses: the server cannot be reached or refuses.
        """
        self._live()
        key = self._check_key(hash_key)

        def once() -> Optional[WeightTensor]:
            doc = self._read_doc(self._obj("wmeta", key), f"metadata of object {key}", key, attempts=1)
            if doc is None:
                return None
            self._check_doc_names(doc, key, "weight")
            size = _opt_int(doc.get("payload_bytes"))
            payload = self._download(self._obj("weights", key), key, size, "object")
            self._check_payload(payload, doc, key, "object")
            return self._decode_verified(payload, doc, key)

        return self._again_if_damaged(once)

    def _again_if_damaged(self, fn: Callable[[], Any]) -> Any:
        """Run a download that verifies what it got; bytes damaged on the way are fetched again
        (``max_attempts`` times in all) before the damage is reported."""
        n = self.config.max_attempts
        for attempt in range(1, n + 1):
            try:
                return fn()
            except IntegrityError as exc:
                if attempt == n:
                    raise
                log.warning("%s; downloading it again (attempt %d of %d)", exc, attempt + 1, n)
        raise AssertionError("unreachable")  # pragma: no cover

    def load_batch(self, hash_keys: List[str], progress: Optional[bool] = None) -> Dict[str, WeightTensor]:
        """Load many tensors, ``max_concurrency`` at a time; ``{hash: WeightTensor}`` for those present."""
        self._live()
        keys = list(dict.fromkeys(hash_keys))
        for k in keys:
            self._check_key(k)
        with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="coral-s3") as pool:
            got = self._run_all(pool, [(k, lambda k=k: self.load(k)) for k in keys], desc="download", progress=progress)
        return {k: got[k] for k in keys if got.get(k) is not None}

    def get_metadata(self, hash_key: str) -> Optional[WeightMetadata]:
        """Metadata of a tensor (or, like HDF5Store, of a delta) without downloading its payload."""
        self._live()
        key = self._check_key(hash_key)
        doc = self._read_doc(self._obj("wmeta", key), f"metadata of object {key}", key)
        if doc is not None:
            return self._metadata_from_doc(doc, key)
        doc = self._read_doc(self._obj("dmeta", key), f"metadata of delta {key}", key)
        if doc is None:
            return None
        try:
            return WeightMetadata(
                name="",
                shape=tuple(int(x) for x in doc["original_shape"]),
                dtype=str(doc["original_dtype"]),
                hash=key,
                compression_info={"delta_type": str(doc["delta_type"])},
            )
        except (KeyError, ValueError, TypeError, CoralError) as exc:
            raise CorruptObjectError(f"metadata of delta {key} at {self.url} is damaged: {exc}", hash_key=key) from None

    def _list_raw(self, sub: str) -> Iterable[Dict[str, Any]]:
        """All objects under ``<prefix><sub>`` (paginated); botocore's exceptions as they come."""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.config.bucket, Prefix=self.config.prefix + sub):
            yield from page.get("Contents", []) or []

    def _list(self, sub: str) -> Iterable[Dict[str, Any]]:
        """All objects under ``<prefix><sub>`` (paginated); errors translated."""
        try:
            yield from self._list_raw(sub)
        except _ANY_EXC as exc:
            err = self._translate(exc, "listing", None)
            raise err from None

    def _list_metadata(self) -> Tuple[List[str], List[str]]:
        """(weight keys, delta keys), from one listing of ``metadata/``."""
        weights: List[str] = []
        deltas: List[str] = []
        start = len(self.config.prefix) + len("metadata/")
        for obj in self._list("metadata/"):
            name = obj["Key"][start:]
            if "/" in name:
                continue
            if name.endswith(".delta.json"):
                deltas.append(name[: -len(".delta.json")])
            elif name.endswith(".json"):
                weights.append(name[: -len(".json")])
        return weights, deltas

    def list_weights(self) -> List[str]:
        self._live()
        return self._list_metadata()[0]

    # ------------------------------------------------------------------------------- deltas
    def _delta_doc(self, delta: Delta, payload: Any) -> Dict[str, Any]:
        return {
            "kind": "delta",
            "delta_type": delta.delta_type.value,
            "reference_hash": delta.reference_hash,
            "original_shape": list(delta.original_shape),
            "original_dtype": delta.original_dtype,
            "compression_ratio": float(delta.compression_ratio),
            "lossless": bool(delta.lossless),
            "extra": {k: _jsonable(v) for k, v in delta.extra.items()},
            "payload_xxh3": _payload_hash(payload),
            "payload_bytes": len(memoryview(payload).cast("B")) if not isinstance(payload, np.ndarray) else int(payload.nbytes),
        }

    def store_delta(self, delta: Delta, delta_hash: str) -> str:
        """Store a delta under ``delta_hash`` (idempotent) and return the key."""
        self._live()
        key = self._check_key(delta_hash)
        if not self._head(self._obj("dmeta", key), key):
            data = delta.data if isinstance(delta.data, (bytes, bytearray, memoryview)) else bytes(delta.data)
            self._put_object_pair("deltas", key, data, self._delta_doc(delta, data))
        return key

    def load_delta(self, delta_hash: str) -> Optional[Delta]:
        """Download and checksum-verify a delta; ``None`` if absent."""
        self._live()
        key = self._check_key(delta_hash)

        def once() -> Optional[Delta]:
            doc = self._read_doc(self._obj("dmeta", key), f"metadata of delta {key}", key, attempts=1)
            if doc is None:
                return None
            self._check_doc_names(doc, key, "delta")
            payload = self._download(self._obj("deltas", key), key, _opt_int(doc.get("payload_bytes")), "delta")
            self._check_payload(payload, doc, key, "delta")
            return self._delta_from_doc(doc, payload.tobytes(), key)

        return self._again_if_damaged(once)

    def _delta_from_doc(self, doc: Dict[str, Any], data: bytes, key: str) -> Delta:
        try:
            return Delta(
                delta_type=DeltaType(str(doc["delta_type"])),
                data=data,
                original_shape=tuple(int(x) for x in doc["original_shape"]),
                original_dtype=str(doc["original_dtype"]),
                reference_hash=str(doc["reference_hash"]),
                compression_ratio=float(doc.get("compression_ratio", 1.0)),
                extra=dict(doc.get("extra") or {}),
            )
        except (KeyError, ValueError, TypeError, CoralError) as exc:
            raise CorruptObjectError(f"metadata of delta {key} at {self.url} is damaged: {exc}", hash_key=key) from None

    def delta_exists(self, delta_hash: str) -> bool:
        self._live()
        key = self._check_key(delta_hash)
        return self._head(self._obj("dmeta", key), key)

    def list_deltas(self) -> List[str]:
        self._live()
        return self._list_metadata()[1]

    def delete_delta(self, delta_hash: str) -> bool:
        self._live()
        key = self._check_key(delta_hash)
        return self._delete_pair("dmeta", "deltas", key)

    # -------------------------------------------------------------------------------- stats
    def get_storage_info(self, logical_sizes: bool = True) -> Dict[str, Any]:
        """Keys: backend ("s3"), url, bucket, prefix, endpoint_url, total_weights, total_bytes (logical,
        from the metadata; needs one GET per weight, skipped with ``logical_sizes=False``),
        compressed_bytes (weight payloads), compression_ratio (compressed/total), total_deltas,
        delta_bytes, metadata_bytes, stored_bytes (all objects), orphaned_payloads (payloads without
        metadata: leftovers of interrupted uploads, invisible and overwritten by the next upload)."""
        self._live()
        sizes: Dict[str, Dict[str, int]] = {"weights": {}, "deltas": {}}
        meta_bytes = 0
        wkeys: List[str] = []
        dkeys: set[str] = set()
        p = self.config.prefix
        for obj in self._list(""):
            rel = obj["Key"][len(p):]
            size = int(obj.get("Size", 0))
            group, _, name = rel.partition("/")
            if "/" in name:
                continue
            if group in sizes:
                sizes[group][name] = size
            elif group == "metadata":
                meta_bytes += size
                if name.endswith(".delta.json"):
                    dkeys.add(name[: -len(".delta.json")])
                elif name.endswith(".json"):
                    wkeys.append(name[: -len(".json")])
        wset = set(wkeys)
        compressed = sum(s for k, s in sizes["weights"].items() if k in wset)
        delta_bytes = sum(s for k, s in sizes["deltas"].items() if k in dkeys)
        orphans = sum(1 for k in sizes["weights"] if k not in wset) + sum(1 for k in sizes["deltas"] if k not in dkeys)
        total = 0
        if logical_sizes and wkeys:
            with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="coral-s3") as pool:
                for doc in pool.map(lambda k: self._read_doc(self._obj("wmeta", k), f"metadata of object {k}", k), wkeys):
                    if doc is not None:
                        total += int(doc.get("nbytes", 0))
        return {
            "backend": "s3",
            "url": self.url,
            "bucket": self.config.bucket,
            "prefix": self.config.prefix,
            "endpoint_url": self.endpoint,
            "total_weights": len(wkeys),
            "total_bytes": total if logical_sizes else None,
            "compressed_bytes": compressed,
            "compression_ratio": (compressed / total) if total else 1.0,
            "total_deltas": len(dkeys),
            "delta_bytes": delta_bytes,
            "metadata_bytes": meta_bytes,
            "stored_bytes": compressed + delta_bytes + meta_bytes,
            "orphaned_payloads": orphans,
        }

    # --------------------------------------------------------------------------------- sync
    def _bar(self, total: int, desc: str, progress: Optional[bool]):
        show = progress if progress is not None else self.config.progress
        if show is None:
            show = bool(getattr(sys.stderr, "isatty", lambda: False)())
        return tqdm(total=total, desc=desc, unit="obj", disable=not show, leave=False, dynamic_ncols=True)

    def _local_job(self, local: HDF5Store, group: str, key: str) -> Optional[_Job]:
        """Read one local object (h5py: caller thread only) and make the upload to run on a worker."""
        self._check_key(key)
        obj = local.read_prepared(key, group)  # payload checksum verified
        if obj is None:
            return None
        a = obj.attrs
        if group == "deltas":
            payload = obj.payload
            delta = self._delta_from_doc(
                {
                    "delta_type": _s(a["delta_type"]),
                    "reference_hash": _s(a["reference_hash"]),
                    "original_shape": [int(x) for x in a["original_shape"]],
                    "original_dtype": _s(a["original_dtype"]),
                    "compression_ratio": float(a.get("compression_ratio", 1.0)),
                    "extra": {k[len("extra_"):]: _jsonable(v) for k, v in a.items() if k.startswith("extra_")},
                },
                b"",
                key,
            )

            def run_delta() -> int:
                return self._put_object_pair("deltas", key, payload, self._delta_doc(delta, payload))

            return _Job(group, key, int(payload.nbytes), run_delta)
        if _s(a.get("encoding", ENCODING_VALUES)) == ENCODING_CODEC:
            payload = obj.payload
            doc = {
                "kind": "weight",
                "name": _s(a.get("name", "")),
                "shape": [int(x) for x in np.asarray(a["shape"]).reshape(-1)],
                "dtype": _s(a["dtype"]),
                "layer_type": _s(a.get("layer_type", "")),
                "model_name": _s(a.get("model_name", "")),
                "hash": _s(a.get("hash", key)),
                "nbytes": int(a.get("nbytes", obj.logical_bytes)),
                "encoding": ENCODING_CODEC,
                "payload_xxh3": _payload_hash(payload),
                "payload_bytes": int(payload.nbytes),
            }

            def run_blob() -> int:
                # never publish bytes that do not decode to their content hash
                self._decode_verified(payload, doc, key)
                return self._put_object_pair("weights", key, payload, doc)

            return _Job(group, key, int(payload.nbytes), run_blob)
        # values-encoded (gzip, lzf, none, ...): load (verified) here, encode on the worker
        del obj
        weight = local.load(key)
        if weight is None:
            return None

        def run_values() -> int:
            payload, doc = self._encode_weight(weight)
            return self._put_object_pair("weights", key, payload, doc)

        return _Job(group, key, int(weight.nbytes), run_values)

    def sync_from_local(self, local: HDF5Store, progress: Optional[bool] = None, *,
                        verify: Union[bool, Collection[str]] = False) -> Dict[str, Any]:
        """Upload every weight and delta of ``local`` that the remote lacks or holds damaged.

        Incremental (the remote is listed once; present objects are skipped), parallel
        (``max_concurrency`` uploads), resumable (re-running after an interruption sends only what is
        still missing). Codec-encoded objects are uploaded as stored, without re-encoding (after
        checking they decode to their content hash); others are loaded and encoded. Every upload is
        verified (see the module docstring).

        An object counts as present when the listing shows both its metadata and its payload. Those
        in ``verify`` (``True``: all of them) are also checked (:meth:`check_remote_object`: one small
        GET each) and uploaded again if damaged.

        Returns stats: ``uploaded`` (weights), ``deltas_uploaded``, ``skipped`` (already remote),
        ``verified`` (present objects checked and found intact), ``repaired`` (present but damaged:
        uploaded again), ``failed``, ``bytes_transferred`` (payload + metadata bytes sent),
        ``downloaded`` and ``deltas_downloaded`` (0), ``seconds``.

        Raises:
            SyncIncompleteError: some objects were not uploaded (``.failures`` says which and why,
                ``.stats`` what was done); run again to resume.
            RemoteAuthError, BucketNotFoundError, RemoteConnectionError: before anything was sent.
        """
        self._live()
        t0 = time.monotonic()
        stats = _new_stats()
        meta = self.list_entries("metadata/")
        payloads = {"weights": self.list_entries("weights/"), "deltas": self.list_entries("deltas/")}
        local_w, local_d = local.list_weights(), local.list_deltas()
        todo: List[Tuple[str, str]] = []
        present: List[Tuple[str, str]] = []
        for group, keys in (("weights", local_w), ("deltas", local_d)):
            suffix = ".json" if group == "weights" else ".delta.json"
            for k in keys:
                there = f"{k}{suffix}" in meta and k in payloads[group]
                (present if there else todo).append((group, k))
        wanted = set() if verify is False else None if verify is True else set(verify)
        check = [(g, k) for g, k in present if wanted is None or k in wanted]
        damaged = self._check_present(check, payloads)
        stats["verified"] = len(check) - len(damaged)
        stats["repaired"] = len(damaged)
        todo += [(g, k) for g, k in check if k in damaged]
        stats["skipped"] = len(local_w) + len(local_d) - len(todo)
        log.info("sync %s -> %s: %d objects to upload (%d of them damaged on the remote), %d already there "
                 "(%d of them checked)", local.filepath, self.url, len(todo), len(damaged), stats["skipped"],
                 stats["verified"])

        def done(job: _Job, sent: int) -> None:
            stats["uploaded" if job.group == "weights" else "deltas_uploaded"] += 1
            stats["bytes_transferred"] += sent

        failures = self._pipeline(
            todo, lambda g, k: self._local_job(local, g, k), done, stats,
            desc=f"push {self.url}", progress=progress, read_ahead_bytes=_INFLIGHT_BYTES,
        )
        stats["seconds"] = time.monotonic() - t0
        self._finish_sync(stats, failures, f"sync from {local.filepath} to {self.url}",
                          "uploaded", len(todo))
        return stats

    def _check_present(self, check: List[Tuple[str, str]],
                       payloads: Dict[str, Dict[str, RemoteEntry]]) -> Dict[str, str]:
        """{key: what is wrong} for the listed objects of ``check`` that are damaged (parallel)."""
        if not check:
            return {}

        def one(item: Tuple[str, str]) -> Tuple[str, Optional[str]]:
            group, key = item
            return key, self.check_remote_object(group, key, payloads[group].get(key))

        damaged: Dict[str, str] = {}
        with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="coral-s3") as pool:
            for key, problem in pool.map(one, check):
                if problem is not None:
                    damaged[key] = problem
                    log.warning("%s at %s is damaged (%s): uploading it again", key, self.url, problem)
        return damaged

    def check_remote_object(self, group: str, key: str, payload: Optional[RemoteEntry] = None) -> Optional[str]:
        """Check one object on the remote without downloading its payload: its metadata (read and
        verified against its checksum) must describe it, and the payload's listed size and ETag
        (``payload``; listed here when not given) must be what the metadata recorded. Returns
        ``None`` if intact, else what is wrong. ``group``: ``"weights"`` or ``"deltas"``.

        Raises:
            RemoteError and subclasses: the server cannot be reached or refuses.
        """
        self._live()
        key = self._check_key(key)
        kind = "weight" if group == "weights" else "delta"
        if payload is None:
            payload = self.list_entries(f"{group}/").get(key)
            if payload is None:
                return "its payload is missing"
        try:
            doc = self._read_doc(self._obj("wmeta" if kind == "weight" else "dmeta", key),
                                 f"metadata of {kind} {key}", key)
        except CorruptObjectError as exc:
            return str(exc)
        if doc is None:
            return "its metadata is missing"
        if doc.get("key") != key or doc.get("kind", kind) != kind:
            return f"its metadata describes {doc.get('kind')} {doc.get('key')}"
        if _opt_int(doc.get("payload_bytes")) != payload.size:
            return f"its payload has {payload.size} bytes, its metadata says {doc.get('payload_bytes')}"
        recorded = {_norm_etag(doc.get(f)) for f in ("payload_etag", "payload_md5") if doc.get(f)}
        if not recorded:
            return "its metadata records no payload checksum (written by an older coral-torch)"
        if payload.etag not in recorded:
            return f"its payload's ETag {payload.etag} is not the {'/'.join(sorted(recorded))} recorded"
        return None

    def _fetch_once(self, group: str, key: str) -> Optional[Tuple[PreparedObject, int]]:
        """Download and verify one remote object into a PreparedObject (None: no such object)."""
        if group == "weights":
            doc = self._read_doc(self._obj("wmeta", key), f"metadata of object {key}", key, attempts=1)
            if doc is None:  # deleted since the listing
                return None
            self._check_doc_names(doc, key, "weight")
            size = _opt_int(doc.get("payload_bytes"))
            payload = self._download(self._obj("weights", key), key, size, "object")
            self._check_payload(payload, doc, key, "object")
            weight = self._decode_verified(payload, doc, key)
            meta = weight.metadata
            del weight
            attrs = weight_attrs(meta, meta.hash or key, meta.nbytes, str(doc.get("encoding", ENCODING_CODEC)),
                                 payload)
            if attrs["encoding"] != ENCODING_CODEC:
                raise CorruptObjectError(
                    f"object {key} at {self.url} has encoding {attrs['encoding']!r}, which cannot be "
                    "copied as is", hash_key=key,
                )
            obj = PreparedObject(key, "weights", payload, attrs, meta.nbytes)
        else:
            doc = self._read_doc(self._obj("dmeta", key), f"metadata of delta {key}", key, attempts=1)
            if doc is None:
                return None
            self._check_doc_names(doc, key, "delta")
            payload = self._download(self._obj("deltas", key), key, _opt_int(doc.get("payload_bytes")), "delta")
            self._check_payload(payload, doc, key, "delta")
            delta = self._delta_from_doc(doc, b"", key)
            try:
                self._check_key(delta.reference_hash)
            except StoreError:
                raise CorruptObjectError(
                    f"metadata of delta {key} at {self.url} names an invalid base {delta.reference_hash!r}",
                    hash_key=key,
                ) from None
            obj = delta_object(delta, key, payload)
        return obj, int(payload.nbytes) + len(encode_document(doc))

    def _check_doc_names(self, doc: Dict[str, Any], key: str, kind: str) -> None:
        if doc.get("key", key) != key or doc.get("kind", kind) != kind:
            raise CorruptObjectError(
                f"metadata of {kind} {key} at {self.url} describes {doc.get('kind')} {doc.get('key')}; "
                "it was not used", hash_key=key,
            )

    def _fetch_job(self, group: str, key: str) -> _Job:
        """A worker job that downloads and verifies one remote object into a PreparedObject; bytes
        that fail a check are downloaded again (``max_attempts`` times in all) before the object is
        reported damaged."""

        return _Job(group, key, 0, lambda: self._again_if_damaged(lambda: self._fetch_once(group, key)))

    def sync_to_local(self, local: HDF5Store, progress: Optional[bool] = None) -> Dict[str, Any]:
        """Download every weight and delta the remote has and ``local`` lacks.

        Downloads and verification (payload checksum, decode, content hash) run on
        ``max_concurrency`` threads; writes into ``local`` happen in the calling thread (h5py is not
        thread-safe), and ``local`` is flushed at the end, also after an error. Resumable: a re-run
        fetches only what ``local`` still lacks.

        Returns stats: ``downloaded`` (weights), ``deltas_downloaded``, ``skipped`` (already local),
        ``failed``, ``bytes_transferred`` (payload + metadata bytes received), ``uploaded`` and
        ``deltas_uploaded`` (0), ``seconds``.

        Raises:
            SyncIncompleteError: some objects were not copied: damaged on the remote (the good ones
                are still copied) or the connection failed (``.failures``, ``.stats``).
            ReadOnlyStoreError: ``local`` is open read-only.
        """
        self._live()
        if getattr(local, "mode", "a") == "r":
            raise ReadOnlyStoreError(f"cannot sync into {local.filepath}: it is open read-only (mode='r')")
        t0 = time.monotonic()
        stats = _new_stats()
        remote_w, remote_d = self._list_metadata()
        local_w, local_d = set(local.list_weights()), set(local.list_deltas())
        todo = [("weights", k) for k in remote_w if k not in local_w]
        todo += [("deltas", k) for k in remote_d if k not in local_d]
        stats["skipped"] = len(remote_w) + len(remote_d) - len(todo)
        log.info("sync %s -> %s: %d objects to download, %d already there", self.url, local.filepath,
                 len(todo), stats["skipped"])
        written = [0]

        def done(job: _Job, result: Optional[Tuple[PreparedObject, int]]) -> None:
            if result is None:
                stats["skipped"] += 1
                return
            obj, received = result
            local.write_prepared(obj)  # calling thread
            stats["downloaded" if job.group == "weights" else "deltas_downloaded"] += 1
            stats["bytes_transferred"] += received
            written[0] += obj.stored_bytes
            if written[0] >= _INFLIGHT_BYTES:
                local.flush()
                written[0] = 0

        try:
            failures = self._pipeline(
                todo, self._fetch_job_checked, done, stats,
                desc=f"pull {self.url}", progress=progress, read_ahead_bytes=None,
            )
        finally:
            local.flush()
        stats["seconds"] = time.monotonic() - t0
        self._finish_sync(stats, failures, f"sync from {self.url} to {local.filepath}", "downloaded", len(todo))
        return stats

    def _fetch_job_checked(self, group: str, key: str) -> _Job:
        self._check_key(key)
        return self._fetch_job(group, key)

    def _pipeline(
        self,
        todo: List[Tuple[str, str]],
        make_job: Callable[[str, str], Optional[_Job]],
        on_done: Callable[[_Job, Any], None],
        stats: Dict[str, Any],
        desc: str,
        progress: Optional[bool],
        read_ahead_bytes: Optional[int],
    ) -> Dict[str, BaseException]:
        """Make jobs in the calling thread, run them on a pool, hand results back to the calling
        thread. Memory stays bounded: at most ``2 * max_concurrency`` jobs (and, if given,
        ``read_ahead_bytes`` of payload) are queued at once. Integrity errors fail one object and the
        rest go on; any other error stops new work, lets running jobs finish and returns."""
        failures: Dict[str, BaseException] = {}
        window = 2 * self.config.max_concurrency
        pending: Dict[Future, _Job] = {}
        queued_bytes = 0
        stop: List[BaseException] = []

        def record(job_key: str, exc: BaseException) -> None:
            if not isinstance(exc, CoralError):
                stop.append(exc)  # a bug: re-raised below as is
                return
            failures[job_key] = exc
            stats["failed"] += 1
            if not isinstance(exc, IntegrityError):
                stop.append(exc)
            log.warning("%s: %s", job_key, exc)

        def drain(bar) -> None:
            nonlocal queued_bytes
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                queued_bytes -= job.size
                exc = fut.exception()
                if exc is not None:
                    record(job.key, exc)
                else:
                    try:
                        on_done(job, fut.result())
                    except Exception as e:  # local write failed
                        record(job.key, e)
                bar.update(1)
                bar.set_postfix_str(_human(stats["bytes_transferred"]), refresh=False)

        with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="coral-s3") as pool, \
                self._bar(len(todo), desc, progress) as bar:
            try:
                for group, key in todo:
                    while pending and (
                        len(pending) >= window
                        or (read_ahead_bytes is not None and queued_bytes >= read_ahead_bytes)
                    ):
                        drain(bar)
                    if stop:
                        break
                    try:
                        job = make_job(group, key)
                    except Exception as exc:  # damaged local object, invalid key: this one fails
                        record(key, exc)
                        bar.update(1)
                        if stop:
                            break
                        continue
                    if job is None:
                        bar.update(1)
                        continue
                    pending[pool.submit(job.run)] = job
                    queued_bytes += job.size
                while pending:
                    drain(bar)
            finally:
                for fut in pending:
                    fut.cancel()
        for exc in stop:
            if not isinstance(exc, CoralError):
                raise exc
        return failures

    def _finish_sync(self, stats: Dict[str, Any], failures: Dict[str, BaseException], what: str,
                     verb: str, planned: int) -> None:
        moved = stats[verb] + stats[f"deltas_{verb}"]
        if not failures:
            log.info("%s: %d objects %s, %d skipped, %s in %.1f s", what, moved, verb, stats["skipped"],
                     _human(stats["bytes_transferred"]), stats["seconds"])
            return
        keys = list(failures)
        first_key = keys[0]
        others = ", ".join(keys[1:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        shown = f"{first_key}: {failures[first_key]}" + (f" (also failed: {others})" if others else "")
        integrity = all(isinstance(e, IntegrityError) for e in failures.values())
        if integrity:
            hint = ("the damaged objects were not copied; every other object was. Repair them from a good "
                    "copy (delete them, then sync again from a store that has them intact)")
        else:
            hint = (f"{planned - moved} of {planned} objects were not transferred. Run the sync again to "
                    "resume: objects already transferred are not sent again")
        raise SyncIncompleteError(
            f"{what} incomplete: {moved} objects {verb}, {len(failures)} failed. {hint}. First failure: {shown}",
            stats=stats, failures=dict(failures),
        ) from None

    # ----------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._transfer.shutdown()
        except Exception:  # pragma: no cover - best effort
            log.debug("transfer manager shutdown failed", exc_info=True)
        try:
            self._client.close()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint!r})"


def _opt_int(v: Any) -> Optional[int]:
    return None if v is None else int(v)


def _new_stats() -> Dict[str, Any]:
    return {
        "uploaded": 0,
        "deltas_uploaded": 0,
        "downloaded": 0,
        "deltas_downloaded": 0,
        "skipped": 0,
        "verified": 0,
        "repaired": 0,
        "failed": 0,
        "bytes_transferred": 0,
        "seconds": 0.0,
    }


def _as_completed(futures: Dict[Future, Any]):
    """Like concurrent.futures.as_completed, without its timeout bookkeeping; cancelled ones are skipped."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            if not f.cancelled():
                yield f
