"""boto/botocore/s3transfer exceptions as coral-torch errors with a plain message (the client's
error translation; only :mod:`.client` and this module know botocore)."""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.parsers import ResponseParserError
from s3transfer.exceptions import RetriesExceededError

from ...errors import (
    BucketNotFoundError,
    CoralError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
)

log = logging.getLogger(__name__)

__all__ = [
    "PreconditionFailedError",
    "translate",
    "error_code",
    "is_missing",
    "ANY_EXC",
    "CONNECTION_ERRORS",
    "DIGEST_CODES",
    "PRECONDITION_CODES",
]


class PreconditionFailedError(RemoteError):
    """A conditional write was refused: ``If-None-Match: *`` and the key exists, or ``If-Match`` and
    the key's ETag is no longer the one given (someone else wrote it first). Nothing was written."""

    def __init__(self, msg: str, *, key: str = "", etag: str | None = None):
        super().__init__(msg)
        self.key = key
        self.etag = etag


DIGEST_CODES = frozenset(  # the server says the body it got does not match the checksum sent with it
    {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum", "BadChecksum", "IncompleteBody"}
)
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
ANY_EXC = (ClientError, BotoCoreError, RetriesExceededError, ResponseParserError, OSError)
AUTH_CODES = frozenset(
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
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
CONNECTION_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    RetriesExceededError,
    OSError,  # socket errors surfacing from a body read
)


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ("" for anything else)."""
    if not isinstance(exc, ClientError):
        return ""
    return str((exc.response.get("Error", {}) or {}).get("Code", ""))


def http_status(exc: BaseException) -> int | None:
    if not isinstance(exc, ClientError):
        return None
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def is_missing(exc: BaseException) -> bool:
    """Whether a ClientError says the key does not exist (not the bucket)."""
    if not isinstance(exc, ClientError):
        return False
    code = error_code(exc)
    return code in MISSING_KEY_CODES or http_status(exc) == 404 and code != "NoSuchBucket"


def translate(client: Any, exc: BaseException, doing: str, key: str | None = None) -> CoralError:
    """A coral-torch error with a plain message for a boto/botocore/s3transfer exception.

    ``client`` gives the context: ``bucket``, ``prefix``, ``endpoint``, ``url``, ``max_attempts``;
    ``key`` is the full object key (``None``: the request was about the bucket or a listing)."""
    if isinstance(exc, CoralError):
        return exc
    where = f"s3://{client.bucket}/{key}" if key else client.url
    bucket, endpoint = client.bucket, client.endpoint
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
        status = http_status(exc)
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
            return BucketNotFoundError(
                f"bucket {bucket!r} does not exist at {endpoint}; create it first "
                f"(e.g. `aws s3 mb s3://{bucket}`) or fix bucket/endpoint_url/region in S3Config",
                bucket=bucket,
                endpoint=endpoint,
            )
        if code in PRECONDITION_CODES or status == 412:
            return PreconditionFailedError(
                f"S3 at {endpoint} refused the conditional write of {where}: another writer changed it "
                f"first ({code or status}); nothing was written",
                key=key or "",
            )
        if code in AUTH_CODES:
            return RemoteAuthError(
                f"S3 at {endpoint} rejected the credentials ({code}: {text}) while {doing} "
                f"{where}. Check access_key/secret_key/session_token in S3Config, or the "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN environment variables "
                "and ~/.aws/credentials"
            )
        if code in DENIED_CODES or status == 403:
            detail = f"{code}: {text}" if text and text != "Forbidden" else "HTTP 403"
            return RemoteAuthError(
                f"S3 at {endpoint} denied access ({detail}) while {doing} {where}: the credentials "
                f"are wrong or lack permission (s3:ListBucket, GetObject, PutObject, DeleteObject on "
                f"bucket {bucket!r} and prefix {client.prefix!r})"
            )
        if status is not None and status >= 500:
            return RemoteError(
                f"S3 at {endpoint} failed while {doing} {where} (HTTP {status} {code}: {text}) "
                f"after {client.max_attempts} attempts; try again later"
            )
        return RemoteError(f"S3 at {endpoint} refused {doing} {where}: {code}: {text}")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return RemoteAuthError(
            f"no usable AWS credentials for {client.url} ({exc}): give access_key/secret_key in "
            "S3Config, set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or configure a profile"
        )
    if isinstance(exc, SSLError):
        return RemoteConnectionError(
            f"TLS to {endpoint} failed while {doing} {where} ({exc}); check the certificate, "
            "or set verify_ssl to a CA bundle (or False for a test server)"
        )
    if isinstance(exc, CONNECTION_ERRORS):
        return RemoteConnectionError(
            f"lost or could not open the connection to S3 at {endpoint} while {doing} {where} "
            f"({msg}); gave up after {client.max_attempts} attempts. Check endpoint_url, the "
            "network and that the server is up"
        )
    if isinstance(exc, BotoCoreError):
        return RemoteError(f"S3 request to {endpoint} failed while {doing} {where}: {msg}")
    if isinstance(exc, ResponseParserError):
        return RemoteError(
            f"S3 at {endpoint} sent a garbled answer while {doing} {where} ({msg.splitlines()[0]}); "
            "try again (a proxy or the network may be damaging responses)"
        )
    return RemoteError(f"unexpected error while {doing} {where}: {msg}")
