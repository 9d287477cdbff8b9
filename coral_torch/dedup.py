"""`Deduplicator`: exact dedup by content hash, and the choice of delta references.

Exact duplicates (a frozen backbone, a LoRA base model, tied weights, buffers that never change)
are recognised by their content hash and stored once, ever. For a tensor that is new, the delta
reference is the tensor of the same name in the parent checkpoint. Optionally, a tensor with no
such partner is matched against earlier tensors of the same dtype and shape by a fixed-size
fingerprint (memory independent of tensor size); that search is an optimisation only, never needed
for correctness, since every delta is verified by hash when rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import DeltaError
from .format.delta import Delta, DeltaConfig, DeltaEncoder, stored_nbytes
from .format.weight_tensor import WeightTensor

if TYPE_CHECKING:  # pragma: no cover
    from .storage.weight_store import WeightStore

FINGERPRINT_SIZE = 256


def fingerprint(weight: WeightTensor) -> np.ndarray | None:
    """A unit vector of up to 256 evenly strided values (floats only), for cosine similarity."""
    if weight.dtype not in ("float32", "float64", "float16") or weight.size < 2:
        return None
    flat = weight.data.reshape(-1)
    step = max(1, flat.size // FINGERPRINT_SIZE)
    sample = flat[::step][:FINGERPRINT_SIZE].astype(np.float64)
    if not np.all(np.isfinite(sample)):
        return None
    norm = np.linalg.norm(sample)
    return sample / norm if norm > 0 else None


@dataclass
class DeduplicationResult(Mapping[str, WeightTensor]):
    """Outcome of :meth:`Deduplicator.deduplicate`.

    As a mapping it is ``unique``: name -> tensor that must be stored in full, so
    ``store.store_batch(result)`` stores exactly the new full tensors; store each of ``deltas`` with
    ``store.store_delta(delta, target_hash)``.

    Attributes:
        unique: name -> tensor that must be stored in full.
        duplicates: name -> hash of an identical tensor already known (store nothing).
        deltas: hash of the target tensor -> :class:`Delta` to store instead of the tensor.
        name_to_hash: every input name -> its content hash.
    """

    unique: dict[str, WeightTensor] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)
    deltas: dict[str, Delta] = field(default_factory=dict)
    name_to_hash: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> WeightTensor:
        return self.unique[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.unique)

    def __len__(self) -> int:
        return len(self.unique)


class Deduplicator:
    """Exact dedup plus delta-reference choice.

    Args:
        similarity_threshold: cosine similarity (-1..1) of fingerprints at or above which a
            same-shaped tensor is tried as a delta reference when no same-name parent exists
            (``None`` disables the search).
        delta_config: delta policy; lossless XOR by default.
        enable_delta_encoding: try deltas at all.
        exists: optional callback telling whether a hash is already stored (e.g. ``store.exists``);
            tensors it knows are reported as duplicates.
        storage: a store whose tensors count as known (shorthand for ``exists=storage.exists``).

    Raises:
        DeltaError: ``similarity_threshold`` is not a number in -1..1 or ``None``, or both
            ``exists`` and ``storage`` are given.
    """

    def __init__(
        self,
        similarity_threshold: float | None = 0.98,
        delta_config: DeltaConfig | None = None,
        enable_delta_encoding: bool = True,
        exists: Callable[[str], bool] | None = None,
        *,
        storage: WeightStore | None = None,
    ):
        if similarity_threshold is not None and (
            isinstance(similarity_threshold, bool)
            or not isinstance(similarity_threshold, (int, float, np.floating, np.integer))
            or not -1.0 <= float(similarity_threshold) <= 1.0
        ):
            raise DeltaError(
                f"similarity_threshold must be a cosine similarity in -1..1 (e.g. 0.98) or None, "
                f"not {similarity_threshold!r}"
            )
        if exists is not None and storage is not None:
            raise DeltaError("give Deduplicator either exists= or storage=, not both")
        self.similarity_threshold = None if similarity_threshold is None else float(similarity_threshold)
        self.encoder = DeltaEncoder(delta_config)
        self.enable_delta_encoding = enable_delta_encoding
        self.storage = storage
        self.exists = storage.exists if storage is not None else exists
        self._known: dict[str, WeightTensor] = {}
        self._by_signature: dict[tuple, list[tuple[np.ndarray, str]]] = {}
        self.stats = {"seen": 0, "duplicates": 0, "deltas": 0, "unique": 0}

    def is_known(self, h: str) -> bool:
        return h in self._known or (self.exists is not None and self.exists(h))

    @staticmethod
    def same_name_reference(name: str, weight: WeightTensor, parent: dict[str, tuple[str, str, tuple]]) -> str | None:
        """Hash of the parent's tensor called ``name`` if it can be a delta base (same dtype/shape)."""
        entry = parent.get(name)
        if entry is None:
            return None
        h, dtype, shape = entry
        return h if dtype == weight.dtype and tuple(shape) == weight.shape else None

    def decide(
        self,
        name: str,
        weight: WeightTensor,
        parent: dict[str, tuple[str, str, tuple]],
        *,
        known: bool | None = None,
    ) -> tuple[str, str | None]:
        """How to store ``weight`` without encoding anything: ``("duplicate", hash)`` if its content
        is known (``known`` when the caller checked in bulk, else :meth:`is_known`), else
        ``("delta", base hash)`` when the parent's tensor of the same name can be its base and
        deltas are enabled, else ``("unique", None)``. What a repository uses; whether a delta
        candidate pays is measured when it is encoded."""
        h = weight.compute_hash()
        self.stats["seen"] += 1
        if known if known is not None else self.is_known(h):
            self.stats["duplicates"] += 1
            return "duplicate", h
        base = self.same_name_reference(name, weight, parent) if self.enable_delta_encoding else None
        if base is not None:
            self.stats["deltas"] += 1
            return "delta", base
        self.stats["unique"] += 1
        return "unique", None

    def similar_reference(self, weight: WeightTensor) -> str | None:
        """Hash of a known tensor of the same dtype/shape whose fingerprint is close enough."""
        if self.similarity_threshold is None:
            return None
        fp = fingerprint(weight)
        if fp is None:
            return None
        best, best_sim = None, self.similarity_threshold
        for other_fp, h in self._by_signature.get((weight.dtype, weight.shape), []):
            sim = float(np.dot(fp, other_fp))
            if sim >= best_sim:
                best, best_sim = h, sim
        return best

    def _register(self, h: str, weight: WeightTensor) -> None:
        self._known[h] = weight
        fp = fingerprint(weight)
        if fp is not None:
            self._by_signature.setdefault((weight.dtype, weight.shape), []).append((fp, h))

    def deduplicate(
        self, weights: dict[str, WeightTensor], parent: dict[str, WeightTensor] | None = None
    ) -> DeduplicationResult:
        """Classify ``weights``: duplicates of known tensors, deltas against ``parent`` (same name)
        or similar known tensors when lossless and smaller than the tensor's own encoding, else
        unique. Tensors seen by earlier calls (and, with ``storage``/``exists``, stored ones) are
        known."""
        from .format import codec, dtypes

        result = DeduplicationResult()
        parent = parent or {}
        for name, w in weights.items():
            h = w.compute_hash()
            result.name_to_hash[name] = h
            self.stats["seen"] += 1
            if self.is_known(h):
                result.duplicates[name] = h
                self.stats["duplicates"] += 1
                continue
            ref = None
            if self.enable_delta_encoding:
                p = parent.get(name)
                if p is not None and self.encoder.can_encode(w, p):
                    ref = p
                else:
                    rh = self.similar_reference(w)
                    ref = self._known.get(rh) if rh else None
            if ref is not None:
                level = self.encoder.config.codec_level
                delta = self.encoder.encode(w, ref)
                own = len(codec.encode(w.raw, dtypes.itemsize(w.dtype), level))
                if delta.lossless and stored_nbytes(delta, level) < own:
                    result.deltas[h] = delta
                    self.stats["deltas"] += 1
                    self._register(h, w)
                    continue
            result.unique[name] = w
            self.stats["unique"] += 1
            self._register(h, w)
        return result
