"""A seekable, read-only file over a buffer, without copying it: what uploads hand to boto3 (which
seeks back to resend a part on a retry)."""

from __future__ import annotations

import io
from typing import Any

from ...format.objects import byte_view

__all__ = ["BufferReader"]


class BufferReader(io.RawIOBase):
    """A seekable, read-only file over a buffer, without copying it (for uploads)."""

    def __init__(self, buf: Any):
        self._mv = byte_view(buf)
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
