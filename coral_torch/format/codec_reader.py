"""Reading codec blobs: frame parsing and checks, :func:`decode` of a whole blob in memory, and
:class:`BlobReader`, which decodes a stored blob (or any byte range of its output) a frame at a
time. The byte layout is described in :mod:`coral_torch.codec`, which also re-exports this
module's public names; the encoder lives there."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import zstandard

from ..errors import CorruptObjectError
from . import planes
from .codec_layout import (
    CHUNKED as _CHUNKED,
    HEADER as _HEADER,
    MAGIC,
    MAGIC_CHUNKED,
    MAX_FRAME_HEAD as _MAX_FRAME_HEAD,
    MAX_PLANES as _MAX_PLANES,
    MODE_RAW,
    MODE_ZSTD,
    PLANE as _PLANE,
)

_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


class _Frame(NamedTuple):
    nbytes: int
    plane_len: int
    table: list  # (mode, length) per plane
    payload_start: int  # offset of the first payload, from the frame's start
    length: int  # the whole frame


def _frame_extent(mv: memoryview, pos: int) -> tuple[int, int, list, int]:
    """Parse the header and plane table of the frame at ``pos``: ``(nbytes, nplanes, table,
    header length)``. Raises ValueError/struct.error on a malformed header."""
    magic, itemsize, nplanes, _, nbytes = _HEADER.unpack_from(mv, pos)
    if magic != MAGIC:
        if magic[:3] == b"CZP" and magic[3:] not in (b"1", b"2"):
            raise ValueError(f"blob format {magic!r} is newer than this coral-torch reads; upgrade coral-torch")
        raise ValueError("bad header")
    if nplanes != (itemsize if itemsize > 1 else 1) or nplanes > _MAX_PLANES or nbytes % max(itemsize, 1):
        raise ValueError("bad header")
    offset = pos + _HEADER.size
    table = []
    for _ in range(nplanes):
        table.append(_PLANE.unpack_from(mv, offset))
        offset += _PLANE.size
    return nbytes, nplanes, table, offset - pos


def _parse_frame(mv: memoryview, pos: int = 0, end: int | None = None) -> _Frame:
    """Parse and check the frame at ``pos`` (it must end at or before ``end``) before anything is
    allocated for it: a damaged length field must raise, not allocate."""
    end = len(mv) if end is None else end
    nbytes, nplanes, table, head_len = _frame_extent(mv, pos)
    plane_len = nbytes // nplanes
    length = head_len + sum(length for _, length in table)
    if pos + length > end:
        raise ValueError("plane lengths run past the end of the blob")
    p = pos + head_len
    for mode, length_k in table:
        if mode == MODE_RAW and length_k != plane_len:
            raise ValueError("raw plane has the wrong length")
        if mode == MODE_ZSTD and zstandard.frame_content_size(mv[p : p + length_k]) != plane_len:
            raise ValueError("zstd plane declares the wrong length")
        if mode not in (MODE_RAW, MODE_ZSTD):
            raise ValueError(f"unknown plane mode {mode}")
        p += length_k
    return _Frame(nbytes, plane_len, table, head_len, length)


def _decode_frame(mv: memoryview, pos: int, frame: _Frame, out: np.ndarray, xor: bool) -> None:
    dec = _decompressor()
    offset = pos + frame.payload_start
    parts = []
    for mode, length in frame.table:
        payload: memoryview | bytes = mv[offset : offset + length]
        offset += length
        if mode == MODE_ZSTD:
            payload = dec.decompress(payload, max_output_size=frame.plane_len)
            if len(payload) != frame.plane_len:
                raise ValueError("plane has the wrong length")
        parts.append(payload)
    planes.join(parts, out, xor)


def _parse_chunked_header(mv: memoryview) -> tuple[int, int]:
    """``(raw_length, chunk_bytes)`` of a chunked blob's header."""
    magic, itemsize, _, _, nbytes, chunk = _CHUNKED.unpack_from(mv, 0)
    if magic != MAGIC_CHUNKED or not 1 <= itemsize <= _MAX_PLANES or nbytes % itemsize or chunk < 1:
        raise ValueError("bad chunked header")
    return nbytes, chunk


def _parse(mv: memoryview) -> tuple[int, list]:
    """``(raw_length, [(output start, blob offset, frame)])`` of a whole blob, every header checked
    against the blob's length before anything is allocated."""
    if bytes(mv[:4]) == MAGIC_CHUNKED:
        nbytes, chunk = _parse_chunked_header(mv)
        frames = []
        start, pos = 0, _CHUNKED.size
        while start < nbytes:
            f = _parse_frame(mv, pos)
            if f.nbytes != min(chunk, nbytes - start):
                raise ValueError(f"chunk at byte {start} declares {f.nbytes} bytes")
            frames.append((start, pos, f))
            start += f.nbytes
            pos += f.length
        if pos != len(mv):
            raise ValueError("chunks do not add up to the blob size")
        return nbytes, frames
    f = _parse_frame(mv, 0)
    if f.length != len(mv):
        raise ValueError("plane lengths do not add up to the blob size")
    return f.nbytes, [(0, 0, f)]


def _corrupt(exc: BaseException, hash_key: str | None) -> CorruptObjectError:
    where = f" of object {hash_key}" if hash_key else ""
    err = CorruptObjectError(
        f"stored bytes{where} are damaged and cannot be decoded ({exc}); "
        "run `coral-torch verify` to list what is affected",
        hash_key=hash_key,
    )
    err.__cause__ = exc
    return err


def decoded_size(blob) -> int | None:
    """The decoded size a blob declares, or None if it has no valid header."""
    try:
        magic, _, _, _, nbytes = _HEADER.unpack_from(memoryview(blob).cast("B"), 0)
    except (struct.error, TypeError, ValueError):
        return None
    return int(nbytes) if magic in (MAGIC, MAGIC_CHUNKED) else None


def _check_out(out: np.ndarray | None, nbytes: int) -> np.ndarray:
    if out is None:
        return np.empty(nbytes, dtype=np.uint8)
    if out.size != nbytes or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous uint8 array of {nbytes} bytes")
    return out


def decode(blob, *, hash_key: str | None = None, out: np.ndarray | None = None, xor: bool = False) -> np.ndarray:
    """Decode a blob made by :func:`encode` into ``out`` (or a new, writable, contiguous uint8
    array). With ``xor``, the decoded bytes are XORed into what ``out`` holds: applying an XOR
    delta to its base in place, without a temporary. A chunked blob is decoded a frame at a time
    (scratch: one chunk's planes).

    Raises:
        CorruptObjectError: the blob is truncated or damaged (the hash check catches the rest).
    """
    if xor and out is None:
        raise ValueError("decode(xor=True) needs the base in out=")
    mv = memoryview(blob).cast("B")
    try:
        nbytes, frames = _parse(mv)
        out = _check_out(out, nbytes)
        for start, pos, f in frames:
            _decode_frame(mv, pos, f, out[start : start + f.nbytes], xor)
        return out
    except (ValueError, struct.error, zstandard.ZstdError) as exc:
        raise _corrupt(exc, hash_key) from exc


class BlobReader:
    """Decodes one stored blob through ``read(offset, length)`` (a buffer of exactly that many
    bytes of the blob; e.g. a ``pread`` of a pack file), holding at most one frame of it at a time.

    A chunked blob is read frame by frame: :meth:`decode_range` reads only the frames it needs, and
    :meth:`decode_into` streams the whole blob into place. A single-frame blob is read whole.
    Errors in the stored bytes raise :class:`~coral_torch.errors.CorruptObjectError`."""

    def __init__(self, read: Callable[[int, int], Any], length: int, *, hash_key: str | None = None) -> None:
        self._read = read
        self.length = length
        self.hash_key = hash_key
        self._frames: list = []  # (output start, blob offset, frame length, nbytes), discovered in order
        self._next = (0, 0)  # (output start, blob offset) of the first frame not discovered yet
        self._cached: tuple[int, np.ndarray] | None = None  # (frame index, its decoded bytes)
        try:
            head = self._fetch(0, min(length, _CHUNKED.size))
            self.chunked = bytes(head[:4]) == MAGIC_CHUNKED
            if self.chunked:
                self.nbytes, self.chunk = _parse_chunked_header(head)
                self._next = (0, _CHUNKED.size)
            else:
                magic, _, _, _, nbytes = _HEADER.unpack_from(head, 0)
                if magic != MAGIC:
                    _frame_extent(head, 0)  # raises with the right message
                self.nbytes, self.chunk = int(nbytes), int(nbytes)
        except (ValueError, struct.error) as exc:
            raise _corrupt(exc, hash_key) from exc

    def _fetch(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"bytes {offset}..{offset + length} lie outside the blob ({self.length} bytes)")
        mv = memoryview(self._read(offset, length)).cast("B")
        if len(mv) != length:
            raise ValueError(f"read {len(mv)} bytes at {offset}, expected {length} (truncated?)")
        return mv

    def _discover(self, upto: int) -> None:
        """Locate the frames that hold output bytes below ``upto``."""
        start, pos = self._next
        while start < min(upto, self.nbytes):
            head = self._fetch(pos, min(_MAX_FRAME_HEAD, self.length - pos))
            nbytes, _, table, head_len = _frame_extent(head, 0)
            length = head_len + sum(length for _, length in table)
            if nbytes != min(self.chunk, self.nbytes - start):
                raise ValueError(f"chunk at byte {start} declares {nbytes} bytes")
            self._frames.append((start, pos, length, nbytes))
            start, pos = start + nbytes, pos + length
            self._next = (start, pos)
        if start >= self.nbytes and pos != self.length:
            raise ValueError("chunks do not add up to the blob size")

    def _decode_frame_into(self, i: int, out: np.ndarray, xor: bool) -> None:
        _, pos, length, _ = self._frames[i]
        mv = self._fetch(pos, length)
        f = _parse_frame(mv, 0)
        if f.length != length:
            raise ValueError("frame length changed between reads")
        _decode_frame(mv, 0, f, out, xor)

    def release(self, before: int | None = None) -> None:
        """Drop the cached frame (a range that cut a frame decoded it whole); with ``before``, only
        if that frame ends at or before this output position."""
        if self._cached is not None and before is not None:
            fs, _, _, fn = self._frames[self._cached[0]]
            if fs + fn > before:
                return
        self._cached = None

    def decode_into(self, out: np.ndarray, xor: bool = False) -> np.ndarray:
        """Decode the whole blob into ``out`` (XOR into it with ``xor``), a frame at a time."""
        return self.decode_range(0, self.nbytes, out, xor)

    def decode_range(self, start: int, stop: int, out: np.ndarray, xor: bool = False) -> np.ndarray:
        """Decode output bytes ``[start, stop)`` into ``out`` (``stop - start`` bytes; XORed into
        it with ``xor``). Frames that lie wholly inside are decoded in place; a frame cut by the
        range is decoded once into a cached buffer."""
        try:
            if not 0 <= start <= stop <= self.nbytes:
                raise ValueError(f"range {start}..{stop} outside 0..{self.nbytes}")
            out = _check_out(out, stop - start)
            if not self.chunked:
                if (start, stop) == (0, self.nbytes):
                    mv = self._fetch(0, self.length)
                    nbytes, frames = _parse(mv)
                    _decode_frame(mv, 0, frames[0][2], out, xor)
                else:
                    self._frames = [(0, 0, self.length, self.nbytes)]
                    self._apply(0, start, stop, out, xor)
                return out
            self._discover(stop)
            for i, (fs, _, _, fn) in enumerate(self._frames):
                fe = fs + fn
                if fe <= start or fs >= stop:
                    continue
                if start <= fs and fe <= stop:
                    self._decode_frame_into(i, out[fs - start : fe - start], xor)
                else:
                    self._apply(i, start, stop, out, xor)
            return out
        except (ValueError, struct.error, zstandard.ZstdError) as exc:
            raise _corrupt(exc, self.hash_key) from exc

    def _apply(self, i: int, start: int, stop: int, out: np.ndarray, xor: bool) -> None:
        fs, _, _, fn = self._frames[i]
        a, b = max(start, fs), min(stop, fs + fn)
        if (self._cached is None or self._cached[0] != i) and (b - a) * 4 < fn:
            # a small piece of a frame (a sampling probe): read just its part of each raw plane and
            # decompress the zstd planes only up to it, instead of the whole frame
            self._decode_part(i, a - fs, b - fs, out[a - start : b - start], xor)
            return
        if self._cached is None or self._cached[0] != i:
            self._cached = None
            buf = np.empty(fn, dtype=np.uint8)
            if self.chunked:
                self._decode_frame_into(i, buf, False)
            else:
                mv = self._fetch(0, self.length)
                _, frames = _parse(mv)
                _decode_frame(mv, 0, frames[0][2], buf, False)
            self._cached = (i, buf)
        buf = self._cached[1]
        a, b = max(start, fs), min(stop, fs + fn)
        dst = out[a - start : b - start]
        if xor:
            np.bitwise_xor(dst, buf[a - fs : b - fs], out=dst)
        else:
            dst[...] = buf[a - fs : b - fs]

    def _decode_part(self, i: int, a: int, b: int, out: np.ndarray, xor: bool) -> None:
        """Decode bytes ``[a, b)`` of frame ``i`` into ``out``."""
        _, pos, length, _ = self._frames[i]
        nbytes, nplanes, table, head_len = _frame_extent(self._fetch(pos, min(_MAX_FRAME_HEAD, length)), 0)
        if head_len + sum(n for _, n in table) != length:
            raise ValueError("frame length changed between reads")
        plane_len = nbytes // nplanes
        pa, pb = a // nplanes, -(-b // nplanes)  # the elements that hold bytes [a, b)
        parts = []
        p = pos + head_len
        for mode, n in table:
            if mode == MODE_RAW:
                if n != plane_len:
                    raise ValueError("raw plane has the wrong length")
                parts.append(bytes(self._fetch(p + pa, pb - pa)))
            elif mode == MODE_ZSTD:
                comp = self._fetch(p, n)
                if zstandard.frame_content_size(comp) != plane_len:
                    raise ValueError("zstd plane declares the wrong length")
                reader = _decompressor().stream_reader(comp, read_across_frames=False)
                got = bytearray()
                while len(got) < pb:
                    more = reader.read(pb - len(got))
                    if not more:
                        raise ValueError("zstd plane ends early")
                    got += more
                parts.append(bytes(got[pa:pb]))
            else:
                raise ValueError(f"unknown plane mode {mode}")
            p += n
        tmp = np.empty((pb - pa) * nplanes, dtype=np.uint8)
        planes.join(parts, tmp, False)
        piece = tmp[a - pa * nplanes : b - pa * nplanes]
        if xor:
            np.bitwise_xor(out, piece, out=out)
        else:
            out[...] = piece
