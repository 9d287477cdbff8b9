"""`WeightStore`: the contract every storage backend (HDF5, S3) fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, TypeVar

from ..format.weight_tensor import WeightMetadata, WeightTensor

_S = TypeVar("_S", bound="WeightStore")


class WeightStore(ABC):
    """Abstract content-addressed store of :class:`WeightTensor` objects.

    Keys are content hashes (:meth:`WeightTensor.compute_hash`). ``store`` is idempotent, ``load``
    returns ``None`` for an unknown key and verifies the bytes it returns against their hash;
    ``load_batch`` leaves unknown keys out of its result. Stores are context managers (``with``
    closes them).
    """

    @abstractmethod
    def store(self, weight: WeightTensor, hash_key: str | None = None) -> str:
        """Store a weight tensor and return its hash key."""

    @abstractmethod
    def load(self, hash_key: str) -> WeightTensor | None:
        """Load a weight tensor by hash; ``None`` if absent."""

    @abstractmethod
    def exists(self, hash_key: str) -> bool:
        """Whether a weight exists, without loading it."""

    @abstractmethod
    def delete(self, hash_key: str) -> bool:
        """Delete a weight; ``True`` if it existed."""

    @abstractmethod
    def list_weights(self) -> list[str]:
        """All weight hashes in the store."""

    @abstractmethod
    def get_metadata(self, hash_key: str) -> WeightMetadata | None:
        """Metadata of a weight without loading its data; ``None`` if absent."""

    @abstractmethod
    def store_batch(self, weights: dict[str, WeightTensor]) -> dict[str, str]:
        """Store many weights; returns ``{input key: hash}``."""

    @abstractmethod
    def load_batch(self, hash_keys: list[str]) -> dict[str, WeightTensor]:
        """Load many weights; returns ``{hash: WeightTensor}`` for those present."""

    @abstractmethod
    def get_storage_info(self) -> dict[str, Any]:
        """Statistics about the store (see each backend for the keys).

        Where a backend reports ``compression_ratio`` it is ``compressed_bytes / total_bytes``:
        the fraction of the logical size that is stored (smaller is better; 0.4 means 60% saved),
        not the "fraction saved" some Coral documentation calls compression ratio.
        """

    def close(self) -> None:  # noqa: B027 - an optional hook, deliberately not abstract
        """Release resources. Default: nothing to do."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
