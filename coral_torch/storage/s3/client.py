"""`S3Client`: verified bytes and documents under one ``s3://bucket/prefix``; the only module (with
its :mod:`.errors` helper) that talks to boto3/botocore.

Keys given to the client are relative to the prefix. What it guarantees:

- uploads are verified (:meth:`S3Client.put_bytes`): every single-part upload sends ``Content-MD5``
  (servers that check it refuse a body damaged on the way with ``BadDigest``), and botocore adds its
  flexible checksum (CRC32) where ``request_checksum_calculation="when_supported"``. The ETag the
  server answers is compared with the MD5 of what was sent (for a multipart upload: the whole
  object's MD5 or the MD5 of the parts' MD5s, ``<hex>-<parts>``); on a mismatch the object is read
  back, and sent again if the server holds other bytes (up to ``max_attempts`` times). A server whose
  ETags turn out not to be MD5s (SSE-KMS, some S3-compatible servers) is recognised by that
  read-back; from then on uploads up to ``read_back_max`` (documents, small payloads) are read back
  after each upload and larger ones rely on the server's own ``Content-MD5`` and checksum checks,
  unless ``upload_verification="read-back"`` asks for every upload to be read back.
- downloads are size-checked (:meth:`S3Client.get_bytes`); documents are verified against their
  checksum (:mod:`coral_torch.format.documents`) and read again when damaged on the way.
- listings are consistency-checked and made again when they contradict themselves.
- conditional writes: ``If-None-Match: *`` (create only) and ``If-Match: <etag>`` (compare and
  swap); a refused one raises :class:`~coral_torch.storage.s3.errors.PreconditionFailedError`.
- every request is retried with backoff (botocore "standard" mode, ``max_attempts`` in all); errors
  come back translated (:func:`~coral_torch.storage.s3.errors.translate`).

Transfers use boto3's managed transfers (one shared ``TransferManager`` per client): objects above
``multipart_threshold`` go up and down in ``multipart_chunksize`` parts.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import boto3
import numpy as np
import xxhash
from boto3.s3.transfer import TransferConfig as BotoTransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound
from botocore.parsers import ResponseParserError
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import ChunksizeAdjuster

from ...errors import CoralError, CorruptObjectError, IntegrityError, RemoteConfigError, RemoteError, StoreError
from ...format.documents import decode_document, encode_document, md5 as new_md5
from ...format.objects import byte_view
from ...format.refnames import validate_ref_name
from .buffer_reader import BufferReader
from .config import S3Config
from .errors import (
    ANY_EXC,
    CONNECTION_ERRORS,
    DIGEST_CODES,
    PreconditionFailedError,
    error_code,
    http_status,
    is_missing,
    translate,
)

log = logging.getLogger(__name__)

__all__ = ["S3Client", "RemoteEntry", "PutResult", "PreconditionFailedError", "norm_etag"]


class RemoteEntry(NamedTuple):
    """One listed object: its size, ETag (normalised: no quotes, lower case) and the time it was last
    written (the listing's ``LastModified`` as a Unix time; 0.0 where the server gave none)."""

    size: int
    etag: str
    modified: float = 0.0


class PutResult(NamedTuple):
    """A verified upload: the server's ETag (normalised), the MD5 hex of the bytes, their size."""

    etag: str
    md5: str
    size: int


class _Rejected(Exception):
    """An upload the server refused as damaged (BadDigest ...) or stored other bytes for."""


def norm_etag(etag: Any) -> str:
    """An ETag as compared here: without quotes or a weak-validator prefix, lower case."""
    e = str(etag or "").strip()
    if e.startswith("W/"):
        e = e[2:]
    return e.strip('"').lower()


def _entry(o: Mapping[str, Any]) -> RemoteEntry:
    """The :class:`RemoteEntry` of one ``list_objects_v2`` item."""
    when = o.get("LastModified")
    try:
        modified = float(when.timestamp()) if when is not None else 0.0
    except (AttributeError, TypeError, ValueError, OverflowError, OSError):
        modified = 0.0
    return RemoteEntry(int(o.get("Size", 0) or 0), norm_etag(o.get("ETag")), modified)


class _ProvideSize(BaseSubscriber):
    """Tells the transfer manager an object's size up front (no HEAD request, no seek to the end)."""

    def __init__(self, size: int):
        self._size = int(size)

    def on_queued(self, future: Any, **kwargs: Any) -> None:  # noqa: D401 - s3transfer callback
        future.meta.provide_transfer_size(self._size)


class S3Client:
    """Verified bytes and documents under one bucket and prefix (see the module docstring).
    Thread-safe."""

    def __init__(self, config: S3Config):
        if not isinstance(config, S3Config):
            raise RemoteConfigError(f"an S3 client needs an S3Config, not {type(config).__name__}")
        self.config = config
        self.transfer = t = config.transfer
        self.bucket, self.prefix, self.url = config.bucket, config.prefix, config.url
        self.max_attempts = t.max_attempts
        self._etag_md5: bool | None = None  # whether ETags are MD5s: None until an upload tells
        self._etag_lock = threading.Lock()
        self._closed = False
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
            retries={"total_max_attempts": t.max_attempts, "mode": "standard"},  # (botocore: max_attempts = retries)
            s3={"addressing_style": c.addressing_style},
            connect_timeout=t.connect_timeout,
            read_timeout=t.read_timeout,
            # worker threads (metadata requests) + the transfer manager's threads (payloads)
            max_pool_connections=2 * t.max_concurrency + 4,
            user_agent_extra="coral-torch",
            request_checksum_calculation=t.request_checksum_calculation,
            response_checksum_validation=t.response_checksum_validation,
        )
        try:
            self._s3 = session.client("s3", endpoint_url=c.endpoint_url, verify=c.verify_ssl, config=boto_config)
        except (BotoCoreError, ValueError) as exc:
            raise RemoteConfigError(f"cannot set up an S3 client for {c.url}: {exc}") from None
        self.endpoint = c.endpoint_url or self._s3.meta.endpoint_url
        self._transfer = create_transfer_manager(
            self._s3,
            BotoTransferConfig(
                multipart_threshold=t.multipart_threshold,
                multipart_chunksize=t.multipart_chunksize,
                max_concurrency=t.max_concurrency,
                num_download_attempts=t.max_attempts,
                preferred_transfer_client="classic",
            ),
        )

    @property
    def etags_are_md5(self) -> bool | None:
        """Whether this server's ETags are the MD5s of what it stores (``None`` until an upload tells)."""
        return self._etag_md5

    # ------------------------------------------------------------------------------ basics
    def key(self, rel: str) -> str:
        """The full object key of ``rel``."""
        return self.prefix + rel

    def where(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{rel}"

    def translate(self, exc: BaseException, doing: str, rel: str | None = None) -> CoralError:
        return translate(self, exc, doing, None if rel is None else self.key(rel))

    def _call(self, doing: str, rel: str | None, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ANY_EXC as exc:
            err = self.translate(exc, doing, rel)
        raise err

    def check_bucket(self) -> None:
        """Check that the bucket exists and the credentials work (translated errors)."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            err = None if http_status(exc) == 403 else translate(self, exc, "checking bucket")
        except (BotoCoreError, ResponseParserError, OSError) as exc:
            err = translate(self, exc, "checking bucket")
        if err is not None:
            raise err
        # HEAD answers 403 without saying why: ask with a request whose error has a code.
        self._call("listing", None, self._s3.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def document_key(self, rel: str) -> str:
        """``rel`` after checking it cannot leave the prefix (``..``, control characters)."""
        try:
            validate_ref_name(rel)
        except CoralError as exc:
            raise StoreError(f"invalid document key for {self.url}: {exc}") from None
        return rel

    # ---------------------------------------------------------------------- single objects
    def exists(self, rel: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self.key(rel))
            return True
        except ClientError as exc:
            if is_missing(exc):
                return False
            err = self.translate(exc, "checking", rel)
        except (BotoCoreError, ResponseParserError, OSError) as exc:
            err = self.translate(exc, "checking", rel)
        raise err

    def delete(self, rel: str) -> None:
        self._call("deleting", rel, self._s3.delete_object, Bucket=self.bucket, Key=self.key(rel))

    def get_bytes(self, rel: str, size: int | None = None, *, what: str = "object", key: str = "") -> np.ndarray:
        """The object's bytes as a uint8 array, checked against ``size`` when given (content checks
        are the caller's). A short or missing payload is :class:`CorruptObjectError` naming ``what``
        ``key`` (it was described elsewhere, so it should be there)."""
        sink = io.BytesIO()
        key = key or rel
        try:
            fut = self._transfer.download(
                self.bucket, self.key(rel), sink, subscribers=[_ProvideSize(size)] if size is not None else None
            )
            fut.result()
        except ClientError as exc:
            if error_code(exc) == "InvalidRange":
                raise CorruptObjectError(
                    f"{what} {key} at {self.url} is damaged: its payload is shorter than recorded; it was not returned",
                    hash_key=key,
                ) from None
            if is_missing(exc):
                raise CorruptObjectError(
                    f"{what} {key} at {self.url} is damaged: its metadata exists but its payload "
                    f"{self.key(rel)} is missing; it was not returned",
                    hash_key=key,
                ) from None
            raise self.translate(exc, "downloading", rel) from None
        except ANY_EXC as exc:
            raise self.translate(exc, "downloading", rel) from None
        payload = np.frombuffer(sink.getbuffer(), dtype=np.uint8)
        if size is not None and payload.size != size:
            raise CorruptObjectError(
                f"{what} {key} at {self.url} is damaged: its payload has {payload.size} bytes, "
                f"not {size}; it was not returned",
                hash_key=key,
            )
        return payload

    def get_range(self, rel: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from ``start`` (fewer at its end); one GET."""
        if length <= 0:
            return b""
        resp = self._call(
            "reading",
            rel,
            self._s3.get_object,
            Bucket=self.bucket,
            Key=self.key(rel),
            Range=f"bytes={int(start)}-{int(start) + int(length) - 1}",
        )
        try:
            return resp["Body"].read()
        except ANY_EXC as exc:
            raise self.translate(exc, "reading", rel) from None

    # ----------------------------------------------------------------------------- listing
    def _list_raw(self, sub: str) -> Iterator[dict[str, Any]]:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + sub):
            yield from page.get("Contents", []) or []

    def iter_entries(self, sub: str = "") -> Iterator[tuple[str, RemoteEntry]]:
        """``(key relative to the prefix, entry)`` for every object under ``<prefix><sub>``, as listed
        (paginated; errors translated, no consistency check: see :meth:`list_entries`)."""
        n = len(self.prefix)
        try:
            for o in self._list_raw(sub):
                yield str(o["Key"])[n:], _entry(o)
        except ANY_EXC as exc:
            raise self.translate(exc, "listing", None) from None

    def has_any(self, sub: str = "") -> bool:
        """Whether anything is stored under ``<prefix><sub>``: one listing request of one key."""
        page = self._call(
            "listing", None, self._s3.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix + sub, MaxKeys=1
        )
        return bool(page.get("Contents"))

    def list_entries(self, sub: str = "") -> dict[str, RemoteEntry]:
        """Every object under ``<prefix><sub>``: ``{key relative to <prefix><sub>: RemoteEntry}`` from one
        paginated listing. A listing that contradicts itself (a key twice, a key outside the prefix,
        an answer that does not parse: damaged on the way) is made again, ``max_attempts`` times in all.

        Raises:
            RemoteError and subclasses: the listing failed or stayed inconsistent.
        """
        base = self.prefix + sub
        n = self.max_attempts
        bad = ""
        for attempt in range(1, n + 1):
            out: dict[str, RemoteEntry] = {}
            bad = ""
            try:
                for o in self._list_raw(sub):
                    k = str(o.get("Key", ""))
                    rel = k[len(base) :]
                    if not k.startswith(base) or rel in out:
                        bad = f"key {k!r} " + ("listed twice" if rel in out else f"is not under {base!r}")
                        break
                    out[rel] = _entry(o)
            except ResponseParserError as exc:
                bad = f"the answer does not parse: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            except ANY_EXC as exc:
                raise self.translate(exc, "listing", None) from None
            if not bad:
                return out
            if attempt < n:
                log.warning(
                    "listing s3://%s/%s was damaged on the way (%s); listing again (attempt %d of %d)",
                    self.bucket,
                    base,
                    bad,
                    attempt + 1,
                    n,
                )
        raise RemoteError(
            f"listing s3://{self.bucket}/{base} at {self.endpoint} kept coming back damaged ({bad}) after "
            f"{n} attempts; try again (a proxy or the network may be damaging responses)"
        )

    # --------------------------------------------------------------------------- documents
    def get_document(
        self,
        rel: str,
        what: str | None = None,
        *,
        key: str | None = None,
        attempts: int | None = None,
        with_etag: bool = False,
    ) -> Any:
        """GET and verify one document (:func:`~coral_torch.format.documents.decode_document`);
        ``None`` if there is none (``(None, None)`` with ``with_etag``, else ``(doc, etag)``).

        A body that arrives damaged is read again, ``attempts`` (default ``max_attempts``) reads in
        all, before the damage is reported; one cut part-way is read again ``max_attempts`` times."""
        n_damaged = attempts or self.max_attempts
        n_cut = self.max_attempts
        where, what = self.where(rel), what or f"document {rel}"
        damaged = cut = 0
        while True:
            try:
                resp = self._s3.get_object(Bucket=self.bucket, Key=self.key(rel))
                body = resp["Body"].read()
            except ClientError as exc:
                if is_missing(exc) and error_code(exc) != "NoSuchBucket":
                    return (None, None) if with_etag else None
                raise self.translate(exc, "reading", rel) from None
            except ANY_EXC as exc:
                cut += 1
                if cut < n_cut and isinstance(exc, CONNECTION_ERRORS):
                    log.warning(
                        "reading %s was cut (%s); reading it again (attempt %d of %d)",
                        where,
                        type(exc).__name__,
                        cut + 1,
                        n_cut,
                    )
                    continue
                raise self.translate(exc, "reading", rel) from None
            try:
                doc = decode_document(body, what, where, key if key is not None else rel)
                return (doc, norm_etag(resp.get("ETag"))) if with_etag else doc
            except CorruptObjectError as exc:
                damaged += 1
                if damaged >= n_damaged:
                    raise
                log.warning("%s; reading it again (attempt %d of %d)", exc, damaged + 1, n_damaged)

    def put_document(
        self,
        rel: str,
        doc: Mapping[str, Any],
        what: str | None = None,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> PutResult:
        """Write ``doc`` at ``rel`` in the canonical encoding (format fields and checksum added) and
        verify what the server stored. ``if_none_match``: only if nothing is there yet;
        ``if_match``: only if the object's ETag is still that one.

        Raises:
            PreconditionFailedError: a condition did not hold; nothing was written.
            RemoteError and subclasses: refused, unreachable, or the server kept storing damaged bytes.
        """
        cond: dict[str, str] = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        if if_match is not None:
            cond["IfMatch"] = f'"{norm_etag(if_match)}"'
        return self.put_bytes(rel, encode_document(doc), what or f"document {rel}", "application/json", cond)

    # -------------------------------------------------------------------- verified uploads
    def _md5s(self, view: memoryview, multipart: bool) -> tuple[str, str | None]:
        """(MD5 hex of the bytes, the ETag S3 gives a multipart upload of them in our part size)."""
        whole = new_md5()
        if not multipart:
            whole.update(view)
            return whole.hexdigest(), None
        chunk = ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, len(view))
        parts = []
        for i in range(0, len(view), chunk):
            part = view[i : i + chunk]
            whole.update(part)
            parts.append(new_md5())
            parts[-1].update(part)
        both = new_md5()
        for p in parts:
            both.update(p.digest())
        return whole.hexdigest(), f"{both.hexdigest()}-{len(parts)}"

    def _send(
        self, rel: str, view: memoryview, md5: str, multipart: bool, content_type: str, cond: Mapping[str, str]
    ) -> str:
        """One upload (Content-MD5 on single-part uploads); returns the server's ETag (normalised).
        Raises _Rejected when the server refuses the body as damaged or holds another size."""
        b, obj = self.bucket, self.key(rel)
        try:
            if not multipart or cond:
                resp = self._s3.put_object(
                    Bucket=b,
                    Key=obj,
                    Body=BufferReader(view),
                    ContentLength=len(view),
                    ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
                    ContentType=content_type,
                    **cond,
                )
                return norm_etag(resp.get("ETag"))
            fut = self._transfer.upload(
                BufferReader(view),
                b,
                obj,
                extra_args={"ContentType": content_type},
                subscribers=[_ProvideSize(len(view))],
            )
            fut.result()
            head = self._s3.head_object(Bucket=b, Key=obj)
        except ClientError as exc:
            code = error_code(exc)
            if code in DIGEST_CODES:
                raise _Rejected(f"the server refused the body it received as damaged ({code})") from None
            raise self.translate(exc, "uploading", rel) from None
        except ANY_EXC as exc:
            raise self.translate(exc, "uploading", rel) from None
        stored = int(head.get("ContentLength", -1))
        if stored != len(view):
            raise _Rejected(f"the server holds {stored} bytes, {len(view)} were sent")
        return norm_etag(head.get("ETag"))

    def _read_back(self, rel: str, view: memoryview) -> str | None:
        """None if the server holds exactly ``view`` at ``rel``, else what is wrong."""
        try:
            got = self.get_bytes(rel, len(view), what="uploaded object", key=self.key(rel))
        except IntegrityError as exc:
            return f"reading it back failed: {exc}"
        if xxhash.xxh3_64(byte_view(got)).hexdigest() != xxhash.xxh3_64(view).hexdigest():
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
                "checksum checks (upload_verification='read-back' reads them back too)",
                self.endpoint,
            )

    def put_bytes(
        self,
        rel: str,
        payload: Any,
        what: str,
        content_type: str = "application/octet-stream",
        cond: Mapping[str, str] | None = None,
    ) -> PutResult:
        """Upload ``payload`` to ``rel`` and make sure the server holds exactly those bytes (see the
        module docstring); sent again when it does not (a conditional write only while the server
        refused the body as damaged: nothing was stored).

        Raises:
            RemoteError: the server kept refusing or damaging the bytes (``max_attempts`` uploads).
            PreconditionFailedError, RemoteError subclasses: refused, unreachable (as translated).
        """
        view = byte_view(payload)
        size = len(view)
        cond = dict(cond or {})
        multipart = size >= self.transfer.multipart_threshold and not cond
        md5, composite = self._md5s(view, multipart)
        accepted = {md5} if composite is None else {md5, composite}
        read_back_all = self.transfer.upload_verification == "read-back"
        n = self.max_attempts
        problem = ""
        for attempt in range(1, n + 1):
            try:
                etag = self._send(rel, view, md5, multipart, content_type, cond)
            except _Rejected as exc:
                problem = str(exc)
            else:
                if etag in accepted and not read_back_all:
                    self._note_etags(True)
                    return PutResult(etag, md5, size)
                if not read_back_all and self._etag_md5 is False and size > self.transfer.read_back_max:
                    return PutResult(etag, md5, size)  # not an MD5 ETag server: its own checks stand
                problem = self._read_back(rel, view) or ""
                if not problem:
                    if etag not in accepted:
                        self._note_etags(False)
                    return PutResult(etag, md5, size)
                problem += f" (ETag {etag or '-'}, MD5 of the data {md5})"
                if cond:  # stored, but damaged: a conditional write cannot be sent again as is
                    break
            if attempt < n:
                log.warning(
                    "upload of %s to %s arrived damaged: %s; sending it again (attempt %d of %d)",
                    what,
                    self.url,
                    problem,
                    attempt + 1,
                    n,
                )
        raise RemoteError(
            f"could not upload {what} to s3://{self.bucket}/{self.key(rel)} intact after {n} attempts: {problem}. "
            f"Something between here and {self.endpoint} damages data (a proxy, the network, the server); "
            "fix it and run the push again"
        )

    # ---------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._transfer.shutdown()
        except Exception:  # pragma: no cover - best effort
            log.debug("transfer manager shutdown failed", exc_info=True)
        try:
            self._s3.close()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        return f"S3Client({self.url!r}, endpoint_url={self.endpoint!r})"
