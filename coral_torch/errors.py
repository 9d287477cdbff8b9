"""Exception classes. Every error coral-torch raises on purpose derives from :class:`CoralError`.

Messages say what went wrong and what to do about it.
"""

from __future__ import annotations


class CoralError(Exception):
    """Base class of every error raised by coral-torch."""


class UnsupportedTensorError(CoralError, TypeError):
    """A value cannot be represented as a :class:`~coral_torch.WeightTensor` (sparse, meta, ...)."""


class StoreError(CoralError):
    """A storage backend cannot do what was asked."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store (file, bucket, prefix) does not exist and the mode does not allow creating it."""


class NotAStoreError(StoreError):
    """A file exists at the path but is not a coral-torch store; it is left untouched."""


class ReadOnlyStoreError(StoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class CompressionUnavailableError(StoreError, ValueError):
    """The requested compression is unknown or not available in this HDF5 build."""


class IntegrityError(CoralError):
    """Bytes read back do not match what was stored (corruption, truncation, tampering)."""

    def __init__(self, message: str, *, hash_key: str | None = None):
        super().__init__(message)
        self.hash_key = hash_key


class HashMismatchError(IntegrityError):
    """Decoded data does not hash to the content address it was stored under."""


class CorruptObjectError(IntegrityError):
    """A stored object cannot be decoded at all (damaged container, codec or HDF5 data)."""


class DeltaError(CoralError):
    """A delta cannot be encoded or applied (wrong reference, shape or dtype mismatch)."""
