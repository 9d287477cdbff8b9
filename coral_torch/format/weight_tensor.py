"""`WeightTensor` and `WeightMetadata`: one tensor's bytes, its description and its content address."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ..errors import UnsupportedTensorError
from . import dtypes

HASH_HEX_LENGTH = 32  # xxh3-128


def content_hasher(dtype: str, shape: tuple[int, ...]) -> xxhash.xxh3_128:
    """The running :func:`content_hash` of a tensor before its bytes: ``update`` it with them in
    order, a piece at a time (streamed reads), and its ``hexdigest()`` is the content hash."""
    h = xxhash.xxh3_128()
    h.update(f"coral-v1|{dtype}|{','.join(map(str, shape))}|".encode())
    return h


def content_hash(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> str:
    """xxh3-128 over dtype, shape and the raw bytes of ``raw`` (a contiguous uint8 view, not copied)."""
    h = content_hasher(dtype, shape)
    h.update(memoryview(raw))  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
    return h.hexdigest()


@dataclass
class WeightMetadata:
    """Description of a stored tensor.

    ``dtype`` accepts a numpy dtype or scalar type, a torch dtype or a canonical name, and is kept
    as a :class:`~coral_torch.dtypes.DTypeName`: the canonical name (a ``str``: JSON writes it as
    the plain string, dict/set lookups by name work) that also compares equal to the numpy and
    torch dtypes it names, so ``WeightMetadata(..., dtype=np.float32).dtype == np.float32`` and
    ``np.dtype(meta.dtype)`` works wherever numpy has the type (not for bfloat16/float8).
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any
    layer_type: str | None = None
    model_name: str | None = None
    compression_info: dict[str, Any] = field(default_factory=dict)
    hash: str | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.dtype = dtypes.DTypeName(self.dtype)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


def _raw_from_torch(tensor) -> tuple[np.ndarray, str, tuple[int, ...], Any]:
    import torch

    if getattr(tensor, "is_nested", False):  # before its layout: a nested tensor may say torch.strided
        raise UnsupportedTensorError(
            f"nested tensors ({tensor.layout}) are not supported; store t.unbind() (a list of tensors) instead"
        )
    if tensor.layout != torch.strided:
        raise UnsupportedTensorError(f"{tensor.layout} tensors are not supported; call .to_dense() before storing")
    if tensor.is_quantized:
        raise UnsupportedTensorError("quantized tensors are not supported; store int_repr() and scales")
    if tensor.device.type == "meta":
        raise UnsupportedTensorError("meta tensors have no data to store; materialise them first")
    name = dtypes.canonical_dtype(tensor.dtype)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    shape = tuple(t.shape)
    flat = t.reshape(-1)
    if flat.stride() != (1,):  # 0 or 1 element (e.g. x[1:2:2]): "contiguous" whatever its stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    raw = flat.view(torch.uint8).numpy()
    return raw, name, shape, t


def _raw_from_numpy(array: np.ndarray, dtype_override: str | None) -> tuple[np.ndarray, str, tuple[int, ...]]:
    array = np.asarray(array)
    shape = tuple(array.shape)
    if dtype_override is not None and dtypes.canonical_dtype(dtype_override) != _np_name(array):
        name = dtypes.canonical_dtype(dtype_override)
        if dtypes.itemsize(name) != array.dtype.itemsize or array.dtype.kind not in "uifcb":
            raise UnsupportedTensorError(
                f"array of dtype {array.dtype} cannot hold {name} values: give the raw bits as an "
                f"unsigned array of {dtypes.itemsize(name)} bytes per item"
            )
    else:
        name = dtypes.canonical_dtype(array.dtype)
    array = np.ascontiguousarray(array)
    raw = array.reshape(-1).view(np.uint8)
    return raw, name, shape


def _np_name(array: np.ndarray) -> str | None:
    try:
        return dtypes.canonical_dtype(array.dtype)
    except UnsupportedTensorError:
        return None


class WeightTensor:
    """A tensor's raw bytes plus its :class:`WeightMetadata`.

    ``data`` may be a numpy array or a torch tensor of any supported dtype, any shape (0-d and empty
    included), contiguous or not, on any device. The bytes are wrapped without copying where the
    input is already a contiguous CPU tensor/array; otherwise one contiguous CPU copy is made.
    For bfloat16 and float8 (no numpy dtype), pass them as torch tensors, or give a raw unsigned
    array with ``metadata.dtype`` naming the real type.
    """

    __slots__ = ("_raw", "_metadata", "_owner", "_hash")

    def __init__(self, data: Any, metadata: WeightMetadata | None = None, *, name: str = ""):
        if metadata is not None and not isinstance(metadata, WeightMetadata):
            raise UnsupportedTensorError(
                f"metadata must be a WeightMetadata or None, not {type(metadata).__name__}; "
                "build one with WeightMetadata(name=..., shape=..., dtype=...)"
            )
        if isinstance(data, WeightTensor):
            raise UnsupportedTensorError(
                "data is already a WeightTensor; pass weight.data or weight.to_torch() to wrap its values"
            )
        owner = None
        override = metadata.dtype if metadata is not None else None
        if is_torch_tensor(data):
            raw, dtype_name, shape, owner = _raw_from_torch(data)
            if override is not None and override != dtype_name:
                raise UnsupportedTensorError(f"metadata says dtype {override} but the tensor is {dtype_name}")
        else:
            raw, dtype_name, shape = _raw_from_numpy(data, override)
            owner = data
        if metadata is None:
            metadata = WeightMetadata(name=name, shape=shape, dtype=dtype_name)
        elif tuple(metadata.shape) != shape:
            raise UnsupportedTensorError(
                f"metadata shape {metadata.shape} does not match data shape {shape} for {metadata.name!r}"
            )
        self._raw = raw
        self._owner = owner
        self._metadata = metadata
        self._hash: str | None = None

    @classmethod
    def from_raw(cls, raw: np.ndarray, metadata: WeightMetadata, *, known_hash: str | None = None) -> WeightTensor:
        """Wrap a contiguous uint8 buffer holding ``metadata.nbytes`` bytes (no copy, no checks of content).
        ``known_hash``: the content hash the caller already computed or verified for these bytes (no second pass)."""
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if raw.size != metadata.nbytes:
            raise UnsupportedTensorError(
                f"{raw.size} bytes cannot hold {metadata.dtype}{list(metadata.shape)} ({metadata.nbytes} bytes)"
            )
        obj = cls.__new__(cls)
        obj._raw = raw
        obj._owner = None
        obj._metadata = metadata
        obj._hash = known_hash
        return obj

    # -- description --------------------------------------------------------------------------
    @property
    def metadata(self) -> WeightMetadata:
        return self._metadata

    @property
    def shape(self) -> tuple[int, ...]:
        return self._metadata.shape

    @property
    def dtype(self) -> dtypes.DTypeName:
        """The canonical dtype name (compares equal to the numpy/torch dtype too)."""
        return self._metadata.dtype

    @property
    def nbytes(self) -> int:
        return int(self._raw.size)

    @property
    def size(self) -> int:
        return self._metadata.numel

    # -- data ---------------------------------------------------------------------------------
    @property
    def raw(self) -> np.ndarray:
        """The bytes as a contiguous 1-d uint8 array (a view, not a copy)."""
        return self._raw

    @property
    def data(self) -> np.ndarray:
        """The values as a numpy array (a view). bfloat16/float8 come back as their raw unsigned bits."""
        return self._raw.view(dtypes.storage_numpy_dtype(self.dtype)).reshape(self.shape)

    def to_torch(self, device: Any = None):
        """The values as a torch tensor of the original dtype, sharing memory when on CPU."""
        import torch

        raw = self._raw
        if raw.size == 0:
            return torch.empty(self.shape, dtype=dtypes.torch_dtype(self.dtype), device=device)
        if not raw.flags.writeable:
            raw = raw.copy()
        t = torch.from_numpy(raw).view(dtypes.torch_dtype(self.dtype)).reshape(self.shape)
        if device is not None:
            t = t.to(device)
        return t

    # -- identity -----------------------------------------------------------------------------
    def compute_hash(self) -> str:
        """Content address: xxh3-128 over dtype, shape and raw bytes (hashed in place, cached)."""
        if self._hash is None:
            self._hash = content_hash(self._raw, self.dtype, self.shape)
            self._metadata.hash = self._hash
        return self._hash

    def is_similar_to(self, other: WeightTensor) -> bool:
        return self.dtype == other.dtype and self.shape == other.shape

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightTensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and bool(np.array_equal(self._raw, other._raw))

    __hash__ = None  # type: ignore[assignment]  # mutable buffer: use compute_hash()

    def __repr__(self) -> str:
        return (
            f"WeightTensor(name={self._metadata.name!r}, dtype={self.dtype}, "
            f"shape={list(self.shape)}, nbytes={self.nbytes})"
        )


def is_torch_tensor(obj: Any) -> bool:
    mod = type(obj).__module__
    if not (mod.startswith("torch") or hasattr(obj, "__torch_function__")):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.Tensor)
