"""`S3Store`: the storage chapter's weight store on AWS S3 or any S3-compatible server (MinIO,
SeaweedFS, moto, ...), over :class:`~coral_torch.storage.s3.client.S3Client`.

The object layout is :mod:`coral_torch.storage.s3.objects`'s; descriptions are the same as
:class:`~coral_torch.storage.hdf5_store.HDF5Store` keeps (:mod:`coral_torch.format.objects`), so
objects move between the two without re-encoding (:meth:`S3Store.sync_from_local`,
:meth:`S3Store.sync_to_local`, both over :mod:`coral_torch.storage.s3.sync`). Uploads, downloads,
documents, retries and errors are the client's (see :mod:`coral_torch.storage.s3.client`):
:class:`~coral_torch.errors.RemoteAuthError`, :class:`~coral_torch.errors.BucketNotFoundError`,
:class:`~coral_torch.errors.RemoteConnectionError`, :class:`~coral_torch.errors.RemoteError`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import ReadOnlyStoreError, RemoteConfigError, StoreError
from ...format import objects as fmt
from ...format.delta import Delta
from ...format.weight_tensor import WeightMetadata, WeightTensor
from ..hdf5_store import HDF5Store
from ..weight_store import WeightStore
from . import sync as engine
from .client import RemoteEntry, S3Client
from .config import S3Config
from .endpoints import LocalSink, LocalSource, S3ObjectSink, S3ObjectSource
from .objects import S3Objects, check_key

log = logging.getLogger(__name__)

__all__ = ["S3Store"]


class S3Store(WeightStore):
    """A content-addressed weight store in an S3 bucket (see :mod:`coral_torch.storage.s3.objects`
    for the layout).

    Implements the :class:`WeightStore` contract plus deltas, :meth:`sync_from_local` and
    :meth:`sync_to_local`. Thread-safe: any method may be called from several threads.
    """

    def __init__(self, config: S3Config):
        if not isinstance(config, S3Config):
            raise RemoteConfigError(f"S3Store needs an S3Config, not {type(config).__name__}")
        self.config = config
        self._closed = False
        self.client = S3Client(config)
        self.objects = S3Objects(self.client, config.codec_level)
        self.endpoint = self.client.endpoint
        if config.check_bucket:
            try:
                self.client.check_bucket()
            except BaseException:
                self.close()
                raise
        log.debug("opened %r", self)

    @property
    def url(self) -> str:
        return self.config.url

    def _live(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")

    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="coral-s3")

    def _progress(self, progress: bool | None) -> bool | None:
        return progress if progress is not None else self.config.progress

    # --------------------------------------------------------------------------- documents
    def get_document(self, rel_key: str, what: str | None = None) -> dict[str, Any] | None:
        """Read the JSON document at ``<prefix><rel_key>`` (written by :meth:`put_document`), verified
        against its checksum; ``None`` if there is none. ``what`` names it in messages.

        Raises:
            CorruptObjectError: damaged (still damaged after ``max_attempts`` reads).
            StoreError: ``rel_key`` could leave the prefix (``..``, control characters), or the
                document is of a newer format.
            RemoteError and subclasses: the server cannot be reached or refuses.
        """
        self._live()
        return self.client.get_document(self.client.document_key(rel_key), what or f"document {rel_key}")

    def put_document(self, rel_key: str, doc: Mapping[str, Any]) -> int:
        """Write ``doc`` as the JSON document at ``<prefix><rel_key>`` (canonical encoding: adds the
        format fields and the checksum) and verify what the server stored. Returns the bytes sent.

        Raises:
            StoreError: ``rel_key`` could leave the prefix.
            RemoteError and subclasses: refused, unreachable, or the server kept storing damaged bytes.
        """
        self._live()
        return self.client.put_document(self.client.document_key(rel_key), doc).size

    def has_any(self, sub: str = "") -> bool:
        """Whether anything is stored under ``<prefix><sub>``: one listing request of one key."""
        self._live()
        return self.client.has_any(sub)

    def list_entries(self, sub: str = "") -> dict[str, RemoteEntry]:
        """Every object under ``<prefix><sub>``: ``{key relative to <prefix><sub>: RemoteEntry}``
        (consistency-checked, see :meth:`S3Client.list_entries`)."""
        self._live()
        return self.client.list_entries(sub)

    # ------------------------------------------------------------------------------ writes

    def store(self, weight: WeightTensor, hash_key: str | None = None) -> str:
        """Store one tensor (idempotent: nothing is sent if the key is present) and return its key."""
        self._live()
        key = check_key(hash_key or weight.compute_hash())
        self.objects.store_weight(weight, key)
        return key

    def store_batch(self, weights: dict[str, WeightTensor], progress: bool | None = None) -> dict[str, str]:
        """Store many tensors, ``max_concurrency`` at a time; returns ``{input key: hash}``."""
        self._live()
        items = list(weights.items())
        if not items:
            return {}
        with self._pool() as pool:
            hashes = list(pool.map(lambda kv: kv[1].compute_hash(), items))
            result = {name: h for (name, _), h in zip(items, hashes)}
            unique: dict[str, WeightTensor] = {}
            for (_, w), h in zip(items, hashes):
                unique.setdefault(h, w)

            def upload(w: WeightTensor, h: str) -> Any:
                return self.objects.store_weight(w, check_key(h))

            self._run_all(
                pool,
                [(h, functools.partial(upload, w, h)) for h, w in unique.items()],
                "upload",
                progress,
            )
        return result

    def _run_all(
        self, pool: ThreadPoolExecutor, tasks: list[tuple[str, Callable[[], Any]]], desc: str, progress: bool | None
    ) -> dict[str, Any]:
        """Run tasks on ``pool`` with a progress bar; on the first error cancel the rest and raise it."""
        out: dict[str, Any] = {}
        futures = {pool.submit(fn): key for key, fn in tasks}
        first: BaseException | None = None
        with engine.progress_bar(len(tasks), desc, self._progress(progress)) as bar:
            try:
                for fut in engine.as_completed(futures):
                    exc = fut.exception()
                    if exc is not None:
                        first = first or exc
                        for f in futures:
                            f.cancel()
                        continue
                    out[futures[fut]] = fut.result()
                    bar.update(1)
            finally:
                for f in futures:
                    f.cancel()
        if first is not None:
            raise first
        return out

    def delete(self, hash_key: str) -> bool:
        """Delete a tensor; ``True`` if it existed. Metadata goes first, so it vanishes at once."""
        self._live()
        return self.objects.delete_pair(fmt.WEIGHTS, check_key(hash_key))

    # ------------------------------------------------------------------------------- reads
    def exists(self, hash_key: str) -> bool:
        self._live()
        return self.objects.exists(fmt.WEIGHTS, check_key(hash_key))

    def load(self, hash_key: str) -> WeightTensor | None:
        """Download, verify and return one tensor; ``None`` if the key is unknown.

        Raises:
            CorruptObjectError / HashMismatchError: the stored bytes are damaged (nothing is returned).
            RemoteError and subclasses: the server cannot be reached or refuses.
        """
        self._live()
        return self.objects.load_weight(check_key(hash_key))

    def load_batch(self, hash_keys: list[str], progress: bool | None = None) -> dict[str, WeightTensor]:
        """Load many tensors, ``max_concurrency`` at a time; ``{hash: WeightTensor}`` for those present."""
        self._live()
        keys = list(dict.fromkeys(hash_keys))
        for k in keys:
            check_key(k)
        with self._pool() as pool:
            got = self._run_all(pool, [(k, functools.partial(self.load, k)) for k in keys], "download", progress)
        return {k: got[k] for k in keys if got.get(k) is not None}

    def get_metadata(self, hash_key: str) -> WeightMetadata | None:
        """Metadata of a tensor (or, like HDF5Store, of a delta) without downloading its payload."""
        self._live()
        key = check_key(hash_key)
        where = f" at {self.url}"
        doc = self.objects.read_meta(fmt.WEIGHTS, key)
        if doc is not None:
            return fmt.weight_metadata(doc, key, where)
        doc = self.objects.read_meta(fmt.DELTAS, key)
        return None if doc is None else fmt.delta_metadata(doc, key, where)

    def list_weights(self) -> list[str]:
        self._live()
        return self.objects.list_metadata()[0]

    # ------------------------------------------------------------------------------ deltas
    def store_delta(self, delta: Delta, delta_hash: str) -> str:
        """Store a delta under ``delta_hash`` (idempotent) and return the key."""
        self._live()
        key = check_key(delta_hash)
        self.objects.store_delta(delta, key)
        return key

    def load_delta(self, delta_hash: str) -> Delta | None:
        """Download and checksum-verify a delta; ``None`` if absent."""
        self._live()
        return self.objects.load_delta(check_key(delta_hash))

    def delta_exists(self, delta_hash: str) -> bool:
        self._live()
        return self.objects.exists(fmt.DELTAS, check_key(delta_hash))

    def list_deltas(self) -> list[str]:
        self._live()
        return self.objects.list_metadata()[1]

    def delete_delta(self, delta_hash: str) -> bool:
        self._live()
        return self.objects.delete_pair(fmt.DELTAS, check_key(delta_hash))

    # ------------------------------------------------------------------------------- stats
    def get_storage_info(self, logical_sizes: bool = True) -> dict[str, Any]:
        """Keys: backend ("s3"), url, bucket, prefix, endpoint_url, total_weights, total_bytes (logical,
        from the metadata; needs one GET per weight, skipped with ``logical_sizes=False``),
        compressed_bytes (weight payloads), compression_ratio (compressed/total), total_deltas,
        delta_bytes, metadata_bytes, stored_bytes (all objects), orphaned_payloads (payloads without
        metadata: leftovers of interrupted uploads, invisible and overwritten by the next upload)."""
        self._live()
        sizes: dict[str, dict[str, int]] = {fmt.WEIGHTS: {}, fmt.DELTAS: {}}
        meta_bytes = 0
        wkeys: list[str] = []
        dkeys: set[str] = set()
        for rel, entry in self.client.iter_entries(""):
            group, _, name = rel.partition("/")
            if "/" in name:
                continue
            if group in sizes:
                sizes[group][name] = entry.size
            elif group == "metadata":
                meta_bytes += entry.size
                if name.endswith(".delta.json"):
                    dkeys.add(name[: -len(".delta.json")])
                elif name.endswith(".json"):
                    wkeys.append(name[: -len(".json")])
        wset = set(wkeys)
        compressed = sum(s for k, s in sizes[fmt.WEIGHTS].items() if k in wset)
        delta_bytes = sum(s for k, s in sizes[fmt.DELTAS].items() if k in dkeys)
        orphans = sum(1 for k in sizes[fmt.WEIGHTS] if k not in wset) + sum(
            1 for k in sizes[fmt.DELTAS] if k not in dkeys
        )
        total = 0
        if logical_sizes and wkeys:
            with self._pool() as pool:
                for doc in pool.map(lambda k: self.objects.read_meta(fmt.WEIGHTS, k), wkeys):
                    if doc is not None:
                        total += int(doc.get("nbytes", 0))
        return {
            "backend": "s3",
            "url": self.url,
            "bucket": self.config.bucket,
            "prefix": self.config.prefix,
            "endpoint_url": self.endpoint,
            "total_weights": len(wkeys),
            "total_bytes": total if logical_sizes else None,
            "compressed_bytes": compressed,
            "compression_ratio": (compressed / total) if total else 1.0,
            "total_deltas": len(dkeys),
            "delta_bytes": delta_bytes,
            "metadata_bytes": meta_bytes,
            "stored_bytes": compressed + delta_bytes + meta_bytes,
            "orphaned_payloads": orphans,
        }

    # -------------------------------------------------------------------------------- sync
    def check_remote_object(self, group: str, key: str, payload: RemoteEntry | None = None) -> str | None:
        """Check one object on the remote without downloading its payload: its metadata (read and
        verified against its checksum) must describe it, and the payload's listed size and ETag
        (``payload``; listed here when not given) must be what the metadata recorded. Returns
        ``None`` if intact, else what is wrong. ``group``: ``"weights"`` or ``"deltas"``.

        Raises:
            RemoteError and subclasses: the server cannot be reached or refuses.
        """
        self._live()
        return self.objects.check_remote_object(group, key, payload)

    def sync_from_local(
        self, local: HDF5Store, progress: bool | None = None, *, verify: bool | Collection[str] = False
    ) -> dict[str, Any]:
        """Upload every weight and delta of ``local`` that the remote lacks or holds damaged.

        Incremental (the remote is listed once; present objects are skipped), parallel
        (``max_concurrency`` uploads), resumable (re-running after an interruption sends only what is
        still missing). Codec-encoded objects are uploaded as stored, without re-encoding (after
        checking they decode to their content hash); others are loaded and encoded. Every upload is
        verified.

        An object counts as present when the listing shows both its metadata and its payload. Those
        in ``verify`` (``True``: all of them) are also checked (:meth:`check_remote_object`: one small
        GET each) and uploaded again if damaged.

        Returns stats: ``uploaded`` (weights), ``deltas_uploaded``, ``skipped`` (already remote),
        ``verified`` (present objects checked and found intact), ``repaired`` (present but damaged:
        uploaded again), ``failed``, ``bytes_transferred`` (payload + metadata bytes sent),
        ``downloaded`` and ``deltas_downloaded`` (0), ``seconds``.

        Raises:
            SyncIncompleteError: some objects were not uploaded (``.failures`` says which and why,
                ``.stats`` what was done); run again to resume.
            RemoteAuthError, BucketNotFoundError, RemoteConnectionError: before anything was sent.
        """
        self._live()
        return engine.sync(
            LocalSource(local),
            S3ObjectSink(self.objects),
            verb="uploaded",
            verify=verify,
            max_concurrency=self.config.max_concurrency,
            progress=self._progress(progress),
            desc=f"push {self.url}",
            read_ahead_bytes=self.client.transfer.read_ahead_bytes,
        )

    def sync_to_local(self, local: HDF5Store, progress: bool | None = None) -> dict[str, Any]:
        """Download every weight and delta the remote has and ``local`` lacks.

        Downloads and verification (payload checksum, decode, content hash) run on
        ``max_concurrency`` threads; writes into ``local`` happen in the calling thread (h5py is not
        thread-safe), and ``local`` is flushed at the end, also after an error. Resumable: a re-run
        fetches only what ``local`` still lacks.

        Returns stats: ``downloaded`` (weights), ``deltas_downloaded``, ``skipped`` (already local),
        ``failed``, ``bytes_transferred`` (payload + metadata bytes received), ``uploaded`` and
        ``deltas_uploaded`` (0), ``seconds``.

        Raises:
            SyncIncompleteError: some objects were not copied: damaged on the remote (the good ones
                are still copied) or the connection failed (``.failures``, ``.stats``).
            ReadOnlyStoreError: ``local`` is open read-only.
        """
        self._live()
        if getattr(local, "mode", "a") == "r":
            raise ReadOnlyStoreError(f"cannot sync into {local.filepath}: it is open read-only (mode='r')")
        return engine.sync(
            S3ObjectSource(self.objects),
            LocalSink(local),
            verb="downloaded",
            max_concurrency=self.config.max_concurrency,
            progress=self._progress(progress),
            desc=f"pull {self.url}",
            read_ahead_bytes=self.client.transfer.read_ahead_bytes,
        )

    # ---------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint!r})"
