"""Canonical dtype names shared by numpy, torch and the on-disk format.

A stored tensor is described by a canonical name (``"float32"``, ``"bfloat16"``,
``"float8_e4m3fn"``...). Its bytes are kept in a numpy array of a *storage dtype* of the same
item size: the real numpy dtype where numpy has one, else an unsigned integer of that width
(numpy has no bfloat16 or float8). Bytes never change on the way; only the label does.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..errors import UnsupportedTensorError

# canonical name -> (itemsize, numpy dtype holding the bytes, numpy dtype is the real type?)
_TABLE: dict[str, tuple[int, str, bool]] = {
    "float64": (8, "<f8", True),
    "float32": (4, "<f4", True),
    "float16": (2, "<f2", True),
    "bfloat16": (2, "<u2", False),
    "float8_e4m3fn": (1, "u1", False),
    "float8_e5m2": (1, "u1", False),
    "float8_e4m3fnuz": (1, "u1", False),
    "float8_e5m2fnuz": (1, "u1", False),
    "float8_e8m0fnu": (1, "u1", False),
    "int64": (8, "<i8", True),
    "int32": (4, "<i4", True),
    "int16": (2, "<i2", True),
    "int8": (1, "i1", True),
    "uint64": (8, "<u8", True),
    "uint32": (4, "<u4", True),
    "uint16": (2, "<u2", True),
    "uint8": (1, "u1", True),
    "bool": (1, "?", True),
    "complex64": (8, "<c8", True),
    "complex128": (16, "<c16", True),
}

FLOAT_DTYPES = frozenset(n for n in _TABLE if n.startswith(("float", "bfloat", "complex")))

_NUMPY_TO_CANONICAL = {np.dtype(spec).str: name for name, (_, spec, real) in _TABLE.items() if real}


def canonical_dtype(dtype: Any) -> str:
    """Return the canonical name of a numpy dtype, torch dtype or dtype name (a plain ``str``;
    see :class:`DTypeName` for the name that also compares equal to those dtypes).

    Raises:
        UnsupportedTensorError: the dtype has no lossless representation here.
    """
    if isinstance(dtype, str) and dtype in _TABLE:
        return str(dtype)
    if _is_torch_dtype(dtype):
        name = str(dtype).removeprefix("torch.")
        if name in _TABLE:
            return name
        raise UnsupportedTensorError(f"torch dtype {dtype} is not supported; supported: {', '.join(sorted(_TABLE))}")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise UnsupportedTensorError(f"unknown dtype {dtype!r}") from exc
    key = np_dtype.newbyteorder("<").str if np_dtype.byteorder == ">" else np_dtype.str
    if np_dtype.byteorder == ">":
        raise UnsupportedTensorError(
            f"big-endian dtype {np_dtype} is not supported; convert with arr.astype(arr.dtype.newbyteorder('<'))"
        )
    if key not in _NUMPY_TO_CANONICAL:
        raise UnsupportedTensorError(f"numpy dtype {np_dtype} is not supported; supported: {', '.join(sorted(_TABLE))}")
    return _NUMPY_TO_CANONICAL[key]


def _is_torch_dtype(obj: Any) -> bool:
    """Whether ``obj`` is a torch dtype, without importing torch (if torch is not loaded, nothing
    can be one)."""
    torch = sys.modules.get("torch")
    dtype_type = getattr(torch, "dtype", None) if torch is not None else None
    return isinstance(dtype_type, type) and isinstance(obj, dtype_type)


def _canonical_or_none(dtype: Any) -> str | None:
    """The canonical name of a numpy dtype, numpy scalar type or torch dtype; ``None`` for any
    other object (never guessed from ``None``, Python types or strings) or an unsupported dtype."""
    is_numpy = isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic))
    if not (is_numpy or _is_torch_dtype(dtype)):
        return None
    try:
        return canonical_dtype(dtype)
    except UnsupportedTensorError:
        return None


class DTypeName(str):
    """A canonical dtype name (``"float32"``, ``"bfloat16"``...) that also compares equal to the
    numpy dtypes, numpy scalar types and torch dtypes it names.

    It *is* the plain string: it hashes like it (dict and set lookups by name keep working), JSON
    writes it as the plain string, ``np.dtype(name)`` works wherever numpy has the type, and
    ``str(name)`` gives a plain ``str``. Comparisons::

        DTypeName("float32") == "float32" == np.float32 == np.dtype("float32") == torch.float32

    Strings compare exactly (``"f4"`` is not ``"float32"``), so equal strings always hash alike.
    A numpy/torch dtype on the other side is canonicalised first; any other object is not equal.
    """

    __slots__ = ()

    def __new__(cls, dtype: Any) -> DTypeName:
        """Raises :class:`UnsupportedTensorError` for dtypes without a lossless representation."""
        return super().__new__(cls, canonical_dtype(dtype))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str.__eq__(self, other)
        name = _canonical_or_none(other)
        if name is None:
            return NotImplemented
        return str.__eq__(self, name)

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = str.__hash__

    def __getnewargs__(self) -> tuple[str]:
        return (str(self),)


def itemsize(name: str) -> int:
    return _TABLE[canonical_dtype(name)][0]


def storage_numpy_dtype(name: str) -> np.dtype:
    """Numpy dtype that holds the bytes of ``name`` (the real one, or an unsigned int of its width)."""
    return np.dtype(_TABLE[canonical_dtype(name)][1])


def has_numpy_dtype(name: str) -> bool:
    return _TABLE[canonical_dtype(name)][2]


def torch_dtype(name: str):
    """The torch dtype for a canonical name."""
    import torch

    return getattr(torch, canonical_dtype(name))


def supported_dtypes() -> list[str]:
    return list(_TABLE)
