"""Delta encoding between a tensor and a reference tensor (normally: itself one checkpoint earlier).

The default, :attr:`DeltaType.XOR`, is lossless for every dtype: the raw bits of target and
reference are XORed and run through the byte-plane codec. Unchanged bits become zeros, so the high
(sign/exponent) planes of a fine-tuning step collapse. Reconstruction XORs again and is verified
against the target's content hash by the caller.

Lossy types (quantized or thresholded differences) exist only behind ``DeltaConfig(allow_lossy=True)``
and are marked ``lossless = False``; they are never used by default and never verified as exact.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import codec, dtypes
from .errors import DeltaError
from .weight_tensor import WeightMetadata, WeightTensor


class DeltaType(str, enum.Enum):
    """How a delta is computed. Only ``XOR`` is lossless."""

    XOR = "xor"  #: lossless: XOR of raw bits, byte-plane split, zstd (any dtype)
    INT8_QUANTIZED = "int8_quantized"  #: lossy: (target - reference) quantised to int8, float dtypes
    SPARSE = "sparse"  #: lossy: only differences above a threshold are kept, float dtypes

    @property
    def lossless(self) -> bool:
        return self is DeltaType.XOR


@dataclass
class DeltaConfig:
    """Delta policy.

    Attributes:
        delta_type: encoding to use; lossy types need ``allow_lossy=True``.
        max_chain_length: a tensor is stored whole (a keyframe) at least every this many
            checkpoints, so loading reads at most ``max_chain_length + 1`` objects per tensor.
            Default 2, measured on the 5-epoch MiniLM fine-tune (``bench/epochs_bench.py
            --chain-k 1,2,3``): a full checkpoint's keyframe costs 151 MB and a delta epoch ~114 MB;
            K=1/2/3/4 store 0.506x/0.475x/0.478x/0.445x of torch.save's bytes and load all five
            epochs in 1.03x/1.09x/1.39x/~1.8x torch.load's time. K=2 keeps most of the saving and
            loads as fast as torch.load.
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
    codec_level: int = codec.DEFAULT_LEVEL

    def __post_init__(self) -> None:
        self.delta_type = DeltaType(self.delta_type)
        if not self.delta_type.lossless and not self.allow_lossy:
            raise DeltaError(
                f"{self.delta_type.value} deltas are lossy; pass allow_lossy=True to use them on purpose"
            )
        if self.max_chain_length < 0:
            raise DeltaError("max_chain_length must be >= 0 (0 disables deltas)")


@dataclass
class Delta:
    """An encoded difference between a target tensor and ``reference_hash``.

    ``data`` is the encoded payload (bytes); ``original_shape``/``original_dtype`` describe the target.
    """

    delta_type: DeltaType
    data: bytes
    original_shape: tuple[int, ...]
    original_dtype: str
    reference_hash: str
    compression_ratio: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.delta_type = DeltaType(self.delta_type)
        self.original_shape = tuple(int(s) for s in self.original_shape)
        self.original_dtype = dtypes.canonical_dtype(self.original_dtype)

    @property
    def lossless(self) -> bool:
        return self.delta_type.lossless

    @property
    def nbytes(self) -> int:
        return len(self.data)


class DeltaEncoder:
    """Encodes a target tensor against a reference and reconstructs it."""

    def __init__(self, config: Optional[DeltaConfig] = None):
        self.config = config or DeltaConfig()

    def can_encode(self, target: WeightTensor, reference: WeightTensor) -> bool:
        if target.dtype != reference.dtype or target.shape != reference.shape or target.nbytes == 0:
            return False
        if self.config.delta_type.lossless:
            return True
        return target.dtype in ("float32", "float16", "bfloat16", "float64")

    def encode(self, target: WeightTensor, reference: WeightTensor) -> Delta:
        """The delta that rebuilds ``target`` from ``reference`` (``data``: the encoded bytes)."""
        if not self.can_encode(target, reference):
            raise DeltaError(
                f"cannot encode {target!r} against {reference!r} with {self.config.delta_type.value}: "
                "dtype and shape must match"
            )
        kind = self.config.delta_type
        ref_hash = reference.compute_hash()
        if kind is DeltaType.XOR:
            width = dtypes.itemsize(target.dtype)
            payload = codec.encode(target.raw, width, self.config.codec_level, base=reference.raw)
            extra: dict[str, Any] = {}
        else:
            tgt = target.to_torch().double()
            ref = reference.to_torch().double()
            diff = (tgt - ref).reshape(-1).numpy()
            if kind is DeltaType.INT8_QUANTIZED:
                scale = float(np.abs(diff).max()) / 127.0 or 1.0
                q = np.clip(np.rint(diff / scale), -127, 127).astype(np.int8)
                payload = codec.encode(q.view(np.uint8), 1, self.config.codec_level)
                extra = {"scale": scale}
            else:  # SPARSE
                idx = np.nonzero(np.abs(diff) > self.config.sparse_threshold)[0].astype(np.int64)
                vals = diff[idx].astype(np.float32)
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

    def reconstruct(self, delta: Delta, reference: WeightTensor, *, name: str = "") -> WeightTensor:
        """Apply ``delta`` to ``reference``. Lossless deltas give back the exact target bytes."""
        if reference.dtype != delta.original_dtype or reference.shape != delta.original_shape:
            raise DeltaError(
                f"delta expects a {delta.original_dtype}{list(delta.original_shape)} reference, got {reference!r}"
            )
        if reference.compute_hash() != delta.reference_hash:
            raise DeltaError(
                f"delta was made against reference {delta.reference_hash}, not {reference.compute_hash()}"
            )
        meta = WeightMetadata(name=name, shape=delta.original_shape, dtype=delta.original_dtype)
        if delta.delta_type is DeltaType.XOR:
            size = codec.decoded_size(delta.data)  # None: damaged header, decode says so below
            if size is not None and size != reference.nbytes:
                raise DeltaError("delta payload size does not match the reference")
            out = reference.raw.copy()
            codec.decode(delta.data, hash_key=delta.reference_hash, out=out, xor=True)
            return WeightTensor.from_raw(out, meta)
        decoded = codec.decode(delta.data, hash_key=delta.reference_hash)
        import torch

        ref = reference.to_torch().double().reshape(-1)
        if delta.delta_type is DeltaType.INT8_QUANTIZED:
            diff = torch.from_numpy(decoded.view(np.int8).astype(np.float64) * delta.extra["scale"])
            out = ref + diff
        else:
            n = int(delta.extra["count"])
            idx = torch.from_numpy(decoded[: n * 8].view(np.int64).copy())
            vals = torch.from_numpy(decoded[n * 8 :].view(np.float32).astype(np.float64))
            out = ref.clone()
            out[idx] += vals
        t = out.to(dtypes.torch_dtype(delta.original_dtype)).reshape(delta.original_shape)
        return WeightTensor(t, meta)
