"""`HDF5Store`: a content-addressed store of tensors in one HDF5 file.

Layout::

    /                       attrs: coral_format, format_version
    /weights/<hash>         one dataset per tensor; metadata in its JSON attribute "coral"
    /metadata/              reserved
    /deltas/<hash>          one dataset per delta, keyed by the hash of the tensor it rebuilds

With the default ``compression="coral"`` a dataset holds one encoded blob (byte-plane split +
zstd, see :mod:`coral_torch.codec`), encoded outside h5py on all cores. With ``None``, ``"gzip"``,
``"lzf"`` or ``"szip"`` it holds the values themselves with that HDF5 filter, readable by any HDF5
tool. Every load is checked against the content hash.

HDF5 is not crash-safe: a killed writer can leave a file unreadable. The repository therefore writes
each pack under a temporary name and publishes it by rename once it is complete and fsynced.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from ..errors import CompressionUnavailableError, HashMismatchError
from ..format import codec, dtypes
from ..format.delta import ARRAY_LAYOUT_KEY, Delta, restore_payload, storage_payload
from ..format.objects import (  # the one description of a stored object (re-exported here)
    ENCODING_CODEC,
    ENCODING_VALUES,
    EXTRA_PREFIX,
    PreparedObject,
    as_text,
    decode_weight,
    delta_attrs,
    delta_from_description,
    delta_logical_bytes,
    delta_metadata,
    weight_attrs,
    weight_metadata,
)
from ..format.weight_tensor import WeightMetadata, WeightTensor
from ..parallel import run_parallel
from .hdf5_pack import (  # the file mechanics (FORMAT_*, META_ATTR re-exported here)
    FORMAT_NAME as FORMAT_NAME,
    FORMAT_VERSION as FORMAT_VERSION,
    META_ATTR as META_ATTR,
    HDF5PackFile,
    read_attrs,
)
from .weight_store import WeightStore

CODEC_COMPRESSION = "coral"
COMPRESSIONS = (CODEC_COMPRESSION, None, "gzip", "lzf", "szip")


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def delta_object(delta: Delta, key: str, payload: np.ndarray | codec.Blob) -> PreparedObject:
    """A delta's payload and description, ready for any store (``delta.data`` is not read)."""
    return PreparedObject(
        key,
        "deltas",
        payload,
        delta_attrs(delta, payload),
        delta_logical_bytes(delta.original_shape, delta.original_dtype),
    )


def _values_view(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The bytes as an array of an HDF5 atomic numeric type (complex -> float pairs, bool -> u1)."""
    np_dtype = dtypes.storage_numpy_dtype(dtype)
    if np_dtype.kind == "c":
        half = np.dtype(f"<f{np_dtype.itemsize // 2}")
        return raw.view(half).reshape(shape + (2,))
    if np_dtype.kind == "b":
        return raw.view(np.uint8).reshape(shape)
    return raw.view(np_dtype).reshape(shape)


class HDF5Store(HDF5PackFile, WeightStore):
    """Local weight store in one HDF5 file.

    Args:
        filepath: the ``.h5`` file.
        compression: ``"coral"`` (default: byte-plane split + zstd, lossless, fastest and smallest),
            ``None``, ``"gzip"``, ``"lzf"`` or ``"szip"`` (HDF5 filters).
        compression_opts: zstd level for ``"coral"`` (default 1), 0-9 for ``"gzip"`` (default 4),
            an ``(options_mask, pixels_per_block)`` tuple for ``"szip"``.
        mode: ``"a"`` open or create (default), ``"r"`` read-only, ``"w"`` create or truncate an
            existing *store*, ``"x"`` create, failing if the file exists. Creating makes missing
            parent directories. An existing empty (0-byte) file counts as no store yet: ``"a"`` and
            ``"w"`` initialise it (as h5py's mode ``"a"`` does), ``"r"`` finds no store in it. Any
            other file that exists but is not a coral-torch store is never modified.
        workers: threads used by the batch operations to hash and encode.
        direct_io: write large encoded payloads around the page cache (``O_DIRECT``) where the
            file system supports it (see :mod:`coral_torch.storage.direct_io`): far less CPU per
            byte, but each write waits for the device. For background writers; the default
            (buffered) lets a caller that waits for the store return at memory speed.
        sync_every: ``fdatasync`` the file on a background thread each time this many payload
            bytes were written (:class:`~coral_torch.storage.direct_io.BackgroundSync`), so that
            the owner's final fsync has only the tail to flush. ``None`` (default): no syncs here.
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        compression: str | None = CODEC_COMPRESSION,
        compression_opts: Any = None,
        mode: str = "a",
        workers: int | None = None,
        direct_io: bool = False,
        sync_every: int | None = None,
    ):
        compression, compression_opts = self._check_compression(compression, compression_opts)
        self.workers = workers or _default_workers()
        super().__init__(filepath, mode, compression, compression_opts, direct_io=direct_io, sync_every=sync_every)

    # ---------------------------------------------------------------------------------- set-up
    @staticmethod
    def _check_compression(compression: str | None, opts: Any) -> tuple[str | None, Any]:
        if compression not in COMPRESSIONS:
            raise CompressionUnavailableError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")
        if compression == CODEC_COMPRESSION:
            level = codec.DEFAULT_LEVEL if opts is None else int(opts)
            if not -7 <= level <= 22:
                raise CompressionUnavailableError(f"zstd level must be in -7..22, not {opts!r}")
            return compression, level
        if compression == "gzip":
            level = 4 if opts is None else opts
            if not isinstance(level, int) or not 0 <= level <= 9:
                raise CompressionUnavailableError(f"gzip compression_opts must be an int 0-9, not {opts!r}")
            return compression, level
        if compression == "szip":
            if not h5py.h5z.filter_avail(h5py.h5z.FILTER_SZIP):
                raise CompressionUnavailableError(
                    "this HDF5 build has no szip filter; use compression='coral', 'gzip' or 'lzf'"
                )
            return compression, opts if opts is not None else ("nn", 16)
        if opts is not None:
            raise CompressionUnavailableError(f"compression {compression!r} takes no compression_opts")
        return compression, None

    # ------------------------------------------------------------------------- encode (no h5py)
    def prepare(self, weight: WeightTensor, hash_key: str | None = None, *, segmented: bool = False) -> PreparedObject:
        """Hash and encode ``weight`` for writing. Thread-safe; touches no HDF5 state.

        ``segmented``: the payload may be a :class:`codec.Blob` that references the encoder's split
        buffer and ``weight``'s own bytes (no joining copy); only for callers that write it with
        :meth:`write_prepared` before ``weight`` changes."""
        return self._prepare(weight, hash_key, segmented=segmented)

    def _prepare(self, weight: WeightTensor, hash_key: str | None, segmented: bool) -> PreparedObject:
        """``segmented``: the payload may be a :class:`codec.Blob` that references the split buffer
        and ``weight``'s own bytes; only for callers that write it before ``weight`` changes."""
        digest = weight.compute_hash()
        meta = weight.metadata
        payload: np.ndarray | codec.Blob
        if self.compression == CODEC_COMPRESSION:
            level = self.compression_opts
            itemsize = dtypes.itemsize(meta.dtype)
            payload = (
                codec.encode_blob(weight.raw, itemsize, level, spill_dir=self.spill_dir)
                if segmented
                else codec.encode(weight.raw, itemsize, level)
            )
            encoding = ENCODING_CODEC
        else:
            payload = _values_view(weight.raw, meta.dtype, meta.shape)
            encoding = ENCODING_VALUES
        attrs = weight_attrs(meta, digest, weight.nbytes, encoding, payload)
        if hash_key is not None and hash_key != digest:
            attrs["custom_key"] = True
        return PreparedObject(hash_key or digest, "weights", payload, attrs, weight.nbytes)

    def prepare_delta(self, delta: Delta, delta_hash: str) -> PreparedObject:
        """Encode ``delta`` for writing under ``delta_hash``. Bytes payloads are written as they
        are; an ndarray payload is codec-encoded and its dtype/shape recorded, so that
        :meth:`load_delta` gives the same ndarray back."""
        level = self.compression_opts if self.compression == CODEC_COMPRESSION else codec.DEFAULT_LEVEL
        payload, layout = storage_payload(delta, level)
        obj = delta_object(delta, delta_hash, payload)
        if layout is not None:
            # an extra_ attribute: it travels with the object wherever extras go (S3 sync)
            obj.attrs[f"{EXTRA_PREFIX}{ARRAY_LAYOUT_KEY}"] = layout
        else:
            obj.attrs.pop(f"{EXTRA_PREFIX}{ARRAY_LAYOUT_KEY}", None)
        return obj

    def store(self, weight: WeightTensor, hash_key: str | None = None) -> str:
        """Store one tensor (idempotent) and return its key."""
        self.writable_file()
        key = hash_key or weight.compute_hash()
        if key not in self.file["weights"]:
            self.write_prepared(self.prepare(weight, key))
            self.file.flush()
        return key

    def store_batch(self, weights: dict[str, WeightTensor]) -> dict[str, str]:
        """Store many tensors: hashing and encoding run on ``workers`` threads, writes in order."""
        self.writable_file()
        result: dict[str, str] = {}
        todo: list[WeightTensor] = []
        seen: set[str] = set()
        group = self.file["weights"]
        for name, w in weights.items():
            h = w.compute_hash()
            result[name] = h
            if h not in seen and h not in group:
                seen.add(h)
                todo.append(w)
        # each worker encodes and writes its own objects (largest first): no payload waits in a
        # queue for one writer, and no thread idles behind a large tensor
        run_parallel(
            lambda w: self.write_prepared(self._prepare(w, None, True)),
            todo,
            self.workers,
            cost=lambda w: w.nbytes,
            name="coral-encode",
        )
        self.file.flush()
        return result

    # -------------------------------------------------------------------------------- read
    def exists(self, hash_key: str) -> bool:
        return hash_key in self.readable_file()["weights"]

    def load(self, hash_key: str) -> WeightTensor | None:
        """Load and verify one tensor; ``None`` if the key is unknown.

        Raises:
            HashMismatchError / CorruptObjectError: the stored bytes are damaged.
        """
        ds = self.dataset("weights", hash_key)
        if ds is None:
            return None
        attrs = read_attrs(ds, hash_key)
        meta = self._metadata_from_attrs(attrs, hash_key)
        if meta.hash != hash_key and not attrs.get("custom_key"):
            raise HashMismatchError(
                f"object stored under {hash_key} in {self.filepath} describes itself as {meta.hash}: "
                "the store was tampered with or damaged; it was not returned",
                hash_key=hash_key,
            )
        payload = self.read_payload(ds, hash_key, attrs)
        return decode_weight(
            payload, attrs, hash_key, f" in {self.filepath}", default_encoding=ENCODING_VALUES, copy=False
        )

    def load_batch(self, hash_keys: list[str]) -> dict[str, WeightTensor]:
        out: dict[str, WeightTensor] = {}
        for key in hash_keys:
            w = self.load(key)
            if w is not None:
                out[key] = w
        return out

    def get_metadata(self, hash_key: str) -> WeightMetadata | None:
        f = self.readable_file()
        if hash_key in f["weights"]:
            return self._metadata_from_attrs(read_attrs(f["weights"][hash_key], hash_key), hash_key)
        if hash_key in f["deltas"]:
            return delta_metadata(read_attrs(f["deltas"][hash_key], hash_key), hash_key)
        return None

    @staticmethod
    def _metadata_from_attrs(attrs: Any, hash_key: str) -> WeightMetadata:
        return weight_metadata(attrs, hash_key, default_encoding=ENCODING_VALUES)

    def list_weights(self) -> list[str]:
        return list(self.readable_file()["weights"].keys())

    def delete(self, hash_key: str) -> bool:
        group = self.writable_file()["weights"]
        if hash_key not in group:
            return False
        del group[hash_key]
        return True

    # ------------------------------------------------------------------------------ deltas
    def store_delta(self, delta: Delta, delta_hash: str) -> str:
        """Store a delta under ``delta_hash`` (normally the hash of the tensor it rebuilds;
        idempotent) and return the key. ``delta.data`` may be bytes or an ndarray; either comes
        back as it went in from :meth:`load_delta`."""
        self.writable_file()
        if delta_hash not in self.file["deltas"]:
            self.write_prepared(self.prepare_delta(delta, delta_hash))
            self.file.flush()
        return delta_hash

    def load_delta(self, delta_hash: str) -> Delta | None:
        """Load and checksum-verify a delta; ``None`` if absent. ``data`` has the type it was
        stored with: ``bytes``, or an ndarray of the stored dtype and shape.

        Raises:
            CorruptObjectError: the payload or its description is damaged.
        """
        ds = self.dataset("deltas", delta_hash)
        if ds is None:
            return None
        a = read_attrs(ds, delta_hash)
        payload = self.read_payload(ds, delta_hash, a)
        layout_attr = f"{EXTRA_PREFIX}{ARRAY_LAYOUT_KEY}"  # how data is given back; not one of the delta's extras
        data = restore_payload(payload.reshape(-1).view(np.uint8), a.get(layout_attr), key=delta_hash)
        return delta_from_description({k: v for k, v in a.items() if k != layout_attr}, data, delta_hash)

    def delta_exists(self, delta_hash: str) -> bool:
        return delta_hash in self.readable_file()["deltas"]

    def list_deltas(self) -> list[str]:
        return list(self.readable_file()["deltas"].keys())

    def delete_delta(self, delta_hash: str) -> bool:
        group = self.writable_file()["deltas"]
        if delta_hash not in group:
            return False
        del group[delta_hash]
        return True

    # ------------------------------------------------------------------------------- stats
    def get_storage_info(self) -> dict[str, Any]:
        """Statistics of the store's weights (full tensors; deltas are counted apart).

        Keys: ``filepath``; ``file_size`` (bytes of the .h5 file, HDF5 overhead and deltas
        included); ``compression`` (used for new writes); ``compressions_found``;
        ``total_weights``; ``total_bytes`` (logical size of the weights); ``compressed_bytes``
        (their datasets' bytes on disk); ``compression_ratio``: ``compressed_bytes / total_bytes``,
        the *fraction of the original size that is stored* (0.40 means the weights take 40% of
        their size, 60% saved; smaller is better; 1.0 for an empty store). It is not the "fraction
        saved" that some Coral documentation calls compression ratio. ``total_deltas`` and
        ``delta_bytes`` (see :meth:`get_delta_storage_info`).
        """
        f = self.readable_file()
        total = compressed = 0
        found: set[str] = set()
        weights = f["weights"]
        for key in weights:
            ds = weights[key]
            a = read_attrs(ds, key)
            total += int(a.get("nbytes", ds.nbytes))
            compressed += int(ds.id.get_storage_size())
            if as_text(a.get("encoding", ENCODING_VALUES)) == ENCODING_CODEC:
                found.add(CODEC_COMPRESSION)
            else:
                found.add(str(ds.compression))
        deltas = self.get_delta_storage_info()
        if self.mode != "r":
            f.flush()
        return {
            "filepath": str(self.filepath),
            "file_size": self.filepath.stat().st_size if self.filepath.exists() else 0,
            "compression": self.compression,
            "compressions_found": sorted(found),
            "total_weights": len(weights),
            "total_bytes": total,
            "compressed_bytes": compressed,
            "compression_ratio": (compressed / total) if total else 1.0,
            "total_deltas": deltas["total_deltas"],
            "delta_bytes": deltas["total_delta_bytes"],
        }

    def get_delta_storage_info(self) -> dict[str, Any]:
        """Keys: ``total_deltas``; ``total_delta_bytes`` (their datasets' bytes on disk);
        ``total_original_bytes`` (size of the tensors they rebuild); ``average_ratio``:
        ``total_delta_bytes / total_original_bytes`` (stored/original, smaller is better; 1.0
        when there are none)."""
        group = self.readable_file()["deltas"]
        n = size = original = 0
        for key in group:
            ds = group[key]
            n += 1
            size += int(ds.id.get_storage_size())
            a = read_attrs(ds, key)
            original += delta_logical_bytes(a["original_shape"], as_text(a["original_dtype"]))
        return {
            "total_deltas": n,
            "total_delta_bytes": size,
            "total_original_bytes": original,
            "average_ratio": (size / original) if original else 1.0,
        }

    def __repr__(self) -> str:
        return f"HDF5Store({str(self.filepath)!r}, compression={self.compression!r}, mode={self.mode!r})"
