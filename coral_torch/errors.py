"""Exception classes. Every error coral-torch raises on purpose derives from :class:`CoralError`.

Messages say what went wrong and what to do about it.
"""

from __future__ import annotations

import pickle


class CoralError(Exception):
    """Base class of every error raised by coral-torch.

    Every one pickles with its message and attributes (``dcp`` sends a rank's failure to the others
    pickled; the default pickling of an exception calls ``cls(*args)``, which the subclasses with
    keyword-only arguments refuse on the receiving rank)."""

    def __reduce__(self) -> tuple:
        state = dict(self.__dict__)
        if isinstance(self, OSError):  # (kept in OSError's own slots, not in __dict__; unset: None)
            slots = {"errno": self.errno, "strerror": self.strerror, "filename": self.filename}
            state.update((k, v) for k, v in slots.items() if v is not None)
        return (_rebuild_error, (type(self), self.args, state))


def _rebuild_error(cls: type[CoralError], args: tuple, state: dict) -> CoralError:
    err = cls.__new__(cls, *args)
    Exception.__init__(err, *args)
    for name, value in state.items():
        setattr(err, name, value)
    return err


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


class UnsafeCheckpointError(CoralError, pickle.UnpicklingError):
    """Loading a value would execute pickled code; refused unless the caller opts in. Also a
    ``pickle.UnpicklingError``, as ``torch.load(weights_only=True)`` raises in the same case."""


class NotACheckpointError(CoralError, ValueError):
    """A file is neither a coral-torch pointer nor a ``torch.save`` file (empty, text, foreign)."""


class MalformedPointerError(NotACheckpointError):
    """A file looks like a coral-torch pointer but cannot be used (truncated, edited, newer version)."""


class CheckpointNotFoundError(CoralError, FileNotFoundError):
    """``load(f)``: ``f`` is no file, and no ref of that name exists in the repository."""


class RepositoryError(CoralError):
    """A repository cannot do what was asked."""


class NotARepositoryError(RepositoryError, FileNotFoundError):
    """The path holds no coral-torch repository."""


class CatalogDamagedError(IntegrityError):
    """The repository's catalog cannot be trusted: it is not a readable SQLite file, or a commit's
    manifest no longer hashes to the commit's id. Objects in packs are not affected; restore the
    catalog from a backup or pull the commits again from a remote."""


class RepositoryIOError(RepositoryError, OSError):
    """The operating system reported an I/O error (EIO and the like) on a repository file. A save
    that meets one publishes nothing; ``errno`` and ``filename`` are the original error's."""

    def __init__(self, message: str, *, errno_: int | None = None, filename: str | None = None):
        RepositoryError.__init__(self, message)
        self.errno = errno_
        self.strerror = message
        self.filename = filename

    def __str__(self) -> str:
        return self.strerror or ""  # always the message (OSError types strerror as optional)


class DiskFullError(RepositoryIOError):
    """A save ran out of disk space (ENOSPC). Nothing of it was published and what it wrote was
    removed; earlier commits are intact. ``needed`` is roughly how many bytes the save needed."""

    def __init__(self, message: str, *, path: str = "", needed: int | None = None):
        RepositoryIOError.__init__(self, message, errno_=28, filename=path or None)  # ENOSPC
        self.path = path
        self.needed = needed


class ReadOnlyRepositoryError(RepositoryError, PermissionError):
    """The repository can be read but not written (read-only mount, or no write permission)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsupportedFormatError(RepositoryError):
    """The repository, a pack or a manifest was written by a newer coral-torch: upgrade to read it."""


class InvalidRefNameError(RepositoryError, ValueError):
    """A ref, tag or run name is malformed or reserved (see :mod:`coral_torch.refnames`)."""


class UnsupportedLocationError(RepositoryError, ValueError):
    """A repository argument is neither a local directory nor ``s3://bucket/prefix`` (or an entry
    point that needs a local directory was given an S3 repository)."""


class ConcurrentChangeError(RepositoryError):
    """A commit could not be published because what it was planned against changed meanwhile (a
    concurrent gc removed an object it deduplicated against or a pack it wrote): save it again."""

    def __init__(self, message: str, missing: tuple = ()):
        super().__init__(message)
        self.missing = tuple(missing)


class RefConflictError(ConcurrentChangeError):
    """A remote ref was not moved because another writer moved it first (compare-and-swap refused).
    ``ref``: its name; ``expected``: the commit it was expected to name (``None``: absent);
    ``current``: the commit it names now (``None``: absent or damaged), the other writer's."""

    def __init__(self, message: str, *, ref: str = "", expected: str | None = None, current: str | None = None):
        super().__init__(message)
        self.ref = ref
        self.expected = expected
        self.current = current


class CoralCheckpointError(CoralError):
    """A background checkpoint save failed; raised on the training thread (on every rank of a
    multi-process run) at the next save point or hook."""


class UnsupportedTorchError(CoralError, ImportError):
    """The installed torch lacks an API this feature needs (e.g. DCP's storage interface)."""


class RepositoryLockedError(RepositoryError):
    """Another process holds the repository's write lock."""

    def __init__(self, message: str, *, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class RefNotFoundError(RepositoryError, KeyError):
    """A ref (hash prefix, tag, run, latest, best) matches no commit."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AmbiguousRefError(RepositoryError, KeyError):
    """A hash prefix matches several commits."""

    def __init__(self, message: str, candidates: list[str]):
        super().__init__(message)
        self.candidates = candidates

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointDamagedError(IntegrityError):
    """A checkpoint cannot be loaded because some of its tensors are damaged."""

    def __init__(self, message: str, *, commit: str, tensors: list[str]):
        super().__init__(message)
        self.commit = commit
        self.tensors = tensors


class RemoteError(StoreError):
    """A remote store (S3 or S3-compatible) refused or failed a request.

    ``stats`` is set where an operation stopped part-way (a sync), saying what was done.
    """

    def __init__(self, message: str, *, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats


class RemoteConfigError(RemoteError, ValueError):
    """A remote store's configuration is invalid (bucket name, endpoint, transfer settings)."""


class RemoteConnectionError(RemoteError, ConnectionError):
    """The remote endpoint cannot be reached, or the connection dropped and retries ran out."""


class RemoteAuthError(RemoteError, PermissionError):
    """The remote rejected the credentials (unknown key, wrong secret, expired token) or denied access."""


class BucketNotFoundError(RemoteError, StoreNotFoundError):
    """The bucket does not exist at the endpoint."""

    def __init__(self, message: str, *, bucket: str, endpoint: str | None = None):
        super().__init__(message)
        self.bucket = bucket
        self.endpoint = endpoint


class RemoteRepositoryNotFoundError(RemoteError, StoreNotFoundError):
    """The bucket exists but the prefix holds no coral-torch repository (nothing at all, or nothing
    a push writes: a mistyped or wrong prefix). A pull of it creates nothing locally."""


class SyncIncompleteError(RemoteError):
    """A sync stopped or finished with objects not transferred. ``stats`` says what was done,
    ``failures`` maps each failed key to its error. Running the sync again resumes: objects already
    transferred are not sent again."""

    def __init__(self, message: str, *, stats: dict | None, failures: dict):
        super().__init__(message, stats=stats)
        self.failures = failures
