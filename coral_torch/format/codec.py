"""The default lossless codec: byte-plane split + zstd, per plane, raw where zstd does not pay.

Why: in a float tensor the byte holding sign and exponent has ~2-3 bits of entropy while mantissa
bytes are close to 8. Splitting the bytes of each element into planes ("byte grouping") lets zstd
see the compressible plane on its own, and storing incompressible planes raw costs no decode time.
XOR deltas (see :mod:`coral_torch.delta`) run through the same codec: there the high planes are
mostly zero and collapse.

Blob layouts (little-endian). A frame, the whole blob of data up to :data:`CHUNK_BYTES`::

    b"CZP1" | u8 itemsize | u8 nplanes | u16 reserved | u64 raw_length
    nplanes x (u8 mode | 7 pad | u64 payload_length)           mode: 0 raw, 1 zstd
    payloads, in plane order

Plane k holds byte k of every element. ``nplanes == 1`` means no split (tiny or 1-byte data).

Larger data is a chunked blob (format 2; every reader since it decodes both)::

    b"CZP2" | u8 itemsize | u8 reserved | u16 reserved | u64 raw_length | u64 chunk_bytes
    ceil(raw_length / chunk_bytes) frames (as above), back to back

Frame k encodes bytes ``[k * chunk_bytes, min((k + 1) * chunk_bytes, raw_length))``; its length
follows from its own header. Why chunks: the encoder works one chunk at a time (its split buffer and
compressed planes are chunk-sized, whatever the tensor's size), a reader needs one chunk's bytes at
a time (:class:`BlobReader`), and an XOR delta can read its base a chunk at a time. 8 MiB chunks
(2 MiB fp32 planes) are far larger than zstd level 1's 512 KiB window, so chunking costs no ratio
(docs/format.md; sizes in docs/guarantees.md, "Measured design choices").

This module is the encoder (:func:`encode`, :func:`encode_blob`, :class:`Blob`); the reader
(:func:`decode`, :class:`BlobReader`) is :mod:`coral_torch.codec_reader`, re-exported here, and the
layout's structs are in :mod:`coral_torch.codec_layout`.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash
import zstandard

from ..defaults import CODEC_LEVEL
from . import planes
from .codec_layout import (
    CHUNKED as _CHUNKED,
    HEADER as _HEADER,
    MAGIC as MAGIC,
    MAGIC_CHUNKED as MAGIC_CHUNKED,
    MAX_FRAME_HEAD as _MAX_FRAME_HEAD,
    MODE_RAW as MODE_RAW,
    MODE_ZSTD as MODE_ZSTD,
    PLANE as _PLANE,
)
from .codec_reader import BlobReader as BlobReader, decode as decode, decoded_size as decoded_size

DEFAULT_LEVEL = CODEC_LEVEL  # coral_torch.defaults holds every default
# Byte planes of weights are entropy-dominated: few long matches. Level 1 with a tiny match table
# and the longest minimum match spends less time hunting for short matches. Measured on MiniLM fp32
# exponent planes (one core): 0.99 GB/s at ratio 0.341, against 0.38 GB/s at 0.369 for plain level 1
# and 0.24 GB/s at 0.400 for level 2.
_MIN_SPLIT_BYTES = 256
_KEEP_IF_BELOW = 0.98  # keep zstd output only if it saves at least 2%
#: Input bytes per frame of a chunked blob; data up to this size is one frame (format 1).
CHUNK_BYTES = 8 << 20
#: Bytes of a segmented blob (:func:`encode_blob`) kept in memory before the rest goes to a spill
#: file (given ``spill_dir``): an encoder's memory stays bounded however large the tensor.
SPILL_AFTER = 64 << 20
_IO_STEP = 4 << 20

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    comp = cache.get(level)
    if comp is None:
        if level == DEFAULT_LEVEL:
            params = zstandard.ZstdCompressionParameters.from_level(1, hash_log=6, min_match=7, write_content_size=True)
        else:
            params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True)
        comp = cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return comp


def split_planes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """(n*itemsize,) uint8 -> (itemsize, n) uint8, byte k of each element in row k."""
    out = np.empty(raw.size, dtype=np.uint8)
    planes.split(raw.reshape(-1), out, itemsize)
    return out.reshape(itemsize, -1)


# ------------------------------------------------------------------------------ blob segments
def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"spill file ended at byte {offset + done}")
        done += got


class FileSegment:
    """``length`` bytes at ``offset`` of the open file ``fd``: a part of a blob that went to a
    spill file instead of memory. Sliceable like a memoryview; :meth:`read_into` fetches it."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length = fd, offset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> FileSegment:
        start, stop, step = s.indices(self.length)
        if step != 1:
            raise ValueError("FileSegment slices must be contiguous")
        return FileSegment(self.fd, self.offset + start, max(0, stop - start))

    def read_into(self, view: memoryview) -> None:
        """Copy the segment into ``view`` (exactly ``len(self)`` bytes)."""
        _pread_into(self.fd, memoryview(view).cast("B"), self.offset)


class _Spill:
    """An anonymous temporary file (``O_TMPFILE`` where there is one) that parts of blobs are
    appended to; it disappears when closed or garbage-collected."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.file = tempfile.TemporaryFile(dir=directory, prefix=".coral-spill-")
        self.fd = self.file.fileno()
        self.size = 0

    def append(self, buf: Any) -> FileSegment:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.size + done)
        seg = FileSegment(self.fd, self.size, len(view))
        self.size += len(view)
        return seg

    def close(self) -> None:
        self.file.close()


Segment = memoryview | FileSegment


class Blob:
    """An encoded object as byte segments, in order: memoryviews, and for a large blob encoded with
    a spill directory, :class:`FileSegment` parts of a spill file it owns.

    A frame's raw planes stay views of the split buffer, so writing a blob with one ``pwritev``
    costs no compaction copy; :meth:`to_array` joins them when one contiguous buffer is needed."""

    __slots__ = ("segments", "nbytes", "_xxh3", "_spill")

    def __init__(self, segments: Sequence[Any], *, xxh3: str | None = None, spill: _Spill | None = None) -> None:
        self.segments: list[Segment] = [x if isinstance(x, FileSegment) else memoryview(x).cast("B") for x in segments]
        self.nbytes = sum(len(x) for x in self.segments)
        self._xxh3 = xxh3
        self._spill = spill

    @property
    def spilled_bytes(self) -> int:
        """How many of the bytes are in the spill file."""
        return sum(len(x) for x in self.segments if isinstance(x, FileSegment))

    def to_array(self) -> np.ndarray:
        out = np.empty(self.nbytes, dtype=np.uint8)
        pos = 0
        for seg in self.segments:
            if isinstance(seg, FileSegment):
                seg.read_into(memoryview(out)[pos : pos + len(seg)])  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
            else:
                out[pos : pos + len(seg)] = np.frombuffer(seg, dtype=np.uint8)
            pos += len(seg)
        return out

    def xxh3_64(self) -> str:
        if self._xxh3 is None:
            h = xxhash.xxh3_64()
            buf: np.ndarray | None = None
            for seg in self.segments:
                if isinstance(seg, FileSegment):
                    buf = buf if buf is not None else np.empty(_IO_STEP, dtype=np.uint8)
                    for start in range(0, len(seg), _IO_STEP):
                        part = seg[start : start + _IO_STEP]
                        view = memoryview(buf)[: len(part)]  # type: ignore[arg-type]  # numpy stubs: Buffer on 3.12+ only
                        part.read_into(view)
                        h.update(view)
                else:
                    h.update(seg)
            self._xxh3 = h.hexdigest()
        return self._xxh3

    def close(self) -> None:
        """Drop the spill file now (else it goes when the blob is garbage-collected)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None


# ------------------------------------------------------------------------------------ encode
def _nplanes(nbytes: int, itemsize: int) -> int:
    """How many byte planes a blob of ``nbytes`` gets: 1 (no split) for tiny or 1-byte data."""
    split = itemsize > 1 and nbytes >= _MIN_SPLIT_BYTES and nbytes % itemsize == 0
    return itemsize if split else 1


def _frame_head_len(nbytes: int, itemsize: int) -> int:
    return _HEADER.size + _nplanes(nbytes, itemsize) * _PLANE.size


def _chunk_size(chunk_bytes: int | None, itemsize: int) -> int:
    c = int(chunk_bytes or CHUNK_BYTES)
    return max(itemsize, c // itemsize * itemsize)


def _base_part(base: Any, start: int, stop: int) -> np.ndarray | None:
    """Bytes ``[start, stop)`` of a base: an array, or any object sliced like one (a streamed base,
    read on demand; see :class:`coral_torch.repository.streams.BaseStream`)."""
    if base is None:
        return None
    part = base[start:stop]
    if not isinstance(part, np.ndarray):
        part = np.frombuffer(memoryview(part).cast("B"), dtype=np.uint8)
    return part.reshape(-1)


def _check_base(base: Any, nbytes: int) -> Any:
    if base is None:
        return None
    if isinstance(base, np.ndarray):
        base = base.reshape(-1)
    size = base.size if hasattr(base, "size") else len(base)
    if size != nbytes:
        raise ValueError(f"base has {size} bytes, data {nbytes}")
    return base


def _encode_planes(raw: np.ndarray, itemsize: int, level: int, base: np.ndarray | None, split_into: np.ndarray | None):
    """Split (XOR ``base`` if given) and compress one frame. Returns ``(header bytes, [payload per
    plane])`` where raw planes are views of ``split_into`` (or of ``raw`` itself when nothing is split)."""
    raw = raw.reshape(-1)
    if base is not None:
        base = base.reshape(-1)
        if base.size != raw.size:
            raise ValueError(f"base has {base.size} bytes, data {raw.size}")
    nbytes = raw.size
    nplanes = _nplanes(nbytes, itemsize)
    split = nplanes > 1
    plane_len = nbytes // nplanes
    if split or base is not None:
        body = split_into if split_into is not None else np.empty(nbytes, dtype=np.uint8)
        if split:
            planes.split(raw, body, itemsize, base)
        else:
            assert base is not None  # split or base is not None
            np.bitwise_xor(raw, base, out=body)
        plane_views = [body[k * plane_len : (k + 1) * plane_len] for k in range(nplanes)]
    else:
        plane_views = [raw]
    comp = _compressor(level)
    payloads: list = []
    headers = []
    for plane in plane_views:
        packed = _compress_if_worth(comp, plane)
        if packed is not None:
            payloads.append(packed)
            headers.append(_PLANE.pack(MODE_ZSTD, len(packed)))
        else:
            payloads.append(plane)
            headers.append(_PLANE.pack(MODE_RAW, plane.size))
    head = _HEADER.pack(MAGIC, itemsize if split else 1, nplanes, 0, nbytes) + b"".join(headers)
    return head, payloads


def _encode_into(raw: np.ndarray, itemsize: int, level: int, base: np.ndarray | None, out: np.ndarray) -> int:
    """Encode one frame into the front of ``out`` (at least ``header + raw.size`` bytes) and return
    its length. The planes are split straight into ``out`` and compacted in place, so the only full
    copy of the data is the split itself."""
    nbytes = raw.size
    head_len = _frame_head_len(nbytes, itemsize)
    head, payloads = _encode_planes(raw, itemsize, level, base, out[head_len : head_len + nbytes])
    base_ptr = out.ctypes.data
    pos = head_len
    for seg in payloads:
        if isinstance(seg, np.ndarray):
            if seg.ctypes.data != base_ptr + pos:  # raw plane: shift left over space freed before it
                if np.shares_memory(seg, out):
                    ctypes.memmove(base_ptr + pos, seg.ctypes.data, seg.size)
                else:
                    out[pos : pos + seg.size] = seg
        else:
            # a zstd plane: its source plane is no longer needed, and pos <= its start
            out[pos : pos + len(seg)] = np.frombuffer(seg, dtype=np.uint8)
        pos += len(seg)
    out[:head_len] = np.frombuffer(head, dtype=np.uint8)
    return pos


def _chunked_header(nbytes: int, itemsize: int, chunk: int) -> bytes:
    return _CHUNKED.pack(MAGIC_CHUNKED, itemsize if nbytes % itemsize == 0 else 1, 0, 0, nbytes, chunk)


def _encode_chunked(
    raw: np.ndarray,
    itemsize: int,
    level: int,
    base: Any,
    chunk: int,
    spill_dir: str | os.PathLike | None,
    budget: int,
):
    """Encode ``raw`` (more than one chunk) as a chunked blob, a frame at a time, into one buffer.

    Each chunk is split straight into the buffer right after the frames before it and compacted
    there (as :func:`_encode_into` does), so the buffer's touched memory is the encoded size plus
    one chunk, in one allocation (few page faults), with no copy of the frames. With ``spill_dir``,
    once the frames kept reach ``budget`` bytes every later frame goes to a spill file and its
    place is reused by the next chunk. Returns ``(buffer of the in-memory part, spilled segments,
    spill, xxh3-64 of the whole blob)``."""
    n = raw.size
    nchunks = -(-n // chunk)
    cap = _CHUNKED.size + n + nchunks * _MAX_FRAME_HEAD
    if spill_dir is not None:
        cap = min(cap, max(budget, _CHUNKED.size) + chunk + 2 * _MAX_FRAME_HEAD)
    out = np.empty(cap, dtype=np.uint8)  # pages are touched (resident) only as frames are written
    head = _chunked_header(n, itemsize, chunk)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    h = xxhash.xxh3_64()
    h.update(head)
    pos = len(head)
    spilled: list = []
    spill: _Spill | None = None
    try:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            length = _encode_into(raw[start:stop], itemsize, level, _base_part(base, start, stop), out[pos:])
            h.update(out[pos : pos + length])  # type: ignore[arg-type]  # numpy stubs: Buffer on 3.12+ only
            if spill is not None or (spill_dir is not None and pos + length > budget):
                if spill is None:
                    assert spill_dir is not None  # no spill yet: spill_dir is set
                    spill = _Spill(spill_dir)
                spilled.append(spill.append(out[pos : pos + length]))
            else:
                pos += length
    except BaseException:
        if spill is not None:
            spill.close()
        raise
    out.resize(pos, refcheck=False)  # shrink in place (realloc, no copy): the rest is freed
    return out, spilled, spill, h.hexdigest()


def encode_blob(
    raw: np.ndarray,
    itemsize: int,
    level: int = DEFAULT_LEVEL,
    *,
    base: Any = None,
    chunk_bytes: int | None = None,
    spill_dir: str | os.PathLike | None = None,
    spill_after: int | None = None,
) -> Blob:
    """Like :func:`encode` (the same bytes), as a :class:`Blob` for writers with ``pwritev``.

    Data up to the chunk size is one frame whose raw planes reference the split buffer, or ``raw``
    itself (an unsplit raw plane): keep ``raw`` unchanged until the blob is written. Larger data is
    encoded a chunk at a time (memory: the encoded size plus one chunk); with ``spill_dir``, what
    comes after the first ``spill_after`` bytes (default :data:`SPILL_AFTER`) goes to an anonymous
    file there instead of memory. ``base`` (XOR delta) is an array or any object sliced like one;
    it is read a chunk at a time, in order."""
    raw = raw.reshape(-1)
    n = raw.size
    base = _check_base(base, n)
    chunk = _chunk_size(chunk_bytes, itemsize)
    if n <= chunk:
        head, payloads = _encode_planes(raw, itemsize, level, _base_part(base, 0, n), None)
        return Blob([head] + payloads)
    budget = SPILL_AFTER if spill_after is None else int(spill_after)
    out, spilled, spill, digest = _encode_chunked(raw, itemsize, level, base, chunk, spill_dir, budget)
    return Blob([out] + spilled, xxh3=digest, spill=spill)


def encode(
    raw: np.ndarray, itemsize: int, level: int = DEFAULT_LEVEL, *, base: Any = None, chunk_bytes: int | None = None
) -> np.ndarray:
    """Encode a contiguous 1-d uint8 array whose elements are ``itemsize`` bytes wide.

    With ``base`` (same size), encodes ``raw XOR base`` (the lossless delta) in the same pass.
    Returns the blob as a new uint8 array. The planes are split straight into the output buffer
    and compacted in place, so the only full copy of the data is the split itself. Data larger
    than the chunk size (default :data:`CHUNK_BYTES`) becomes a chunked blob.
    """
    raw = raw.reshape(-1)
    n = raw.size
    base = _check_base(base, n)
    chunk = _chunk_size(chunk_bytes, itemsize)
    if n <= chunk:
        out = np.empty(_frame_head_len(n, itemsize) + n, dtype=np.uint8)
        return out[: _encode_into(raw, itemsize, level, _base_part(base, 0, n), out)]
    return _encode_chunked(raw, itemsize, level, base, chunk, None, 0)[0]


def _compress_if_worth(comp: zstandard.ZstdCompressor, plane: np.ndarray) -> bytes | None:
    """zstd output for the plane if it saves at least 2%, else None. (Probing a sample first to
    skip mantissa planes was measured: it lost 1% of ratio on MiniLM for no clear speed gain.)"""
    if plane.size == 0:
        return None
    packed = comp.compress(plane.data)
    return packed if len(packed) < _KEEP_IF_BELOW * plane.size else None
