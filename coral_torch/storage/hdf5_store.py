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

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np

from .. import codec, dtypes
from ..delta import ARRAY_LAYOUT_KEY, Delta, restore_payload, storage_payload
from ..errors import (
    CompressionUnavailableError,
    CoralError,
    CorruptObjectError,
    HashMismatchError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreNotFoundError,
)
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
    jsonable,
    payload_checksum,
    weight_attrs,
    weight_metadata,
)
from ..parallel import run_parallel
from ..weight_tensor import WeightMetadata, WeightTensor
from .direct_io import MIN_DIRECT_BYTES, PAGE, PayloadWriter
from .weight_store import WeightStore

log = logging.getLogger(__name__)

FORMAT_NAME = "coral-torch-hdf5"
FORMAT_VERSION = 1
CODEC_COMPRESSION = "coral"
COMPRESSIONS = (CODEC_COMPRESSION, None, "gzip", "lzf", "szip")
_MIN_FILTER_BYTES = 4096
META_ATTR = "coral"  # JSON metadata of each dataset
_PWRITE_MIN_BYTES = 1  # codec payloads are written with pwrite (see _create_for_pwrite)
# large datasets start on a page boundary, so their payload can be written with O_DIRECT
_ALIGNMENT = {"alignment_threshold": MIN_DIRECT_BYTES, "alignment_interval": PAGE}
_JSON_TYPE = h5py.h5t.py_create(h5py.string_dtype("utf-8"), logical=True)  # variable-length UTF-8


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _read_only(path: Path, exc: OSError) -> ReadOnlyStoreError:
    """h5py's "cannot create/open" error (HDF5's flags and all) as one line; ``errno`` and
    ``filename`` are kept, so a repository can name its own read-only error."""
    assert exc.errno is not None  # one of _READ_ONLY_ERRNOS
    err = ReadOnlyStoreError(
        f"cannot write {path}: {os.strerror(exc.errno)} (read-only mount or no write permission); "
        "open it with mode='r' to read it, or write to a writable location"
    )
    err.errno, err.filename = exc.errno, str(path)
    return err


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


class HDF5Store(WeightStore):
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
        self.filepath = Path(filepath)
        self.compression, self.compression_opts = self._check_compression(compression, compression_opts)
        if mode not in ("a", "r", "w", "x"):
            raise StoreError(f"mode must be 'a', 'r', 'w' or 'x', not {mode!r}")
        self.mode = mode
        self.workers = workers or _default_workers()
        self.direct_io = direct_io
        self.sync_every = sync_every
        self._writer: PayloadWriter | None = None  # payload bytes, outside h5py (see _create_for_pwrite)
        self._lock = threading.RLock()  # HDF5 calls of concurrent writers (see write_prepared)
        self._groups: dict[str, h5py.Group] = {}
        self._pwrite_dcpl: Any = None  # dataset creation property list of _create_for_pwrite
        self.file = self._open(mode)

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

    def _open(self, mode: str) -> h5py.File:
        path = self.filepath
        exists = path.exists()
        if mode == "r" and not exists:
            raise StoreNotFoundError(f"no store at {path}: the file does not exist (mode 'r' creates nothing)")
        if mode == "x" and exists:
            raise StoreError(f"{path} already exists; open it with mode='a' or choose another path")
        if exists and path.is_file() and path.stat().st_size == 0:
            # an empty file (touch, mkstemp, NamedTemporaryFile) holds nothing to protect
            if mode == "r":
                raise StoreNotFoundError(
                    f"no store at {path}: the file is empty (mode 'r' creates nothing); "
                    "open it with mode='a' to create a store in it"
                )
            exists = False
        if exists:
            if path.is_dir():
                raise NotAStoreError(f"{path} is a directory, not an HDF5 store file")
            if not h5py.is_hdf5(str(path)):
                raise NotAStoreError(
                    f"{path} exists but is not an HDF5 file; it was left untouched. Choose another path."
                )
            try:
                with h5py.File(path, "r") as probe:
                    self._check_format(probe)
            except OSError as exc:
                raise NotAStoreError(f"{path} is an HDF5 file that cannot be read: {exc}") from exc
        if mode in ("w", "x") or not exists:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = h5py.File(path, "w" if mode in ("w", "a") else "x", **self._alignment())
            except OSError as exc:
                if exc.errno not in _READ_ONLY_ERRNOS:
                    raise
                raise _read_only(path, exc) from exc
            f.attrs["coral_format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            for g in ("weights", "metadata", "deltas"):
                f.require_group(g)
            f.flush()
            return f
        try:
            return h5py.File(path, "r") if mode == "r" else h5py.File(path, "a", **self._alignment())
        except OSError as exc:
            if mode != "r" and exc.errno in _READ_ONLY_ERRNOS:
                raise _read_only(path, exc) from exc
            raise StoreError(
                f"cannot open {path} in mode {mode!r}: {exc}. Another process may hold it open for writing."
            ) from exc

    @property
    def spill_dir(self) -> Path:
        """Where an encoder of this store spills what does not fit its in-memory budget (see
        :func:`coral_torch.codec.encode_blob`): beside the file, so the copy into it stays in the kernel."""
        return self.filepath.parent

    def _alignment(self) -> dict[str, int]:
        """With direct I/O, large datasets start on a page boundary (O_DIRECT needs aligned
        offsets); otherwise HDF5 packs them back to back."""
        return _ALIGNMENT if self.direct_io else {}

    def _check_format(self, f: h5py.File) -> None:
        fmt = f.attrs.get("coral_format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT_NAME or not all(g in f for g in ("weights", "deltas")):
            raise NotAStoreError(f"{self.filepath} is an HDF5 file but not a coral-torch store; it was left untouched")
        version = int(f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise NotAStoreError(
                f"{self.filepath} has store format {version}, newer than this coral-torch "
                f"understands ({FORMAT_VERSION}); upgrade coral-torch"
            )

    def _writable(self) -> h5py.File:
        if self.file is None or not self.file.id.valid:
            raise StoreError(f"store {self.filepath} is closed")
        if self.mode == "r":
            raise ReadOnlyStoreError(f"store {self.filepath} is open read-only (mode='r')")
        return self.file

    def _readable(self) -> h5py.File:
        if self.file is None or not self.file.id.valid:
            raise StoreError(f"store {self.filepath} is closed")
        return self.file

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

    # ------------------------------------------------------------------------------- write
    def write_prepared(self, obj: PreparedObject) -> bool:
        """Write a prepared object; ``False`` if the key was already present (nothing written).

        Thread-safe: HDF5 calls run under the store's lock, the payload bytes of large encoded
        objects are written after it is released (``pwrite``, no GIL), so several threads can
        encode and write at once."""
        self._writable()
        by_pwrite = self._pwrite_ok(obj)
        if isinstance(obj.payload, codec.Blob) and not by_pwrite:
            obj.payload = obj.payload.to_array()  # small: one contiguous buffer for h5py
        payload = obj.payload
        with self._lock:
            group = self._group(obj.group)
            if _has_link(group, obj.key):
                return False
            offset: int | None
            try:
                if by_pwrite:
                    dsid, offset = self._create_for_pwrite(group, obj.key, payload.nbytes)
                else:
                    assert isinstance(payload, np.ndarray)  # a Blob became an array above
                    kwargs = self._filter_kwargs(obj)
                    ds = group.create_dataset(obj.key, data=payload, **kwargs)
                    dsid = ds.id
                    offset = dsid.get_offset() if ds.chunks is None and payload.size else None
                # one JSON attribute, not one HDF5 attribute per field: measured ~4x cheaper per
                # dataset to write and to read (h5py attribute calls dominate small tensors);
                # written with the low-level API (3x cheaper than ds.attrs[...] = ..., same type)
                text = json.dumps(jsonable(obj.attrs), separators=(",", ":"))
                aid = h5py.h5a.create(dsid, META_ATTR.encode(), _JSON_TYPE, h5py.h5s.create(h5py.h5s.SCALAR))
                aid.write(np.array(text, dtype=h5py.string_dtype("utf-8")))
            except Exception:
                if obj.key in group:  # never leave a dataset without its attributes
                    del group[obj.key]
                raise
        if by_pwrite:
            assert offset is not None  # _create_for_pwrite always gives one
            try:
                self._pwrite_all(payload, offset)
            except BaseException:
                with self._lock:
                    if obj.key in group:
                        del group[obj.key]
                raise
        if offset is not None:
            obj.location = (int(offset), int(payload.nbytes))
        return True

    def _group(self, name: str) -> h5py.Group:
        g = self._groups.get(name)
        if g is None or not g.id.valid:
            g = self._groups[name] = self.file[name]
        return g

    def _filter_kwargs(self, obj: PreparedObject) -> dict[str, Any]:
        # HDF5 filters need chunked layout; below a few KiB they only add overhead (and szip refuses
        # chunks smaller than its block), so tiny datasets are stored plain.
        payload = cast(np.ndarray, obj.payload)  # not a Blob: those are written by pwrite
        if (
            obj.attrs.get("encoding") == ENCODING_VALUES
            and payload.nbytes >= _MIN_FILTER_BYTES
            and payload.ndim > 0
            and self.compression is not None
        ):
            kwargs: dict[str, Any] = {"compression": self.compression}
            if self.compression_opts is not None:
                kwargs["compression_opts"] = self.compression_opts
            return kwargs
        return {}

    def _pwrite_ok(self, obj: PreparedObject) -> bool:
        p = obj.payload
        if isinstance(p, codec.Blob):
            return p.nbytes >= _PWRITE_MIN_BYTES
        return (
            obj.attrs.get("encoding", ENCODING_CODEC) == ENCODING_CODEC
            and p.dtype == np.uint8
            and p.ndim == 1
            and p.nbytes >= _PWRITE_MIN_BYTES
            and p.flags.c_contiguous
        )

    def _create_for_pwrite(self, group: h5py.Group, key: str, size: int) -> tuple[Any, int]:
        """Create a contiguous uint8 dataset with its space allocated at once and return it with
        its file offset; the caller writes the bytes there with ``pwrite`` on a plain descriptor.
        h5py keeps the GIL while it copies data; a ``pwrite`` releases it, so other threads keep
        encoding during the write. HDF5 never touches an early-allocated, never-filled contiguous
        dataset's space after this."""
        if self._pwrite_dcpl is None:  # one property list for all of them (called under self._lock)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            self._pwrite_dcpl = dcpl
        space = h5py.h5s.create_simple((size,))
        dsid = h5py.h5d.create(group.id, key.encode(), h5py.h5t.STD_U8LE, space, dcpl=self._pwrite_dcpl)
        offset = dsid.get_offset()
        if offset is None:  # pragma: no cover - early allocation always gives an address
            raise StoreError(f"HDF5 gave no file offset for {key}")
        if self._writer is None:
            self._writer = PayloadWriter(self.filepath, direct=self.direct_io, sync_every=self.sync_every)
        return dsid, int(offset)

    def _pwrite_all(self, payload: np.ndarray | codec.Blob, offset: int) -> None:
        segments = payload.segments if isinstance(payload, codec.Blob) else [memoryview(payload).cast("B")]  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
        assert self._writer is not None
        self._writer.write(segments, offset)

    def store(self, weight: WeightTensor, hash_key: str | None = None) -> str:
        """Store one tensor (idempotent) and return its key."""
        self._writable()
        key = hash_key or weight.compute_hash()
        if key not in self.file["weights"]:
            self.write_prepared(self.prepare(weight, key))
            self.file.flush()
        return key

    def store_batch(self, weights: dict[str, WeightTensor]) -> dict[str, str]:
        """Store many tensors: hashing and encoding run on ``workers`` threads, writes in order."""
        self._writable()
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

    def flush(self) -> None:
        self._writable().flush()

    # -------------------------------------------------------------------------------- read
    def exists(self, hash_key: str) -> bool:
        return hash_key in self._readable()["weights"]

    def _read_payload(self, ds: h5py.Dataset, hash_key: str, attrs: dict[str, Any] | None = None) -> np.ndarray:
        try:
            payload = ds[()]
        except (OSError, ValueError) as exc:
            raise CorruptObjectError(
                f"object {hash_key} in {self.filepath} cannot be read: {exc}", hash_key=hash_key
            ) from exc
        payload = np.asarray(payload)
        expected = (attrs if attrs is not None else _read_attrs(ds, hash_key)).get("payload_xxh3")
        if expected is not None and payload_checksum(payload) != as_text(expected):
            raise CorruptObjectError(
                f"object {hash_key} in {self.filepath} is damaged (payload checksum mismatch); it was not returned",
                hash_key=hash_key,
            )
        return payload

    def _dataset(self, group: str, key: str) -> h5py.Dataset | None:
        """The dataset of ``key`` in ``group``, None if there is none. What HDF5 meets finding and
        opening it in a damaged file (group index, object header) is :class:`CorruptObjectError`."""
        self._readable()
        try:
            g = self._group(group)
            ds = g[key] if key in g else None  # not g.get(): that takes HDF5's failure to open it for absence
        except (KeyError, RuntimeError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the OS's I/O error: named as such above
                raise
            raise CorruptObjectError(
                f"object {key} in {self.filepath} cannot be read: its HDF5 structure is "
                f"damaged ({type(exc).__name__}: {exc})",
                hash_key=key,
            ) from exc
        if ds is not None and not isinstance(ds, h5py.Dataset):  # a damaged object header's type
            raise CorruptObjectError(
                f"object {key} in {self.filepath} cannot be read: HDF5 finds a "
                f"{type(ds).__name__} there, not a dataset (its header is damaged)",
                hash_key=key,
            )
        return ds

    def location(self, key: str, group: str = "weights") -> tuple[int, int] | None:
        """``(file offset, length)`` of the bytes HDF5 reads as the payload of ``key`` (its dataset's
        contiguous storage), or None if it is stored otherwise; :class:`CorruptObjectError` if HDF5
        cannot open it."""
        self._readable()
        try:
            dsid = h5py.h5d.open(self._group(group).id, key.encode())
            offset = dsid.get_offset()
            return None if offset is None else (int(offset), int(dsid.get_storage_size()))
        except (KeyError, RuntimeError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise CorruptObjectError(
                f"object {key} in {self.filepath} cannot be read: its HDF5 structure is "
                f"damaged ({type(exc).__name__}: {exc})",
                hash_key=key,
            ) from exc

    def read_prepared(self, key: str, group: str = "weights") -> PreparedObject | None:
        """The stored payload and attributes of one object, exactly as written, checksum-verified
        but not decoded. Used to copy objects between stores without re-encoding."""
        ds = self._dataset(group, key)
        if ds is None:
            return None
        attrs = _read_attrs(ds, key)
        payload = self._read_payload(ds, key, attrs)
        try:
            if group == "weights":
                logical = int(attrs.get("nbytes", payload.nbytes))
            else:
                logical = delta_logical_bytes(attrs["original_shape"], as_text(attrs["original_dtype"]))
        except (KeyError, ValueError, TypeError, CoralError) as exc:
            raise CorruptObjectError(
                f"metadata of object {key} in {self.filepath} is damaged: {exc!r}", hash_key=key
            ) from exc
        return PreparedObject(key, group, payload, attrs, logical)

    def load(self, hash_key: str) -> WeightTensor | None:
        """Load and verify one tensor; ``None`` if the key is unknown.

        Raises:
            HashMismatchError / CorruptObjectError: the stored bytes are damaged.
        """
        ds = self._dataset("weights", hash_key)
        if ds is None:
            return None
        attrs = _read_attrs(ds, hash_key)
        meta = self._metadata_from_attrs(attrs, hash_key)
        if meta.hash != hash_key and not attrs.get("custom_key"):
            raise HashMismatchError(
                f"object stored under {hash_key} in {self.filepath} describes itself as {meta.hash}: "
                "the store was tampered with or damaged; it was not returned",
                hash_key=hash_key,
            )
        payload = self._read_payload(ds, hash_key, attrs)
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
        f = self._readable()
        if hash_key in f["weights"]:
            return self._metadata_from_attrs(_read_attrs(f["weights"][hash_key], hash_key), hash_key)
        if hash_key in f["deltas"]:
            return delta_metadata(_read_attrs(f["deltas"][hash_key], hash_key), hash_key)
        return None

    @staticmethod
    def _metadata_from_attrs(attrs: Any, hash_key: str) -> WeightMetadata:
        return weight_metadata(attrs, hash_key, default_encoding=ENCODING_VALUES)

    def list_weights(self) -> list[str]:
        return list(self._readable()["weights"].keys())

    def delete(self, hash_key: str) -> bool:
        group = self._writable()["weights"]
        if hash_key not in group:
            return False
        del group[hash_key]
        return True

    # ------------------------------------------------------------------------------ deltas
    def store_delta(self, delta: Delta, delta_hash: str) -> str:
        """Store a delta under ``delta_hash`` (normally the hash of the tensor it rebuilds;
        idempotent) and return the key. ``delta.data`` may be bytes or an ndarray; either comes
        back as it went in from :meth:`load_delta`."""
        self._writable()
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
        ds = self._dataset("deltas", delta_hash)
        if ds is None:
            return None
        a = _read_attrs(ds, delta_hash)
        payload = self._read_payload(ds, delta_hash, a)
        layout_attr = f"{EXTRA_PREFIX}{ARRAY_LAYOUT_KEY}"  # how data is given back; not one of the delta's extras
        data = restore_payload(payload.reshape(-1).view(np.uint8), a.get(layout_attr), key=delta_hash)
        return delta_from_description({k: v for k, v in a.items() if k != layout_attr}, data, delta_hash)

    def delta_exists(self, delta_hash: str) -> bool:
        return delta_hash in self._readable()["deltas"]

    def list_deltas(self) -> list[str]:
        return list(self._readable()["deltas"].keys())

    def delete_delta(self, delta_hash: str) -> bool:
        group = self._writable()["deltas"]
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
        f = self._readable()
        total = compressed = 0
        found: set[str] = set()
        weights = f["weights"]
        for key in weights:
            ds = weights[key]
            a = _read_attrs(ds, key)
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
        group = self._readable()["deltas"]
        n = size = original = 0
        for key in group:
            ds = group[key]
            n += 1
            size += int(ds.id.get_storage_size())
            a = _read_attrs(ds, key)
            original += delta_logical_bytes(a["original_shape"], as_text(a["original_dtype"]))
        return {
            "total_deltas": n,
            "total_delta_bytes": size,
            "total_original_bytes": original,
            "average_ratio": (size / original) if original else 1.0,
        }

    # ----------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the file; raises what a background sync of its payloads met (the file is closed
        all the same)."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        finally:
            if self.file is not None and self.file.id.valid:
                self.file.close()
            self.file = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"HDF5Store({str(self.filepath)!r}, compression={self.compression!r}, mode={self.mode!r})"


def _has_link(group: h5py.Group, key: str) -> bool:
    """``key in group`` for a plain name, through the low-level call (a quarter of the cost)."""
    if not key or "/" in key or key.startswith("."):  # paths, "." and ".." mean what h5py says they mean
        return key in group
    return bool(group.id.links.exists(key.encode()))


def _read_attrs(ds: h5py.Dataset, key: str) -> dict[str, Any]:
    """A dataset's metadata: the JSON attribute, or (files from before it) one attribute per field."""
    try:
        raw = ds.attrs.get(META_ATTR)
        if raw is None:
            return {k: _py(v) for k, v in ds.attrs.items()}
    except (KeyError, RuntimeError, ValueError, OSError) as exc:  # HDF5 attribute storage damaged
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise CorruptObjectError(
            f"metadata of object {key} cannot be read: {type(exc).__name__}: {exc}", hash_key=key
        ) from exc
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (ValueError, TypeError) as exc:
        raise CorruptObjectError(f"metadata of object {key} is damaged: {exc}", hash_key=key) from exc


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
