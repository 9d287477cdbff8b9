"""Where a repository lives: a local directory (the embedded default) or ``s3://bucket/prefix``.

The one parser of repository arguments. A string with a URL scheme is never taken as a local path:
``s3://`` names an S3 repository, ``coral://`` is a checkpoint reference (not a repository), and
any other scheme is refused with a one-line error before anything is created. Standard library only
(the CLI's read-only commands import it without boto3 or torch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .defaults import default_repository
from .errors import UnsupportedLocationError

__all__ = ["S3Location", "parse_location", "S3_SCHEME"]

S3_SCHEME = "s3://"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """``s3://<bucket>/<prefix>``: the prefix has no leading or trailing ``/`` ("" for the bucket's root)."""

    bucket: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url


def parse_location(repo: str | os.PathLike | None) -> Path | S3Location:
    """A repository argument as an absolute local directory or an :class:`S3Location`. ``None``
    means ``$CORAL_REPO`` (which may itself be an ``s3://`` URL) or ``./.coral``."""
    raw = os.fspath(repo) if repo is not None else default_repository()
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    m = _SCHEME_RE.match(raw)
    if m is None:
        return Path(raw).absolute()
    scheme = m.group(1).lower()
    if scheme == "s3":
        bucket, _, prefix = raw[len(m.group(0)) :].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise UnsupportedLocationError(
                f"{raw!r} does not name an S3 bucket: write s3://<bucket>/<prefix> with a bucket name of 3-63 "
                "lowercase letters, digits, '.' and '-'"
            )
        if any(seg in (".", "..") for seg in prefix.split("/")) or "//" in prefix or "\\" in prefix:
            raise UnsupportedLocationError(f"{raw!r}: the prefix may not contain '.', '..' or empty path segments")
        return S3Location(bucket, prefix)
    if scheme == "coral":
        raise UnsupportedLocationError(
            f"{raw!r} is a checkpoint reference, not a repository: pass it as the checkpoint "
            "(load('coral://latest', repo=...)) and the repository as a directory or s3://bucket/prefix"
        )
    raise UnsupportedLocationError(
        f"{raw!r} is a {scheme}:// URL: a repository is a local directory or s3://bucket/prefix "
        "(S3-compatible storage); for a directory whose name contains '://', write it as ./<name>"
    )
