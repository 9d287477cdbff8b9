"""Delta encoding between a tensor and a reference tensor (normally: itself one checkpoint earlier).

The default, :attr:`DeltaType.XOR`, is lossless for every dtype: the raw bits of target and
reference are XORed and run through the byte-plane codec. Unchanged bits become zeros, so the high
(sign/exponent) planes of a fine-tuning step collapse. Reconstruction XORs again and is verified
against the target's content hash by the caller.

:attr:`DeltaType.FLOAT32_RAW` is the arithmetic difference ``target - reference`` in float32, kept
as raw float32 values (an ndarray). It is lossless too, because the encoder only emits it when it is
exact: every value of reference, difference and target is finite and normal (or zero), so no NaN
payload rule or flush-to-zero mode can change a result, and ``reference + difference`` reproduces
the target bit for bit. Otherwise (other dtypes included) the encoder falls back to XOR. The
target's content hash rides along in ``extra["target_hash"]`` and is checked on reconstruction.

Lossy types (quantized or thresholded differences) exist only behind ``DeltaConfig(allow_lossy=True)``
and are marked ``lossless = False``; they are never used by default and never verified as exact.

``compression_ratio`` here is always *stored size / original size* (smaller is better: 0.05 means
the delta takes 5% of the tensor, 95% saved). Some Coral documentation uses "fraction saved"
instead; coral-torch does not.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from .. import defaults
from ..errors import CorruptObjectError, DeltaError, HashMismatchError, UnsupportedTensorError
from . import codec, dtypes
from .weight_tensor import WeightMetadata, WeightTensor, is_torch_tensor

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: key of ``Delta.extra`` that stores use to remember how an ndarray ``data`` was laid out
#: (dtype, shape, encoding of the stored bytes); reserved, see :func:`storage_payload`.
ARRAY_LAYOUT_KEY = "coral_data_array"
_ARRAY_ENCODING = "czp1"  # the stored bytes are a codec blob of the array's bytes

DeltaData = bytes | bytearray | memoryview | np.ndarray


class DeltaType(str, enum.Enum):
    """How a delta is computed. ``XOR`` and ``FLOAT32_RAW`` are lossless."""

    XOR = "xor"  #: lossless: XOR of raw bits, byte-plane split, zstd (any dtype)
    #: lossless: float32 ``target - reference`` as raw float32 values, emitted only when verified
    #: exact (else the encoder falls back to XOR)
    FLOAT32_RAW = "float32_raw"
    INT8_QUANTIZED = "int8_quantized"  #: lossy: (target - reference) quantised to int8, float dtypes
    SPARSE = "sparse"  #: lossy: only differences above a threshold are kept, float dtypes

    @property
    def lossless(self) -> bool:
        return self in (DeltaType.XOR, DeltaType.FLOAT32_RAW)


@dataclass
class DeltaConfig:
    """Delta policy.

    Attributes:
        delta_type: encoding to use; lossy types need ``allow_lossy=True``. ``FLOAT32_RAW`` is used
            where it is exact and falls back to ``XOR`` elsewhere (``Delta.delta_type`` says which).
        max_chain_length: a tensor is stored whole (a keyframe) at least every this many
            checkpoints, so loading reads at most ``max_chain_length + 1`` objects per tensor.
            Default 2: longer chains save few more bytes and make loads slower (docs/guarantees.md,
            "Measured design choices", for the measurement with ``bench/epochs_bench.py --chain-k``).
        min_saving: a delta is kept only if it is at most this fraction of the tensor's own encoding.
        allow_lossy: opt in to lossy delta types; checkpoints using them are marked lossy.
        sparse_threshold: absolute difference below which a SPARSE delta drops the change.
        codec_level: zstd level for encoded deltas.
    """

    delta_type: DeltaType = DeltaType.XOR
    max_chain_length: int = 2
    min_saving: float = 0.95
    allow_lossy: bool = False
    sparse_threshold: float = 1e-6
    codec_level: int = defaults.CODEC_LEVEL

    def __post_init__(self) -> None:
        self.delta_type = DeltaType(self.delta_type)
        if not self.delta_type.lossless and not self.allow_lossy:
            raise DeltaError(f"{self.delta_type.value} deltas are lossy; pass allow_lossy=True to use them on purpose")
        if self.max_chain_length < 0:
            raise DeltaError("max_chain_length must be >= 0 (0 disables deltas)")


@dataclass(eq=False)
class Delta:
    """An encoded difference between a target tensor and the tensor ``reference_hash`` names.

    Attributes:
        delta_type: how ``data`` was computed (see :class:`DeltaType`).
        data: the payload. ``XOR``/lossy types: the codec-encoded bytes (a ``bytes`` object, or a
            uint8 array of them). ``FLOAT32_RAW``: the float32 difference, as an ndarray of
            ``original_shape`` (the encoder's output; a hand-built delta may give any shape with
            that many elements) or its raw little-endian bytes. Stores keep the type: an ndarray
            stored in an :class:`~coral_torch.storage.HDF5Store` loads back as an ndarray of the
            same dtype and shape.
        original_shape, original_dtype: the target's shape and dtype (``original_dtype`` accepts
            numpy/torch dtypes and is kept as a :class:`~coral_torch.dtypes.DTypeName`).
        reference_hash: content hash of the reference; ``reconstruct`` refuses any other tensor.
        compression_ratio: informational, *stored size / original size* (``len(data)`` over the
            target's bytes for deltas made by :class:`DeltaEncoder`): smaller is better, 0.05 means
            95% saved. This is not the "fraction saved" some Coral documentation means by the same
            name; a hand-built delta keeps whatever value it is given.
        extra: type-specific parameters (``scale``, ``count``, ``target_hash``...). The key
            ``"coral_data_array"`` is reserved for stores.

    A delta is *lossless* (``lossless``) when reconstruction gives back exactly the tensor it was
    made from: always for ``XOR``, and for ``FLOAT32_RAW`` deltas made by :class:`DeltaEncoder`
    (verified on encode, checked against ``extra["target_hash"]`` on reconstruction). A hand-built
    ``FLOAT32_RAW`` delta rebuilds ``reference + data`` in float32, exactly that sum.
    """

    delta_type: DeltaType
    data: DeltaData
    original_shape: tuple[int, ...]
    original_dtype: str
    reference_hash: str
    compression_ratio: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.delta_type = DeltaType(self.delta_type)
        self.original_shape = tuple(int(s) for s in self.original_shape)
        self.original_dtype = dtypes.DTypeName(self.original_dtype)  # UnsupportedTensorError if unknown
        if not isinstance(self.data, (bytes, bytearray, memoryview, np.ndarray)):
            hint = " (call .numpy() on a CPU tensor)" if is_torch_tensor(self.data) else ""
            raise DeltaError(f"Delta.data must be bytes or a numpy array, not {type(self.data).__name__}{hint}")
        self.compression_ratio = float(self.compression_ratio)

    @property
    def lossless(self) -> bool:
        return self.delta_type.lossless

    @property
    def nbytes(self) -> int:
        """Size of ``data`` in bytes (an ndarray's ``nbytes``, a bytes object's length)."""
        if isinstance(self.data, np.ndarray):
            return int(self.data.nbytes)
        return memoryview(self.data).nbytes

    @property
    def original_nbytes(self) -> int:
        """Size of the tensor the delta rebuilds."""
        return int(np.prod(self.original_shape, dtype=np.int64)) * dtypes.itemsize(self.original_dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delta):
            return NotImplemented
        return (
            self.delta_type,
            self.original_shape,
            self.original_dtype,
            self.reference_hash,
            self.compression_ratio,
            self.extra,
        ) == (
            other.delta_type,
            other.original_shape,
            other.original_dtype,
            other.reference_hash,
            other.compression_ratio,
            other.extra,
        ) and _same_data(self.data, other.data)

    __hash__ = None  # type: ignore[assignment]  # mutable


def _same_data(a: DeltaData, b: DeltaData) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return bytes(a) == bytes(b)


# ---------------------------------------------------------------------------------- payloads
def storage_payload(delta: Delta, level: int = codec.DEFAULT_LEVEL) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The bytes a store writes for ``delta.data`` (a contiguous uint8 array) and, when ``data`` is
    an ndarray, the layout that :func:`restore_payload` needs to give the same ndarray back.

    An ndarray is written codec-encoded (lossless, like every other payload); bytes are written as
    they are. Stores keep the layout in the delta's attributes as ``extra["coral_data_array"]``.

    Raises:
        DeltaError: the array's dtype has no fixed-size numeric representation (object, strings).
    """
    data = delta.data
    if not isinstance(data, np.ndarray):
        if ARRAY_LAYOUT_KEY in delta.extra:  # still in its stored form (a store gave it back raw)
            return np.frombuffer(data, dtype=np.uint8), dict(delta.extra[ARRAY_LAYOUT_KEY])
        return np.frombuffer(data, dtype=np.uint8), None
    if data.dtype.hasobject or data.dtype.kind not in "biufc":
        raise DeltaError(f"Delta.data of dtype {data.dtype} cannot be stored; give bytes or a numeric array")
    arr = np.ascontiguousarray(data)
    payload = codec.encode(arr.reshape(-1).view(np.uint8), arr.dtype.itemsize, level)
    return payload, {"dtype": arr.dtype.str, "shape": [int(x) for x in arr.shape], "encoding": _ARRAY_ENCODING}


def restore_payload(payload: DeltaData, layout: dict[str, Any] | None, *, key: str | None = None) -> DeltaData:
    """Inverse of :func:`storage_payload`: ``bytes`` when there is no layout, else the ndarray.

    Raises:
        CorruptObjectError: the layout is damaged or does not match the decoded bytes.
    """
    if layout is None:
        # numpy stubs: ndarray is a Buffer only on 3.12+
        return bytes(memoryview(payload).cast("B")) if not isinstance(payload, bytes) else payload  # type: ignore[arg-type]
    try:
        dt = np.dtype(str(layout["dtype"]))
        shape = tuple(int(x) for x in layout["shape"])
        encoding = str(layout.get("encoding", _ARRAY_ENCODING))
        if dt.hasobject or encoding != _ARRAY_ENCODING:
            raise ValueError(f"unknown layout {layout!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptObjectError(f"array layout of delta {key} is damaged: {exc}", hash_key=key) from None
    buf = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, dtype=np.uint8)
    raw = codec.decode(np.ascontiguousarray(buf).reshape(-1).view(np.uint8), hash_key=key)
    count = int(np.prod(shape, dtype=np.int64))
    if raw.size != count * dt.itemsize:
        raise CorruptObjectError(
            f"delta {key} decodes to {raw.size} bytes, its layout says {dt}{list(shape)}", hash_key=key
        )
    return raw.view(dt).reshape(shape)


def _payload(delta: Delta) -> DeltaData:
    """``delta.data`` in its in-memory form (an ndarray restored if a store left it encoded)."""
    if not isinstance(delta.data, np.ndarray) and ARRAY_LAYOUT_KEY in delta.extra:
        return restore_payload(delta.data, delta.extra[ARRAY_LAYOUT_KEY], key=delta.reference_hash)
    return delta.data


def _bytes_view(data: DeltaData) -> bytes | bytearray | memoryview | np.ndarray:
    """Contiguous bytes of a payload, for the codec."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return data


# ------------------------------------------------------------------------------ float32 math
_F32_EXP = np.uint32(0x7F800000)
_F32_MANT = np.uint32(0x007FFFFF)


def _all_normal_or_zero(values: np.ndarray) -> bool:
    """No NaN, infinity or subnormal among float32 ``values`` (zeros of either sign are fine)."""
    bits = values.reshape(-1).view(np.uint32)
    exp = bits & _F32_EXP
    return not bool(np.any((exp == _F32_EXP) | ((exp == 0) & ((bits & _F32_MANT) != 0))))


def _float32_add(reference: np.ndarray, diff: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.add(reference.reshape(-1), diff.reshape(-1), dtype=np.float32)


# ---------------------------------------------------------------------------------- encoder
class DeltaEncoder:
    """Encodes a target tensor against a reference and reconstructs it."""

    def __init__(self, config: DeltaConfig | None = None):
        self.config = config or DeltaConfig()

    def can_encode(self, target: WeightTensor, reference: WeightTensor) -> bool:
        if target.dtype != reference.dtype or target.shape != reference.shape or target.nbytes == 0:
            return False
        if self.config.delta_type.lossless:
            return True
        return target.dtype in ("float32", "float16", "bfloat16", "float64")

    @staticmethod
    def exact_float32_difference(target: WeightTensor, reference: WeightTensor) -> np.ndarray | None:
        """``target - reference`` in float32 (shape of the target) when adding it back to the
        reference reproduces the target bit for bit on any IEEE machine, else ``None``.

        Exact means: both tensors are float32, every value of reference, difference and target is
        finite and normal or zero (NaN payloads and flush-to-zero modes could otherwise change a
        sum), and ``reference + difference`` has the target's bits.
        """
        if target.dtype != "float32" or reference.dtype != "float32" or target.shape != reference.shape:
            return None
        t, r = target.data, reference.data
        if not (_all_normal_or_zero(t) and _all_normal_or_zero(r)):
            return None
        with np.errstate(all="ignore"):
            diff = np.subtract(t, r, dtype=np.float32)
        # a zero difference takes the target's sign: -0.0 + -0.0 is -0.0, -0.0 + +0.0 is not
        np.copysign(diff, t, out=diff, where=diff == 0)
        if not _all_normal_or_zero(diff):
            return None
        back = _float32_add(r, diff)
        if not np.array_equal(back.view(np.uint32), t.reshape(-1).view(np.uint32)):
            return None
        return diff.reshape(target.shape)

    def encode(self, target: WeightTensor, reference: WeightTensor) -> Delta:
        """The delta that rebuilds ``target`` from ``reference``.

        With ``FLOAT32_RAW`` the result is a ``FLOAT32_RAW`` delta (``data``: the float32
        difference array) where :meth:`exact_float32_difference` finds one, else an ``XOR`` delta.
        """
        if not self.can_encode(target, reference):
            raise DeltaError(
                f"cannot encode {target!r} against {reference!r} with {self.config.delta_type.value}: "
                "dtype and shape must match"
            )
        kind = self.config.delta_type
        ref_hash = reference.compute_hash()
        if kind is DeltaType.FLOAT32_RAW:
            diff = self.exact_float32_difference(target, reference)
            if diff is not None:
                return Delta(
                    delta_type=kind,
                    data=diff,
                    original_shape=target.shape,
                    original_dtype=target.dtype,
                    reference_hash=ref_hash,
                    compression_ratio=diff.nbytes / max(target.nbytes, 1),
                    extra={"target_hash": target.compute_hash()},
                )
            log.debug("%r: float32 difference is not exact, falling back to an XOR delta", target)
            kind = DeltaType.XOR
        if kind is DeltaType.XOR:
            width = dtypes.itemsize(target.dtype)
            payload = codec.encode(target.raw, width, self.config.codec_level, base=reference.raw)
            extra: dict[str, Any] = {}
        else:
            tgt = target.to_torch().double()
            ref = reference.to_torch().double()
            diff64 = (tgt - ref).reshape(-1).numpy()
            if kind is DeltaType.INT8_QUANTIZED:
                scale = float(np.abs(diff64).max()) / 127.0 or 1.0
                q = np.clip(np.rint(diff64 / scale), -127, 127).astype(np.int8)
                payload = codec.encode(q.view(np.uint8), 1, self.config.codec_level)
                extra = {"scale": scale}
            else:  # SPARSE
                idx = np.nonzero(np.abs(diff64) > self.config.sparse_threshold)[0].astype(np.int64)
                vals = diff64[idx].astype(np.float32)
                payload = codec.encode(
                    np.concatenate([idx.view(np.uint8), vals.view(np.uint8)]), 1, self.config.codec_level
                )
                extra = {"count": int(idx.size)}
        return Delta(
            delta_type=kind,
            data=payload.tobytes(),
            original_shape=target.shape,
            original_dtype=target.dtype,
            reference_hash=ref_hash,
            compression_ratio=len(payload) / max(target.nbytes, 1),
            extra=extra,
        )

    # ------------------------------------------------------------------------ reconstruct
    @overload
    def reconstruct(self, delta: Delta, reference: WeightTensor, *, name: str = "") -> WeightTensor: ...

    @overload
    def reconstruct(self, delta: Delta, reference: np.ndarray, *, name: str = "") -> np.ndarray: ...

    @overload
    def reconstruct(self, delta: Delta, reference: torch.Tensor, *, name: str = "") -> torch.Tensor: ...

    def reconstruct(
        self, delta: Delta, reference: WeightTensor | np.ndarray | torch.Tensor, *, name: str = ""
    ) -> WeightTensor | np.ndarray | torch.Tensor:
        """Apply ``delta`` to ``reference``. Lossless deltas give back the exact target bytes.

        ``reference`` may be a :class:`WeightTensor` (returns a WeightTensor named ``name``), a
        numpy array (returns a numpy array) or a torch tensor (returns a tensor on its device).
        An array is read as ``delta.original_dtype``: give the values (``float32`` for a float32
        delta) or, for bfloat16/float8, the raw unsigned bits, as ``WeightTensor.data`` holds them.
        The result array is in the same form.

        Raises:
            DeltaError: the reference's dtype, shape or content hash is not the delta's reference,
                or the payload does not fit.
            HashMismatchError: a ``FLOAT32_RAW`` delta made by the encoder did not rebuild its
                target on this machine (a changed floating-point mode); nothing wrong is returned.
            CorruptObjectError: the payload is damaged.
        """
        ref = self._reference(delta, reference)
        if ref.dtype != delta.original_dtype or ref.shape != delta.original_shape:
            raise DeltaError(
                f"delta expects a {delta.original_dtype}{list(delta.original_shape)} reference, got {ref!r}"
            )
        if ref.compute_hash() != delta.reference_hash:
            raise DeltaError(f"delta was made against reference {delta.reference_hash}, not {ref.compute_hash()}")
        meta = WeightMetadata(name=name, shape=delta.original_shape, dtype=delta.original_dtype)
        out = self._apply(delta, ref, meta)
        if isinstance(reference, WeightTensor):
            return out
        if isinstance(reference, np.ndarray):
            return out.data
        return out.to_torch(device=reference.device)

    @staticmethod
    def _reference(delta: Delta, reference: Any) -> WeightTensor:
        if isinstance(reference, WeightTensor):
            return reference
        if is_torch_tensor(reference):
            try:
                return WeightTensor(reference)
            except UnsupportedTensorError as exc:
                raise DeltaError(f"cannot use the reference tensor: {exc}") from None
        if isinstance(reference, np.ndarray):
            want = dtypes.storage_numpy_dtype(delta.original_dtype)
            if reference.dtype != want:
                raw_bits = "" if dtypes.has_numpy_dtype(delta.original_dtype) else " (its raw bits)"
                raise DeltaError(
                    f"the reference array is {reference.dtype}, but the delta rebuilds a "
                    f"{delta.original_dtype} tensor: pass an array of dtype {want}{raw_bits}"
                )
            meta = WeightMetadata(name="", shape=reference.shape, dtype=delta.original_dtype)
            return WeightTensor(reference, meta)
        raise DeltaError(
            f"reference must be a WeightTensor, a numpy array or a torch tensor, not {type(reference).__name__}"
        )

    def _apply(self, delta: Delta, ref: WeightTensor, meta: WeightMetadata) -> WeightTensor:
        data = _payload(delta)
        if delta.delta_type is DeltaType.XOR:
            blob = _bytes_view(data)
            size = codec.decoded_size(blob)  # None: damaged header, decode says so below
            if size is not None and size != ref.nbytes:
                raise DeltaError("delta payload size does not match the reference")
            out = ref.raw.copy()
            codec.decode(blob, hash_key=delta.reference_hash, out=out, xor=True)
            return WeightTensor.from_raw(out, meta)
        if delta.delta_type is DeltaType.FLOAT32_RAW:
            return self._apply_float32_raw(delta, data, ref, meta)
        decoded = codec.decode(_bytes_view(data), hash_key=delta.reference_hash)
        import torch

        base = ref.to_torch().double().reshape(-1)
        if delta.delta_type is DeltaType.INT8_QUANTIZED:
            diff = torch.from_numpy(decoded.view(np.int8).astype(np.float64) * delta.extra["scale"])
            out = base + diff
        else:
            n = int(delta.extra["count"])
            idx = torch.from_numpy(decoded[: n * 8].view(np.int64).copy())
            vals = torch.from_numpy(decoded[n * 8 :].view(np.float32).astype(np.float64))
            out = base.clone()
            out[idx] += vals
        t = out.to(dtypes.torch_dtype(delta.original_dtype)).reshape(delta.original_shape)
        return WeightTensor(t, meta)

    @staticmethod
    def _apply_float32_raw(delta: Delta, data: DeltaData, ref: WeightTensor, meta: WeightMetadata) -> WeightTensor:
        if delta.original_dtype != "float32":
            raise DeltaError(
                f"a float32_raw delta rebuilds float32 tensors, but this one says {delta.original_dtype}; "
                "use an xor delta for other dtypes"
            )
        numel = meta.numel
        if isinstance(data, np.ndarray):
            if data.dtype.kind != "f" or data.dtype.itemsize != 4:
                raise DeltaError(
                    f"float32_raw delta data must be a float32 array, not {data.dtype}; "
                    "compute the difference in float32"
                )
            diff = data.astype("<f4", copy=False)
        else:
            if memoryview(data).nbytes != numel * 4:
                raise DeltaError(
                    f"float32_raw delta data holds {memoryview(data).nbytes} bytes, "
                    f"the target needs {numel * 4} (one float32 per element)"
                )
            diff = np.frombuffer(data, dtype="<f4")
        if diff.size != numel:
            raise DeltaError(
                f"float32_raw delta data has {diff.size} elements, the target {list(delta.original_shape)} has {numel}"
            )
        out = _float32_add(ref.data, diff)
        w = WeightTensor.from_raw(out.view(np.uint8), meta)
        expected = delta.extra.get("target_hash")
        if expected is not None and w.compute_hash() != expected:
            raise HashMismatchError(
                f"float32_raw delta against {delta.reference_hash} rebuilt a tensor hashing to "
                f"{w.compute_hash()}, not its target {expected} (floating-point mode changed?); "
                "nothing was returned",
                hash_key=str(expected),
            )
        return w


def stored_nbytes(delta: Delta, level: int = codec.DEFAULT_LEVEL) -> int:
    """Bytes a store writes for ``delta``'s payload (an ndarray is codec-encoded first)."""
    if isinstance(delta.data, np.ndarray):
        return int(storage_payload(delta, level)[0].nbytes)
    return delta.nbytes
