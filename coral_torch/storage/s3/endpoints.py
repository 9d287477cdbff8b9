"""Sources and sinks of the sync engine (:mod:`.sync`) for local stores and S3 remotes."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ...format.objects import DELTAS, WEIGHTS, PreparedObject
from .objects import S3Objects, check_key
from .sync import Pending

__all__ = ["S3ObjectSource", "S3ObjectSink", "LocalSource", "LocalSink"]


class LocalSource:
    """Objects of a local store, read (checksum-verified, not decoded) on the calling thread."""

    def __init__(self, store: Any, where: str | None = None, keys: Mapping[str, list[str]] | None = None):
        self.store = store
        self.where = where or str(getattr(store, "filepath", store))
        self._keys = keys

    def list_objects(self) -> Mapping[str, list[str]]:
        if self._keys is not None:
            return self._keys
        return {WEIGHTS: self.store.list_weights(), DELTAS: self.store.list_deltas()}

    def open(self, group: str, key: str) -> Pending | None:
        obj = self.store.read_prepared(key, group)
        if obj is None:
            return None
        return Pending(int(obj.payload.nbytes), lambda: (obj, 0))


class LocalSink:
    """A local store that objects are written into (on the calling thread: h5py is not thread-safe)."""

    concurrent = False

    def __init__(self, store: Any, where: str | None = None):
        self.store = store
        self.where = where or str(getattr(store, "filepath", store))

    def present(self) -> Mapping[str, Mapping[str, Any]]:
        return {WEIGHTS: dict.fromkeys(self.store.list_weights()), DELTAS: dict.fromkeys(self.store.list_deltas())}

    def accept(self, group: str, key: str) -> None:
        check_key(key)  # a key from the remote: it must be one a store can hold

    def check(self, group: str, key: str, entry: Any) -> str | None:
        return None

    def write(self, obj: PreparedObject) -> int:
        self.store.write_prepared(obj)
        return 0

    def flush(self) -> None:
        self.store.flush()


class S3ObjectSource:
    """The objects of an S3 remote (``only``: those among these keys), downloaded and verified on
    the workers. ``listing``: the remote's (weight keys, delta keys) listed a moment ago (objects are
    content-addressed and immutable: a download of several passes lists them once). ``decode``: as
    :meth:`S3Objects.fetch`'s."""

    def __init__(
        self,
        objects: S3Objects,
        only: Collection[str] | None = None,
        listing: tuple[list[str], list[str]] | None = None,
        *,
        decode: bool = True,
    ):
        self.objects = objects
        self.where = objects.url
        self.only = set(only) if only is not None else None
        self.listing = listing  # a recent S3Objects.list_metadata() to use instead of listing again
        self.decode = decode  # see S3Objects.fetch

    def list_objects(self) -> Mapping[str, list[str]]:
        weights, deltas = self.listing if self.listing is not None else self.objects.list_metadata()
        if self.only is not None:
            weights = [k for k in weights if k in self.only]
            deltas = [k for k in deltas if k in self.only]
        return {WEIGHTS: weights, DELTAS: deltas}

    def open(self, group: str, key: str) -> Pending | None:
        return Pending(0, lambda: self.objects.fetch(group, key, decode=self.decode))


class S3ObjectSink:
    """An S3 remote that objects are uploaded to (verified) on the workers."""

    concurrent = True

    def __init__(self, objects: S3Objects):
        self.objects = objects
        self.where = objects.url

    def present(self) -> dict[str, dict[str, Any]]:
        return self.objects.present()

    def accept(self, group: str, key: str) -> None:
        check_key(key)

    def check(self, group: str, key: str, entry: Any) -> str | None:
        return self.objects.check_remote_object(group, key, entry)

    def write(self, obj: PreparedObject) -> int:
        return self.objects.put_prepared(obj)

    def flush(self) -> None:
        pass
