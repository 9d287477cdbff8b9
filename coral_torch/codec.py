"""The default lossless codec: byte-plane split + zstd, per plane, raw where zstd does not pay.

Why: in a float tensor the byte holding sign and exponent has ~2-3 bits of entropy while mantissa
bytes are close to 8. Splitting the bytes of each element into planes ("byte grouping") lets zstd
see the compressible plane on its own, and storing incompressible planes raw costs no decode time.
XOR deltas (see :mod:`coral_torch.delta`) run through the same codec: there the high planes are
mostly zero and collapse.

Blob layout (little-endian)::

    b"CZP1" | u8 itemsize | u8 nplanes | u16 reserved | u64 raw_length
    nplanes x (u8 mode | 7 pad | u64 payload_length)           mode: 0 raw, 1 zstd
    payloads, in plane order

Plane k holds byte k of every element. ``nplanes == 1`` means no split (tiny or 1-byte data).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Optional

import numpy as np
import xxhash
import zstandard

from . import planes
from .errors import CorruptObjectError

MAGIC = b"CZP1"
_HEADER = struct.Struct("<4sBBHQ")
_PLANE = struct.Struct("<B7xQ")
MODE_RAW = 0
MODE_ZSTD = 1
DEFAULT_LEVEL = 1
# Byte planes of weights are entropy-dominated: few long matches. Level 1 with a tiny match table
# and the longest minimum match spends less time hunting for short matches. Measured on MiniLM fp32
# exponent planes (one core): 0.99 GB/s at ratio 0.341, against 0.38 GB/s at 0.369 for plain level 1
# and 0.24 GB/s at 0.400 for level 2.
_MIN_SPLIT_BYTES = 256
_KEEP_IF_BELOW = 0.98  # keep zstd output only if it saves at least 2%

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    comp = cache.get(level)
    if comp is None:
        if level == DEFAULT_LEVEL:
            params = zstandard.ZstdCompressionParameters.from_level(
                1, hash_log=6, min_match=7, write_content_size=True
            )
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


class Blob:
    """An encoded object as byte segments (header, then each plane's payload), in order.

    The raw planes stay views of the split buffer, so writing a blob with one ``pwritev`` costs no
    compaction copy; :meth:`to_array` joins them when one contiguous buffer is needed."""

    __slots__ = ("segments", "nbytes")

    def __init__(self, segments: list) -> None:
        self.segments = [memoryview(x).cast("B") for x in segments]
        self.nbytes = sum(len(x) for x in self.segments)

    def to_array(self) -> np.ndarray:
        out = np.empty(self.nbytes, dtype=np.uint8)
        pos = 0
        for seg in self.segments:
            out[pos : pos + len(seg)] = np.frombuffer(seg, dtype=np.uint8)
            pos += len(seg)
        return out

    def xxh3_64(self) -> str:
        h = xxhash.xxh3_64()
        for seg in self.segments:
            h.update(seg)
        return h.hexdigest()


def _nplanes(nbytes: int, itemsize: int) -> int:
    """How many byte planes a blob of ``nbytes`` gets: 1 (no split) for tiny or 1-byte data."""
    split = itemsize > 1 and nbytes >= _MIN_SPLIT_BYTES and nbytes % itemsize == 0
    return itemsize if split else 1


def _encode_planes(raw: np.ndarray, itemsize: int, level: int, base: Optional[np.ndarray], split_into: Optional[np.ndarray]):
    """Split (XOR ``base`` if given) and compress. Returns ``(header bytes, [payload per plane])``
    where raw planes are views of ``split_into`` (or of ``raw`` itself when nothing is split)."""
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


def encode_blob(raw: np.ndarray, itemsize: int, level: int = DEFAULT_LEVEL, *, base: Optional[np.ndarray] = None) -> Blob:
    """Like :func:`encode`, as a :class:`Blob` (no compaction copy; for writers with ``pwritev``).
    The blob may reference ``raw`` itself (an unsplit raw plane): keep ``raw`` unchanged until written."""
    head, payloads = _encode_planes(raw, itemsize, level, base, None)
    return Blob([head] + payloads)


def encode(raw: np.ndarray, itemsize: int, level: int = DEFAULT_LEVEL, *, base: Optional[np.ndarray] = None) -> np.ndarray:
    """Encode a contiguous 1-d uint8 array whose elements are ``itemsize`` bytes wide.

    With ``base`` (same size), encodes ``raw XOR base`` (the lossless delta) in the same pass.
    Returns the blob as a new uint8 array. The planes are split straight into the output buffer
    and compacted in place, so the only full copy of the data is the split itself.
    """
    raw = raw.reshape(-1)
    nbytes = raw.size
    head_len = _HEADER.size + _nplanes(nbytes, itemsize) * _PLANE.size
    out = np.empty(head_len + nbytes, dtype=np.uint8)
    head, payloads = _encode_planes(raw, itemsize, level, base, out[head_len:])
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
    return out[:pos]


def _compress_if_worth(comp: zstandard.ZstdCompressor, plane: np.ndarray) -> bytes | None:
    """zstd output for the plane if it saves at least 2%, else None. (Probing a sample first to
    skip mantissa planes was measured: it lost 1% of ratio on MiniLM for no clear speed gain.)"""
    if plane.size == 0:
        return None
    packed = comp.compress(plane.data)
    return packed if len(packed) < _KEEP_IF_BELOW * plane.size else None


def decoded_size(blob) -> Optional[int]:
    """The decoded size a blob declares, or None if it has no valid header."""
    try:
        magic, _, _, _, nbytes = _HEADER.unpack_from(memoryview(blob).cast("B"), 0)
    except (struct.error, TypeError, ValueError):
        return None
    return int(nbytes) if magic == MAGIC else None


def decode(blob, *, hash_key: Optional[str] = None, out: Optional[np.ndarray] = None, xor: bool = False) -> np.ndarray:
    """Decode a blob made by :func:`encode` into ``out`` (or a new, writable, contiguous uint8
    array). With ``xor``, the decoded bytes are XORed into what ``out`` holds: applying an XOR
    delta to its base in place, without a temporary.

    Raises:
        CorruptObjectError: the blob is truncated or damaged (the hash check catches the rest).
    """
    if xor and out is None:
        raise ValueError("decode(xor=True) needs the base in out=")
    mv = memoryview(blob).cast("B")
    try:
        magic, itemsize, nplanes, _, nbytes = _HEADER.unpack_from(mv, 0)
        if magic != MAGIC or nplanes != (itemsize if itemsize > 1 else 1) or nbytes % max(itemsize, 1):
            raise ValueError("bad header")
        offset = _HEADER.size
        table = []
        for _ in range(nplanes):
            table.append(_PLANE.unpack_from(mv, offset))
            offset += _PLANE.size
        plane_len = nbytes // nplanes
        # Check the declared sizes against the blob before allocating: a damaged length field must
        # raise CorruptObjectError, not MemoryError (or a huge allocation).
        if offset + sum(length for _, length in table) != len(mv):
            raise ValueError("plane lengths do not add up to the blob size")
        pos = offset
        for mode, length in table:
            if mode == MODE_RAW and length != plane_len:
                raise ValueError("raw plane has the wrong length")
            if mode == MODE_ZSTD and zstandard.frame_content_size(mv[pos : pos + length]) != plane_len:
                raise ValueError("zstd plane declares the wrong length")
            if mode not in (MODE_RAW, MODE_ZSTD):
                raise ValueError(f"unknown plane mode {mode}")
            pos += length
        if out is None:
            out = np.empty(nbytes, dtype=np.uint8)
        elif out.size != nbytes or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous uint8 array of {nbytes} bytes")
        dec = _decompressor()
        parts = []
        for mode, length in table:
            payload = mv[offset : offset + length]
            offset += length
            if mode == MODE_ZSTD:
                payload = dec.decompress(payload, max_output_size=plane_len)
                if len(payload) != plane_len:
                    raise ValueError("plane has the wrong length")
            parts.append(payload)
        planes.join(parts, out, xor)
        return out
    except (ValueError, struct.error, zstandard.ZstdError) as exc:
        where = f" of object {hash_key}" if hash_key else ""
        raise CorruptObjectError(
            f"stored bytes{where} are damaged and cannot be decoded ({exc}); "
            "run `coral-torch verify` to list what is affected",
            hash_key=hash_key,
        ) from exc
