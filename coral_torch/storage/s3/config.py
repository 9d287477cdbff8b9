"""Where an S3 remote is (:class:`S3Config`) and how objects move to and from it
(:class:`TransferConfig`): every transfer knob and its default, in one place. No I/O, no boto."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import RemoteConfigError
from ...format import codec

__all__ = ["S3Config", "TransferConfig", "MiB"]

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's smallest multipart part (all but the last)
MAX_PART = 5 * 1024 * MiB
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]$")
_ADDRESSING = ("auto", "path", "virtual")
_CHECKSUM_WHEN = ("when_supported", "when_required")
_UPLOAD_VERIFICATION = ("auto", "read-back")


@dataclass(frozen=True)
class TransferConfig:
    """How objects move (s3transfer-style: every knob of the client and the sync engine, one set of
    defaults). :attr:`S3Config.transfer` gives the one an :class:`S3Config` asks for; the meaning of
    each knob is documented there.

    ``read_ahead_bytes``: payload bytes a sync reads ahead of its uploads, at most.
    ``read_back_max``: uploads up to this size are read back on servers whose ETags are not MD5s.
    """

    max_concurrency: int = 8
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    request_checksum_calculation: str = "when_supported"
    response_checksum_validation: str = "when_required"
    upload_verification: str = "auto"
    read_ahead_bytes: int = 1 << 30
    read_back_max: int = 1 * MiB

    def __post_init__(self) -> None:
        if not isinstance(self.max_concurrency, int) or not 1 <= self.max_concurrency <= 256:
            raise RemoteConfigError(f"max_concurrency must be an int in 1..256, not {self.max_concurrency!r}")
        if not isinstance(self.multipart_threshold, int) or self.multipart_threshold < 1:
            raise RemoteConfigError(f"multipart_threshold must be a positive int, not {self.multipart_threshold!r}")
        if not isinstance(self.multipart_chunksize, int) or not MIN_PART <= self.multipart_chunksize <= MAX_PART:
            raise RemoteConfigError(
                f"multipart_chunksize must be between 5 MiB and 5 GiB (S3's part limits), "
                f"not {self.multipart_chunksize!r}"
            )
        if not isinstance(self.max_attempts, int) or not 1 <= self.max_attempts <= 50:
            raise RemoteConfigError(f"max_attempts must be an int in 1..50, not {self.max_attempts!r}")
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise RemoteConfigError("connect_timeout and read_timeout must be positive")
        for name in ("request_checksum_calculation", "response_checksum_validation"):
            if getattr(self, name) not in _CHECKSUM_WHEN:
                raise RemoteConfigError(f"{name} must be one of {_CHECKSUM_WHEN}, not {getattr(self, name)!r}")
        if self.upload_verification not in _UPLOAD_VERIFICATION:
            raise RemoteConfigError(
                f"upload_verification must be one of {_UPLOAD_VERIFICATION}, not {self.upload_verification!r}"
            )


_T = TransferConfig  # the defaults below are TransferConfig's


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

    The transfer knobs are gathered in :attr:`transfer` (a :class:`TransferConfig`).
    """

    bucket: str
    region: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    max_concurrency: int = _T.max_concurrency
    multipart_threshold: int = _T.multipart_threshold
    multipart_chunksize: int = _T.multipart_chunksize
    max_attempts: int = _T.max_attempts
    addressing_style: str = "auto"
    verify_ssl: bool | str = True
    connect_timeout: float = _T.connect_timeout
    read_timeout: float = _T.read_timeout
    codec_level: int = codec.DEFAULT_LEVEL
    check_bucket: bool = True
    progress: bool | None = None
    request_checksum_calculation: str = _T.request_checksum_calculation
    response_checksum_validation: str = _T.response_checksum_validation
    upload_verification: str = _T.upload_verification

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
        if (
            "//" in prefix
            or any(ord(c) < 32 or ord(c) == 127 for c in prefix)
            or "\\" in prefix
            or any(seg in (".", "..") for seg in prefix.split("/"))
        ):
            raise RemoteConfigError(
                f"invalid prefix {self.prefix!r}: "
                "no empty, '.' or '..' path segments, backslashes or control characters"
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
        self.transfer  # noqa: B018 - validates the transfer knobs
        if self.addressing_style not in _ADDRESSING:
            raise RemoteConfigError(f"addressing_style must be one of {_ADDRESSING}, not {self.addressing_style!r}")
        if not -7 <= int(self.codec_level) <= 22:
            raise RemoteConfigError(f"codec_level must be a zstd level in -7..22, not {self.codec_level!r}")

    @property
    def transfer(self) -> TransferConfig:
        """The transfer knobs of this config (validated)."""
        return TransferConfig(
            max_concurrency=self.max_concurrency,
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_attempts=self.max_attempts,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            request_checksum_calculation=self.request_checksum_calculation,
            response_checksum_validation=self.response_checksum_validation,
            upload_verification=self.upload_verification,
        )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
