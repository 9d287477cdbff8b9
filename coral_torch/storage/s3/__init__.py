"""The S3 side of storage: a transport (:mod:`.client`, configured by :mod:`.config`), the object
layout over it (:mod:`.objects`), the chapter's :class:`~.store.S3Store`, and the resumable bulk
transfer engine (:mod:`.sync`, with its sources and sinks in :mod:`.endpoints`).

Names load on first use: boto3 is imported with the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_exports

if TYPE_CHECKING:
    # `X as X`: re-exported names (for type checkers; at run time they load lazily below)
    from .client import (
        PreconditionFailedError as PreconditionFailedError,
        PutResult as PutResult,
        RemoteEntry as RemoteEntry,
        S3Client as S3Client,
    )
    from .config import S3Config as S3Config, TransferConfig as TransferConfig
    from .store import S3Store as S3Store

_LAZY = {
    "S3Config": ".config",
    "TransferConfig": ".config",
    "S3Client": ".client",
    "RemoteEntry": ".client",
    "PutResult": ".client",
    "PreconditionFailedError": ".errors",
    "S3Store": ".store",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
