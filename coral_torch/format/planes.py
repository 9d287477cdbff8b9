"""Byte-plane split/join: the C module ``coral_torch._planes`` when it was built, numpy otherwise.

Both give the same bytes; the C loops release the GIL and run at memory speed, numpy's strided
copies at a fraction of it. Set ``CORAL_TORCH_NO_C=1`` to force the numpy path (tests do, to
check one against the other).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

try:
    if os.environ.get("CORAL_TORCH_NO_C"):
        raise ImportError("disabled by CORAL_TORCH_NO_C")
    from .. import _planes as _c
except ImportError as exc:  # pragma: no cover - depends on the build
    _c = None
    log.debug("coral_torch._planes not available (%s): using numpy byte-plane copies", exc)

HAVE_C = _c is not None


def split(src: np.ndarray, dst: np.ndarray, itemsize: int, base: np.ndarray | None = None) -> None:
    """Write byte ``k`` of every ``itemsize``-byte element of ``src`` to plane ``k`` of ``dst``
    (``dst[k*n + i] = src[i*itemsize + k]``). All are contiguous uint8 arrays of the same size.
    With ``base``, the planes of ``src XOR base`` are written (an XOR delta without a temporary)."""
    if _c is not None:
        _c.split(src, dst, itemsize, base)
        return
    n = src.size // itemsize
    grid = dst.reshape(itemsize, n)
    if base is None:
        np.copyto(grid, src.reshape(n, itemsize).T)
    else:
        np.bitwise_xor(src.reshape(n, itemsize).T, base.reshape(n, itemsize).T, out=grid)


def join(planes: Sequence[np.ndarray | bytes | bytearray | memoryview], dst: np.ndarray, xor: bool = False) -> None:
    """Interleave ``planes`` (``len(planes)`` equal-sized uint8 arrays) into ``dst``; with ``xor``,
    XOR them into what ``dst`` already holds (applying a delta in one pass)."""
    if _c is not None:
        _c.join(planes, dst, xor)
        return
    w = len(planes)
    grid = dst.reshape(-1, w)
    for k, p in enumerate(planes):
        p = np.frombuffer(p, dtype=np.uint8)
        if xor:
            np.bitwise_xor(grid[:, k], p, out=grid[:, k])
        else:
            grid[:, k] = p
