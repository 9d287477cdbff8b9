"""Stored objects read a chunk at a time: delta bases for the encoder, whole objects into place.

A commit that delta-encodes a tensor needs its base: the tensor of the same name in the parent
commit, stored as a chain (a full object, then XOR deltas on top of it). Decoding the whole base
first costs one tensor-sized buffer per encoder thread, plus the stored bytes it was read into.
:class:`BaseStream` instead decodes the range the encoder asks for, chunk by chunk (a chunked blob,
see :mod:`coral_torch.codec`, is read one frame at a time), and checks every level of the chain
against its content hash as the encoder reads through it: the read that completes the stream
raises :class:`~coral_torch.errors.HashMismatchError` instead of returning its bytes if any level
hashed differently, so a delta is never finished against a damaged base.

Nothing here knows about the catalog: the repository hands over, per chain level, a
:class:`~coral_torch.codec.BlobReader` and the content hash its result must have.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import CorruptObjectError, HashMismatchError
from ..format.codec import BlobReader
from ..format.weight_tensor import content_hasher


class ReadBuffer:
    """A growing byte buffer that several readers take turns with (one read in use at a time)."""

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None

    def get(self, n: int) -> memoryview:
        if self._buf is None or self._buf.size < n:
            self._buf = None  # free the smaller one first
            self._buf = np.empty(max(n, 1), dtype=np.uint8)
        return memoryview(self._buf)[:n]  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+

    def release(self) -> None:
        self._buf = None


def pread_source(fd: int, offset: int, buffer: ReadBuffer | None = None) -> Callable[[int, int], memoryview]:
    """``read(pos, length)`` for a :class:`BlobReader` over the blob at ``offset`` of file ``fd``:
    the bytes, in ``buffer`` (shared by the readers of one stream; valid until its next read), or
    fewer if the file ends first."""
    buffer = buffer if buffer is not None else ReadBuffer()

    def read(pos: int, length: int) -> memoryview:
        view = buffer.get(length)
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + pos + done)
            if got == 0:
                return view[:done]
            done += got
        return view

    return read


class BaseStream:
    """The bytes of a delta base, decoded on demand: ``stream[a:b]`` is a uint8 array of bytes
    ``[a, b)`` (a view of a buffer this object reuses: valid until the next slice).

    ``levels``: the chain, full object first, then each XOR delta on top of it, as ``(reader,
    content hash of the bytes after this level)``. Bytes read in order (each slice starting at or
    before the end of what was read so far) are hashed per level; reading past the end that way
    completes the check. Slices elsewhere (a sampling probe) are decoded but not hashed."""

    def __init__(
        self, levels: Sequence[tuple[BlobReader, str]], dtype: str, shape: tuple, nbytes: int, *, name: str = ""
    ) -> None:
        if not levels:
            raise ValueError("a base stream needs at least one level")
        for reader, h in levels:
            if reader.nbytes != nbytes:
                raise HashMismatchError(
                    f"object {h} of the chain of delta base {levels[-1][1]} decodes to {reader.nbytes} bytes, "
                    f"not {nbytes}",
                    hash_key=h,
                )
        self.levels = list(levels)
        self.size = nbytes
        self.name = name
        self._hashers = [content_hasher(dtype, tuple(shape)) for _ in self.levels]
        self._hashed = 0  # bytes [0, _hashed) went through every level's hasher
        self._buf: np.ndarray | None = None
        self.verified = nbytes == 0 and self._check()

    def __len__(self) -> int:
        return self.size

    def _check(self) -> bool:
        for hasher, (_, h) in zip(self._hashers, self.levels):
            actual = hasher.hexdigest()
            if actual != h:
                raise HashMismatchError(
                    f"delta base {self.levels[-1][1]}: object {h} of its chain hashes to {actual} when read "
                    "back: its pack is damaged (run `coral-torch verify`)",
                    hash_key=h,
                )
        return True

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice):
            raise TypeError("a BaseStream is read by contiguous slices")
        start, stop, step = s.indices(self.size)
        if step != 1:
            raise ValueError("a BaseStream is read by contiguous slices")
        stop = max(start, stop)
        n = stop - start
        if self._buf is None or self._buf.size < n:
            self._buf = None  # free the smaller one first
            self._buf = np.empty(n, dtype=np.uint8)
        out = self._buf[:n]
        hash_from = self._hashed if start <= self._hashed < stop else None
        for i, ((reader, _), hasher) in enumerate(zip(self.levels, self._hashers)):
            reader.decode_range(start, stop, out, xor=i > 0)
            if hash_from is not None:
                hasher.update(out[hash_from - start :])  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
        if hash_from is not None:
            self._hashed = stop
            for reader, _ in self.levels:  # in-order reads decode whole frames in place
                reader.release(before=stop)
            if stop == self.size:
                self.verified = self._check()
        return out

    def release(self) -> None:
        """Drop the buffers (the stream can still be read; it allocates again)."""
        self._buf = None
        for reader, _ in self.levels:
            reader.release()


_thread = threading.local()


def thread_buffer() -> ReadBuffer:
    """This thread's :class:`ReadBuffer` for object reads: it grows to the largest frame read (a
    chunked blob is read a frame at a time), never to a whole large object."""
    buf = getattr(_thread, "buf", None)
    if buf is None:
        buf = _thread.buf = ReadBuffer()
    return buf


def _located(row: Any) -> bool:
    return row.offset is not None and row.length is not None and row.offset >= 0 and row.length > 0


def open_stored(fd: int, row: Any, *, buffer: ReadBuffer | None = None, where: str = "") -> BlobReader:
    """A :class:`BlobReader` over the object of catalog row ``row`` (``hash``, ``offset``,
    ``length``, ``nbytes``) in the pack open as ``fd``. Its claimed extent and the size its blob
    declares are checked against the file and the row before anything is allocated."""
    size = os.fstat(fd).st_size
    if not _located(row) or row.offset + row.length > size:
        raise CorruptObjectError(
            f"object {row.hash} claims bytes {row.offset}..{(row.offset or 0) + (row.length or 0)} of pack "
            f"{where}, which has {size}: the catalog row or the pack is damaged",
            hash_key=row.hash,
        )
    reader = BlobReader(
        pread_source(fd, row.offset, buffer if buffer is not None else thread_buffer()), row.length, hash_key=row.hash
    )
    if reader.nbytes != row.nbytes:
        raise CorruptObjectError(
            f"object {row.hash} in pack {where} decodes to {reader.nbytes} bytes, its catalog row says "
            f"{row.nbytes}: the pack or the catalog is damaged",
            hash_key=row.hash,
        )
    return reader


def stream_base(chain: Sequence[Any], pack_fd: Callable[[str], int]) -> BaseStream | None:
    """A :class:`BaseStream` over a delta base's chain of catalog rows (full object first), or None
    when it cannot be streamed (a row without a recorded location, a lossy row, a chain that does
    not start with a full object): then decode it whole. ``pack_fd(name)`` opens a pack for pread.
    The rows' sizes must already be checked against their dtype and shape."""
    if not chain or chain[0].kind != "full" or any(r.kind != "delta" for r in chain[1:]):
        return None
    if not all(_located(r) and r.lossless for r in chain):
        return None
    last = chain[-1]
    if any(r.nbytes != last.nbytes for r in chain):
        raise CorruptObjectError(f"the chain of delta base {last.hash} mixes sizes", hash_key=last.hash)
    buffer = ReadBuffer()  # the levels are read one after another: one buffer serves them all
    levels = [(open_stored(pack_fd(r.pack), r, buffer=buffer, where=r.pack), r.hash) for r in chain]
    return BaseStream(levels, last.dtype, tuple(last.shape), last.nbytes, name=last.hash)
