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
"""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import xxhash
import zstandard

from . import planes
from .defaults import CODEC_LEVEL
from .errors import CorruptObjectError

MAGIC = b"CZP1"
MAGIC_CHUNKED = b"CZP2"
_HEADER = struct.Struct("<4sBBHQ")
_PLANE = struct.Struct("<B7xQ")
_CHUNKED = struct.Struct("<4sBBHQQ")
MODE_RAW = 0
MODE_ZSTD = 1
DEFAULT_LEVEL = CODEC_LEVEL  # coral_torch.defaults holds every default
# Byte planes of weights are entropy-dominated: few long matches. Level 1 with a tiny match table
# and the longest minimum match spends less time hunting for short matches. Measured on MiniLM fp32
# exponent planes (one core): 0.99 GB/s at ratio 0.341, against 0.38 GB/s at 0.369 for plain level 1
# and 0.24 GB/s at 0.400 for level 2.
_MIN_SPLIT_BYTES = 256
_KEEP_IF_BELOW = 0.98  # keep zstd output only if it saves at least 2%
_MAX_PLANES = 16
_MAX_FRAME_HEAD = _HEADER.size + _MAX_PLANES * _PLANE.size
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


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


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


# ------------------------------------------------------------------------------------ decode
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
